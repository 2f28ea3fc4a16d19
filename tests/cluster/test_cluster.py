"""The scale-out configuration under load: PostgreSQL + Redis, two service processes on two ports
(as two hosts would be) and the fake OpenAI server, one of the processes killed mid-load.

Run by `make test-cluster` (which points it at PostgreSQL and Redis); skipped otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import TEST_API_KEY
from tests.fake_openai import FakeOpenAI
from tests.live import free_port, manage, start_uvicorn, stop, wait_until_serving

POSTGRES = os.environ.get("CLUSTER_POSTGRES_URL", "")
REDIS = os.environ.get("CLUSTER_REDIS_URL", "")
DATABASE = "chat_cluster"
DEAD_AFTER = 3.0

pytestmark = pytest.mark.skipif(
    not (POSTGRES and REDIS),
    reason="the cluster test needs CLUSTER_POSTGRES_URL and CLUSTER_REDIS_URL (make test-cluster)",
)


@dataclass
class Host:
    name: str
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    hosts: list[Host]
    env: dict[str, str]
    tokens: dict[str, str] = field(default_factory=dict)

    def manage(self, *args: str) -> str:
        done = manage(self.env, *args)
        return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""

    def query(self, sql: str, *params: object) -> list[tuple]:
        with psycopg.connect(self.env["DATABASE_URL"], autocommit=True) as db:
            return db.execute(sql, params).fetchall()


def _start_host(name: str, env: dict[str, str], directory: Path) -> Host:
    port = free_port()
    log = directory / f"{name}.log"
    process = start_uvicorn(port, env, log)
    wait_until_serving(process, log, port, timeout=30)
    return Host(name, port, process, log)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def cluster(fake, tmp_path_factory) -> Iterator[Cluster]:
    admin = psycopg.connect(POSTGRES, autocommit=True)
    admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {DATABASE}")
    admin.close()
    database_url = POSTGRES.rsplit("/", 1)[0] + "/" + DATABASE
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS,
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_MAX_RETRIES": "0",
        "OPENAI_TIMEOUT": "10",
        "CHAT_STREAM_SAVE_INTERVAL": "0.2",
        "CHAT_GENERATION_DEAD_AFTER": str(DEAD_AFTER),
        "CHAT_HEARTBEAT_INTERVAL": "0.5",
        "CHAT_RESERVATION_TTL_SECONDS": "15",
        # Anonymous load is not limited; named users are.
        "CHAT_THROTTLE_ANON": "",
        "CHAT_THROTTLE_USER": "5/min",
        "CHAT_MAX_CONCURRENT_PER_USER": "0",
        "CHAT_MODEL_PRICES": "gpt-3.5-turbo=1:1",
        "LOG_LEVEL": "WARNING",
    }
    import redis

    redis.Redis.from_url(REDIS).flushdb()
    directory = tmp_path_factory.mktemp("cluster")
    manage(env, "migrate", "-v0")
    cluster = Cluster([], env)
    try:
        for name in ("a", "b"):
            cluster.hosts.append(_start_host(name, env, directory))
        for user in ("limited-a", "budgeted"):
            cluster.tokens[user] = cluster.manage("create_token", user)
        yield cluster
    finally:
        for host in cluster.hosts:
            stop(host.process)


def _events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.split("\n\n"):
        name, data = "", ""
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
        if name:
            events.append((name, json.loads(data)))
    return events


@dataclass
class Outcome:
    key: str
    host: str
    kind: str  # "stream" or "plain"
    status: int | None = None
    message: dict | None = None
    error: str | None = None
    retried_on: str | None = None


async def _create(
    client: httpx.AsyncClient, host: Host, body: dict, key: str
) -> tuple[int, dict | None, str | None]:
    """(status, final message or None, error code or None); raises on connection errors."""
    headers = {"Idempotency-Key": key}
    if body.get("stream"):
        async with client.stream(
            "POST", f"{host.url}/api/messages/create/", json=body, headers=headers
        ) as response:
            text = "".join([chunk async for chunk in response.aiter_text()])
        events = _events(text)
        name, data = events[-1]
        if name == "message":
            return response.status_code, data, None
        return response.status_code, None, data["error"]["code"]
    response = await client.post(f"{host.url}/api/messages/create/", json=body, headers=headers)
    if response.status_code == 201:
        return 201, response.json(), None
    return response.status_code, None, response.json()["error"]["code"]


async def _one_request(client: httpx.AsyncClient, cluster: Cluster, n: int) -> Outcome:
    first, other = cluster.hosts[n % 2], cluster.hosts[(n + 1) % 2]
    stream = n % 3 != 0
    body = {"prompt_message": f"load {n} [[latency:2]] [[chunks:8]]", "stream": stream}
    outcome = Outcome(key=f"load-{n}-{uuid.uuid4().hex[:6]}", host=first.name, kind="stream")
    outcome.kind = "stream" if stream else "plain"
    try:
        outcome.status, outcome.message, outcome.error = await _create(
            client, first, body, outcome.key
        )
    except httpx.HTTPError:
        # The host died under us: retry on the other one, as a client or load balancer would,
        # with the same Idempotency-Key.
        outcome.retried_on = other.name
        outcome.status, outcome.message, outcome.error = await _create(
            client, other, body, outcome.key
        )
    return outcome


async def _reattach_across(client: httpx.AsyncClient, cluster: Cluster) -> list[float]:
    """A stream started on host a, followed from host b: the delays between the deltas that b
    received (live ones are spread over the reply's ~2 s; a replay would arrive at once)."""
    a, b = cluster.hosts
    body = {"prompt_message": "follow me across [[latency:2]] [[chunks:8]]", "stream": True}
    async with client.stream("POST", f"{a.url}/api/messages/create/", json=body) as response:
        first = ""
        lines = response.aiter_lines()
        async for line in lines:
            if line.startswith("data:"):
                first = line
                break
        message_id = json.loads(first[5:])["id"]
        arrivals = []
        async with client.stream("GET", f"{b.url}/api/messages/{message_id}/stream/") as other:
            async for line in other.aiter_lines():
                if line.startswith("event: delta"):
                    arrivals.append(time.monotonic())
                if line.startswith("event: message"):
                    break
        async for _ in lines:
            pass
    return arrivals


def test_the_cluster_keeps_every_reply_and_every_limit_when_a_host_dies(cluster):
    a, b = cluster.hosts

    async def scenario() -> tuple[list[Outcome], list[float], list[int]]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
            arrivals = await _reattach_across(client, cluster)
            load = asyncio.gather(*(_one_request(client, cluster, n) for n in range(40)))
            await asyncio.sleep(1.0)
            os.kill(b.process.pid, signal.SIGKILL)  # host b dies mid-load
            outcomes = await load
            # The survivor went on serving during and after the kill.
            after = [
                (await client.get(f"{a.url}/api/messages/?page_size=1")).status_code
                for _ in range(5)
            ]
            return outcomes, arrivals, after

    outcomes, arrivals, after = asyncio.run(scenario())

    # Re-attach across processes was live: deltas spread over the generation, not one burst.
    assert len(arrivals) >= 3 and arrivals[-1] - arrivals[1] > 0.5, arrivals
    assert after == [200] * 5
    # Every request got an answer: a reply, or (for those on the dead host) interrupted.
    for outcome in outcomes:
        assert outcome.status is not None, outcome
        if outcome.message is None:
            assert outcome.error == "generation_interrupted", outcome
            assert outcome.retried_on == "a", outcome
    assert any(o.retried_on for o in outcomes), "host b was killed while it had requests"
    succeeded = [o for o in outcomes if o.message is not None]
    assert len(succeeded) >= 20
    # Every successful reply is stored exactly once, whole.
    for outcome in succeeded:
        rows = cluster.query(
            "SELECT id, status, response FROM chat_message WHERE idempotency_key = %s",
            outcome.key,
        )
        assert len(rows) == 1 and rows[0][0] == outcome.message["id"], outcome
        assert rows[0][1] == "completed" and rows[0][2] == outcome.message["response"]
    # Nothing stays pending or streaming once the dead host's generations are found.
    deadline = time.monotonic() + DEAD_AFTER * 4
    while time.monotonic() < deadline:
        pending = cluster.query(
            "SELECT count(*) FROM chat_message WHERE status IN ('pending', 'streaming')"
        )[0][0]
        if pending == 0:
            break
        time.sleep(0.5)
    assert pending == 0
    # The dead host's budget reservations were settled by the survivor.
    assert cluster.query("SELECT count(*) FROM billing_reservation")[0][0] == 0


def test_rate_limits_and_budgets_are_shared_by_the_hosts(cluster):
    survivors = [h for h in cluster.hosts if h.process.poll() is None]
    if len(survivors) < 2:  # the crash test ran first: bring host b back
        index = next(i for i, h in enumerate(cluster.hosts) if h.process.poll() is not None)
        cluster.hosts[index] = _start_host("b2", cluster.env, cluster.hosts[index].log.parent)
    a, b = cluster.hosts

    async def burst(token: str, count: int, prompt: str) -> list[httpx.Response]:
        headers = {"Authorization": f"Token {token}"}
        async with httpx.AsyncClient(timeout=30.0, headers=headers) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{(a, b)[n % 2].url}/api/messages/create/",
                        json={"prompt_message": f"{prompt} {n}"},
                    )
                    for n in range(count)
                )
            )

    limited = asyncio.run(burst(cluster.tokens["limited-a"], 12, "limited"))
    assert sorted(r.status_code for r in limited) == [201] * 5 + [429] * 7
    assert {r.json()["error"]["code"] for r in limited if r.status_code == 429} == {"rate_limited"}

    # A budget that fits about three calls (prices 1:1 USD per million tokens; each call
    # reserves its prompt plus CHAT_MAX_COMPLETION_TOKENS = 4096 tokens).
    budget = Decimal("0.013")
    cluster.manage("set_budget", "budgeted", str(budget))
    # Slow replies, so that the admitted calls' reservations overlap however the burst is spread.
    spent = asyncio.run(burst(cluster.tokens["budgeted"], 10, "budgeted [[latency:2]]"))
    refusals = [r.json()["error"]["code"] for r in spent if r.status_code == 429]
    assert any(r.status_code == 201 for r in spent)
    assert "budget_exceeded" in refusals and set(refusals) <= {"budget_exceeded", "rate_limited"}
    total = cluster.query(
        "SELECT COALESCE(SUM(cost), 0) FROM billing_ledgerentry l JOIN auth_user u "
        "ON u.id = l.user_id WHERE u.username = 'budgeted'"
    )[0][0]
    assert Decimal(total) / 10**12 <= budget
