"""A lean HTTP/1.1 transport for the SDK's HTTP client (httpx2), on asyncio and httptools.

The `openai` SDK sends every request through an httpx2 client; what carries the bytes is a
pluggable transport. With httpx2's own client and transport a model call costs 1.35 ms of CPU,
with the SDK's aiohttp adapter 0.81 ms, with this transport and LeanAsyncClient (below) 0.49 ms
(`make bench-transport`, BENCHMARKS.md). It does only what a client of one API needs: keep-alive
connections per origin (a pool with a size limit), requests with a body of bytes, responses
parsed by httptools (the C parser uvicorn uses), streamed to the SDK as they arrive, and
httpx2's own exceptions for timeouts and broken connections, which the SDK turns into its
APITimeoutError / APIConnectionError. HTTPS uses the system's trust store. Proxies are not
supported: use OPENAI_HTTP_BACKEND=httpx behind one.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import httptools
import httpx2

Origin = tuple[str, str, int]  # scheme, host, port


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._headers_done: asyncio.Future | None = None
        self._reset_response()

    def _reset_response(self) -> None:
        """Forget the previous response, before the next request on this connection."""
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks.clear()
        self._complete = False
        self._keep_alive = False
        self._body_until_close = False
        self._error: Exception | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._parser is None:  # bytes nobody asked for: the connection is unusable
            self._fail(httpx2.RemoteProtocolError("Unexpected data on an idle connection."))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx2.RemoteProtocolError("Unexpected protocol upgrade."))
        except httptools.HttpParserError as exc:
            self._fail(httpx2.RemoteProtocolError(f"Malformed HTTP response: {exc}"))

    def eof_received(self) -> bool | None:
        self._ended(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)

    def _ended(self, exc: Exception | None) -> None:
        if exc is None and self._body_until_close and not self._complete:
            # A response with neither Content-Length nor chunked encoding ends with the stream.
            self._keep_alive = False
            self.on_message_complete()
        elif exc is not None:
            self._fail(httpx2.ReadError(f"The connection broke: {exc}"))
        else:
            self._fail(httpx2.RemoteProtocolError("Server disconnected before the response ended."))
        self.closed = True

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        # llhttp answers this only until the message is complete.
        self._keep_alive = self._parser.should_keep_alive()
        framed = {name.lower() for name, _ in self._headers} & {
            b"content-length",
            b"transfer-encoding",
        }
        self._body_until_close = not framed
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_result(None)
        self._wake()

    # internals
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        self.closed = True
        if self._complete:
            return
        if self._error is None:
            self._error = error
        if self._headers_done is not None and not self._headers_done.done():
            self._headers_done.set_exception(error)
        self._wake()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def send(
        self, request_head: bytes, body: bytes, read_timeout: float | None
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Send a request and wait for the response's head: (status, headers)."""
        self._parser = httptools.HttpResponseParser(self)
        self._reset_response()
        self._headers_done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request_head + body)
        await self._wait(self._headers_done, read_timeout)
        return self._parser.get_status_code(), self._headers

    async def body(self, read_timeout: float | None) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        while True:
            while self._chunks:
                yield self._chunks.popleft()
            if self._complete:
                return
            if self._error is not None:
                raise self._error
            self._waiter = loop.create_future()
            try:
                await self._wait(self._waiter, read_timeout)
            finally:
                self._waiter = None

    async def _wait(self, future: asyncio.Future, timeout: float | None) -> None:
        """Await `future`; after `timeout` seconds the connection fails with ReadTimeout. A
        plain timer rather than asyncio.timeout(): one per wait, on every call."""
        if timeout is None:
            await future
            return
        timer = asyncio.get_running_loop().call_later(timeout, self._read_timed_out)
        try:
            await future
        finally:
            timer.cancel()

    def _read_timed_out(self) -> None:
        self._fail(httpx2.ReadTimeout("Timed out waiting for the response."))
        self.close()

    @property
    def reusable(self) -> bool:
        return self._complete and self._keep_alive and not self.closed


class _ResponseStream(httpx2.AsyncByteStream):
    def __init__(self, pool: HTTPTransport, connection: _Connection, read_timeout: float | None):
        self._pool = pool
        self._connection = connection
        self._read_timeout = read_timeout
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._connection.body(self._read_timeout):
            yield chunk
        self._release()

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._connection)


