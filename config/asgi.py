"""ASGI entry point: Django's own ASGI handler, plus the lifespan events it does not handle.

At startup each process interrupts what dead processes left behind and starts its maintenance
loop (heartbeats, stop requests, crash recovery: chat.services.lifecycle); at shutdown its
generations in flight are stopped and stored as `interrupted` with their partial text, so no
message stays pending forever, and its live metrics (generations in flight) stop counting.
"""

import logging
import os

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


async def application(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        await django_application(scope, receive, send)
