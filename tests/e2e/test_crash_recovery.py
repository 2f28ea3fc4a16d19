"""A worker process killed mid-generation (SIGKILL, as an out-of-memory kill does): its messages
are found by the surviving process and stored as interrupted, and nobody waits forever on them.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import time

import psutil
import pytest

from tests.conftest import parse_sse
from tests.e2e.conftest import LiveService, read_event

DEAD_AFTER = 3.0
CRASH_SETTINGS = {
    "workers": 2,
    "env": {
        "CHAT_GENERATION_DEAD_AFTER": str(DEAD_AFTER),
        "CHAT_HEARTBEAT_INTERVAL": "0.5",
        "CHAT_MAX_CONCURRENT_PER_USER": "0",
    },
}
STREAMS = 16


def _stream_with_key(service: LiveService, n: int) -> tuple[http.client.HTTPConnection, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
    conn.request(
        "POST",
        "/api/messages/create/",
        json.dumps({"prompt_message": f"story {n} [[latency:8]] [[chunks:16]]", "stream": True}),
        {"Content-Type": "application/json", "Idempotency-Key": f"crash-{n}"},
    )
    response = conn.getresponse()
    name, start = read_event(response)
    assert name == "start"
    return conn, start


def _worker_pids(service: LiveService) -> list[int]:
    children = psutil.Process(service.process.pid).children()
    # uvicorn's supervisor runs its workers as `spawn` children (plus multiprocessing's
    # resource tracker, which is not one).
    return [c.pid for c in children if "resource_tracker" not in " ".join(c.cmdline())]


def _answer_of(service: LiveService, method: str, path: str, body: dict | None = None) -> str:
    """The final event (or status) of a request, whatever process answers it."""
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=DEAD_AFTER * 6)
    headers = {"Content-Type": "application/json"}
    if body is not None:
        headers["Idempotency-Key"] = body.pop("key")
    conn.request(method, path, json.dumps(body) if body else None, headers)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    if response.getheader("Content-Type", "").startswith("text/event-stream"):
        return parse_sse(text)[-1].event
    return str(response.status)


@pytest.mark.parametrize("live_service", [CRASH_SETTINGS], indirect=True)
def test_a_killed_workers_generations_end_and_their_retries_do_not_hang(live_service):
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        opened = list(pool.map(lambda n: _stream_with_key(live_service, n), range(STREAMS)))
    victim = _worker_pids(live_service)[0]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    for conn, _ in opened:
        conn.close()
    ids = [start["id"] for _, start in opened]

    # Every re-attach and every idempotent retry ends, on the surviving process.
    with concurrent.futures.ThreadPoolExecutor(2 * STREAMS) as pool:
        reattached = pool.map(
            lambda i: _answer_of(live_service, "GET", f"/api/messages/{i}/stream/"), ids
        )
        retried = pool.map(
            lambda n: _answer_of(
                live_service,
                "POST",
                "/api/messages/create/",
                {"prompt_message": f"story {n} [[latency:8]] [[chunks:16]]", "key": f"crash-{n}"},
            ),
            range(STREAMS),
        )
        reattached, retried = list(reattached), list(retried)
    waited = time.monotonic() - killed_at
    assert set(reattached) <= {"message", "error"}, reattached
    assert set(retried) <= {"201", "503"}, retried
    assert "error" in reattached and "503" in retried  # some were on the killed worker

    statuses = [live_service.stored(i)["status"] for i in ids]
    assert set(statuses) <= {"completed", "interrupted"}, statuses
    assert "interrupted" in statuses
    # Found within the bound, not after a restart plus 300 s.
    assert waited < DEAD_AFTER * 4 + 8, waited
    for message_id, status in zip(ids, statuses, strict=True):
        if status == "interrupted":
            assert live_service.stored(message_id)["error_code"] == "generation_interrupted"
