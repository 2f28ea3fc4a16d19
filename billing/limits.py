"""Rate limits shared by every server process: a sliding log, like DRF's SimpleRateThrottle.

At most `rate.limit` requests are admitted in any window of `rate.window` seconds; a refused
request is not recorded. Each check-and-record is one atomic step, so concurrent requests on
many processes never overshoot:

- with REDIS_URL: one Lua script on a sorted set per key, timed by the Redis server's clock;
- without: the database, one conditional INSERT in a transaction that serializes on the key
  (pg_advisory_xact_lock on PostgreSQL; SQLite's BEGIN IMMEDIATE serializes all writers):
  `hit()` in a transaction of its own, `throttle()` in the one that stores the request.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import math
import random
import uuid
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.utils import timezone
from redis.exceptions import NoScriptError, RedisError

from billing.models import RateLimitHit
from billing.rates import Rate, parse_rate
from chat import db
from chat.errors import RateLimited
from chat.redis_client import get_redis

__all__ = [
    "PendingHit",
    "Rate",
    "hit",
    "parse_rate",
    "purge_rate_limit_hits",
    "rate_for",
    "rate_limited",
    "throttle",
    "throttle_key",
]

logger = logging.getLogger(__name__)

REDIS_KEY_PREFIX = "chat:ratelimit:"
KEY_MAX_LENGTH: int = RateLimitHit._meta.get_field("key").max_length  # type: ignore[assignment]
# First key of the two-key form of PostgreSQL's advisory locks, so that these locks never
# collide with other advisory locks of the application.
ADVISORY_LOCK_NAMESPACE = 0x62696C6C  # "bill"
# About one database check in PURGE_EVERY also deletes every key's hits older than a day (the
# longest DRF window).
PURGE_EVERY = 1000
# About one check in STALE_DELETE_EVERY deletes its key's hits that have left the window.
STALE_DELETE_EVERY = 16

# KEYS[1] the sorted set; ARGV: limit, window in microseconds, a unique member.
# Returns -1 when admitted (and recorded), else the microseconds until the oldest hit leaves
# the window. Scores are the Redis server's clock, in microseconds (exact in a Lua double).
SLIDING_LOG_SCRIPT = """
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) < limit then
    redis.call('ZADD', key, now, ARGV[3])
    redis.call('PEXPIRE', key, math.ceil(window / 1000))
    return -1
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
if oldest[2] == nil then
    return window
