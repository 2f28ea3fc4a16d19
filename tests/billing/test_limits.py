"""Rate limits on both backends (Redis database 2, and the database): atomic under concurrent
requests from threads and from separate processes, DRF's sliding-log semantics, Retry-After."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from django.db import connection, transaction

from billing import limits
from billing.limits import REDIS_KEY_PREFIX, Rate, hit
from billing.models import RateLimitHit
from chat.errors import RateLimited
from chat.redis_client import close_redis, get_redis
from tests.billing.conftest import REDIS_TEST_URL, redis_or_skip, run_in_threads

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["database", "redis"])
async def backend(request, settings, redis_keys):
    """Runs a test once per backend; `backend.key()` makes a fresh key (deleted after)."""
    if request.param == "redis":
        redis_or_skip()
        settings.REDIS_URL = REDIS_TEST_URL
    else:
        settings.REDIS_URL = ""

    class Backend:
        name = request.param

        @staticmethod
        def track(key: str) -> str:
            """Delete `key`'s sorted set from Redis after the test."""
            redis_keys.append(REDIS_KEY_PREFIX + key)
            return key

        @classmethod
        def key(cls) -> str:
            return cls.track(f"test:{uuid.uuid4().hex}")

    yield Backend
    await close_redis()


async def test_twelve_concurrent_hits_against_5_per_minute_admit_five(backend):
    key = backend.key()
    results = await asyncio.gather(*(hit(key=key, rate=Rate(5, 60)) for _ in range(12)))
    assert results.count(None) == 5
    assert all(wait is not None and 59 < wait <= 60 for wait in results if wait is not None)
    if backend.name == "database":
        assert await RateLimitHit.objects.filter(key=key).acount() == 5


def test_concurrent_hits_from_threads_each_with_its_own_loop_admit_five(backend):
    key = backend.key()

    def one(_: int) -> float | None:
        async def go() -> float | None:
            try:
                return await hit(key=key, rate=Rate(5, 60))
            finally:
                await close_redis()

        return asyncio.run(go())

    results = run_in_threads(12, one)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert results.count(None) == 5


def _database_url() -> str:
    conf = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{conf['NAME']}"
    assert connection.vendor == "postgresql"
    auth = conf["USER"] + (f":{conf['PASSWORD']}" if conf["PASSWORD"] else "")
    return f"postgres://{auth}@{conf['HOST'] or '127.0.0.1'}:{conf['PORT'] or 5432}/{conf['NAME']}"


