"""In-process registry of generations in flight, so that any number of clients can follow one.

A generation runs as its own asyncio task, detached from the request that started it: a client
that disconnects (or a request cancelled by the server) never stops it, so the reply is always
stored. Followers get what was generated so far as one delta, then every new delta live, then
the end. Followers in another server process find no entry here and follow the database instead
(see `chat.services.follow_message`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from chat.errors import ApplicationError
from chat.models import Message

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextDelta:
    text: str


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
        self.finished: Finished | None = None
        self.task: asyncio.Task | None = None
        self._followers: set[asyncio.Queue[GenerationEvent]] = set()
        self._done = asyncio.Event()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def publish(self, text: str) -> None:
        self.parts.append(text)
        event = TextDelta(text)
        for queue in self._followers:
            queue.put_nowait(event)

    def finish(self, finished: Finished) -> None:
        self.finished = finished
        self._done.set()
        for queue in self._followers:
            queue.put_nowait(finished)

    async def wait(self) -> Finished:
        await self._done.wait()
        assert self.finished is not None
        return self.finished

    async def follow(self, *, heartbeat: float | None = None) -> AsyncIterator[GenerationEvent]:
        """Everything generated so far as one delta, then live deltas, then `Finished`; a
        `Heartbeat` whenever `heartbeat` seconds pass without an event."""
        queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        # Snapshot and subscribe with no await in between, so no delta falls in the gap.
        snapshot = self.text
        finished = self.finished
        self._followers.add(queue)
        try:
            if snapshot:
                yield TextDelta(snapshot)
            if finished is not None:
                yield finished
                return
            while True:
                if queue.empty() and heartbeat is not None:
                    try:
                        # Cancelling Queue.get() on timeout never loses an item.
                        async with asyncio.timeout(heartbeat):
                            event = await queue.get()
                    except TimeoutError:
                        yield Heartbeat()
                        continue
                else:
                    event = await queue.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self._followers.discard(queue)


_generations: dict[int, Generation] = {}


def get(message_id: int) -> Generation | None:
    return _generations.get(message_id)


def in_flight() -> list[Generation]:
    return list(_generations.values())


def start(message_id: int, run: Callable[[Generation], Awaitable[None]]) -> Generation:
    """Start `run(generation)` as a detached task; it must call `generation.finish()`."""
    generation = Generation(message_id)
    _generations[message_id] = generation

    async def runner() -> None:
        try:
            await run(generation)
        finally:
            _generations.pop(message_id, None)

    # The registry holds the only strong reference to the task until it ends.
    generation.task = asyncio.get_running_loop().create_task(runner())
    return generation


async def cancel_all(timeout: float = 10.0) -> int:
    """Cancel every generation of this process and wait for each to record its state."""
    tasks = [g.task for g in _generations.values() if g.task is not None and not g.task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            logger.warning("%d generations did not stop within %.0fs", len(pending), timeout)
    return len(tasks)
