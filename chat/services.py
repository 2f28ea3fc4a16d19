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
from django.db import IntegrityError, transaction
from django.utils import timezone

from chat import db, llm, selectors, streams
from chat.context import build_context
from chat.errors import (
    ApplicationError,
    GenerationInterrupted,
    IdempotencyKeyMismatch,
    InternalError,
    InvalidRequest,
    MessageInProgress,
    ServiceNotConfigured,
    UpstreamError,
    UpstreamTruncated,
    rebuild,
)
from chat.models import IN_PROGRESS_STATUSES, Conversation, Message, MessageStatus
from chat.streams import Finished, GenerationEvent, Heartbeat, TextDelta

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartedMessage:
    message: Message
    # True when an Idempotency-Key matched an earlier request: nothing new was started.
    replayed: bool


# --- Writes (sync; run by chat.db: `db.write` for the short writes, `db.run` for the rest) ---


TITLE_LENGTH = 60


def auto_title(prompt: str) -> str:
    """A conversation title cut from its first prompt, at a word boundary."""
    text = " ".join(prompt.split())
    if len(text) <= TITLE_LENGTH:
        return text
    cut = text[:TITLE_LENGTH].rsplit(" ", 1)[0] or text[:TITLE_LENGTH]
    return cut + "…"


@dataclass(frozen=True)
class _Prepared:
    """A stored message, ready to generate."""

    message: Message
    turns: list[llm.ChatTurn]
    options: llm.GenerationOptions
    new_conversation: bool


def _resolve_options(
    conversation: Conversation | None,
    *,
    model: str | None,
    temperature: float | None,
    max_tokens: int | None,
) -> llm.GenerationOptions:
    """The request's values, else the conversation's, else the server's defaults."""
    return llm.GenerationOptions(
        model=model or (conversation and conversation.model) or settings.OPENAI_MODEL,
        temperature=temperature
        if temperature is not None
        else conversation and conversation.temperature,
        max_tokens=max_tokens
        if max_tokens is not None
        else conversation and conversation.max_tokens,
    )


def _conversation_for_request(conversation_id: int) -> Conversation:
    try:
        return Conversation.objects.get(pk=conversation_id)
    except Conversation.DoesNotExist:
        raise InvalidRequest(
            f"Conversation {conversation_id} does not exist.",
            extra={"fields": {"conversation": [f"Conversation {conversation_id} does not exist."]}},
        ) from None


@dataclass(frozen=True)
class _Plan:
    """A new message before it is stored: where it goes, how it is generated, what is sent."""

    conversation: Conversation | None  # None: the message starts a new conversation
    options: llm.GenerationOptions
    turns: list[llm.ChatTurn]
    context_ids: list[int]
    prompt_token_count: int | None
    fingerprint: str


def _plan_message(
    *,
    prompt: str,
    conversation: Conversation | None,
    model: str | None,
    temperature: float | None,
    max_tokens: int | None,
    idempotency_key: str | None,
) -> _Plan:
    """Options and context of a new message; reads the conversation's history, if any."""
    options = _resolve_options(
        conversation, model=model, temperature=temperature, max_tokens=max_tokens
    )
    # Only a request with an Idempotency-Key is ever compared with another.
    fingerprint = (
        request_fingerprint(
            prompt=prompt,
            conversation_id=conversation.pk if conversation else None,
            options=options,
        )
        if idempotency_key is not None
        else ""
    )
    if conversation is None:
        # A first message sends no history: nothing to count until it becomes history.
        return _Plan(None, options, [{"role": "user", "content": prompt}], [], None, fingerprint)
    context = build_context(
        conversation_id=conversation.pk,
        prompt=prompt,
        model=options.model,
        system_prompt=conversation.system_prompt,
    )
    return _Plan(
        conversation,
        options,
        context.turns,
        context.message_ids,
        context.prompt_token_count,
        fingerprint,
    )


def _plan_follow_up(*, conversation_id: int, **request: object) -> _Plan:
    conversation = _conversation_for_request(conversation_id)
    return _plan_message(conversation=conversation, **request)  # type: ignore[arg-type]


def _insert_prompt(plan: _Plan, *, prompt: str, idempotency_key: str | None) -> Message:
    """Store the prompt as a pending message (and its new conversation). Runs in `db.write`."""
    now = timezone.now()
    conversation = plan.conversation
    if conversation is None:
        conversation = db.insert(
            Conversation(title=auto_title(prompt), created_at=now, updated_at=now)
        )
    else:
        conversation.updated_at = now
        db.update(conversation, ["updated_at"])
    options = plan.options
    return db.insert(
        Message(
            conversation=conversation,
            prompt_message=prompt,
            created_at=now,
            model=options.model,
            temperature=options.temperature,
            max_tokens=options.max_tokens,
            status=MessageStatus.PENDING,
            context_message_ids=plan.context_ids,
            prompt_token_count=plan.prompt_token_count,
            idempotency_key=idempotency_key,
            request_fingerprint=plan.fingerprint,
        )
    )


