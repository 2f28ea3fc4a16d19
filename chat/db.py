"""Run ORM work from async code on a small, fixed pool of threads.

Django's own async ORM methods hop to a thread per request context, so every request would open
its own database connection. Here a few long-lived threads each keep one connection (a
connection pool in effect), and every unit of work is one short function — never a transaction
held open across an `await`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from django.conf import settings
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    close_old_connections,
    connection,
    connections,
    models,
    transaction,
)
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

_executor: ThreadPoolExecutor | None = None


def _get_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(
            max_workers=settings.DATABASE_THREADS, thread_name_prefix="db"
        )
    return _executor


def _run(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    # Drops a connection that broke or outlived CONN_MAX_AGE before it is used again.
    close_old_connections()
    return fn(*args, **kwargs)


async def run(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Await `fn(*args, **kwargs)` run on a database thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_get_executor(), functools.partial(_run, fn, *args, **kwargs))


def close_connections() -> None:
    """Close the connection of every database thread and of every event loop (at shutdown, and
    at the end of a test run)."""
    global _executor
    _close_loop_connections()
    executor, _executor = _executor, None
    if executor is None:
        return
    workers = settings.DATABASE_THREADS
    barrier = threading.Barrier(workers, timeout=10)

    def close_own_connections() -> None:
        # The barrier makes each worker thread take exactly one of these tasks.
        barrier.wait()
        connections.close_all()

    for _ in range(workers):
        executor.submit(close_own_connections)
    executor.shutdown(wait=True)


# --- Short writes --------------------------------------------------------------------------
# A chat writes twice: its prompt before the model call, its reply after. Each is a few
# statements that SQLite (a library in this process, the WAL appended to without an fsync)
# runs in tens of microseconds: far less than a hop to a database thread and back, whose thread
# wake-ups and GIL hand-overs cost the server about 1 ms of CPU per chat (BENCHMARKS.md). So on
# SQLite they are tried on the event loop first, on a connection of the loop's own that never
# blocks the loop: no busy timeout (while the write lock is held elsewhere the write is retried
# after an awaited pause, and after a few tries left to a database thread, which waits for the
# lock as usual) and no automatic checkpoint (its fsyncs run on a database thread every
# CHECKPOINT_EVERY writes). On PostgreSQL a write is a network round trip, so it always
# runs on a database thread.

CHECKPOINT_EVERY = 1000
# While another connection holds the write lock, the loop retries after these pauses (awaited,
# so other requests go on meanwhile), then leaves the write to a database thread.
LOCKED_RETRY_DELAYS = (0.0, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032)
COMMITTED, LOCKED, FAILED = "committed", "locked", "failed"


class _LoopWriter:
    """The event loop thread's own SQLite connection, used only by `write`."""

    def __init__(self, wrapper: BaseDatabaseWrapper) -> None:
        self.wrapper = wrapper
        self.raw: sqlite3.Connection = wrapper.connection
        self.raw.execute("PRAGMA busy_timeout = 0")
        self.raw.execute("PRAGMA wal_autocheckpoint = 0")
        self.cursor = self.raw.cursor()
        self.writes = 0
        self.checkpoint: asyncio.Future | None = None

    def try_write(self, fn: Callable[..., R], args: Any, kwargs: Any) -> tuple[str, R | None]:
        """Run `fn` in a transaction of this connection, without waiting for the write lock:
        (COMMITTED, result), or (LOCKED | FAILED, None) with nothing kept."""
        raw = self.raw
        try:
            raw.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            # SQLITE_BUSY: another connection holds the write lock.
            return (LOCKED if exc.sqlite_errorcode == sqlite3.SQLITE_BUSY else FAILED), None
        _inline.writer = self
        try:
            result = fn(*args, **kwargs)
            raw.execute("COMMIT")
        except (sqlite3.Error, DatabaseError):
            # E.g. a unique key already taken: the database thread reruns it and reports it.
            return FAILED, None
        finally:
            _inline.writer = None
            if raw.in_transaction:
                raw.execute("ROLLBACK")
        self.writes += 1
        if self.writes % CHECKPOINT_EVERY == 0 and (
            self.checkpoint is None or self.checkpoint.done()
        ):
            self.checkpoint = asyncio.ensure_future(run(_checkpoint))
        return COMMITTED, result

    def close(self) -> None:
        self.raw.close()