end
return math.max(1, math.ceil(tonumber(oldest[2]) + window - now))
"""
SLIDING_LOG_SHA = hashlib.sha1(SLIDING_LOG_SCRIPT.encode(), usedforsecurity=False).hexdigest()


def _storage_key(key: str) -> str:
    if len(key) <= KEY_MAX_LENGTH:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


async def hit(*, key: str, rate: Rate) -> float | None:
    """Record a request of `key` if `rate` admits it: None when admitted, else the seconds
    until a slot frees (> 0). Redis when REDIS_URL is set (the database if Redis fails)."""
    key = _storage_key(key)
    counted, wait = await _hit_redis_if_configured(key, rate)
    if counted:
        return wait
    return await db.run(_hit_db, key, rate)


async def _hit_redis_if_configured(key: str, rate: Rate) -> tuple[bool, float | None]:
    """(True, `hit`'s answer) when Redis counted the hit; (False, None) without Redis, or when
    it failed: the database must count it."""
    client = get_redis()
    if client is None:
        return False, None
    try:
        return True, await _hit_redis(client, key, rate)
    except RedisError:
        logger.warning("Rate limit check on Redis failed; using the database", exc_info=True)
        return False, None


async def _hit_redis(client, key: str, rate: Rate) -> float | None:
    args = (rate.limit, math.ceil(rate.window * 1_000_000), uuid.uuid4().hex)
    redis_key = REDIS_KEY_PREFIX + key
    try:
        result = await client.evalsha(SLIDING_LOG_SHA, 1, redis_key, *args)
    except NoScriptError:  # first use on this server (EVAL caches it for the next EVALSHA)
        result = await client.eval(SLIDING_LOG_SCRIPT, 1, redis_key, *args)
    result = int(result)
    return None if result < 0 else result / 1_000_000


def _hit_db(key: str, rate: Rate) -> float | None:
    with transaction.atomic():
        return _hit_in_transaction(key, rate)


def _hit_in_transaction(key: str, rate: Rate) -> float | None:
    """`hit` on the database, in the caller's transaction: the check and the record serialize
    on the key until that transaction ends, and a rollback takes the record back."""
    window = dt.timedelta(seconds=rate.window)
    connection = transaction.get_connection()
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                [ADVISORY_LOCK_NAMESPACE, key],
            )
    # Read the clock once the key is ours, so hits are recorded in order.
    now = timezone.now()
    # Hits that left the window are no longer counted; deleting them now and then (and the
    # daily purge) keeps a key's rows few without a DELETE on every check.
    if random.randrange(STALE_DELETE_EVERY) == 0:  # noqa: S311 (not a secret)
        RateLimitHit.objects.filter(key=key, at__lte=now - window).delete()
    # The count and the insert in one statement (raw: the ORM cannot say INSERT ... SELECT,
    # and as two ORM queries it costs over ten times the CPU; BENCHMARKS.md).
    at = connection.ops.adapt_datetimefield_value(now)
    since = connection.ops.adapt_datetimefield_value(now - window)
    with connection.cursor() as cursor:
        cursor.execute(_RECORD_IF_UNDER_LIMIT_SQL, [key, at, key, since, rate.limit])
        admitted = cursor.rowcount == 1
    if admitted:
        if random.randrange(PURGE_EVERY) == 0:  # noqa: S311 (not a secret)
            purge_rate_limit_hits(now=now)
        return None
    in_window = RateLimitHit.objects.filter(key=key, at__gt=now - window)
    oldest = in_window.order_by("at").values_list("at", flat=True).first()
    if oldest is None:  # a limit of 0
        return float(rate.window)
    return max((oldest + window - now).total_seconds(), 1e-6)


_HITS = RateLimitHit._meta.db_table
_RECORD_IF_UNDER_LIMIT_SQL = f"""
INSERT INTO {_HITS} ("key", "at")
SELECT %s, %s
WHERE (SELECT COUNT(*) FROM {_HITS} WHERE "key" = %s AND "at" > %s) < %s
"""  # noqa: S608 (the table name from the model; every value is a parameter)


def purge_rate_limit_hits(*, older_than: float = 86400, now: dt.datetime | None = None) -> int:
    """Delete the database backend's hits older than `older_than` seconds (of every key)."""
    now = now or timezone.now()
    deleted, _ = RateLimitHit.objects.filter(at__lt=now - dt.timedelta(seconds=older_than)).delete()
    return deleted


# --- Throttling API requests -------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _parsed(text: str) -> Rate | None:
    return parse_rate(text)


def rate_for(*, anonymous: bool) -> Rate | None:
    """The request rate allowed per client: CHAT_THROTTLE_ANON for anonymous clients,
    CHAT_THROTTLE_USER for users; None: no limit."""
    return _parsed(settings.CHAT_THROTTLE_ANON if anonymous else settings.CHAT_THROTTLE_USER)


def throttle_key(*, user_id: int | None, client_ip: str | None) -> str:
    """Users are limited per user, anonymous clients per IP address."""
    if user_id is not None:
        return f"user:{user_id}"
    return f"anon:{client_ip or 'unknown'}"


def rate_limited(wait: float) -> RateLimited:
    """The 429 for a request refused by a rate limit, `wait` seconds before a slot frees."""
    seconds = max(1, math.ceil(wait))
    unit = "second" if seconds == 1 else "seconds"
    return RateLimited(
        f"Too many requests; try again in {seconds} {unit}.",
        extra={"retry_after": seconds},
        headers={"Retry-After": str(seconds)},
    )


@dataclass(frozen=True)
class PendingHit:
    """A request that the database backend counts in the transaction that stores it."""

    key: str
    rate: Rate

    def record(self) -> None:
        """Count the request in the caller's transaction (`transaction.atomic()`), or raise
        RateLimited; the transaction's rollback then leaves nothing recorded."""
        if not transaction.get_connection().in_atomic_block:
            raise RuntimeError("PendingHit.record() must run inside transaction.atomic().")
        wait = _hit_in_transaction(self.key, self.rate)
        if wait is not None:
            raise rate_limited(wait)


async def throttle(*, user_id: int | None, client_ip: str | None) -> PendingHit | None:
    """Count one API request against its client's rate; RateLimited if refused.

    On Redis the request is counted here. On the database (no REDIS_URL, or Redis failing) it
    is returned as a PendingHit, for the caller to `record()` inside the transaction that
    stores the request: one transaction and one database round trip fewer, and a request that
    transaction refuses (over its budget, say) is not counted. None: nothing left to count.
    """
    rate = rate_for(anonymous=user_id is None)
    if rate is None:
        return None
    key = _storage_key(throttle_key(user_id=user_id, client_ip=client_ip))
    counted, wait = await _hit_redis_if_configured(key, rate)
    if not counted:
        return PendingHit(key=key, rate=rate)
    if wait is not None:
        raise rate_limited(wait)
    return None
