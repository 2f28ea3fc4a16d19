"""A fake OpenAI-compatible HTTP server for tests, benchmarks and CI.

It is a real HTTP server (aiohttp) on 127.0.0.1 that speaks enough of the
Chat Completions protocol for the official ``openai`` SDK to talk to it:

* ``GET  /v1/models`` (and ``GET /v1/models/{id}``)
* ``POST /v1/chat/completions`` (plain and ``"stream": true``)

Replies are deterministic: ``"Echo: <last user message>"`` unless overridden
with :attr:`FakeOpenAI.reply` or a ``[[reply:TEXT]]`` marker in the last user
message.  Faults (429/500/503/401/400, timeouts, malformed bodies, dropped or
cut connections) can be queued with :meth:`FakeOpenAI.fail_next` or triggered
with a ``[[fault:NAME]]`` / ``[[fault:429:RETRY_AFTER]]`` /
``[[fault:timeout:SECONDS]]`` marker in the last user message.  Other markers:
``[[refusal:TEXT]]`` (the model refuses: ``content`` null, ``refusal`` TEXT),
``[[latency:SECONDS]]`` and ``[[chunks:N]]`` (this reply's duration and stream chunks),
``[[nousage]]`` (no ``usage`` in the reply, even when a stream asks for it).
With ``markers=False`` (``--no-markers``) prompts are never read for markers: every prompt is
echoed, whatever it contains (for generated traffic, e.g. ``make test-schema``).

In-process use::

    with FakeOpenAI() as fake:
        client = openai.OpenAI(api_key="test-key", base_url=fake.url)
        ...

Command line (foreground, stops on SIGTERM/SIGINT)::

    python -m tests.fake_openai --host 127.0.0.1 --port 8001 --latency 1.0 --chunks 20
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import web
from aiohttp.web_request import BaseRequest

__all__ = ["FAULTS", "FakeOpenAI", "RecordedRequest", "main"]

#: Fault names accepted by :meth:`FakeOpenAI.fail_next` and ``[[fault:NAME]]``.
FAULTS = frozenset({"429", "500", "503", "401", "400", "timeout", "malformed", "drop", "cut"})

DEFAULT_TIMEOUT_DELAY = 30.0
MODELS = ("gpt-3.5-turbo", "gpt-4o-mini", "gpt-4o")
MODEL_CREATED = 1686935002
CLIENT_MAX_SIZE = 64 * 1024 * 1024
MALFORMED_BODY = b'{"id": "chatcmpl-broken", "choices": ['

_REPLY_RE = re.compile(r"\[\[reply:(.*?)\]\]", re.DOTALL)
_REFUSAL_RE = re.compile(r"\[\[refusal:(.*?)\]\]", re.DOTALL)
_LATENCY_RE = re.compile(r"\[\[latency:([0-9]+(?:\.[0-9]*)?)\]\]")
_CHUNKS_RE = re.compile(r"\[\[chunks:([0-9]+)\]\]")
_NO_USAGE = "[[nousage]]"
_FAULT_RE = re.compile(r"\[\[fault:([A-Za-z0-9_]+)(?::([0-9]+(?:\.[0-9]*)?))?\]\]")
_JSON = "application/json"
_IMMEDIATE_FAULTS = frozenset({"429", "500", "503", "401", "400", "malformed", "drop"})


@dataclass
class RecordedRequest:
    """One HTTP request received by the fake server."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased header names
    json: Any | None  # parsed JSON body, or None (no body / not JSON)
    # The ``usage`` the server reported in its reply (None: none was sent, e.g. ``[[nousage]]``,
    # a stream without ``include_usage``, a fault or a cut stream).
    usage: dict[str, int] | None = None


@dataclass(frozen=True)
class _Fault:
    name: str
    retry_after: float | None = None
    delay: float | None = None


# --------------------------------------------------------------------------- helpers


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error(
    status: int,
    message: str,
    type_: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, body=_dumps(body), content_type=_JSON, headers=headers)