_inline = threading.local()  # .writer: the _LoopWriter whose write is running on this thread
_loop_writers: dict[int, _LoopWriter | None] = {}  # by thread; None where writes never inline
_loop_writers_lock = threading.Lock()


async def _loop_writer() -> _LoopWriter | None:
    thread = threading.get_ident()
    try:
        return _loop_writers[thread]
    except KeyError:
        pass
    writer = None
    if settings.DATABASE_INLINE_WRITES and connections[DEFAULT_DB_ALIAS].vendor == "sqlite":
        wrapper = connections.create_connection(DEFAULT_DB_ALIAS)
        # Django opens connections only outside an event loop; this one is then used by the
        # loop's thread alone (Django's SQLite connections allow that: check_same_thread=False).
        await run(wrapper.connect)
        writer = _LoopWriter(wrapper)
    with _loop_writers_lock:
        # Two requests of a fresh process may both have got here: the first one's is kept.
        kept = _loop_writers.setdefault(thread, writer)
    if kept is not writer and writer is not None:
        writer.close()
    return kept


def _close_loop_connections() -> None:
    with _loop_writers_lock:
        writers = [w for w in _loop_writers.values() if w is not None]
        _loop_writers.clear()
    for writer in writers:
        writer.close()


def _checkpoint() -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
    except DatabaseError:  # the next one will do; the WAL stays valid meanwhile
        logger.warning("WAL checkpoint failed", exc_info=True)