def _idempotent_replay(idempotency_key: str, fingerprint: str) -> Message:
    """The message an earlier request with this key stored; the same body is required."""
    existing = Message.objects.get(idempotency_key=idempotency_key)
    if existing.request_fingerprint != fingerprint:
        raise IdempotencyKeyMismatch(extra={"message_id": existing.pk})
    return existing


def _prepare_regeneration(
    *,
    message_id: int,
    model: str | None,
    temperature: float | None,
    max_tokens: int | None,
) -> _Prepared:
    """Archive the current reply and reset the message for a new generation."""
    with transaction.atomic():
        message = selectors.message_get(message_id=message_id, for_update=True)
        if not message.is_finished:
            raise MessageInProgress(extra={"message_id": message.pk})
        conversation = message.conversation
        options = _resolve_options(
            None,
            model=model or message.model or conversation.model,
            temperature=temperature if temperature is not None else message.temperature,
            max_tokens=max_tokens if max_tokens is not None else message.max_tokens,
        )
        context = build_context(
            conversation_id=conversation.pk,
            prompt=message.prompt_message,
            model=options.model,
            system_prompt=conversation.system_prompt,
            before_id=message.pk,
        )
        message.previous_replies = [*message.previous_replies, _archived_reply(message)]
        message.response = ""
        message.status = MessageStatus.PENDING
        message.model = options.model
        message.temperature = options.temperature
        message.max_tokens = options.max_tokens
        message.finish_reason = ""
        message.prompt_tokens = message.completion_tokens = message.latency_ms = None
        message.response_token_count = None
        message.error_code = message.error_message = ""
        message.completed_at = None
        message.context_message_ids = context.message_ids
        message.prompt_token_count = context.prompt_token_count
        message.save()
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=timezone.now())
    return _Prepared(message, context.turns, options, False)


def _archived_reply(message: Message) -> dict:
    return {
        "response": message.response,
        "status": message.status,
        "model": message.model,
        "finish_reason": message.finish_reason,
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "error_code": message.error_code,
        "completed_at": message.completed_at.isoformat() if message.completed_at else None,
    }


def _record_partial(message: Message, text: str) -> None:
    message.response = text
    message.status = MessageStatus.STREAMING
    db.update(message, ["response", "status", "updated_at"])


# An update of a row deleted meanwhile is an error, never a silent re-insert.
_OUTCOME_FIELDS = [
    "response",
    "status",
    "model",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "error_code",
    "error_message",
    "completed_at",
    "updated_at",
]


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
    db.update(message, _OUTCOME_FIELDS)


def _record_failure(
    message: Message, error: ApplicationError, partial_text: str, status: str, latency_ms: int
) -> None:
    message.response = partial_text
    message.status = status
    message.error_code = error.code
    message.error_message = error.message
    message.latency_ms = latency_ms
    message.completed_at = timezone.now()
    db.update(message, _OUTCOME_FIELDS)


# --- Generation -------------------------------------------------------------------------------


async def _produce(
    generation: streams.Generation,
    message: Message,
    turns: list[llm.ChatTurn],
    options: llm.GenerationOptions,
    stream: bool,
) -> llm.Completion:
    """Call the model; publish the text to followers, saving partial text at an interval."""
    if not stream:
        completion = await llm.complete(messages=turns, options=options)
        generation.publish(completion.text)
        return completion
    completion: llm.Completion | None = None
    last_saved: float | None = None
    save_interval = settings.CHAT_STREAM_SAVE_INTERVAL
    async for event in llm.stream(messages=turns, options=options):
        if isinstance(event, llm.Delta):
            generation.publish(event.text)
            now = time.monotonic()
            if last_saved is None or now - last_saved >= save_interval:
                last_saved = now
                await db.write(_record_partial, message, generation.text)
        else:
            completion = event
    assert completion is not None
    return completion