def test_concurrent_hits_from_separate_processes_admit_five(backend):
    key = backend.key()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": _database_url(),
        "REDIS_URL": REDIS_TEST_URL if backend.name == "redis" else "",
    }
    command = [sys.executable, "-m", "tests.billing.hit_worker", key, "5", "60", "4"]
    processes = [
        subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for process in processes:
            assert process.stdout.readline().strip() == "ready", process.stderr.read()
        for process in processes:  # all three are up: release them together
            process.stdin.write("go\n")
            process.stdin.flush()
        results = []
        for process in processes:
            out, err = process.communicate(timeout=60)
            assert process.returncode == 0, err
            results.extend(json.loads(out))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert len(results) == 12
    assert results.count(None) == 5


async def test_the_wait_and_retry_after(backend):
    key = backend.key()
    for _ in range(5):
        assert await hit(key=key, rate=Rate(5, 60)) is None
    wait = await hit(key=key, rate=Rate(5, 60))
    assert 59 < wait <= 60
    error = limits.rate_limited(wait)
    assert isinstance(error, RateLimited)
    assert (error.status_code, error.code) == (429, "rate_limited")
    assert error.extra == {"retry_after": 60}
    assert error.headers == {"Retry-After": "60"}
    assert error.message == "Too many requests; try again in 60 seconds."
    assert limits.rate_limited(0.2).extra == {"retry_after": 1}  # rounded up, at least 1
    assert limits.rate_limited(1.01).headers == {"Retry-After": "2"}


async def test_the_window_slides_and_refusals_are_not_recorded(backend):
    key, rate = backend.key(), Rate(2, 1.0)
    assert await hit(key=key, rate=rate) is None
    await asyncio.sleep(0.4)
    assert await hit(key=key, rate=rate) is None
    # Refused, and not recorded: refusals never push the window on.
    for _ in range(5):
        wait = await hit(key=key, rate=rate)
        assert wait is not None and 0.3 < wait <= 0.6
    await asyncio.sleep(wait + 0.05)
    # The first hit has left the window, the second has not: exactly one slot.
    assert await hit(key=key, rate=rate) is None
    wait = await hit(key=key, rate=rate)
    assert wait is not None and wait <= 0.4
    await asyncio.sleep(wait + 0.05)
    assert await hit(key=key, rate=rate) is None


async def test_a_limit_of_zero_refuses_everything(backend):
    wait = await hit(key=backend.key(), rate=Rate(0, 60))
    assert wait == 60


async def test_throttle_per_user_and_per_client_ip(backend, settings):
    settings.CHAT_THROTTLE_USER = "2/min"
    settings.CHAT_THROTTLE_ANON = "1/hour"
    user_id = uuid.uuid4().int % 10**12
    ip = f"2001:db8::{uuid.uuid4().hex[:4]}"
    ip = backend.track(f"anon:{ip}").removeprefix("anon:")
    backend.track(f"user:{user_id}")
    assert limits.throttle_key(user_id=user_id, client_ip=ip) == f"user:{user_id}"
    assert limits.throttle_key(user_id=None, client_ip=ip) == f"anon:{ip}"
    assert limits.throttle_key(user_id=None, client_ip=None) == "anon:unknown"
    assert limits.rate_for(anonymous=False) == Rate(2, 60)
    assert limits.rate_for(anonymous=True) == Rate(1, 3600)

    await throttle(user_id=user_id, client_ip=ip)
    await throttle(user_id=user_id, client_ip=ip)
    with pytest.raises(RateLimited) as refused:
        await throttle(user_id=user_id, client_ip=ip)
    assert refused.value.extra["retry_after"] == 60
    await throttle(user_id=None, client_ip=ip)
    with pytest.raises(RateLimited) as refused:
        await throttle(user_id=None, client_ip=ip)
    assert refused.value.headers["Retry-After"] == "3600"
    settings.CHAT_THROTTLE_USER = ""
    for _ in range(5):
        assert await limits.throttle(user_id=user_id, client_ip=ip) is None  # nothing to count
    assert limits.rate_for(anonymous=False) is None


async def throttle(*, user_id: int | None, client_ip: str | None) -> None:
    """`limits.throttle`, and its pending hit (database backend) recorded in a transaction of
    its own, as the services record it in the transaction that stores the request."""
    pending = await limits.throttle(user_id=user_id, client_ip=client_ip)
    if pending is not None:
        await sync_to_async(_record_in_transaction)(pending)


def _record_in_transaction(pending: limits.PendingHit, *, then_fail: bool = False) -> None:
    with transaction.atomic():
        pending.record()
        if then_fail:
            raise RuntimeError("the request's transaction fails")


async def test_on_the_database_a_hit_counts_with_the_transaction_that_records_it(settings):
    settings.REDIS_URL = ""
    settings.CHAT_THROTTLE_USER = "2/min"
    user_id = uuid.uuid4().int % 10**12
    stored = RateLimitHit.objects.filter(key=f"user:{user_id}")

    pending = await limits.throttle(user_id=user_id, client_ip=None)
    assert pending == limits.PendingHit(key=f"user:{user_id}", rate=Rate(2, 60))
    assert await stored.acount() == 0  # not counted until recorded
    with pytest.raises(RuntimeError, match=r"inside transaction\.atomic"):
        await sync_to_async(pending.record)()
    # A request whose transaction fails (refused by its budget, say) is not counted.
    for _ in range(3):
        with pytest.raises(RuntimeError, match="fails"):
            await sync_to_async(_record_in_transaction)(pending, then_fail=True)
    assert await stored.acount() == 0
    await throttle(user_id=user_id, client_ip=None)
    await throttle(user_id=user_id, client_ip=None)
    assert await stored.acount() == 2
    with pytest.raises(RateLimited):
        await throttle(user_id=user_id, client_ip=None)
    assert await stored.acount() == 2


async def test_on_redis_a_hit_is_counted_at_once(settings, redis_keys):
    redis_or_skip()
    settings.REDIS_URL = REDIS_TEST_URL
    settings.CHAT_THROTTLE_USER = "1/min"
    user_id = uuid.uuid4().int % 10**12
    redis_keys.append(f"{REDIS_KEY_PREFIX}user:{user_id}")
    try:
        assert await limits.throttle(user_id=user_id, client_ip=None) is None
        with pytest.raises(RateLimited):
            await limits.throttle(user_id=user_id, client_ip=None)
    finally:
        await close_redis()
    assert not await RateLimitHit.objects.filter(key=f"user:{user_id}").aexists()


async def test_hits_that_left_the_window_are_not_counted_and_are_deleted_now_and_then(
    monkeypatch,
):
    key = f"test:{uuid.uuid4().hex}"
    rate = Rate(2, 0.2)
    stored = RateLimitHit.objects.filter(key=key)
    monkeypatch.setattr(limits, "STALE_DELETE_EVERY", 10**9)  # practically never
    assert await sync_to_async(limits._hit_db)(key, rate) is None
    assert await sync_to_async(limits._hit_db)(key, rate) is None
    assert await sync_to_async(limits._hit_db)(key, rate) is not None
    await asyncio.sleep(0.25)
    assert await sync_to_async(limits._hit_db)(key, rate) is None  # the old two are not counted
    assert await stored.acount() == 3
    monkeypatch.setattr(limits, "STALE_DELETE_EVERY", 1)  # every check
    await asyncio.sleep(0.25)
    assert await sync_to_async(limits._hit_db)(key, rate) is None
    assert await stored.acount() == 1


def test_purging_old_database_hits():
    from django.utils import timezone

    now = timezone.now()
    RateLimitHit.objects.create(key="test:old", at=now - timezone.timedelta(days=2))
    RateLimitHit.objects.create(key="test:new", at=now)
    assert limits.purge_rate_limit_hits(now=now) == 1
    assert list(RateLimitHit.objects.values_list("key", flat=True)) == ["test:new"]


def test_long_keys_are_hashed_to_fit():
    assert limits._storage_key("k" * 255) == "k" * 255
    hashed = limits._storage_key("k" * 256)
    assert hashed.startswith("sha256:") and len(hashed) == 7 + 64


# --- the shared Redis client -----------------------------------------------------------------


def test_no_redis_client_without_redis_url(settings):
    settings.REDIS_URL = ""

    async def get():
        return get_redis()

    assert asyncio.run(get()) is None


def test_one_redis_client_per_event_loop_rebuilt_when_the_url_changes(settings):
    redis_or_skip()
    settings.REDIS_URL = REDIS_TEST_URL

    async def clients():
        first, again = get_redis(), get_redis()
        assert first is again
        assert await first.ping()
        settings.REDIS_URL = REDIS_TEST_URL.replace("127.0.0.1", "localhost")
        rebuilt = get_redis()
        assert rebuilt is not first
        assert await rebuilt.ping()
        settings.REDIS_URL = REDIS_TEST_URL
        await close_redis()
        return first

    one = asyncio.run(clients())
    other = asyncio.run(clients())
    assert one is not other


async def test_when_redis_fails_the_database_limits(settings, caplog):
    # Nothing listens on port 1: every Redis call fails at once; the database takes over.
    settings.REDIS_URL = "redis://127.0.0.1:1/2"
    key = f"test:{uuid.uuid4().hex}"
    try:
        results = [await hit(key=key, rate=Rate(2, 60)) for _ in range(3)]
    finally:
        await close_redis()
    assert results[:2] == [None, None] and results[2] is not None
    assert await RateLimitHit.objects.filter(key=key).acount() == 2
    assert "using the database" in caplog.text
