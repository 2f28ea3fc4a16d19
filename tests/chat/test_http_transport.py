"""chat.http_transport, the SDK's default HTTP transport, against real sockets: the fake OpenAI
server, and for the odd corners raw servers written here."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx2
import pytest
import trustme

from chat.http_transport import HTTPTransport, LeanAsyncClient
from tests.conftest import TEST_API_KEY

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _raw_server(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(transport=HTTPTransport(max_connections=4)) as client:
        yield client


async def test_requests_reuse_one_keep_alive_connection(client, fake_openai_server):
    fake_openai_server.reset()
    url = fake_openai_server.url + "/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {TEST_API_KEY}"}
    local_ports = set()
    for _ in range(3):
        response = await client.post(url, json=body, headers=headers)
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == "Echo: hi"
        pool = client._transport._idle  # the one idle connection, back in the pool
        [[connection]] = [list(idle) for idle in pool.values()]
        local_ports.add(connection.transport.get_extra_info("sockname")[1])
    assert len(local_ports) == 1
    assert [r.json["messages"] for r in fake_openai_server.chat_requests()] == [
        body["messages"]
    ] * 3


async def test_a_chunked_response_is_streamed_as_it_arrives(client):
    release = asyncio.Event()

    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    server, base = await _raw_server(handler)
    async with server, client.stream("GET", base + "/") as response:
        chunks = response.aiter_bytes()
        assert await anext(chunks) == b"first"  # before the server sent the rest
        release.set()
        assert await anext(chunks) == b"second"


async def test_a_response_without_length_ends_with_the_connection(client):
    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"ok": true}')
        await writer.drain()
        writer.close()

    server, base = await _raw_server(handler)
    async with server:
        response = await client.get(base + "/")
    assert response.json() == {"ok": True}
    assert not client._transport._idle.get(("http", "127.0.0.1", response.url.port))


async def test_a_connection_closed_before_the_answer_is_a_protocol_error(client):
    async def handler(reader, writer):
        await _read_request(reader)
        writer.close()

    server, base = await _raw_server(handler)
    async with server:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.post(base + "/", content=b"{}")


async def test_a_slow_answer_is_a_read_timeout_and_a_refused_connection_a_connect_error(client):
    async def handler(reader, writer):
        await _read_request(reader)
        await asyncio.sleep(5)

    server, base = await _raw_server(handler)
    async with server:
        with pytest.raises(httpx2.ReadTimeout):
            await client.post(base + "/", content=json.dumps({}).encode(), timeout=0.2)
    with pytest.raises(httpx2.ConnectError):
        await client.get(base + "/")  # the server is gone


async def test_the_lean_client_sends_the_request_as_built_and_falls_back_for_the_rest():
    seen = []

    async def handler(reader, writer):
        while not reader.at_eof():
            try:
                seen.append(await _read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    server, base = await _raw_server(handler)
    async with server, LeanAsyncClient(transport=HTTPTransport()) as client:
        lean = client.build_request(
            "POST", base + "/v1/chat", content=b'{"a": 1}', headers={"X-Key": "v"}, timeout=3.0
        )
        assert lean.extensions["timeout"]["read"] == 3.0
        assert (await client.send(lean)).json() == {}
        with_query = client.build_request("GET", base + "/v1/models", params={"limit": 2})
        assert with_query.url.query == b"limit=2"
        assert (await client.send(with_query)).status_code == 200
    assert seen[0].startswith(b"POST /v1/chat HTTP/1.1\r\n")
    assert b"\r\nX-Key: v\r\n" in seen[0] and seen[0].endswith(b'\r\n\r\n{"a": 1}')
    assert seen[1].startswith(b"GET /v1/models?limit=2 HTTP/1.1\r\n")


async def test_https_verifies_the_servers_certificate():
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def handler(reader, writer):
        await _read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"tls": 1}\n')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_context)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    async with server:
        async with httpx2.AsyncClient(transport=HTTPTransport(ssl_context=trusting)) as client:
            assert (await client.get(url)).json() == {"tls": 1}
        # The system's trust store does not know this CA: the connection is refused.
        async with httpx2.AsyncClient(transport=HTTPTransport()) as client:
            with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(url)
