"""The life of a server process: the maintenance loop that keeps its generations alive and
finds dead processes' ones, and what happens at startup and shutdown.

Ownership of a generation is a heartbeat in the database, never a pid or process memory: each
process marks its generations alive every CHAT_HEARTBEAT_INTERVAL seconds, and any process (on
any host) stores a generation not marked for CHAT_GENERATION_DEAD_AFTER seconds as interrupted.
So after a process is killed (SIGKILL, an out-of-memory kill, a lost host) none of its messages
stays pending for much more than CHAT_GENERATION_DEAD_AFTER.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from django.conf import settings

from billing import services as billing
from chat import db, generations, llm
from chat.services import generation as generation_service

logger = logging.getLogger(__name__)

_maintenance: asyncio.Task | None = None


async def maintain_once(*, heartbeat: bool = True) -> None:
    """One round of maintenance: stop the generations their users asked to stop through another
    process, and (with `heartbeat`) mark this process's generations alive and interrupt dead
    processes' ones."""
    live = {g.message_id: g for g in generations.in_flight()}
    if live:
        for message_id in await db.run(generation_service.stop_requested, message_ids=list(live)):
            generation_service.stop(live[message_id], reason="user")
    if heartbeat:
        if live or generations.pending_tasks():
            await db.run(generation_service.mark_alive, message_ids=list(live))
            await db.run(billing.extend_reservations, worker_id=generations.WORKER_ID)
        interrupted = await db.run(generation_service.interrupt_orphans)
        await db.run(generation_service.settle_expired_reservations)
        if interrupted:
            logger.warning(
                "stored %d generations of dead processes as interrupted", len(interrupted)
            )


async def _maintenance_loop() -> None:
    tick = min(settings.CHAT_HEARTBEAT_INTERVAL, settings.CHAT_CANCEL_POLL_INTERVAL)
    loop = asyncio.get_running_loop()
    last_heartbeat = loop.time()
    while True:
        await asyncio.sleep(tick)
        heartbeat = loop.time() - last_heartbeat >= settings.CHAT_HEARTBEAT_INTERVAL - tick / 2
        if heartbeat:
            last_heartbeat = loop.time()
        try:
            await maintain_once(heartbeat=heartbeat)
        except Exception:  # the database may be briefly away; the next round retries
            logger.exception("maintenance round failed")


async def on_server_startup() -> None:
    """Interrupt what dead processes left behind, then keep maintaining."""
    global _maintenance
    interrupted = await db.run(generation_service.interrupt_orphans)
    if interrupted:
        logger.warning("stored %d generations of dead processes as interrupted", len(interrupted))
    _maintenance = asyncio.get_running_loop().create_task(_maintenance_loop())


async def on_server_shutdown() -> None:
    """Stop this process's generations, each stored as interrupted with its partial text."""
    global _maintenance
    if _maintenance is not None:
        _maintenance.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await _maintenance
        _maintenance = None
    count = await generations.cancel_all()
    if count:
        logger.warning("interrupted %d generations at shutdown", count)
    await llm.close_client()
    await asyncio.get_running_loop().run_in_executor(None, db.close_connections)


def can_send() -> bool:
    """Whether messages can be sent (an API key is configured)."""
    return llm.is_configured()
