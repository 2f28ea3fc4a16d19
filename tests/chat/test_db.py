"""chat.db's precompiled writes store exactly what the ORM would; chat.db.write runs them in short
transactions, on the event loop where it can."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest
from django.db import DatabaseError, IntegrityError, connection
from django.utils import timezone

from chat import db
from chat.models import Conversation, Message

pytestmark = pytest.mark.django_db(transaction=True)


def test_insert_and_update_round_trip_through_the_orm():
    conversation = db.insert(Conversation(title="Ünïcode ✓", temperature=0.5))
    assert conversation.pk is not None
    created = timezone.now()
    message = db.insert(
        Message(
            conversation=conversation,
            prompt_message="Привет!",
            created_at=created,
            model="gpt-4o",
            temperature=1.25,
            max_tokens=64,
            context_message_ids=[3, 1, 2],
            previous_replies=[{"response": "old", "completed_at": None}],
            idempotency_key="k-1",
        )
    )
    stored = Message.objects.get(pk=message.pk)
    assert stored.conversation_id == conversation.pk
    assert stored.prompt_message == "Привет!"
    assert stored.created_at == created
    assert stored.temperature == 1.25 and stored.max_tokens == 64
    assert stored.context_message_ids == [3, 1, 2]
    assert stored.previous_replies == [{"response": "old", "completed_at": None}]
    assert stored.status == "pending" and stored.response == ""
    assert stored.updated_at is not None  # auto_now applied on insert

    message.response = "Здравствуйте!"
    message.status = "completed"
    message.completed_at = timezone.now()
    before = stored.updated_at
    db.update(message, ["response", "status", "completed_at", "updated_at"])
    stored = Message.objects.get(pk=message.pk)
    assert stored.response == "Здравствуйте!" and stored.status == "completed"
    assert stored.completed_at == message.completed_at
    assert stored.updated_at > before
    assert stored.model == "gpt-4o"  # untouched columns stay


def test_updating_a_deleted_row_is_an_error_not_a_reinsert():
    message = db.insert(Message(conversation=db.insert(Conversation()), prompt_message="x"))
    Message.objects.filter(pk=message.pk).delete()
    message.response = "late"
    with pytest.raises(DatabaseError):
        db.update(message, ["response"])
    assert not Message.objects.filter(pk=message.pk).exists()


# --- chat.db.write: short writes on the event loop (SQLite) ---------------------------------

sqlite_only = pytest.mark.skipif(
    connection.vendor != "sqlite", reason="writes run on the event loop only on SQLite"
)


def _store_conversation(title: str) -> Conversation:
    return db.insert(Conversation(title=title))


class _Ticker:
    """Counts event loop turns while a write is pending: a blocked loop does not tick."""

    def __init__(self) -> None:
        self.ticks = 0
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.005)
            self.ticks += 1


@sqlite_only
async def test_a_write_runs_on_the_event_loop_thread_and_is_committed():
    threads = []

    def store(title: str) -> Conversation:
        threads.append(threading.get_ident())
        return _store_conversation(title)

    conversation = await db.write(store, "on the loop")
    assert threads == [threading.get_ident()]  # no hop to a database thread
    stored = await Conversation.objects.aget(pk=conversation.pk)
    assert stored.title == "on the loop"


@sqlite_only
@pytest.mark.parametrize("held_for", [0.02, 0.3])
async def test_a_write_waits_for_a_lock_held_elsewhere_without_blocking_the_loop(held_for):
    # Another process's writer, in effect: a connection of its own holding the write lock.
    other = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    ticker = _Ticker()
    asyncio.get_running_loop().call_later(held_for, other.execute, "COMMIT")
    started = time.monotonic()
    try:
        conversation = await db.write(_store_conversation, "after the lock")
    finally:
        ticker.task.cancel()
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()
    waited = time.monotonic() - started
    assert waited >= held_for * 0.9
    assert ticker.ticks >= held_for / 0.005 * 0.5  # the loop kept running while it waited
    assert (await Conversation.objects.aget(pk=conversation.pk)).title == "after the lock"


async def test_a_write_that_fails_keeps_nothing_and_raises_the_databases_error():
    def store_twice_with_one_key() -> None:
        conversation = _store_conversation("kept?")
        for _ in range(2):
            db.insert(Message(conversation=conversation, prompt_message="x", idempotency_key="k"))

    with pytest.raises(IntegrityError):
        await db.write(store_twice_with_one_key)
    assert not await Conversation.objects.filter(title="kept?").aexists()


@sqlite_only
async def test_requests_racing_on_a_fresh_loop_share_one_loop_connection():
    db._close_loop_connections()
    writers = set()

    def store(title: str) -> Conversation:
        writers.add(id(db._inline.writer))
        return _store_conversation(title)

    stored = await asyncio.gather(*(db.write(store, f"c{i}") for i in range(5)))
    assert len({c.pk for c in stored}) == 5
    assert len(writers) == 1  # one connection of the loop's own, not one per racer
