"""Generations followed live across processes and hosts, through Redis (when REDIS_URL is set).

Each generation appends its text to a Redis stream (`chat:generation:<message id>`): pieces of
reply or refusal, then an end marker. A follower on any process reads the stream from its
start — the text so far, with no gap before the live part — then blocks for new entries, so it
sees each piece as soon as the generating process has it. Stop requests travel on a pub/sub
channel that every process listens to.

Publishing never holds up a generation: pieces are buffered and written by a background flush
(at most every FLUSH_INTERVAL), and a Redis failure only costs the live view — followers then
read the database, which every generation writes anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from chat.generations import TextDelta
from chat.models import Message
from chat.redis_client import get_redis

logger = logging.getLogger(__name__)

KEY_PREFIX = "chat:generation:"
STOP_CHANNEL = "chat:stop"
# Pieces published within this many seconds go out in one write.
FLUSH_INTERVAL = 0.005
# A stream outlives its generation by this long (re-attaches after that read the database);
# one whose writer died expires the same way.
KEEP_SECONDS = 3600


def is_enabled() -> bool:
    return get_redis() is not None


def stream_key(message: Message) -> str:
    """The stream of a message's current generation. Each generation has its own: a
    regenerated message (one more previous reply) starts a new one, so a follower never reads
    the previous generation's text; the creation time keeps ids reused after a database reset
    apart."""
    created = int(message.created_at.timestamp() * 1_000_000)
    return f"{KEY_PREFIX}{message.pk}:{created}:{len(message.previous_replies)}"


@dataclass(frozen=True)
class Ended:
    """The generation has stored its outcome (read it from the database)."""


@dataclass(frozen=True)
class Quiet:
    """Nothing new for the follower's heartbeat interval."""


LiveEvent = TextDelta | Ended | Quiet


class Publisher:
    """Writes one generation's pieces to its stream."""

    def __init__(self, message: Message) -> None:
        self.key = stream_key(message)
        self._pending: list[dict[Any, Any]] = []
        self._flush: asyncio.Task | None = None
        self._failed = False

    def delta(self, delta: TextDelta) -> None:
        self._pending.append({"t": delta.text, "r": "1" if delta.refusal else "0"})
        self._schedule()

    def end(self) -> None:
        self._pending.append({"end": "1"})
        self._schedule()

    async def close(self) -> None:
        """Wait for everything published to be written (or to have failed)."""
        while self._flush is not None and not self._flush.done():
            await asyncio.shield(self._flush)

    def _schedule(self) -> None:
        if self._failed or (self._flush is not None and not self._flush.done()):
            return
        self._flush = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        await asyncio.sleep(FLUSH_INTERVAL)
        client = get_redis()
        while self._pending and client is not None:
            entries, self._pending = self._pending, []
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for entry in entries:
                        pipe.xadd(self.key, entry)
                    pipe.expire(self.key, KEEP_SECONDS)
                    await pipe.execute()
            except (RedisError, OSError):
                logger.warning(
                    "live events of %s not published; followers read the database",
                    self.key,
                    exc_info=True,
                )
                self._failed = True
                return


async def follow(message: Message, *, heartbeat: float) -> AsyncIterator[LiveEvent]:
    """The generation's text so far as one delta, then each new piece, then `Ended`; `Quiet`
    whenever `heartbeat` seconds pass without news. Raises RedisError if Redis fails."""
    client = get_redis()
    assert client is not None
    key = stream_key(message)
    last_id = "0"
    first_read = True
    while True:
        # [(key, [(entry id, {field: value})...])] (redis-py's RESP2 reply)
        found: Any = await client.xread({key: last_id}, block=max(1, int(heartbeat * 1000)))
        if not found:
            first_read = False
            yield Quiet()
            continue
        ((_, entries),) = found
        pieces: dict[bool, list[str]] = {False: [], True: []}
        ended = False
        for entry_id, fields in entries:
            last_id = entry_id
            if fields.get(b"end"):
                ended = True
                break
            pieces[fields.get(b"r") == b"1"].append(fields[b"t"].decode())
        for refusal in (False, True):
            if not pieces[refusal]:
                continue
            if first_read:
                yield TextDelta("".join(pieces[refusal]), refusal=refusal)
            else:
                for piece in pieces[refusal]:
                    yield TextDelta(piece, refusal=refusal)
        first_read = False
        if ended:
            yield Ended()
            return


async def request_stop(message_id: int) -> None:
    """Tell every process to stop this generation (the one running it does)."""
    client = get_redis()
    if client is None:
        return
    try:
        await client.publish(STOP_CHANNEL, str(message_id))
    except (RedisError, OSError):
        logger.warning("stop request for %s not published", message_id, exc_info=True)


async def stop_requests() -> AsyncIterator[int]:
    """Message ids whose generation someone asked to stop, as they come (forever)."""
    client = get_redis()
    assert client is not None
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(STOP_CHANNEL)
        while True:
            message = await pubsub.get_message(timeout=30.0)
            if message is not None:
                with contextlib.suppress(ValueError):
                    yield int(message["data"])
    finally:
        with contextlib.suppress(RedisError, OSError):
            await pubsub.aclose()
