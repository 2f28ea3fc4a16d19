"""Shared fixtures. The only thing faked is the outside world: the OpenAI API, by a real HTTP
server on 127.0.0.1 (tests/fake_openai.py) that the service reaches through OPENAI_BASE_URL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.fake_openai import FakeOpenAI

TEST_API_KEY = "test-key"


@pytest.fixture(scope="session", autouse=True)
def _close_database_threads(django_db_setup, django_db_blocker) -> Iterator[None]:
    """The ORM threads of chat.db keep connections open; close them before the test database
    is dropped (PostgreSQL refuses to drop a database in use)."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    from chat import db

    db.close_connections()
    # Django's own async ORM calls in tests (aget, acount...) run on asgiref's shared thread.
    SyncToAsync.single_thread_executor.submit(connections.close_all).result()


@pytest.fixture(scope="session")
def fake_openai_server() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def fake_openai(fake_openai_server: FakeOpenAI, settings) -> Iterator[FakeOpenAI]:
    """The fake OpenAI server, reset, with the service configured to use it."""
    fake_openai_server.reset()
    settings.OPENAI_API_KEY = TEST_API_KEY
    settings.OPENAI_BASE_URL = fake_openai_server.url
    settings.OPENAI_MAX_RETRIES = 0
    settings.OPENAI_TIMEOUT = 5.0
    settings.CHAT_STREAM_SAVE_INTERVAL = 0.05
    yield fake_openai_server
    fake_openai_server.reset()


@pytest.fixture(params=["httptools", "aiohttp", "httpx"])
def http_backend(request, settings) -> str:
    """Runs a test once per HTTP transport the SDK can be given (OPENAI_HTTP_BACKEND)."""
    settings.OPENAI_HTTP_BACKEND = request.param
    return request.param


@pytest.fixture(autouse=True)
async def _drain_generations() -> Any:
    """Let generations started by a test finish inside its event loop."""
    yield
    from chat import llm, streams

    tasks = [g.task for g in streams.in_flight() if g.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    # Each test has its own event loop, hence its own client: close its connections.
    await llm.close_client()


@dataclass
class SSEEvent:
    event: str
    data: Any


def parse_sse(body: str) -> list[SSEEvent]:
    events = []
    for block in body.split("\n\n"):
        name, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].strip())
        if data:
            events.append(SSEEvent(name, json.loads("\n".join(data))))
    return events


async def read_streaming(response) -> str:
    chunks = [chunk async for chunk in response.streaming_content]
    return b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks).decode()
