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

import logging
import os
import sys

import django
from django.conf import settings
from django.core import signals
from django.core.cache import close_caches
from django.core.handlers.asgi import ASGIHandler
from django.db import close_old_connections, reset_queries

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
    async def __call__(self, scope, receive, send) -> None:
        # Django wraps each request in a ThreadSensitiveContext, which starts (and joins) a
        # thread of its own the first time the request runs sync code. The API's views keep
        # the ORM on chat.db's threads, so the only sync call left per request is Django's
        # response.close(); without the per-request context it runs on asgiref's one
        # long-lived thread instead.
        await self.handle(scope, receive, send)

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


async def _lifespan(receive, send) -> None:
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            try:
                await services.on_server_startup()
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