def _atomic(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    with transaction.atomic():
        return fn(*args, **kwargs)


async def write(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Run `fn(*args, **kwargs)` in one transaction and commit it.

    `fn` makes its writes with `insert` and `update` only, and must be safe to run twice: when
    the try on the event loop cannot commit (see above), it is rolled back and `fn` runs again
    on a database thread, where errors are raised as usual.
    """
    writer = await _loop_writer()
    if writer is not None:
        for delay in LOCKED_RETRY_DELAYS:
            outcome, result = writer.try_write(fn, args, kwargs)
            if outcome == COMMITTED:
                return result  # type: ignore[return-value]
            if outcome == FAILED:
                break
            await asyncio.sleep(delay)
    return await run(_atomic, fn, *args, **kwargs)


# --- Precompiled writes --------------------------------------------------------------------
# Model.save() compiles its SQL anew on every call: for a chat that is most of the ORM's cost
# (BENCHMARKS.md). These build each statement once per model and column set, with Django's own
# quoting and each field's own value preparation (get_db_prep_save), and run it with fresh
# values. No signals are sent: the models here have no receivers. Tests check every saved field
# reads back through the ORM unchanged.


def _target() -> tuple[BaseDatabaseWrapper, sqlite3.Cursor | None, str]:
    """The connection to write with, its cursor if it is an event loop's own (a plain sqlite3
    cursor), and the placeholder its statements use (sqlite3's own `?` there, else `%s`)."""
    writer: _LoopWriter | None = getattr(_inline, "writer", None)
    if writer is not None:
        return writer.wrapper, writer.cursor, "?"
    return connection, None, "%s"


def _execute(
    conn: BaseDatabaseWrapper,
    inline_cursor: sqlite3.Cursor | None,
    sql: str,
    params: list[Any],
    read: Callable[[Any], R],
) -> R:
    """Run one statement on the target's cursor and `read` the result from that cursor."""
    if inline_cursor is not None:
        inline_cursor.execute(sql, params)
        return read(inline_cursor)
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return read(cursor)


_statements: dict[tuple, tuple[str, tuple[Field, ...]]] = {}

# Field classes whose get_db_prep_save() hands back a value of the matching Python type (and
# None) unchanged on every backend: for those values the call, a few microseconds for each of a
# message's twenty-odd columns, is skipped.
_PASS_THROUGH_TYPES: dict[type[Field], type] = {
    models.CharField: str,
    models.TextField: str,
    models.IntegerField: int,
    models.PositiveIntegerField: int,
    models.PositiveSmallIntegerField: int,
    models.SmallIntegerField: int,
    models.BigIntegerField: int,
    models.FloatField: float,
}


def _db_values(
    obj: Model, fields: tuple[Field, ...], conn: BaseDatabaseWrapper, *, add: bool
) -> list[Any]:
    values = []
    for field in fields:
        value = field.pre_save(obj, add)
        expected = _PASS_THROUGH_TYPES.get(type(field))
        if expected is None or not (type(value) is expected or (value is None and field.null)):
            value = field.get_db_prep_save(value, conn)
        values.append(value)
    return values


def _insert_statement(
    model: type[Model], conn: BaseDatabaseWrapper, placeholder: str
) -> tuple[str, tuple[Field, ...]]:
    key = ("insert", model, conn.vendor, placeholder)
    if key not in _statements:
        meta = model._meta
        fields = tuple(f for f in meta.concrete_fields if not f.primary_key)
        quote = conn.ops.quote_name
        columns = ", ".join(quote(f.column) for f in fields)
        placeholders = ", ".join([placeholder] * len(fields))
        # Identifiers come from model metadata, quoted by Django; values are always parameters.
        sql = f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES ({placeholders})"  # noqa: S608
        if conn.features.can_return_columns_from_insert:
            sql += f" RETURNING {quote(meta.pk.column)}"
        _statements[key] = sql, fields
    return _statements[key]


def insert(obj: Model) -> Model:
    """INSERT `obj` (a new row) and set its primary key; like obj.save() for a new object."""
    conn, inline_cursor, placeholder = _target()
    returning = conn.features.can_return_columns_from_insert
    sql, fields = _insert_statement(type(obj), conn, placeholder)
    params = _db_values(obj, fields, conn, add=True)
    pk = _execute(
        conn,
        inline_cursor,
        sql,
        params,
        (lambda cursor: cursor.fetchone()[0]) if returning else (lambda cursor: cursor.lastrowid),
    )
    obj.pk = pk
    obj._state.adding = False
    obj._state.db = conn.alias
    return obj


def _update_statement(
    model: type[Model], names: tuple[str, ...], conn: BaseDatabaseWrapper, placeholder: str
) -> tuple[str, tuple[Field, ...]]:
    key = ("update", model, names, conn.vendor, placeholder)
    if key not in _statements:
        meta = model._meta
        fields = tuple(meta.get_field(name) for name in names)
        quote = conn.ops.quote_name
        assignments = ", ".join(f"{quote(f.column)} = {placeholder}" for f in fields)
        table, pk = quote(meta.db_table), quote(meta.pk.column)
        sql = f"UPDATE {table} SET {assignments} WHERE {pk} = {placeholder}"  # noqa: S608
        _statements[key] = sql, fields
    return _statements[key]


def update(obj: Model, names: Sequence[str]) -> None:
    """UPDATE the given fields of `obj`'s row; like obj.save(update_fields=names), and like it
    an error when the row is gone."""
    conn, inline_cursor, placeholder = _target()
    sql, fields = _update_statement(type(obj), tuple(names), conn, placeholder)
    params = _db_values(obj, fields, conn, add=False)
    params.append(obj.pk)
    rowcount = _execute(conn, inline_cursor, sql, params, lambda cursor: cursor.rowcount)
    if rowcount != 1:
        raise DatabaseError(f"{type(obj).__name__} {obj.pk} is gone; nothing was updated.")
