"""Tests for tests/fake_openai.py, driven through the real ``openai`` SDK over HTTP.

These tests do not need Django; run them with
``python -m pytest tests/test_fake_openai.py -q -p no:django``.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.fake_openai import FakeOpenAI, RecordedRequest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def server():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def fake(server):
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def client(fake):
    with openai.OpenAI(api_key="test-key", base_url=fake.url, max_retries=0, timeout=5) as c:
        yield c


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def drain(stream) -> tuple[list, BaseException | None]:
    """Read a stream to its end; return the chunks and the exception that ended it."""
    received = []
    try:
        for chunk in stream:
            received.append(chunk)
    except (openai.APIError, ValueError) as exc:
        return received, exc
    return received, None


def http(method: str, url: str, body: object | None = None, headers: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


# ------------------------------------------------------------------ happy paths


def test_completion_content_usage_and_recording(fake, client):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello there world"},
    ]
    resp = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.2)

    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == MODEL
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Echo: hello there world"
    assert choice.finish_reason == "stop"
    # P = (3 + 4) + (3 + 4); C = len("Echo: hello there world".split())
    assert resp.usage.prompt_tokens == 14
    assert resp.usage.completion_tokens == 4
    assert resp.usage.total_tokens == 18

    [rec] = fake.chat_requests()
    assert isinstance(rec, RecordedRequest)
    assert rec.method == "POST"
    assert rec.path == "/v1/chat/completions"
    assert rec.headers["authorization"] == "Bearer test-key"
    assert rec.json["model"] == MODEL
    assert rec.json["messages"] == messages
    assert rec.json["temperature"] == 0.2


def test_stream_with_usage(fake, client):
    fake.stream_chunks = 4
    stream = client.chat.completions.create(
        model=MODEL,
        messages=user("stream me please"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 4
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: stream me please"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert finishes.count("stop") == 1
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    assert usage_chunks[0] is chunks[-1]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 7
    assert chunks[-1].usage.completion_tokens == 4


def test_stream_latency_is_spread_over_chunks(fake, client):
    fake.latency = 0.2
    fake.stream_chunks = 4
    start = time.monotonic()
    stream = client.chat.completions.create(model=MODEL, messages=user("slow"), stream=True)
    first = next(stream)
    first_at = time.monotonic() - start
    rest = list(stream)
    total = time.monotonic() - start
    assert first.choices[0].delta.role == "assistant"
    assert first_at < 0.15  # the role chunk is not delayed
    assert 0.19 <= total < 1.5
    assert "".join(c.choices[0].delta.content or "" for c in rest) == "Echo: slow"


def test_non_stream_latency(fake, client):
    fake.latency = 0.15
    start = time.monotonic()
    client.chat.completions.create(model=MODEL, messages=user("x"))
    assert time.monotonic() - start >= 0.14


def test_reply_marker_and_override(fake, client):
    resp = client.chat.completions.create(
        model=MODEL, messages=user("please [[reply:Exactly this text.]] thanks")
    )
    assert resp.choices[0].message.content == "Exactly this text."

    fake.reply = "Fixed reply"
    resp = client.chat.completions.create(model=MODEL, messages=user("anything"))
    assert resp.choices[0].message.content == "Fixed reply"

    fake.reset()
    assert fake.requests == []
    resp = client.chat.completions.create(model=MODEL, messages=user("anything"))
    assert resp.choices[0].message.content == "Echo: anything"


def test_max_tokens_cuts_with_length(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=user("[[reply:one two three four five six]]"),
        max_tokens=3,
    )
    assert resp.choices[0].message.content == "one two three"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 3

    stream = client.chat.completions.create(
        model=MODEL,
        messages=user("[[reply:one two three four five six]]"),
        max_tokens=2,
        stream=True,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "one two"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_and_404(fake, client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["gpt-3.5-turbo", "gpt-4o-mini", "gpt-4o"]

    status, _, body = http("GET", fake.url + "/nope")
    assert status == 404
    assert body["error"]["type"] == "invalid_request_error"


def test_auth_and_validation_errors(fake):
    status, _, body = http("POST", fake.url + "/chat/completions", {"model": MODEL})
    assert status == 401

    auth = {"Authorization": "Bearer test-key"}
    status, _, body = http("POST", fake.url + "/chat/completions", {"model": MODEL}, auth)
    assert status == 400
    assert body["error"]["param"] == "messages"
    status, _, body = http("POST", fake.url + "/chat/completions", {"messages": user("x")}, auth)
    assert status == 400


def test_valid_keys():
    with FakeOpenAI(valid_keys={"good-test-key"}) as fake:
        good = openai.OpenAI(api_key="good-test-key", base_url=fake.url, max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=user("hi")).choices
        bad = openai.OpenAI(api_key="wrong-test-key-abcd", base_url=fake.url, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as exc_info:
            bad.chat.completions.create(model=MODEL, messages=user("hi"))
        error = exc_info.value.body
        assert error["code"] == "invalid_api_key"
        assert error["message"].startswith("Incorrect API key provided: ")
        assert "abcd." in error["message"]
        assert "wrong-test-key" not in error["message"]


def test_async_client_concurrency(fake):
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(
            api_key="test-key", base_url=fake.url, max_retries=0
        ) as aclient:
            resps = await asyncio.gather(
                *(
                    aclient.chat.completions.create(model=MODEL, messages=user(f"n{i}"))
                    for i in range(50)
                )
            )
            return [r.choices[0].message.content for r in resps]

    fake.latency = 0.1
    start = time.monotonic()
    contents = asyncio.run(run())
    assert sorted(contents) == sorted(f"Echo: n{i}" for i in range(50))
    assert time.monotonic() - start < 3
    assert len(fake.chat_requests()) == 50


# --------------------------------------------------------------------------- faults


def test_fault_429_with_retry_after(fake, client):
    fake.fail_next("429", retry_after=7)
    with pytest.raises(openai.RateLimitError) as exc_info:
        client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert exc_info.value.response.headers["retry-after"] == "7"
    assert exc_info.value.body["code"] == "rate_limit_exceeded"

    # marker form, and no header when no retry-after is given
    with pytest.raises(openai.RateLimitError) as exc_info:
        client.chat.completions.create(model=MODEL, messages=user("x [[fault:429:3]]"))
    assert exc_info.value.response.headers["retry-after"] == "3"
    with pytest.raises(openai.RateLimitError) as exc_info:
        client.chat.completions.create(model=MODEL, messages=user("x [[fault:429]]"))
    assert "retry-after" not in exc_info.value.response.headers

    # the fault was consumed; faulted requests are recorded too
    assert client.chat.completions.create(model=MODEL, messages=user("ok")).choices
    assert len(fake.chat_requests()) == 4


@pytest.mark.parametrize("status", ["500", "503"])
def test_fault_server_errors(fake, client, status):
    fake.fail_next(status, count=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as exc_info:
            client.chat.completions.create(model=MODEL, messages=user("hi"))
        assert exc_info.value.status_code == int(status)
    assert client.chat.completions.create(model=MODEL, messages=user("hi")).choices


def test_fault_401_and_400(fake, client):
    fake.fail_next("401")
    with pytest.raises(openai.AuthenticationError) as exc_info:
        client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert exc_info.value.body["code"] == "invalid_api_key"

    with pytest.raises(openai.BadRequestError) as exc_info:
        client.chat.completions.create(model=MODEL, messages=user("[[fault:400]]"))
    assert exc_info.value.body["code"] == "context_length_exceeded"


def test_fault_timeout(fake):
    fake.fail_next("timeout", delay=1.0)
    short = openai.OpenAI(api_key="test-key", base_url=fake.url, max_retries=0, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        short.chat.completions.create(model=MODEL, messages=user("hi"))
    assert time.monotonic() - start < 0.9
    # the marker form, with a delay the client tolerates, answers normally
    resp = short.chat.completions.create(model=MODEL, messages=user("[[fault:timeout:0.05]]"))
    assert resp.choices[0].finish_reason == "stop"


def test_fault_drop(fake, client):
    fake.fail_next("drop")
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=user("hi"))
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model=MODEL, messages=user("[[fault:drop]]"))
    assert client.chat.completions.create(model=MODEL, messages=user("hi")).choices


def test_fault_malformed(fake, client):
    fake.fail_next("malformed")
    with pytest.raises((ValueError, openai.APIError)) as exc_info:  # a JSON error
        client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert not isinstance(exc_info.value, openai.APIConnectionError)
    assert client.chat.completions.create(model=MODEL, messages=user("hi")).choices


def test_fault_cut_stream(fake, client):
    fake.stream_chunks = 6
    fake.fail_next("cut")
    stream = client.chat.completions.create(
        model=MODEL, messages=user("a reply long enough to cut"), stream=True
    )
    received, error = drain(stream)
    assert isinstance(error, openai.APIConnectionError)
    assert received
    assert received[0].choices[0].delta.role == "assistant"
    assert 1 <= len(received) - 1 < 6  # some, but not all, content chunks arrived
    assert all(c.choices[0].finish_reason is None for c in received)

    # marker form
    stream = client.chat.completions.create(
        model=MODEL, messages=user("x [[fault:cut]]"), stream=True
    )
    received, error = drain(stream)
    assert isinstance(error, openai.APIConnectionError)
    assert all(c.choices[0].finish_reason is None for c in received)


def test_start_fails_on_busy_port_and_stop_is_idempotent(fake):
    with pytest.raises(OSError):
        FakeOpenAI(port=fake.port).start()
    other = FakeOpenAI().start()
    other.stop()
    other.stop()


def test_fail_next_rejects_unknown_fault(fake):
    with pytest.raises(ValueError, match="unknown fault"):
        fake.fail_next("teapot")


def test_markers_can_be_turned_off():
    """Generated prompts (make test-schema) may contain markers by chance: with markers off
    every prompt is echoed as it is."""
    prompts = ["[[fault:500]]", "[[fault:timeout:9]] x", "[[reply:no]]", "[[latency:9]]"]
    with FakeOpenAI(markers=False) as fake:
        with openai.OpenAI(api_key="k", base_url=fake.url, max_retries=0, timeout=2) as c:
            for prompt in prompts:
                resp = c.chat.completions.create(model=MODEL, messages=user(prompt))
                assert resp.choices[0].message.content == f"Echo: {prompt}"
            streamed = c.chat.completions.create(
                model=MODEL, messages=user("[[fault:cut]] [[chunks:1]]"), stream=True
            )
            text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
            assert text == "Echo: [[fault:cut]] [[chunks:1]]"


# --------------------------------------------------------------------------- CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_starts_answers_and_stops():
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fake_openai",
            "--port",
            str(port),
            "--chunks",
            "3",
            "--no-markers",
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "CLI did not print its listening line"
        line = proc.stdout.readline().strip()
        url = f"http://127.0.0.1:{port}/v1"
        assert line == f"fake-openai listening on {url}"

        cli_client = openai.OpenAI(api_key="test-key", base_url=url, max_retries=0, timeout=5)
        resp = cli_client.chat.completions.create(model=MODEL, messages=user("via cli"))
        assert resp.choices[0].message.content == "Echo: via cli"
        chunks = list(
            cli_client.chat.completions.create(model=MODEL, messages=user("abc"), stream=True)
        )
        assert sum(1 for c in chunks if c.choices[0].delta.content) == 3
        # --no-markers: a fault marker is just text.
        resp = cli_client.chat.completions.create(model=MODEL, messages=user("[[fault:500]]"))
        assert resp.choices[0].message.content == "Echo: [[fault:500]]"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
