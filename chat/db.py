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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from django.conf import settings
from django.db import close_old_connections, connections

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