def _content_text(content: Any) -> str:
    """Text of a message ``content`` (a string or a list of content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return " ".join(parts)
    return ""


def _mask_key(key: str) -> str:
    last4 = key[-4:]
    if len(key) > 8:
        return f"{key[:3]}...{last4}"
    return f"...{last4}"


def _split_text(text: str, n: int) -> list[str]:
    """Split ``text`` into at most ``n`` roughly equal, non-empty pieces."""
    if not text:
        return []
    length = len(text)
    n = max(1, min(n, length))
    return [text[i * length // n : (i + 1) * length // n] for i in range(n)]


def _close_connection(request: BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a project dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# --------------------------------------------------------------------------- server


class FakeOpenAI:
    """Fake OpenAI Chat Completions server (see module docstring)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float = 0.0,
        stream_chunks: int = 5,
        valid_keys: Iterable[str] | None = None,
        record: bool = True,
        markers: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.latency = float(latency)
        self.stream_chunks = int(stream_chunks)
        self.valid_keys: frozenset[str] | None = frozenset(valid_keys) if valid_keys else None
        self.reply: str | None = None
        self.record = record
        self.markers = markers
        self.requests: list[RecordedRequest] = []

        self._initial_stream_chunks = self.stream_chunks
        self._lock = threading.Lock()
        self._faults: collections.deque[_Fault] = collections.deque()
        self._ids = itertools.count(1)
        self._runner: web.BaseRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- public API

    @property
    def url(self) -> str:
        """Base URL including ``/v1`` (what ``OPENAI_BASE_URL`` is set to)."""
        if not self.port:
            raise RuntimeError("FakeOpenAI is not started (no port assigned yet)")
        host = self.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/v1"

    def start(self) -> Self:
        """Serve from a daemon thread with its own event loop; return once listening."""
        if self._thread is not None:
            return self
        loop = _new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_forever()
            finally:
                try:
                    pending = asyncio.all_tasks(loop)
                    for task in pending:
                        task.cancel()
                    if pending:
                        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                finally:
                    loop.close()

        thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._astart(), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            raise
        self._loop, self._thread = loop, thread
        return self

    def stop(self) -> None:
        """Stop the server and its thread (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        self._thread = self._loop = None
        try:
            asyncio.run_coroutine_threadsafe(self._astop(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)

    def fail_next(
        self,
        fault: str,
        *,
        count: int = 1,
        retry_after: int | None = None,
        delay: float | None = None,
    ) -> None:
        """Make the next ``count`` chat-completion requests hit ``fault``."""
        name = str(fault)
        if name not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {sorted(FAULTS)}")
        if count < 1:
            raise ValueError("count must be >= 1")
        item = _Fault(name, retry_after, delay)
        with self._lock:
            self._faults.extend([item] * count)

    def reset(self) -> None:
        """Forget requests, queued faults and reply override; reset latency/chunks."""
        with self._lock:
            self.requests.clear()
            self._faults.clear()
        self.reply = None
        self.latency = 0.0
        self.stream_chunks = self._initial_stream_chunks

    def chat_requests(self) -> list[RecordedRequest]:
        """Recorded ``POST /v1/chat/completions`` requests, in order."""
        with self._lock:
            return [
                r for r in self.requests if r.method == "POST" and r.path == "/v1/chat/completions"
            ]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- lifecycle

    async def _astart(self) -> None:
        loop = asyncio.get_running_loop()

        def request_factory(message, payload, protocol, writer, task):  # type: ignore[no-untyped-def]
            return BaseRequest(
                message,
                payload,
                protocol,
                writer,
                task,
                loop,
                client_max_size=CLIENT_MAX_SIZE,
            )

        server = web.Server(self._handle, request_factory=request_factory, access_log=None)
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.25)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, backlog=4096, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        sockets = getattr(site._server, "sockets", None) or ()
        if sockets:
            self.port = sockets[0].getsockname()[1]
        self._runner = runner

    async def _astop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # ---------------------------------------------------------------- handlers

    async def _handle(self, request: BaseRequest) -> web.StreamResponse:
        method = request.method
        path = request.path
        raw = await request.read() if request.body_exists else b""
        body: Any = None
        rec: RecordedRequest | None = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        if self.record:
            headers = {k.lower(): v for k, v in request.headers.items()}
            rec = RecordedRequest(method=method, path=path, headers=headers, json=body)
            with self._lock:
                self.requests.append(rec)

        if path == "/v1/chat/completions" and method == "POST":
            return await self._chat(request, raw, body, rec)
        if method == "GET":
            if path == "/v1/models":
                return web.Response(
                    body=_dumps({"object": "list", "data": [self._model(m) for m in MODELS]}),
                    content_type=_JSON,
                )
            if path.startswith("/v1/models/") and path[len("/v1/models/") :] in MODELS:
                return web.Response(
                    body=_dumps(self._model(path[len("/v1/models/") :])),
                    content_type=_JSON,
                )
        return _error(404, f"Invalid URL ({method} {path})", "invalid_request_error")

    @staticmethod
    def _model(model_id: str) -> dict[str, Any]:
        return {
            "id": model_id,
            "object": "model",
            "created": MODEL_CREATED,
            "owned_by": "openai",
        }

    def _pop_fault(self) -> _Fault | None:
        if not self._faults:
            return None
        with self._lock:
            return self._faults.popleft() if self._faults else None

    async def _chat(
        self, request: BaseRequest, raw: bytes, body: Any, rec: RecordedRequest | None = None
    ) -> web.StreamResponse:
        stream = isinstance(body, dict) and body.get("stream") is True

        fault = self._pop_fault()
        if fault is not None:
            if fault.name in _IMMEDIATE_FAULTS or (fault.name == "cut" and not stream):
                return self._fault_response(request, fault, stream)
            if fault.name == "timeout":
                await asyncio.sleep(
                    fault.delay if fault.delay is not None else DEFAULT_TIMEOUT_DELAY
                )

        # -- auth
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return _error(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth "
                "(i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
            )
        if self.valid_keys and key not in self.valid_keys:
            return self._invalid_key(key)

        # -- validation
        if not isinstance(body, dict):
            if raw:
                msg = (
                    "We could not parse the JSON body of your request. (HINT: This "
                    "likely means you aren't using your HTTP library correctly.)"
                )
            else:
                msg = "you must provide a model parameter"
            return _error(400, msg, "invalid_request_error")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _error(400, "you must provide a model parameter", "invalid_request_error")
        messages = body.get("messages")
        if "messages" not in body:
            return _error(
                400,
                "Missing required parameter: 'messages'.",
                "invalid_request_error",
                param="messages",
                code="missing_required_parameter",
            )
        if not isinstance(messages, list):
            return _error(
                400,
                "Invalid type for 'messages': expected an array, but got "
                f"{type(messages).__name__} instead.",
                "invalid_request_error",
                param="messages",
                code="invalid_type",
            )
        if not messages:
            return _error(
                400,
                "Invalid 'messages': empty array. Expected an array with minimum "
                "length 1, but got an empty array instead.",
                "invalid_request_error",
                param="messages",
                code="empty_array",
            )
        prompt_tokens = 0
        last_user = ""
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
                return _error(
                    400,
                    f"Invalid 'messages[{i}]': expected an object with a 'role'.",
                    "invalid_request_error",
                    param=f"messages[{i}]",
                    code="invalid_value",
                )
            text = _content_text(msg.get("content"))
            prompt_tokens += len(text.split()) + 4
            if msg["role"] == "user":
                last_user = text

        # -- markers in the last user message
        marker_reply = None
        refusal = False
        no_usage = False
        latency = self.latency
        chunks = self.stream_chunks
        if self.markers and "[[" in last_user:
            if fault is None:
                m = _FAULT_RE.search(last_user)
                if m is not None:
                    name, number = m.group(1), m.group(2)
                    if name not in FAULTS:
                        return _error(
                            400,
                            f"Unknown fake fault {name!r}; expected one of {sorted(FAULTS)}.",
                            "invalid_request_error",
                        )
                    num = float(number) if number else None
                    if name == "429" and num is not None:
                        fault = _Fault(name, retry_after=int(num) if num.is_integer() else num)
                    else:
                        fault = _Fault(name, delay=num)
                    if name in _IMMEDIATE_FAULTS or (name == "cut" and not stream):
                        return self._fault_response(request, fault, stream, prompt_tokens)
                    if name == "timeout":
                        await asyncio.sleep(num if num is not None else DEFAULT_TIMEOUT_DELAY)
            m = _REPLY_RE.search(last_user)
            if m is not None:
                marker_reply = m.group(1)
            m = _REFUSAL_RE.search(last_user)
            if m is not None:
                marker_reply, refusal = m.group(1), True
            m = _LATENCY_RE.search(last_user)
            if m is not None:
                latency = float(m.group(1))
            m = _CHUNKS_RE.search(last_user)
            if m is not None:
                chunks = max(1, int(m.group(1)))
            no_usage = _NO_USAGE in last_user

        if marker_reply is not None:
            text = marker_reply
        elif self.reply is not None:
            text = self.reply
        else:
            text = f"Echo: {last_user}"

        # -- max_tokens
        finish_reason = "stop"
        words = text.split()
        completion_tokens = max(1, len(words))
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if (
            isinstance(max_tokens, int)
            and not isinstance(max_tokens, bool)
            and completion_tokens > max_tokens
        ):
            text = " ".join(words[: max(0, max_tokens)])
            completion_tokens = max(0, max_tokens)
            finish_reason = "length"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        completion_id = f"chatcmpl-{next(self._ids)}"
        created = int(time.time())

        if stream:
            so = body.get("stream_options")
            include_usage = isinstance(so, dict) and so.get("include_usage") is True
            return await self._stream(
                request,
                completion_id=completion_id,
                created=created,
                model=model,
                text=text,
                finish_reason=finish_reason,
                usage=usage if include_usage and not no_usage else None,
                cut=fault is not None and fault.name == "cut",
                latency=latency,
                chunks=chunks,
                refusal=refusal,
                rec=rec,
            )

        if latency > 0:
            await asyncio.sleep(latency)
        if rec is not None and not no_usage:
            rec.usage = usage
        reply = {"role": "assistant", "content": text, "refusal": None}
        if refusal:
            reply = {"role": "assistant", "content": None, "refusal": text}
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": reply,
                    "finish_reason": finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": None if no_usage else usage,
            "system_fingerprint": None,
        }
        return web.Response(body=_dumps(payload), content_type=_JSON)

    async def _stream(
        self,
        request: BaseRequest,
        *,
        completion_id: str,
        created: int,
        model: str,
        text: str,
        finish_reason: str,
        usage: dict[str, int] | None,
        cut: bool,
        latency: float,
        chunks: int,
        refusal: bool = False,
        rec: RecordedRequest | None = None,
    ) -> web.StreamResponse:
        include_usage = usage is not None
        base = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data: dict[str, Any] = dict(base)
            data["choices"] = [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            ]
            if include_usage:
                data["usage"] = None
            return b"data: " + _dumps(data) + b"\n\n"

        # Content chunks are the bulk of the work: splice the JSON-encoded piece into a
        # pre-rendered template instead of serialising a whole dict per chunk.
        field = "refusal" if refusal else "content"
        head, _, tail = chunk({field: ""}).partition(f'"{field}":""'.encode())
        head += f'"{field}":'.encode()

        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
            }
        )
        pieces = _split_text(text, chunks)
        delay = latency / len(pieces) if pieces and latency > 0 else 0.0
        if cut:
            pieces = pieces[: len(pieces) // 2]
        pending = [chunk({"role": "assistant", "content": ""})]
        try:
            await resp.prepare(request)
            for piece in pieces:
                if delay:
                    await resp.write(b"".join(pending))
                    pending.clear()
                    await asyncio.sleep(delay)
                pending.append(head + json.dumps(piece).encode() + tail)
            if cut:
                if pending:
                    await resp.write(b"".join(pending))
                _close_connection(request)
                return resp
            pending.append(chunk({}, finish_reason))
            if usage is not None:
                data = dict(base)
                data["choices"] = []
                data["usage"] = usage
                pending.append(b"data: " + _dumps(data) + b"\n\n")
            pending.append(b"data: [DONE]\n\n")
            if rec is not None:  # before the client can see it
                rec.usage = usage
            await resp.write_eof(b"".join(pending))
        except ConnectionError:  # the client went away
            if rec is not None:
                rec.usage = None
        return resp

    def _invalid_key(self, key: str) -> web.Response:
        return _error(
            401,
            f"Incorrect API key provided: {_mask_key(key)}. "
            "You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            code="invalid_api_key",
        )

    def _fault_response(
        self,
        request: BaseRequest,
        fault: _Fault,
        stream: bool,
        prompt_tokens: int | None = None,
    ) -> web.Response:
        name = fault.name
        if name == "429":
            headers = None
            if fault.retry_after is not None:
                headers = {"retry-after": str(fault.retry_after)}
            return _error(
                429,
                "Rate limit reached for requests. Please try again later.",
                "requests",
                code="rate_limit_exceeded",
                headers=headers,
            )
        if name == "500":
            return _error(
                500,
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
            )
        if name == "503":
            return _error(
                503,
                "The server is overloaded or not ready yet.",
                "server_error",
                code="service_unavailable",
            )
        if name == "401":
            key = request.headers.get("Authorization", "").partition(" ")[2].strip()
            return self._invalid_key(key)
        if name == "400":
            tokens = prompt_tokens if prompt_tokens is not None else 20000
            return _error(
                400,
                "This model's maximum context length is 16385 tokens. However, your "
                f"messages resulted in {max(tokens, 16386)} tokens. "
                "Please reduce the length of the messages.",
                "invalid_request_error",
                param="messages",
                code="context_length_exceeded",
            )
        if name == "malformed":
            if stream:
                return web.Response(
                    body=b"data: " + MALFORMED_BODY + b"\n\n",
                    headers={"Content-Type": "text/event-stream; charset=utf-8"},
                )
            return web.Response(body=MALFORMED_BODY, content_type=_JSON)
        # "drop" (and "cut" for non-streaming requests): close without any response.
        _close_connection(request)
        return web.Response()


# --------------------------------------------------------------------------- CLI


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeOpenAI(
        host=args.host,
        port=args.port,
        latency=args.latency,
        stream_chunks=args.chunks,
        valid_keys=args.valid_key or None,
        record=False,
        markers=not args.no_markers,
    )
    if args.reply is not None:
        fake.reply = args.reply
    await fake._astart()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # non-Unix
            loop.add_signal_handler(sig, stop.set)
    print(f"fake-openai listening on {fake.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await fake._astop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fake_openai",
        description="Fake OpenAI Chat Completions server.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per reply")
    parser.add_argument("--chunks", type=int, default=5, help="content chunks per streamed reply")
    parser.add_argument("--reply", default=None, help="fixed reply text for every request")
    parser.add_argument(
        "--valid-key",
        action="append",
        default=[],
        help="accepted API key (repeatable; default: any non-empty key)",
    )
    parser.add_argument(
        "--no-markers",
        action="store_true",
        help="ignore [[...]] markers in prompts (echo every prompt as it is)",
    )
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        run = asyncio.run
    else:
        run = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):  # the signal handler normally wins
        run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
