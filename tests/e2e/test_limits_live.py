"""Limits hold across server processes: the service under uvicorn with 2 worker processes (and,
to be sure requests land on both, as 2 single-process instances sharing one database), real
sockets, one connection per request. Rate limits are kept in the database, or in Redis
(REDIS_TEST_URL's database) when it is configured.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import re
import secrets
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from billing.limits import REDIS_KEY_PREFIX
from chat import live
from chat.models import Message
from tests.billing.conftest import REDIS_TEST_URL, redis_or_skip
from tests.conftest import TEST_API_KEY, parse_sse
from tests.fake_openai import FakeOpenAI
from tests.live import BIN, ROOT, free_port, start_uvicorn, stop, wait_until_serving

ANON_RATE = 5
CAP = 2
CREATE_URL = "/api/messages/create/"


@dataclass
class Deployment:
    ports: list[int]  # one per instance; requests go round-robin
    db_path: Path
    env: dict[str, str]
    logs: list[Path]
    workers: int
    client_ip: str  # what requests seem to come from (X-Forwarded-For)
    other_ip: str  # another client address

    def port(self, index: int) -> int:
        return self.ports[index % len(self.ports)]

    def call(
        self,
        index: int,
        method: str,
        path: str,
        body: dict | None = None,
        token: str | None = None,
        client_ip: str | None = None,
    ) -> tuple[int, dict[str, str], str]:
        """One request on its own connection: (status, headers by lower-case name, body)."""
        headers = {
            "Content-Type": "application/json",
            "X-Forwarded-For": client_ip or self.client_ip,
        }
        if token:
            headers["Authorization"] = f"Token {token}"
        conn = http.client.HTTPConnection("127.0.0.1", self.port(index), timeout=60)
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None, headers)
            response = conn.getresponse()
            return (
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read().decode(),
            )
        finally:
            conn.close()

    def manage(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BIN / "python", "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def query(self, sql: str) -> list[tuple]:
        with sqlite3.connect(self.db_path, timeout=30) as db:
            return db.execute(sql).fetchall()

    def log(self) -> str:
        return "\n".join(path.read_text() for path in self.logs)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


# name: (instances, worker processes each, rate limits in Redis)
DEPLOYMENTS = {
    "2-workers": (1, 2, False),
    "2-instances": (2, 1, False),
    "2-workers-redis": (1, 2, True),
}


def deployments(cap: int):
    """Parameters of `deployment`: every kind, with this CHAT_MAX_CONCURRENT_PER_USER."""
    return pytest.mark.parametrize(
        "deployment", [(kind, cap) for kind in DEPLOYMENTS], ids=list(DEPLOYMENTS), indirect=True
    )


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory) -> Path:
    """An empty, migrated SQLite database that each deployment starts from (a copy)."""
    path = tmp_path_factory.mktemp("template") / "db.sqlite3"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{path}"}
    subprocess.run([BIN / "python", "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    with sqlite3.connect(path) as db:  # everything in the main file, nothing left in the WAL
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path


@pytest.fixture
def deployment(request, tmp_path, fake_server, migrated_db) -> Iterator[Deployment]:
    """The service as deployed: request.param is (a kind of DEPLOYMENTS, the concurrency cap)."""
    kind, cap = request.param
    instances, workers, use_redis = DEPLOYMENTS[kind]
    if use_redis:
        redis_or_skip()
    db_path = tmp_path / "db.sqlite3"
    # Clients seem to come from an address of their own (through a trusted proxy), so that
    # runs sharing one Redis database never share a rate-limit bucket.
    client_ip, other_ip = (
        f"10.{secrets.randbelow(250)}.{secrets.randbelow(250)}.{n}" for n in (1, 2)
    )
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{db_path}",
        "REDIS_URL": REDIS_TEST_URL if use_redis else "",
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": fake_server.url,
        "OPENAI_MAX_RETRIES": "0",
        "CHAT_STREAM_SAVE_INTERVAL": "0.1",
        "CHAT_ALLOW_ANONYMOUS": "true",
        "CHAT_TRUSTED_PROXIES": "1",
        "CHAT_THROTTLE_ANON": f"{ANON_RATE}/min",
        "CHAT_THROTTLE_USER": "",
        "CHAT_MAX_CONCURRENT_PER_USER": str(cap),
        "CHAT_USER_BUDGET_USD": "",
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }
    shutil.copyfile(migrated_db, db_path)
    ports = [free_port() for _ in range(instances)]
    logs = [tmp_path / f"service-{i}.log" for i in range(instances)]
    deployment = Deployment(ports, db_path, env, logs, workers, client_ip, other_ip)
    try:
        with ExitStack() as stack:
            for port, log_path in zip(ports, logs, strict=True):
                process = start_uvicorn(port, env, log_path, workers=workers)
                stack.callback(stop, process)
                wait_until_serving(process, log_path, port, workers=workers)
            yield deployment
    finally:
        if use_redis:
            _delete_redis_keys(deployment)


def _delete_redis_keys(deployment: Deployment) -> None:
    """The keys this run made: its rate-limit buckets and its generations' event streams."""
    messages = deployment.query("SELECT id, created_at, previous_replies FROM chat_message")
    users = [row[0] for row in deployment.query("SELECT id FROM auth_user")]
    keys = [f"{REDIS_KEY_PREFIX}anon:{ip}" for ip in (deployment.client_ip, deployment.other_ip)]
    keys += [f"{REDIS_KEY_PREFIX}user:{pk}" for pk in users]
    keys += [
        live.stream_key(
            Message(
                pk=pk,
                created_at=datetime.fromisoformat(created).replace(tzinfo=UTC),
                previous_replies=json.loads(previous),
            )
        )
        for pk, created, previous in messages
    ]
    client = redis.Redis.from_url(REDIS_TEST_URL)
    client.delete(*keys)
    client.close()


