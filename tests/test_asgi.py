"""config/asgi.py: each request's synchronous parts run on a thread of its own, borrowed from a
set of reused one-thread executors, and the database connections that requests open are closed
when they end (bounded on SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from django.db.backends.base.base import BaseDatabaseWrapper
from django.test import Client

from config import asgi


async def _call(path: str) -> None:
    await asgi.application({"type": "http", "path": path}, None, None)


async def test_a_request_keeps_one_thread_and_concurrent_requests_get_different_ones(
    monkeypatch,
):
    threads: dict[str, list[int]] = {"/a": [], "/b": []}
    both_started = asyncio.Barrier(2)

    async def app(scope, receive, send):
        threads[scope["path"]].append(await sync_to_async(threading.get_ident)())
        await both_started.wait()
        threads[scope["path"]].append(await sync_to_async(threading.get_ident)())

    monkeypatch.setattr(asgi, "django_application", app)
    monkeypatch.setattr(asgi, "_idle_request_executors", type(asgi._idle_request_executors)())
    await asyncio.wait_for(asyncio.gather(_call("/a"), _call("/b")), timeout=5)

    (a1, a2), (b1, b2) = threads["/a"], threads["/b"]
    assert a1 == a2 and b1 == b2  # thread-sensitive: one thread per request
    assert a1 != b1  # isolated: a slow request never holds up another one's sync work
    assert threading.get_ident() not in (a1, b1)

    # The threads are reused, not started for every request.
    threads["/a"].clear()
    monkeypatch.setattr(asgi, "django_application", _one_hop(threads["/a"]))
    await _call("/a")
    assert threads["/a"][0] in (a1, b1)


def _one_hop(seen: list[int]):
    async def app(scope, receive, send):
        seen.append(await sync_to_async(threading.get_ident)())

    return app


async def test_a_request_abandoned_during_sync_work_does_not_break_the_next(monkeypatch):
    release = threading.Event()

    async def stuck(scope, receive, send):
        await sync_to_async(release.wait)()

    monkeypatch.setattr(asgi, "django_application", stuck)
    abandoned = asyncio.create_task(_call("/stuck"))
    await asyncio.sleep(0.1)
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned

    seen: list[int] = []
    monkeypatch.setattr(asgi, "django_application", _one_hop(seen))
    next_request = asyncio.create_task(_call("/next"))
    await asyncio.sleep(0.1)
    release.set()  # the abandoned work ends; whatever thread the next one got, it completes
    await asyncio.wait_for(next_request, timeout=5)
    assert len(seen) == 1


def _open_database_connections() -> int:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            )
            return cursor.fetchone()[0]
    # SQLite keeps a closed connection's file descriptor for reuse while other connections of
    # the process hold locks on the file, so count the connections Django holds open instead.
    wrappers = [o for o in gc.get_objects() if issubclass(type(o), BaseDatabaseWrapper)]
    return sum(wrapper.connection is not None for wrapper in wrappers)


@pytest.mark.django_db(transaction=True)
async def test_admin_and_docs_requests_do_not_pile_up_database_connections(api):
    user = await get_user_model().objects.acreate_superuser(username="root", password="pw-x")
    client = Client()
    await client.aforce_login(user)
    api.cookies["sessionid"] = client.cookies["sessionid"].value
    await api.get("/admin/")  # warm up: whatever is opened once and kept
    before = await sync_to_async(_open_database_connections)()

    async def browse(path: str) -> None:
        response = await api.get(path)
        assert response.status_code == 200

    for _ in range(3):
        await asyncio.gather(
            *(browse(p) for p in ["/admin/", "/admin/chat/message/", "/api/docs/"] * 4)
        )
    after = await sync_to_async(_open_database_connections)()
    # 36 requests on up to 12 threads at once; each closes its connection when it ends (a
    # pooled PostgreSQL connection goes back to the pool, whose size is bounded).
    bound = settings.DATABASES["default"].get("OPTIONS", {}).get("pool", {}).get("max_size", 0)
    assert after <= before + max(bound, 2)
