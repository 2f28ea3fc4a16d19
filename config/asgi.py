"""ASGI entry point: Django's own ASGI handler, plus the lifespan events it does not handle.

At startup each process interrupts what dead processes left behind and starts its maintenance
loop (heartbeats, stop requests, crash recovery: chat.services.lifecycle); at shutdown its
generations in flight are stopped and stored as `interrupted` with their partial text, so no
message stays pending forever, and its live metrics (generations in flight) stop counting.
"""

import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import ThreadSensitiveContext
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_application = get_asgi_application()

from chat import metrics  # noqa: E402  (after the settings: see chat.metrics_dir)
from chat.services import lifecycle  # noqa: E402  (needs the app registry loaded above)

logger = logging.getLogger(__name__)


async def _lifespan(receive, send) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            try:
                await lifecycle.on_server_startup()
            except Exception as exc:
                logger.exception("startup failed")
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            try:
                await lifecycle.on_server_shutdown()
            finally:
                # The process ends: its live gauges (generations in flight) stop counting.
                metrics.process_exit()
                await send({"type": "lifespan.shutdown.complete"})
            return


# Django's handler runs each request's synchronous parts (the request signals, rendering a DRF
# response, response.close()) on a thread of the request's own, in a ThreadSensitiveContext. Left
# to itself asgiref starts two threads per request for that (the executor's, and one to join it)
# and the event loop waits for each to start. A request here borrows a one-thread executor
# instead, and gives it back afterwards: the same thread-per-request isolation, threads reused.
_idle_request_executors: deque[ThreadPoolExecutor] = deque()
_MAX_IDLE_REQUEST_EXECUTORS = 64


async def _django_request(scope, receive, send) -> None:
    try:
        executor = _idle_request_executors.pop()
    except IndexError:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")
    try:
        # Outermost, so Django's own ThreadSensitiveContext() inside defers to it.
        async with ThreadSensitiveContext(executor=executor):
            await django_application(scope, receive, send)
    finally:
        if len(_idle_request_executors) < _MAX_IDLE_REQUEST_EXECUTORS:
            _idle_request_executors.append(executor)
        else:
            executor.shutdown(wait=False)


async def application(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        await _django_request(scope, receive, send)