class HTTPTransport(httpx2.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 connections per origin, at most `max_connections` in all."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._idle: dict[Origin, collections.deque[_Connection]] = collections.defaultdict(
            collections.deque
        )
        self._slots = asyncio.Semaphore(max_connections)
        self._keepalive_expiry = keepalive_expiry
        self._ssl = ssl_context  # None: the system's trust store, certificates verified

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(origin),
                    host,
                    port,
                    ssl=self._ssl_context() if scheme == "https" else None,
                )
        except TimeoutError:
            raise httpx2.ConnectTimeout(f"Timed out connecting to {host}:{port}.") from None
        except OSError as exc:
            raise httpx2.ConnectError(f"Could not connect to {host}:{port}: {exc}") from exc
        return connection

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive_expiry:
                return connection
            connection.close()
            self._slots.release()
        return None

    def release(self, connection: _Connection) -> None:
        if connection.reusable:
            connection._parser = None
            connection.idle_since = time.monotonic()
            self._idle[connection.origin].append(connection)
        else:
            connection.close()
            self._slots.release()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx2.UnsupportedProtocol(f"Unsupported URL scheme {scheme!r}.")
        port = url.port or (443 if scheme == "https" else 80)
        origin = (scheme, url.host, port)
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()

        connection = self._idle_connection(origin)
        if connection is None:
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpx2.PoolTimeout("No connection became free in time.") from None
            try:
                connection = await self._connect(origin, timeouts.get("connect"))
            except BaseException:
                self._slots.release()
                raise

        head = [f"{request.method} {url.raw_path.decode('ascii')} HTTP/1.1\r\n".encode("ascii")]
        for name, value in request.headers.raw:
            head.append(name + b": " + value + b"\r\n")
        head.append(b"\r\n")
        try:
            status, headers = await connection.send(b"".join(head), body, timeouts.get("read"))
        except BaseException:
            connection.close()
            self._slots.release()
            raise
        return httpx2.Response(
            status_code=status,
            headers=headers,
            stream=_ResponseStream(self, connection, timeouts.get("read")),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()


class LeanAsyncClient(httpx2.AsyncClient):
    """The httpx2 client the SDK is given with HTTPTransport.

    httpx2's client merges client-level headers, cookies and query parameters into every
    request, parses its URL again, runs auth and redirect flows and a cookie jar over every
    response: about a third of the CPU of a chat call here (BENCHMARKS.md), for features a
    client of one JSON API does not use (the SDK sets every header, authenticates with one,
    and the API neither redirects nor sets cookies). This client sends the SDK's request as it
    is built; anything beyond that (form data, files, query parameters, cookies, an auth
    flow) takes httpx2's own path. Redirects are not followed: a 3xx reaches the SDK as an
    error, which for a misconfigured OPENAI_BASE_URL says more than a silent hop.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._urls: dict[str, httpx2.URL] = {}

    def _url(self, url: httpx2.URL | str) -> httpx2.URL:
        if isinstance(url, httpx2.URL):
            return url
        parsed = self._urls.get(url)
        if parsed is None:
            parsed = self._merge_url(url)
            if len(self._urls) < 64:  # the SDK calls a handful of endpoints
                self._urls[url] = parsed
        return parsed

    def build_request(  # type: ignore[override]
        self,
        method: str,
        url: httpx2.URL | str,
        *,
        content: Any = None,
        data: Any = None,
        files: Any = None,
        json: Any = None,
        params: Any = None,
        headers: Any = None,
        cookies: Any = None,
        timeout: Any = httpx2.USE_CLIENT_DEFAULT,
        extensions: dict | None = None,
    ) -> httpx2.Request:
        if data is not None or files is not None or params or cookies or self.cookies:
            return super().build_request(
                method,
                url,
                content=content,
                data=data,
                files=files,
                json=json,
                params=params,
                headers=headers,
                cookies=cookies,
                timeout=timeout,
                extensions=extensions,
            )
        extensions = {} if extensions is None else extensions
        if "timeout" not in extensions:
            chosen = (
                self.timeout
                if isinstance(timeout, type(httpx2.USE_CLIENT_DEFAULT))
                else httpx2.Timeout(timeout)
            )
            extensions = {**extensions, "timeout": chosen.as_dict()}
        return httpx2.Request(
            method,
            self._url(url),
            content=content,
            json=json,
            headers=headers,
            extensions=extensions,
        )

    async def send(  # type: ignore[override]
        self,
        request: httpx2.Request,
        *,
        stream: bool = False,
        auth: Any = httpx2.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx2.USE_CLIENT_DEFAULT,
    ) -> httpx2.Response:
        if self.is_closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        if auth is not httpx2.USE_CLIENT_DEFAULT or self.auth is not None:
            return await super().send(
                request, stream=stream, auth=auth, follow_redirects=follow_redirects
            )
        response = await self._transport.handle_async_request(request)
        response.request = request
        response.default_encoding = self._default_encoding
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response
