"""Fixtures of the billing tests: users, prices, Redis (one database only), threads."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.db import connections

from billing.prices import parse_model_prices

# The one Redis database the tests use (they delete only the keys they create there);
# TEST_REDIS_URL picks another, e.g. when several checkouts share one Redis server.
REDIS_TEST_URL = os.environ.get("TEST_REDIS_URL") or "redis://127.0.0.1:6379/2"

# Simple prices for arithmetic in the tests: "cheap" costs 1 micro-dollar (10**6 pico) per input
# token and 2 per output token.
TEST_PRICES = "cheap=1:2,free=0:0"


@pytest.fixture
def prices(settings) -> dict:
    settings.CHAT_MODEL_PRICES = parse_model_prices(
        TEST_PRICES, allowed_models=settings.OPENAI_ALLOWED_MODELS
    )
    return settings.CHAT_MODEL_PRICES


@pytest.fixture
def billing_settings(settings, prices):
    """Known billing settings: monthly budget of $1, cap of 4, TTL 60 s."""
    settings.CHAT_USER_BUDGET_USD = Decimal("1")
    settings.CHAT_USER_BUDGET_PERIOD = "month"
    settings.CHAT_MAX_CONCURRENT_PER_USER = 4
    settings.CHAT_RESERVATION_TTL_SECONDS = 60.0
    return settings


@pytest.fixture
def make_user(django_user_model) -> Callable[..., Any]:
    def make(username: str | None = None) -> Any:
        return django_user_model.objects.create_user(
            username=username or f"user-{uuid.uuid4().hex[:8]}", password="pw-for-tests"
        )

    return make


@pytest.fixture
def user(make_user) -> Any:
    return make_user("alice")


def redis_or_skip() -> None:
    try:
        redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        message = f"Redis is not reachable at {REDIS_TEST_URL} ({exc})"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message + "; start Redis (or set CI=true to make this a failure)")


@pytest.fixture
def redis_keys() -> Iterator[list[str]]:
    """Redis keys a test creates (in REDIS_TEST_URL's database), deleted after it; nothing else
    is touched."""
    keys: list[str] = []
    yield keys
    if keys:
        client = redis.Redis.from_url(REDIS_TEST_URL)
        client.delete(*keys)
        client.close()


@pytest.fixture
async def redis_backend(settings, redis_keys):
    """REDIS_URL pointed at REDIS_TEST_URL; the loop's client is closed after the test."""
    from chat.redis_client import close_redis

    redis_or_skip()
    settings.REDIS_URL = REDIS_TEST_URL
    yield redis_keys
    await close_redis()


@pytest.fixture
def db_backend(settings):
    settings.REDIS_URL = ""


def run_in_threads(count: int, fn: Callable[[int], Any], timeout: float = 60) -> list[Any]:
    """Run fn(0..count-1) on `count` threads released together, each with its own database
    connection (closed when it ends); their results (or exceptions) in order."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def target(index: int) -> None:
        try:
            barrier.wait(timeout=timeout)
            results[index] = fn(index)
        except BaseException as exc:  # reported to the test below
            results[index] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a thread did not finish"
    return results
