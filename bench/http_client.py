"""A minimal keep-alive HTTP/1.1 client, and Server-Sent Events parsing.

The client is an ``asyncio.Protocol`` that parses the response in ``data_received`` (no task
wake-up per chunk), so that the load generator stays light next to the service it measures.
One request at a time per connection; bodies delimited by Content-Length, chunked encoding or
the end of the connection. A body can be handed over piece by piece as it arrives (with the
time it arrived) instead of being collected, which is how streams are timed event by event.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

JSON = "application/json"
EVENT_STREAM = "text/event-stream"
MAX_HEAD_BYTES = 65536

#: Receives each piece of a response body as it arrives, with its arrival time.
BodySink = Callable[[bytes, float], None]


class ConnectionClosed(Exception):
    """The server closed the connection before the response was complete."""


class ProtocolError(Exception):
    """The response could not be parsed."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes  # empty when the body went to a sink
    head_at: float  # time.monotonic() when the status line and headers had arrived
    keep_alive: bool

    def json(self) -> Any:
        return json.loads(self.body)


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._sink: BodySink | None = None
        self._reset()

    def _reset(self) -> None:
        self._state = "head"  # head, body, size, chunk, trailer, until_close, done
        self._status = 0
        self._keep_alive = True
        self._remaining = 0
        self._parts: list[bytes] = []
        self._head_at = 0.0

    @property
    def awaiting_head(self) -> bool:
        """True until the response's status line and headers have arrived."""
        return self._state == "head"

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is None or self._waiter.done():
            return  # unsolicited bytes: the next request's parse will reject them
        try:
            self._parse()
        except Exception as exc:
            self._waiter.set_exception(ProtocolError(f"bad response: {exc!r}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None or self._waiter.done():
            return
        if self._state == "until_close":
            self._body_piece(bytes(self._buffer))
            self._finish()
        else:
            self._waiter.set_exception(ConnectionClosed(f"connection closed ({self._state})"))

    # -- API

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def request(self, data: bytes, sink: BodySink | None = None) -> asyncio.Future[Response]:
        """Send a whole request; the future gives the response. With `sink`, the body goes to it
        piece by piece as it arrives and the response's `body` is empty."""
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._sink = sink
        self._reset()
        self.transport.write(data)
        return self._waiter

    # -- parsing

    def _body_piece(self, piece: bytes) -> None:
        if self._sink is not None:
            self._sink(piece, time.monotonic())
        else:
            self._parts.append(piece)

    def _finish(self) -> None:
        assert self._waiter is not None
        body = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._waiter.set_result(Response(self._status, body, self._head_at, self._keep_alive))
        self._state = "done"

    def _parse(self) -> None:
        buffer = self._buffer
        while True:
            state = self._state
            if state == "head":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise ProtocolError("response head too large")
                    return
                lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
                del buffer[: end + 4]
                self._head_at = time.monotonic()
                self._read_head(lines)
                if self._state == "until_close":
                    return
            elif state == "body":
                if len(buffer) < self._remaining:
                    return
                self._body_piece(bytes(buffer[: self._remaining]))
                del buffer[: self._remaining]
                self._finish()
                return
            elif state == "size":
                end = buffer.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buffer[:end]).split(b";", 1)[0], 16)
                del buffer[: end + 2]
                self._remaining = size
                self._state = "chunk" if size else "trailer"
            elif state == "chunk":
                if len(buffer) < self._remaining + 2:
                    return
                self._body_piece(bytes(buffer[: self._remaining]))
                del buffer[: self._remaining + 2]
                self._state = "size"
            elif state == "trailer":
                if buffer[:2] == b"\r\n":
                    del buffer[:2]
                else:
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        return
                    del buffer[: end + 4]
                self._finish()
                return
            else:  # until_close (the body ends with the connection) or done
                return

    def _read_head(self, lines: list[str]) -> None:
        self._status = int(lines[0].split(" ", 2)[1])
        chunked = False
        length = -1
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif name == "connection":
                self._keep_alive = "close" not in value.lower()
        if chunked:
            self._state = "size"
        elif length >= 0:
            self._remaining = length
            self._state = "body"
        else:
            self._keep_alive = False
            self._state = "until_close"


@dataclass(frozen=True)
class Endpoint:
    """One service instance: where to connect, and what every request carries."""

    host: str
    port: int
    base_path: str = ""
    token: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.base_path}"

    def request(
        self, method: str, path: str, *, body: bytes | None = None, accept: str = JSON
    ) -> bytes:
        """The bytes of a request for `path` (below the endpoint's base path)."""
        head = [
            f"{method} {self.base_path}{path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            f"Accept: {accept}",
        ]
        if self.token:
            head.append(f"Authorization: Token {self.token}")
        if body is not None:
            head.append(f"Content-Type: {JSON}")
            head.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + (body or b"")

    async def connect(self) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(HttpConnection, self.host, self.port)
        return connection

    async def get(self, path: str, *, timeout: float = 10.0) -> Response:
        """One GET on a connection of its own."""
        async with asyncio.timeout(timeout):
            connection = await self.connect()
            try:
                return await connection.request(self.request("GET", path))
            finally:
                connection.close()


@dataclass(frozen=True, slots=True)
class SseEvent:
    name: str
    data: str
    at: float  # arrival time (time.monotonic()) of the bytes that completed the event

    def json(self) -> Any:
        return json.loads(self.data)


class SseParser:
    """Splits an event stream into events as its bytes arrive; comments (keep-alives) are
    dropped."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes, at: float) -> list[SseEvent]:
        blocks = (self._pending + data).split(b"\n\n")
        self._pending = blocks.pop()
        events = []
        for block in blocks:
            name = "message"
            data_lines = []
            for line in block.decode().split("\n"):
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data_lines.append(line[5:].removeprefix(" "))
            if data_lines:
                events.append(SseEvent(name, "\n".join(data_lines), at))
        return events


def parse_sse(body: bytes) -> list[SseEvent]:
    """The events of a whole event-stream body."""
    return SseParser().feed(body + b"\n\n", 0.0)