async def _generate(
    generation: streams.Generation,
    message: Message,
    turns: list[llm.ChatTurn],
    options: llm.GenerationOptions,
    stream: bool,
    *,
    title_conversation: bool = False,
) -> None:
    """Produce the reply and store the outcome. Whatever happens, the message ends in a final
    status and every follower gets `Finished`."""
    started = time.monotonic()
    error: ApplicationError | None = None
    status = MessageStatus.FAILED
    cancelled = False
    completion: llm.Completion | None = None
    try:
        completion = await _produce(generation, message, turns, options, stream)
    except ApplicationError as exc:
        error = exc
        if isinstance(exc, UpstreamTruncated):
            status = MessageStatus.TRUNCATED
    except asyncio.CancelledError:
        cancelled = True
        error, status = GenerationInterrupted(), MessageStatus.INTERRUPTED
    except Exception:  # a bug of ours: still never leave the message pending
        logger.exception("generation of message %s failed", message.pk)
        error = InternalError()

    try:
        if error is None:
            assert completion is not None
            await db.write(_record_completion, message, completion)
        else:
            error.extra["message_id"] = message.pk
            latency_ms = int((time.monotonic() - started) * 1000)
            await db.write(_record_failure, message, error, generation.text, status, latency_ms)
    except Exception:
        logger.exception("could not store the outcome of message %s", message.pk)
        error = error or InternalError(extra={"message_id": message.pk})
    finally:
        generation.finish(Finished(message, error))

    if cancelled:
        raise asyncio.CancelledError
    if error is None and title_conversation:
        await _title_from_model(message)


TITLE_INSTRUCTION = (
    "Write a title of at most six words for a conversation that starts with the message "
    "below. Answer with the title only, no quotes."
)


def _set_generated_title(conversation_id: int, expected: str, title: str) -> None:
    # Only if nobody renamed the conversation in the meantime.
    Conversation.objects.filter(pk=conversation_id, title=expected).update(title=title)


async def _title_from_model(message: Message) -> None:
    """Best effort: a failure leaves the title cut from the prompt."""
    try:
        completion = await llm.complete(
            messages=[
                {"role": "system", "content": TITLE_INSTRUCTION},
                {"role": "user", "content": message.prompt_message[:2000]},
            ],
            options=llm.GenerationOptions(model=settings.OPENAI_MODEL, max_tokens=20),
        )
    except ApplicationError as exc:
        logger.info("title generation failed: %s", exc.code)
        return
    title = " ".join(completion.text.strip().strip('"').split())[:200]
    if title:
        await db.run(
            _set_generated_title,
            message.conversation_id,
            auto_title(message.prompt_message),
            title,
        )


def can_send() -> bool:
    """Whether messages can be sent (an API key is configured)."""
    return llm.is_configured()


