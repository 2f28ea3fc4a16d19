"""The benchmark package's own logic: event parsing, re-attach timing, cursors, presets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.config import DEFAULTS, SCENARIOS, resolve
from bench.deep_history import keyset_cursor, next_cursor
from bench.http_client import Endpoint, SseParser, parse_sse
from bench.reattach import StreamTrace, compare
from bench.report import distribution_ms, percentile


def test_sse_parser_joins_events_split_across_reads_and_drops_keepalives():
    parser = SseParser()
    assert parser.feed(b'event: start\ndata: {"id"', 1.0) == []
    events = parser.feed(b': 7}\n\n: keep-alive\n\nevent: delta\ndata: {"content": "a"}\n\n', 2.0)
    assert [(e.name, e.json(), e.at) for e in events] == [
        ("start", {"id": 7}, 2.0),
        ("delta", {"content": "a"}, 2.0),
    ]
    assert [e.name for e in parse_sse(b"event: message\ndata: {}\n\n")] == ["message"]


def test_request_carries_the_token_and_the_body_length():
    request = Endpoint("127.0.0.1", 8000, token="t0k").request("POST", "/x/", body=b"{}")
    head, _, body = request.partition(b"\r\n\r\n")
    assert b"POST /x/ HTTP/1.1" in head and b"Authorization: Token t0k" in head
    assert b"Content-Length: 2" in head and body == b"{}"


def _trace(started: float, deltas: list[tuple[str, float]], finished: float) -> StreamTrace:
    trace = StreamTrace(requested_at=started - 0.01, started_at=started, message_id=1)
    for text, at in deltas:
        trace.text += text
        trace.deltas.append((len(trace.text), at))
    trace.final = {"status": "completed", "response": trace.text}
    trace.finished_at = finished
    return trace


def test_compare_times_live_pieces_by_cumulative_length():
    leader = _trace(0.0, [("ab", 0.1), ("cd", 0.2), ("ef", 0.3), ("gh", 0.4)], 0.5)
    # B began at 0.15: "ab" was replayed; the saved text came in two reads.
    follower = _trace(0.15, [("ab", 0.16), ("cdef", 0.9), ("gh", 1.0)], 1.2)
    timing = compare(leader, follower)
    assert timing.error is None and timing.replayed == 1
    assert timing.extra_latencies == pytest.approx([0.7, 0.6, 0.6])
    assert timing.end_latency == pytest.approx(0.7)


def test_compare_reports_a_follower_that_saw_other_text():
    leader = _trace(0.0, [("ab", 0.1)], 0.2)
    follower = _trace(0.05, [("ax", 0.1)], 0.2)
    assert compare(leader, follower).error == "text_mismatch"
    assert compare(leader, None).error == "A_no_start_event"


def test_next_cursor_from_field_or_link():
    assert next_cursor({"next_cursor": "abc"}) == "abc"
    assert next_cursor({"next": "http://h/api/messages/?cursor=x%3D&page_size=5"}) == "x="
    assert next_cursor({"next": "http://h/api/messages/?page=3"}) is None
    assert next_cursor({"next": None}) is None


@pytest.mark.django_db(transaction=True)
async def test_a_keyset_cursor_from_a_row_continues_after_that_row(api, fake_openai):
    for n in range(5):
        created = await api.post("/api/messages/create/", json={"prompt_message": f"p{n}"})
        assert created.status_code == 201
    first_two = (await api.get("/api/messages/?page_size=2")).json()["results"]
    cursor = keyset_cursor(first_two[-1]["created_at"])
    page = (await api.get("/api/messages/", params={"cursor": cursor, "page_size": 2})).json()
    assert [m["prompt_message"] for m in page["results"]] == ["p2", "p3"]


def test_percentiles_are_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert distribution_ms([0.001, 0.003])["max"] == pytest.approx(3.0)


def test_explicit_options_win_over_the_preset():
    config = resolve({"concurrency": 5}, "reattach", "cmd {host} {port} {workers}")
    assert config.kind == "reattach" and config.load.concurrency == 5
    assert config.deployment.instances == SCENARIOS["reattach"]["instances"]
    assert config.upstream.latency == SCENARIOS["reattach"]["latency"]
    custom = resolve({}, None, "cmd")
    assert custom.kind == "load" and custom.load.concurrency == DEFAULTS["concurrency"]
    assert custom.load.warmup >= custom.load.ramp == custom.upstream.latency


def test_the_context_benchmark_runs(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "context", "--sizes", "10,40", "--runs", "2"],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path}/context.sqlite3"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    rows = [line.split() for line in completed.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["10", "40"]
    assert rows[0][-1] == "10"  # a short conversation is kept whole


def test_the_admission_benchmark_runs():
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "admission", "--chats", "3", "--warmup", "1"],
        cwd=Path(__file__).resolve().parent.parent,
        # Its own throwaway SQLite database, whatever the suite runs on.
        env={k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    anonymous, user = completed.stdout.split("== user")
    assert "_store_prompt" in anonymous and "APIView.initial" not in anonymous
    # With a token, limits and a budget, the rate limit is counted in the prompt's transaction.
    assert "_store_prompt" in user and "_hit_db" not in user
    assert "rate limit: hit (database)" in user and "admission path in all" in user
