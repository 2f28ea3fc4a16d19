"""The registry of this process's generations in flight, so that any number of clients can follow
one live, and shutdown and stop requests can reach every one.

A generation runs as its own asyncio task, detached from the request that started it: a client
that disconnects never stops it, so the reply is always stored. Followers get what was generated
so far as one delta, then every new delta live, then the end. Followers in another process find
no entry here and follow the generation through Redis or the database (chat.services.messages).

Every task started here (a generation, and the follow-up work of one, such as titling its
conversation) is tracked until it ends, so `cancel_all` at shutdown sees them all; the entry by
message id is the message's current generation, and only its own task removes it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from chat import metrics
from chat.errors import ApplicationError
from chat.models import Message

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextDelta:
    text: str
    # True for a piece of a refusal (the model declining), False for a piece of the reply.
    refusal: bool = False


@dataclass(frozen=True)
class Finished:
    """The generation ended; `message` is the stored final state, `error` set if it failed."""

    message: Message
    error: ApplicationError | None = None


@dataclass(frozen=True)
class Heartbeat:
    """Nothing happened for a while (lets transports keep an idle connection open)."""


GenerationEvent = TextDelta | Finished | Heartbeat


class Generation:
    def __init__(self, message_id: int) -> None:
        self.message_id = message_id
        self.parts: list[str] = []
        self.refusal_parts: list[str] = []
        self.finished: Finished | None = None
        self.task: asyncio.Task | None = None
        # Why the generation was cancelled, for its task to store: e.g. "user", "shutdown".
        self.stop_reason: str | None = None
        self._followers: set[asyncio.Queue[GenerationEvent]] = set()
        self._done = asyncio.Event()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def refusal(self) -> str:
        return "".join(self.refusal_parts)

    def publish(self, delta: TextDelta) -> None:
        (self.refusal_parts if delta.refusal else self.parts).append(delta.text)
        for queue in self._followers:
            queue.put_nowait(delta)

    def finish(self, finished: Finished) -> None:
        self.finished = finished
        self._done.set()
        for queue in self._followers:
            queue.put_nowait(finished)

    async def wait(self) -> Finished:
        await self._done.wait()
        assert self.finished is not None
        return self.finished

    def cancel(self, reason: str) -> None:
        if self.finished is None and self.task is not None and not self.task.done():
            self.stop_reason = self.stop_reason or reason
            self.task.cancel()

    async def follow(self, *, heartbeat: float | None = None) -> AsyncIterator[GenerationEvent]:
        """Everything generated so far as one delta, then live deltas, then `Finished`; a
        `Heartbeat` whenever `heartbeat` seconds pass without an event."""
        queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        # Snapshot and subscribe with no await in between, so no delta falls in the gap.
        text, refusal, finished = self.text, self.refusal, self.finished
        self._followers.add(queue)
        try:
            if text:
                yield TextDelta(text)
            if refusal:
                yield TextDelta(refusal, refusal=True)
            if finished is not None:
                yield finished
                return
            while True:
                try:
                    async with asyncio.timeout(heartbeat):
                        # Cancelling Queue.get() on timeout never loses an item.
                        event = await queue.get()
                except TimeoutError:
                    yield Heartbeat()
                    continue
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self._followers.discard(queue)


# This process's identity as the owner of budget reservations (billing): fresh in every process,
# never a pid, so it stays unique across hosts and restarts.
WORKER_ID = uuid.uuid4().hex

_current: dict[int, Generation] = {}
_tasks: set[asyncio.Task] = set()


def get(message_id: int) -> Generation | None:
    return _current.get(message_id)


def in_flight() -> list[Generation]:
    return list(_current.values())


def _track(task: asyncio.Task) -> asyncio.Task:
    # The set holds the only strong reference to a detached task until it ends.
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return task


def start(message_id: int, run: Callable[[Generation], Awaitable[None]]) -> Generation:
    """Start `run(generation)` as a detached task; it must call `generation.finish()`."""
    generation = Generation(message_id)
    _current[message_id] = generation

    async def runner() -> None:
        metrics.generations_in_flight.inc()
        try:
            await run(generation)
        finally:
            metrics.generations_in_flight.dec()
            # A regenerate may have registered a newer generation of this message meanwhile.
            if _current.get(message_id) is generation:
                del _current[message_id]

    generation.task = _track(asyncio.get_running_loop().create_task(runner()))
    return generation


def run_detached(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task:
    """Follow-up work of a generation (e.g. titling its conversation), tracked like one."""
    return _track(asyncio.get_running_loop().create_task(coroutine))


def pending_tasks() -> list[asyncio.Task]:
    return [task for task in _tasks if not task.done()]


async def cancel_all(timeout: float = 10.0) -> int:
    """Cancel every task of this process and wait for each to record its state."""
    for generation in in_flight():
        generation.cancel("shutdown")
    tasks = pending_tasks()
    for task in tasks:
        task.cancel()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            logger.warning("%d generations did not stop within %.0fs", len(pending), timeout)
    return len(tasks)
