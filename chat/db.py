"""Run ORM work from async code on a small, fixed pool of threads.

Django's own async ORM methods hop to a thread per request context, so every request would open
its own database connection. Here a few long-lived threads each keep one connection (a
connection pool in effect), and every unit of work is one short function — never a transaction
held open across an `await`.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection, connections
from django.db.models import Field, Model

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
    """Close the connection of every database thread (at shutdown, and between test runs)."""
    global _executor
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


# --- Precompiled writes for the hot path -----------------------------------------------------
# Model.save() compiles its SQL anew on every call: for a chat that is most of the ORM's cost
# (BENCHMARKS.md). These build each statement once per model and column set, with Django's own
# quoting and each field's own value preparation (get_db_prep_save), and run it with fresh
# values. No signals are sent: the models here have no receivers. Tests check every saved field
# reads back through the ORM unchanged.


@functools.cache
def _insert_statement(model: type[Model], vendor: str) -> tuple[str, tuple[Field, ...], bool]:
    meta = model._meta
    fields = tuple(f for f in meta.concrete_fields if not f.primary_key)
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column) for f in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    # Identifiers come from model metadata, quoted by Django; values are always parameters.
    sql = f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES ({placeholders})"  # noqa: S608
    returning = connection.features.can_return_columns_from_insert
    if returning:
        sql += f" RETURNING {quote(meta.pk.column)}"
    return sql, fields, returning


def insert(obj: Model) -> Model:
    """INSERT `obj` (a new row) and set its primary key; like obj.save() for a new object."""
    sql, fields, returning = _insert_statement(type(obj), connection.vendor)
    params = [f.get_db_prep_save(f.pre_save(obj, add=True), connection) for f in fields]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        pk = cursor.fetchone()[0] if returning else cursor.lastrowid
    obj.pk = pk
    obj._state.adding = False
    obj._state.db = connection.alias
    return obj


@functools.cache
def _update_statement(model: type[Model], names: tuple[str, ...], vendor: str):
    meta = model._meta
    fields = tuple(meta.get_field(name) for name in names)
    quote = connection.ops.quote_name
    assignments = ", ".join(f"{quote(f.column)} = %s" for f in fields)
    table, pk = quote(meta.db_table), quote(meta.pk.column)
    sql = f"UPDATE {table} SET {assignments} WHERE {pk} = %s"  # noqa: S608
    return sql, fields


def update(obj: Model, names: Sequence[str]) -> None:
    """UPDATE the given fields of `obj`'s row; like obj.save(update_fields=names), and like it
    an error when the row is gone."""
    sql, fields = _update_statement(type(obj), tuple(names), connection.vendor)
    params = [f.get_db_prep_save(f.pre_save(obj, add=False), connection) for f in fields]
    params.append(obj.pk)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        if cursor.rowcount != 1:
            raise DatabaseError(f"{type(obj).__name__} {obj.pk} is gone; nothing was updated.")