def _all_at_once(count: int, fn) -> list:
    """fn(0..count-1) on `count` threads released together."""
    barrier = threading.Barrier(count)

    def run(index: int):
        barrier.wait(timeout=30)
        return fn(index)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def _two_server_processes(deployment: Deployment) -> None:
    pids = set(re.findall(r"Started server process \[(\d+)\]", deployment.log()))
    assert len(pids) == 2, deployment.log()


# No concurrency cap here: anonymous clients all act as one shared user, whose cap would refuse
# some of the burst's overlapping replies (too_many_concurrent) after the rate limit let them in.
@deployments(cap=0)
def test_twelve_concurrent_anonymous_requests_admit_exactly_the_rate(deployment, fake_server):
    _two_server_processes(deployment)
    fake_server.reset()
    results = _all_at_once(
        12,
        lambda i: deployment.call(i, "POST", CREATE_URL, {"prompt_message": f"anonymous {i}"}),
    )

    codes = sorted(status for status, _, _ in results)
    assert codes == [201] * ANON_RATE + [429] * (12 - ANON_RATE), [
        (s, b[:300]) for s, _, b in results
    ]
    for status, headers, body in results:
        if status == 429:
            assert json.loads(body)["error"]["code"] == "rate_limited"
            assert int(headers["retry-after"]) >= 1
    assert len(fake_server.chat_requests()) == ANON_RATE
    assert deployment.query("SELECT COUNT(*) FROM chat_message") == [(ANON_RATE,)]
    # Another client address has its own bucket.
    status, _, body = deployment.call(
        0, "POST", CREATE_URL, {"prompt_message": "elsewhere"}, client_ip=deployment.other_ip
    )
    assert status == 201, body


@deployments(cap=CAP)
def test_the_concurrency_cap_holds_across_processes_with_slow_streams(deployment, fake_server):
    _two_server_processes(deployment)
    fake_server.reset()
    created = deployment.manage("create_token", "alice")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert created.stdout == token + "\n" and len(token) == 40  # only the key
    slow = {"prompt_message": "slow [[latency:3]]", "stream": True}
    held: list[list[str]] = []  # the reservations' worker ids, sampled while replies run
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            held.append(
                [r[0] for r in deployment.query("SELECT worker_id FROM billing_reservation")]
            )
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = _all_at_once(6, lambda i: deployment.call(i, "POST", CREATE_URL, slow, token))
    finally:
        done.set()
        watcher.join()

    codes = sorted(status for status, _, _ in results)
    assert codes == [200] * CAP + [429] * (6 - CAP), [r[:2] for r in results]
    for status, headers, body in results:
        if status == 200:
            assert parse_sse(body)[-1].data["status"] == "completed"
        else:
            error = json.loads(body)["error"]
            assert error["code"] == "too_many_concurrent" and error["limit"] == CAP
            assert headers["retry-after"] == "1"
    assert len(fake_server.chat_requests()) == CAP
    assert max(len(sample) for sample in held) == CAP
    # Settled: nothing held, and there is room again.
    assert deployment.query("SELECT COUNT(*) FROM billing_reservation") == [(0,)]
    status, _, body = deployment.call(0, "POST", CREATE_URL, {"prompt_message": "now"}, token)
    assert status == 201, body
