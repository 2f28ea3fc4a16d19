"""The service as users run it: uvicorn in its own process, real sockets, real disconnects,
real SIGTERM. The OpenAI API is the fake server, reached through OPENAI_BASE_URL."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import time

import pytest

from tests.conftest import TEST_API_KEY, parse_sse
from tests.e2e.conftest import read_event


def test_docs_and_admin_assets_are_served_without_a_cdn(live_service):
    conn = http.client.HTTPConnection("127.0.0.1", live_service.port, timeout=30)
    conn.request("GET", "/api/docs/")
    page = conn.getresponse().read().decode()
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets), page
    assert "cdn." not in page.lower()
    for path in [*assets, "/static/admin/css/base.css"]:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, path


def test_the_contract_over_real_http(live_service):
    status, created = live_service.request(
        "POST", "/api/messages/create/", {"prompt_message": "Привет!"}
    )
    assert status == 201
    assert created["prompt_message"] == "Привет!" and created["response"] == "Echo: Привет!"
    status, listing = live_service.request("GET", "/api/messages/")
    assert status == 200 and listing["count"] == 1
    assert listing["results"][0]["id"] == created["id"]


@pytest.mark.parametrize(
    ("size", "status", "code"),
    [(100_000, 400, "invalid"), (3_000_000, 413, "request_too_large")],  # 2.5 MB limit
)
def test_large_bodies_get_a_clear_json_error(live_service, size, status, code):
    answered, body = live_service.request(
        "POST", "/api/messages/create/", {"prompt_message": "x" * size}
    )
    assert answered == status
    assert body["error"]["status"] == status and body["error"]["code"] == code
    if code == "invalid":
        assert "prompt_message" in body["error"]["fields"]
    else:
        assert "2621440 bytes" in body["error"]["message"]


def test_a_client_that_disconnects_after_the_first_delta_still_gets_a_stored_reply(
    live_service, fake
):
    fake.latency = 1.0
    fake.stream_chunks = 10
    conn, response = live_service.open_stream({"prompt_message": "do not lose me please"})
    assert response.status == 200
    name, start = read_event(response)
    assert name == "start"
    name, _ = read_event(response)
    assert name == "delta"
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    deadline = time.monotonic() + 10
    while True:
        _, message = live_service.request("GET", f"/api/messages/{start['id']}/")
        if message["status"] != "streaming" and message["status"] != "pending":
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert message["status"] == "completed"
    assert message["response"] == "Echo: do not lose me please"
    assert message["usage"]["completion_tokens"] > 0
    # The stream's request line was written when the client went away.
    log = live_service.log_path.read_text().splitlines()
    lines = [json.loads(line) for line in log if line.startswith("{")]
    [line] = [
        line
        for line in lines
        if line["logger"] == "chat.request" and line["status"] == 200 and line["method"] == "POST"
    ]
    assert line["disconnected"] is True and line["request_id"]


def test_reattach_from_another_connection_replays_and_follows(live_service, fake):
    fake.latency = 1.0
    fake.stream_chunks = 10
    conn, response = live_service.open_stream({"prompt_message": "watch me from two places"})
    _, start = read_event(response)
    read_event(response)  # first delta

    other = http.client.HTTPConnection("127.0.0.1", live_service.port, timeout=30)
    other.request("GET", f"/api/messages/{start['id']}/stream/")
    events = parse_sse(other.getresponse().read().decode())
    conn.close()

    text = "".join(e.data["content"] for e in events if e.event == "delta")
    assert text == "Echo: watch me from two places"
    assert events[-1].event == "message" and events[-1].data["status"] == "completed"


def test_sigterm_marks_generations_in_flight_interrupted_with_their_partial_text(
    live_service, fake
):
    fake.latency = 20.0
    fake.stream_chunks = 20
    conn, response = live_service.open_stream({"prompt_message": "a long answer follows here"})
    _, start = read_event(response)
    _, delta = read_event(response)

    live_service.process.send_signal(signal.SIGTERM)
    live_service.process.wait(timeout=20)
    conn.close()

    stored = live_service.stored(start["id"])
    assert stored["status"] == "interrupted", live_service.log_path.read_text()
    assert stored["response"].startswith(delta["content"])
    assert stored["error_code"] == "generation_interrupted"


@pytest.mark.parametrize("live_service", [2], indirect=True)
def test_two_worker_processes_share_idempotency_and_reattach(live_service, fake):
    """With several server processes, racing retries still make one message and one model
    call, and a client re-attaching from any process gets the whole reply."""
    import concurrent.futures

    fake.latency = 1.0
    fake.stream_chunks = 10

    def post_with_key() -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", live_service.port, timeout=30)
        conn.request(
            "POST",
            "/api/messages/create/",
            json.dumps({"prompt_message": "only once"}),
            {"Content-Type": "application/json", "Idempotency-Key": "shared-key"},
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: post_with_key(), range(8)))
    assert {status for status, _ in results} == {201}
    assert {body["id"] for _, body in results} == {results[0][1]["id"]}
    assert all(body["response"] == "Echo: only once" for _, body in results)
    assert len(fake.chat_requests()) == 1

    conn, response = live_service.open_stream({"prompt_message": "seen from everywhere"})
    _, start = read_event(response)

    def reattach() -> str:
        other = http.client.HTTPConnection("127.0.0.1", live_service.port, timeout=30)
        other.request("GET", f"/api/messages/{start['id']}/stream/")
        events = parse_sse(other.getresponse().read().decode())
        assert events[-1].event == "message"
        return "".join(e.data["content"] for e in events if e.event == "delta")

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(lambda _: reattach(), range(6)))
    conn.close()
    assert texts == ["Echo: seen from everywhere"] * 6


# --- observability ------------------------------------------------------------------------------


def scrape(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    body = response.read().decode()
    conn.close()
    assert response.status == 200, body
    return body


def sample_sum(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@pytest.mark.parametrize("live_service", [2], indirect=True)
def test_metrics_add_up_every_worker_process(live_service, tmp_path):
    """Whichever worker answers the scrape, /metrics counts the requests of both."""
    import concurrent.futures

    def chat(index: int) -> int:
        return live_service.request(
            "POST", "/api/messages/create/", {"prompt_message": f"count {index}"}
        )[0]

    [run] = list((tmp_path / "metrics").iterdir())  # one run: both workers' supervisor
    sent = 0
    writers: set[str] = set()
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        while len(writers) < 2 and sent < 100:  # until both workers have served some
            assert list(pool.map(chat, range(sent, sent + 10))) == [201] * 10
            sent += 10
            writers = {path.stem.rsplit("_", 1)[1] for path in run.glob("counter_*.db")}
    assert len(writers) == 2, sorted(path.name for path in run.iterdir())
    for _ in range(6):  # new connections: either worker may answer each scrape
        text = scrape(live_service.port)
        created = {"route": "message-create", "method": "POST", "status": "201"}
        assert sample_sum(text, "chat_http_requests_total", **created) == sent
        assert sample_sum(text, "chat_tokens_total", kind="completion") > 0
        assert sample_sum(text, "chat_generations_in_flight") == 0


def test_json_request_lines_and_live_gauges_removed_at_shutdown(live_service, tmp_path):
    conn = http.client.HTTPConnection("127.0.0.1", live_service.port, timeout=30)
    conn.request(
        "POST",
        "/api/messages/create/",
        json.dumps({"prompt_message": "trace me"}),
        {"Content-Type": "application/json", "X-Request-ID": "trace-e2e-1"},
    )
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 201 and response.getheader("X-Request-ID") == "trace-e2e-1"
    [run] = list((tmp_path / "metrics").iterdir())
    assert list(run.glob("gauge_livesum_*.db"))

    live_service.process.send_signal(signal.SIGTERM)
    live_service.process.wait(timeout=20)
    log = live_service.log_path.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert not [line for line in lines if line["logger"] == "uvicorn.access"]
    traced = [line for line in lines if line.get("request_id") == "trace-e2e-1"]
    [line] = [line for line in traced if line["logger"] == "chat.request"]
    assert line["status"] == 201
    assert line["route"] == "message-create" and line["client_ip"] == "127.0.0.1"
    assert any(line["logger"].startswith("uvicorn") for line in lines)  # same format
    assert TEST_API_KEY not in log
    assert not list(run.glob("gauge_livesum_*.db"))  # this worker's gauge stops counting
