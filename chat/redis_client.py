"""The shared Redis client (redis.asyncio), one per running event loop.

A redis.asyncio connection pool is bound to the event loop it was first used on, so each loop
gets its own client, built at first use from `settings.REDIS_URL` (read at call time, never at
import) and rebuilt when the URL changes. `get_redis()` is None when REDIS_URL is empty.
"""

from __future__ import annotations

import asyncio
import weakref

import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import RedisError

from chat.errors import RedisUnavailable

# How long a readiness check waits for Redis to answer.
PING_TIMEOUT = 2.0

_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[str, aioredis.Redis]] = (
    weakref.WeakKeyDictionary()
)
# Old clients being closed after a URL change (kept referenced until their close finishes).
_closing: set[asyncio.Task] = set()


def get_redis() -> aioredis.Redis | None:
    """The running loop's client for settings.REDIS_URL, or None without one. Call it from
    inside an event loop (RuntimeError otherwise)."""
    url = settings.REDIS_URL
    if not url:
        return None
    loop = asyncio.get_running_loop()
    entry = _clients.get(loop)
    if entry is not None and entry[0] == url:
        return entry[1]
    # A client holds references to its loop (through its connections), so entries of loops
    # that have been closed are dropped here rather than left to the weak keys.
    for other in [other for other in list(_clients) if other.is_closed()]:
        _clients.pop(other, None)
    client = aioredis.Redis.from_url(url, health_check_interval=30, socket_connect_timeout=5)
    _clients[loop] = (url, client)
    if entry is not None:
        task = loop.create_task(entry[1].aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)
    return client


async def close_redis() -> None:
    """Close the running loop's client and its connections (at shutdown; in tests)."""
    entry = _clients.pop(asyncio.get_running_loop(), None)
    if entry is not None:
        await entry[1].aclose()


async def ping() -> bool:
    """True when Redis answers (within PING_TIMEOUT), False without REDIS_URL; raises
    RedisUnavailable when it does not answer."""
    client = get_redis()
    if client is None:
        return False
    try:
        async with asyncio.timeout(PING_TIMEOUT):
            await client.ping()
    except (RedisError, OSError, TimeoutError) as exc:
        raise RedisUnavailable() from exc
    return True
