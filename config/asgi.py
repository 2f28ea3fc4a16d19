"""ASGI entry point: Django plus the lifespan events Django itself does not handle.

Requests under /api/ go to a second Django handler with a lean middleware stack
(settings.API_MIDDLEWARE) whose hooks run inline on the event loop; everything else (admin, the
docs pages) gets the full MIDDLEWARE. The per-request signal receivers that close database
connections are dropped: under this server the ORM runs on the long-lived threads of chat.db,
which manage their own connections, and running the receivers would cost a thread per request.

At startup, generations left `pending`/`streaming` by a process that died are marked
`interrupted`; at shutdown, this process's generations in flight are stopped and stored as
`interrupted` with their partial text, so no message stays pending forever.
"""

import asyncio
import gc
import io
import logging
import os
import sys
import tempfile

import django
from django.conf import settings
from django.core import signals
from django.core.cache import close_caches
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.db import close_old_connections, reset_queries
from django.urls import set_script_prefix

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup(set_prefix=False)

# The event loop thread and chat.db's threads share the GIL. With the default 5 ms switch
# interval a database thread that released the GIL for SQLite waits up to 5 ms to get it back,
# and every chat waits in that queue twice (BENCHMARKS.md: 132 -> 170 requests/s).
sys.setswitchinterval(settings.GIL_SWITCH_INTERVAL)

signals.request_started.disconnect(reset_queries)
signals.request_started.disconnect(close_old_connections)
signals.request_finished.disconnect(close_old_connections)
signals.request_finished.disconnect(close_caches)


class APIHandler(ASGIHandler):
    """Django's ASGI handler, without its two hops to a thread per request.

    Django wraps each request in a ThreadSensitiveContext (a thread of its own the first time
    the request runs sync code) and calls `response.close()` through `sync_to_async`. The API's
    views run no sync code on the loop's behalf (chat.api.base), and `response.close()` only
    sends `request_finished`, whose receivers here (Django's URLconf reset) do no I/O, so it
    runs inline. `handle` is Django 5.2's own with that one change; a thread wake-up costs far
    more CPU than the close itself (BENCHMARKS.md).
    """

    async def __call__(self, scope, receive, send) -> None:
        await self.handle(scope, receive, send)

    async def read_body(self, receive):
        """Django's, with a body that fits in memory (API bodies do) kept in a plain BytesIO
        rather than a SpooledTemporaryFile, whose setup costs more than the JSON parsing."""
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestAborted()
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if size > settings.FILE_UPLOAD_MAX_MEMORY_SIZE:
                return await self._spool(chunks, message, receive)
            if not message.get("more_body", False):
                return io.BytesIO(b"".join(chunks))

    async def _spool(self, chunks, message, receive):
        body_file = tempfile.SpooledTemporaryFile(
            max_size=settings.FILE_UPLOAD_MAX_MEMORY_SIZE, mode="w+b"
        )
        body_file.writelines(chunks)
        while message.get("more_body", False):
            message = await receive()
            if message["type"] == "http.disconnect":
                body_file.close()
                raise RequestAborted()
            body_file.write(message.get("body", b""))
        body_file.seek(0)
        return body_file

    async def handle(self, scope, receive, send) -> None:
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        await signals.request_started.asend(sender=self.__class__, scope=scope)
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            error_response.close()
            return

        async def process_request(request, send):
            response = await self.run_get_response(request)
            try:
                await self.send_response(response, send)
            except asyncio.CancelledError:
                pass  # the client went away while the response was sent
            return response

        # As Django does: the view is cancelled if the client disconnects first.
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request(request, send)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                # Read, not re-raised: a re-raise would tie this frame and the task into a
                # reference cycle that only the garbage collector frees.
                error = None if task.cancelled() else task.exception()
                if isinstance(error, AssertionError):
                    body_file.close()
                    raise error
                if error is not None and not isinstance(error, RequestAborted):
                    raise error
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        processed = tasks[1]
        del tasks
        if processed.cancelled():
            await signals.request_finished.asend(sender=self.__class__)
        else:
            processed.result().close()
        body_file.close()

    def load_middleware(self, is_async: bool = False) -> None:
        full_stack = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = full_stack


django_application = ASGIHandler()
api_application = APIHandler()

from chat import services  # noqa: E402  (needs the app registry loaded above)

logger = logging.getLogger(__name__)


def _tune_garbage_collector() -> None:
    """Python's cyclic GC runs every 700 net allocations by default, and each full collection
    walks every object alive, Django's and the libraries' included: about a tenth of the CPU of
    a chat (BENCHMARKS.md). The objects that exist once the process has started live as long
    as it does, so they are frozen out of collections, and collections run less often."""
    gc.collect()
    gc.freeze()
    if settings.GC_GEN0_THRESHOLD:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(settings.GC_GEN0_THRESHOLD, gen1, gen2)


async def _lifespan(receive, send) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            try:
                await services.on_server_startup()
                _tune_garbage_collector()
            except Exception as exc:
                logger.exception("startup failed")
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            try:
                await services.on_server_shutdown()
            finally:
                await send({"type": "lifespan.shutdown.complete"})
            return


async def application(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    elif scope["type"] == "http" and scope["path"].startswith(settings.API_PATH_PREFIX):
        await api_application(scope, receive, send)
    else:
        await django_application(scope, receive, send)
