"""Shared fixtures. The only thing faked is the outside world: the OpenAI API, by a real HTTP
server on 127.0.0.1 (tests/fake_openai.py) that the service reaches through OPENAI_BASE_URL.

API tests go through the ASGI application that ships (`config.asgi.application`), with its
real middleware, over httpx's ASGI transport (`api`); tests/e2e runs it under uvicorn.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
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


@pytest.fixture(autouse=True)
def _fresh_user_caches() -> Iterator[None]:
    """Tests empty the database between them: forget the cached anonymous user and tokens."""
    from chat.api.authentication import forget_cached_tokens
    from chat.services import users

    users.forget_anonymous_user()
    forget_cached_tokens()
    yield
    users.forget_anonymous_user()
    forget_cached_tokens()


@pytest.fixture(autouse=True)
def _no_request_limits(settings) -> None:
    """Most tests send more than the anonymous rate limit allows, several at once: limits are
    off unless a test sets them (tests/billing, tests/chat/test_limits.py)."""
    settings.CHAT_THROTTLE_ANON = ""
    settings.CHAT_THROTTLE_USER = ""
    settings.CHAT_MAX_CONCURRENT_PER_USER = 0


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


@pytest.fixture(params=["aiohttp", "httpx"])
def http_client(request, settings) -> str:
    """Runs a test once per HTTP client the SDK can be given (OPENAI_HTTP_CLIENT)."""
    settings.OPENAI_HTTP_CLIENT = request.param
    return request.param


@pytest.fixture(autouse=True)
async def _drain_generations() -> Any:
    """Let generations started by a test finish inside its event loop."""
    yield
    from chat import generations, llm

    tasks = generations.pending_tasks()
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    # Each test has its own event loop, hence its own client: close its connections.
    await llm.close_client()


@pytest.fixture
async def api() -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the shipped ASGI application (no credentials: anonymous use)."""
    from config.asgi import application

    transport = httpx.ASGITransport(app=application, client=("127.0.0.1", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        yield client


def authenticated(client: httpx.AsyncClient, token: str) -> httpx.AsyncClient:
    """Another client of the same application, sending `Authorization: Token <token>`."""
    return httpx.AsyncClient(
        transport=client._transport,
        base_url=client.base_url,
        headers={"Authorization": f"Token {token}"},
    )


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


def error_of(response: httpx.Response) -> dict:
    """The body of an error response, checked against the one error shape."""
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["status"] == response.status_code
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    return error


JSON = {"Content-Type": "application/json"}


@pytest.fixture
def anonymous(transactional_db):
    """The shared user that requests without credentials act as."""
    from chat.services import users

    return users.anonymous_user()
