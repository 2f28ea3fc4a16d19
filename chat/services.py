"""Use cases of the chat: send a message (streamed or not), follow a generation, recover.

Rules that hold everywhere here:
- the prompt is committed before the model is called, and the reply is saved in a second short
  write: no transaction is ever open across a model call or a stream;
- a generation runs as a detached task (chat.streams), so a client that goes away never loses
  the reply;
- failures are stored on the message (status, error code and message) and raised as
  `chat.errors.UpstreamError`s that name the stored message's id.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError
from django.utils import timezone

from chat import db, llm, selectors, streams
from chat.context import build_turns
from chat.errors import (
    ApplicationError,
    GenerationInterrupted,
    IdempotencyKeyMismatch,
    InternalError,
    ServiceNotConfigured,
    UpstreamTruncated,
    error_for_stored_message,
)
from chat.models import IN_PROGRESS_STATUSES, Message, MessageStatus
from chat.streams import Finished, GenerationEvent, TextDelta

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartedMessage:
    message: Message
    # True when an Idempotency-Key matched an earlier request: nothing new was started.
    replayed: bool


# --- Writes (sync; run on database threads through chat.db) ----------------------------------


def _insert_prompt(
    *, prompt: str, model: str, idempotency_key: str | None, fingerprint: str
) -> tuple[Message, bool]:
    try:
        message = Message.objects.create(
            prompt_message=prompt,
            model=model,
            status=MessageStatus.PENDING,
            idempotency_key=idempotency_key,
            request_fingerprint=fingerprint,
        )
    except IntegrityError:
        if idempotency_key is None:
            raise
        return Message.objects.get(idempotency_key=idempotency_key), False
    return message, True


def _record_partial(message: Message, text: str) -> None:
    message.response = text
    message.status = MessageStatus.STREAMING
    message.save(update_fields=["response", "status", "updated_at"])


def _record_completion(message: Message, completion: llm.Completion) -> None:
    message.response = completion.text
    message.status = MessageStatus.COMPLETED
    message.model = completion.model
    message.finish_reason = completion.finish_reason or ""
    message.prompt_tokens = completion.prompt_tokens
    message.completion_tokens = completion.completion_tokens
    message.latency_ms = completion.latency_ms
    message.error_code = ""
    message.error_message = ""
    message.completed_at = timezone.now()
    message.save()


def _record_failure(
    message: Message, error: ApplicationError, partial_text: str, status: str, latency_ms: int
) -> None:
    message.response = partial_text
    message.status = status
    message.error_code = error.code
    message.error_message = error.message
    message.latency_ms = latency_ms
    message.completed_at = timezone.now()
    message.save()


# --- Generation -------------------------------------------------------------------------------


async def _generate(
    generation: streams.Generation,
    message: Message,
    turns: list[llm.ChatTurn],
    options: llm.GenerationOptions,
    stream: bool,
) -> None:
    started = time.monotonic()

    def elapsed_ms() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        completion: llm.Completion | None = None
        if stream:
            last_saved: float | None = None
            async for event in llm.stream(messages=turns, options=options):
                if isinstance(event, llm.Delta):
                    generation.publish(event.text)
                    now = time.monotonic()
                    if last_saved is None or now - last_saved >= settings.CHAT_STREAM_SAVE_INTERVAL:
                        last_saved = now
                        await db.run(_record_partial, message, generation.text)
                else:
                    completion = event
        else:
            completion = await llm.complete(messages=turns, options=options)
            generation.publish(completion.text)
        assert completion is not None
        await db.run(_record_completion, message, completion)
        generation.finish(Finished(message))
    except ApplicationError as exc:
        status = (
            MessageStatus.TRUNCATED if isinstance(exc, UpstreamTruncated) else MessageStatus.FAILED
        )
        exc.extra["message_id"] = message.pk
        await db.run(_record_failure, message, exc, generation.text, status, elapsed_ms())
        generation.finish(Finished(message, exc))
    except asyncio.CancelledError:
        error = GenerationInterrupted(extra={"message_id": message.pk})
        await db.run(
            _record_failure,
            message,
            error,
            generation.text,
            MessageStatus.INTERRUPTED,
            elapsed_ms(),
        )
        generation.finish(Finished(message, error))
        raise
    except Exception:  # a bug of ours: still never leave the message pending
        logger.exception("generation of message %s failed", message.pk)
        error = InternalError(extra={"message_id": message.pk})
        await db.run(
            _record_failure, message, error, generation.text, MessageStatus.FAILED, elapsed_ms()
        )
        generation.finish(Finished(message, error))


def request_fingerprint(*, prompt: str, options: llm.GenerationOptions) -> str:
    """What makes two requests "the same" for Idempotency-Key purposes."""
    canonical = json.dumps(
        {"prompt": prompt, **options.as_request_kwargs()}, sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


async def start_message(
    *,
    prompt: str,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    stream: bool = False,
    idempotency_key: str | None = None,
) -> StartedMessage:
    """Store the prompt and start generating the reply in the background.

    With an `idempotency_key` already used by an earlier request with the same body, the earlier
    message is returned (`replayed=True`) and nothing new is started; with a different body,
    `IdempotencyKeyMismatch` is raised.
    """
    if not llm.is_configured():
        raise ServiceNotConfigured()
    options = llm.GenerationOptions(
        model=model or settings.OPENAI_MODEL, temperature=temperature, max_tokens=max_tokens
    )
    fingerprint = request_fingerprint(prompt=prompt, options=options)
    message, created = await db.run(
        _insert_prompt,
        prompt=prompt,
        model=options.model,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
    )
    if not created:
        if message.request_fingerprint != fingerprint:
            raise IdempotencyKeyMismatch(extra={"message_id": message.pk})
        return StartedMessage(message=message, replayed=True)
    turns = build_turns(message)
    streams.start(
        message.pk,
        lambda generation: _generate(generation, message, turns, options, stream),
    )
    return StartedMessage(message=message, replayed=False)


async def wait_for_message(*, message_id: int) -> Message:
    """The message once its generation has ended; raises its error if it failed."""
    async for event in follow_message(message_id=message_id):
        if isinstance(event, Finished):
            if event.error is not None:
                raise event.error
            return event.message
    raise AssertionError("follow_message ended without Finished")  # pragma: no cover


async def send_message(**kwargs) -> tuple[Message, bool]:
    """Non-streaming use case: store the prompt, get the reply, return the stored message."""
    started = await start_message(**kwargs)
    message = await wait_for_message(message_id=started.message.pk)
    return message, started.replayed


async def follow_message(*, message_id: int) -> AsyncIterator[GenerationEvent]:
    """Replay what a message's generation produced so far, then follow it to the end.

    A generation of this process is followed live; one in another process (or one that already
    ended) is read from the database, polled at the partial-save interval.
    """
    generation = streams.get(message_id)
    if generation is not None:
        async for event in generation.follow():
            yield event
        return
    message = await db.run(selectors.message_get, message_id=message_id)
    sent = ""
    while True:
        text = message.response
        if len(text) > len(sent) and text.startswith(sent):
            yield TextDelta(text[len(sent) :])
            sent = text
        if message.is_finished:
            yield Finished(message, error_for_stored_message(message))
            return
        await asyncio.sleep(settings.CHAT_STREAM_SAVE_INTERVAL)
        message = await db.run(selectors.message_get, message_id=message_id)


# --- Process lifecycle ------------------------------------------------------------------------


def _interrupt_stale_generations(older_than: timedelta) -> int:
    cutoff = timezone.now() - older_than
    return Message.objects.filter(status__in=IN_PROGRESS_STATUSES, updated_at__lt=cutoff).update(
        status=MessageStatus.INTERRUPTED,
        error_code=GenerationInterrupted.code,
        error_message=GenerationInterrupted.default_message,
        completed_at=timezone.now(),
        updated_at=timezone.now(),
    )


async def on_server_startup() -> None:
    """Mark generations that a dead process left behind as interrupted."""
    count = await db.run(
        _interrupt_stale_generations,
        timedelta(seconds=settings.CHAT_STALE_GENERATION_SECONDS),
    )
    if count:
        logger.warning("marked %d stale generations as interrupted", count)


async def on_server_shutdown() -> None:
    """Stop this process's generations, each saved as interrupted with its partial text."""
    count = await streams.cancel_all()
    if count:
        logger.warning("interrupted %d generations at shutdown", count)
    await llm.close_client()