def request_fingerprint(
    *, prompt: str, conversation_id: int | None, options: llm.GenerationOptions
) -> str:
    """What makes two requests "the same" for Idempotency-Key purposes."""
    canonical = json.dumps(
        {"prompt": prompt, "conversation": conversation_id, **options.as_request_kwargs()},
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _launch(prepared: _Prepared, *, stream: bool) -> None:
    message = prepared.message
    streams.start(
        message.pk,
        lambda generation: _generate(
            generation,
            message,
            prepared.turns,
            prepared.options,
            stream,
            title_conversation=prepared.new_conversation and settings.CHAT_TITLE_FROM_MODEL,
        ),
    )


async def start_message(
    *,
    prompt: str,
    conversation_id: int | None = None,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    stream: bool = False,
    idempotency_key: str | None = None,
) -> StartedMessage:
    """Store the prompt and start generating the reply in the background.

    Without `conversation_id` a new conversation is started. With an `idempotency_key` already
    used by an earlier request with the same body, the earlier message is returned
    (`replayed=True`) and nothing new is started; with a different body,
    `IdempotencyKeyMismatch` is raised.
    """
    request = {
        "prompt": prompt,
        "model": model,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "idempotency_key": idempotency_key,
    }
    if conversation_id is None:
        plan = _plan_message(conversation=None, **request)
    else:
        plan = await db.run(_plan_follow_up, conversation_id=conversation_id, **request)
    try:
        message = await db.write(
            _insert_prompt, plan, prompt=prompt, idempotency_key=idempotency_key
        )
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = await db.run(_idempotent_replay, idempotency_key, plan.fingerprint)
        return StartedMessage(message=existing, replayed=True)
    prepared = _Prepared(message, plan.turns, plan.options, plan.conversation is None)
    if not llm.is_configured():
        # Kept like any failed prompt: retried with regenerate once a key is configured.
        error = ServiceNotConfigured(extra={"message_id": prepared.message.pk})
        await db.write(_record_failure, prepared.message, error, "", MessageStatus.FAILED, 0)
        raise error
    _launch(prepared, stream=stream)
    return StartedMessage(message=prepared.message, replayed=False)


async def regenerate_message(
    *,
    message_id: int,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    stream: bool = False,
) -> Message:
    """Ask the model again for a stored prompt with the same context; the reply it replaces
    (or the failure) is kept in `previous_replies`. Also the way to retry a failed message."""
    if not llm.is_configured():
        raise ServiceNotConfigured()
    prepared = await db.run(
        _prepare_regeneration,
        message_id=message_id,
        model=model,
        temperature=temperature,
        max_tokens=max_tokens,
    )
    _launch(prepared, stream=stream)
    return prepared.message


async def wait_for_message(*, message_id: int) -> Message:
    """The message once its generation has ended; raises its error if it failed."""
    generation = streams.get(message_id)
    if generation is not None:
        finished = await generation.wait()
        if finished.error is not None:
            raise finished.error
        return finished.message
    async for event in follow_message(message_id=message_id):
        if isinstance(event, Finished):
            if event.error is not None:
                raise event.error
            return event.message
    raise AssertionError("follow_message ended without Finished")  # pragma: no cover


async def send_message(
    *,
    prompt: str,
    conversation_id: int | None = None,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    idempotency_key: str | None = None,
) -> tuple[Message, bool]:
    """Non-streaming use case: store the prompt, get the reply, return the stored message and
    whether it was an idempotent replay. Raises the generation's error if it failed."""
    started = await start_message(
        prompt=prompt,
        conversation_id=conversation_id,
        model=model,
        temperature=temperature,
        max_tokens=max_tokens,
        idempotency_key=idempotency_key,
    )
    message = await wait_for_message(message_id=started.message.pk)
    return message, started.replayed


def _stored_error(message: Message) -> ApplicationError | None:
    """The error of a message that ended badly, as its generation raised it."""
    if not message.is_finished or message.status == MessageStatus.COMPLETED:
        return None
    return rebuild(
        message.error_code or UpstreamError.code,
        message.error_message,
        extra={"message_id": message.pk},
    )


async def follow_message(
    *, message_id: int, heartbeat: float | None = None
) -> AsyncIterator[GenerationEvent]:
    """Replay what a message's generation produced so far, then follow it to the end, with a
    `Heartbeat` whenever `heartbeat` seconds pass without news.

    A generation of this process is followed live; one in another process (or one that already
    ended) is read from the database, polled at the partial-save interval.
    """
    generation = streams.get(message_id)
    if generation is not None:
        async for event in generation.follow(heartbeat=heartbeat):
            yield event
        return
    message = await db.run(selectors.message_get, message_id=message_id)
    sent = ""
    quiet_since = time.monotonic()
    while True:
        text = message.response
        if len(text) > len(sent) and text.startswith(sent):
            yield TextDelta(text[len(sent) :])
            sent, quiet_since = text, time.monotonic()
        if message.is_finished:
            yield Finished(message, _stored_error(message))
            return
        if heartbeat is not None and time.monotonic() - quiet_since >= heartbeat:
            yield Heartbeat()
            quiet_since = time.monotonic()
        await asyncio.sleep(settings.CHAT_STREAM_SAVE_INTERVAL)
        message = await db.run(selectors.message_get, message_id=message_id)


# --- Conversations ----------------------------------------------------------------------------

CONVERSATION_FIELDS = ("title", "system_prompt", "model", "temperature", "max_tokens")


def conversation_create(
    *,
    title: str = "",
    system_prompt: str = "",
    model: str = "",
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> Conversation:
    now = timezone.now()
    return Conversation.objects.create(
        title=title,
        system_prompt=system_prompt,
        model=model,
        temperature=temperature,
        max_tokens=max_tokens,
        created_at=now,
        updated_at=now,
    )


def conversation_update(*, conversation: Conversation, **changes: object) -> Conversation:
    """Rename, or change the system prompt, model or generation parameters."""
    unknown = set(changes) - set(CONVERSATION_FIELDS)
    if unknown:
        raise InvalidRequest(f"Unknown conversation fields: {', '.join(sorted(unknown))}.")
    for field, value in changes.items():
        setattr(conversation, field, value)
    if changes:
        conversation.updated_at = timezone.now()
        conversation.save(update_fields=[*changes, "updated_at"])
    return conversation


def conversation_delete(*, conversation: Conversation) -> None:
    """Delete a conversation with its messages; refused while one is still generating."""
    busy = conversation.messages.filter(status__in=IN_PROGRESS_STATUSES).values_list(
        "id", flat=True
    )
    in_flight = [pk for pk in busy if streams.get(pk) is not None]
    if in_flight:
        raise MessageInProgress(
            "A reply in this conversation is still being generated; delete it when it ends.",
            extra={"message_id": in_flight[0]},
        )
    conversation.delete()


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
    await asyncio.get_running_loop().run_in_executor(None, db.close_connections)
