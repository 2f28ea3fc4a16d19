"""Run ORM work from async code on a small, fixed pool of threads.

Django's own async ORM methods (`aget`, `asave`...) hop to the request's own thread, so under
ASGI every request would open (or borrow) a database connection of its own. Here
DATABASE_THREADS long-lived threads each keep one connection for the life of the process: the
async API's connections are bounded, and each unit of work is one short function — never a
transaction held open across an `await`.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

from django.conf import settings
from django.db import connections

P = ParamSpec("P")
R = TypeVar("R")

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _get_executor() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=settings.DATABASE_THREADS, thread_name_prefix="db"
            )
        return _executor


def _run(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    # CONN_MAX_AGE is 0 (for the request-scoped connections of the admin and docs); these
    # threads keep theirs, and only drop one that failed and can no longer be used.
    for connection in connections.all(initialized_only=True):
        if connection.errors_occurred:
            connection.close_if_unusable_or_obsolete()
    return fn(*args, **kwargs)


async def run(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Await `fn(*args, **kwargs)` run on a database thread."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_get_executor(), functools.partial(_run, fn, *args, **kwargs))


def close_connections() -> None:
    """Close the connection of every database thread (at shutdown, and at the end of a test
    run) and stop the threads."""
    global _executor
    with _executor_lock:
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
