"""Generating a reply: the detached task that calls the model, publishes its text to followers,
saves partial text while streaming, and stores the outcome.

Rules that hold here:
- no transaction is ever open across a model call or a stream: the prompt was committed before
  the task starts, partial text and the outcome are each one short write;
- whatever happens (upstream failure, a stop request, shutdown, a bug of ours) the message ends
  in a final status and every follower gets `Finished`;
- failures are stored on the message (status, error code and message) and raised to followers
  as `chat.errors.UpstreamError`s that name the stored message's id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from django.conf import settings
from django.db import transaction
from django.db.models import Case, Q, Value, When
from django.utils import timezone

from billing import services as billing
from billing.models import LedgerKind, Reservation
from chat import db, generations, live, llm, metrics, tokens
from chat.errors import (
    ApplicationError,
    BudgetExceeded,
    GenerationInterrupted,
    InternalError,
    TooManyConcurrent,
    UpstreamTimeout,
    UpstreamTruncated,
    stored_details,
)
from chat.generations import Finished, Generation, TextDelta
from chat.models import IN_PROGRESS_STATUSES, Conversation, Message, MessageStatus

logger = logging.getLogger(__name__)

StopReason = Literal["user", "shutdown"]


@dataclass(frozen=True)
class PreparedGeneration:
    """A stored message, ready to generate its reply."""

    message: Message
    turns: list[llm.ChatTurn]
    options: llm.GenerationOptions
    # Tokens of the turns as counted offline: what is charged when upstream reports no usage.
    counted_tokens: int
    # The budget reservation that the outcome settles.
    reservation: Reservation | None
    # The message started a new conversation (which the model may title).
    new_conversation: bool = False


def launch(prepared: PreparedGeneration, *, stream: bool) -> Generation:
    """Start generating the reply of a stored (pending) message as a detached task."""
    return generations.start(
        prepared.message.pk, lambda generation: _generate(generation, prepared, stream)
    )


def stop(generation: Generation, *, reason: StopReason) -> None:
    """Stop a generation of this process; it stores its text so far and finishes."""
    generation.cancel(reason)


def _publish(generation: Generation, publisher: live.Publisher | None, delta: TextDelta) -> None:
    generation.publish(delta)
    if publisher is not None:
        publisher.delta(delta)


async def _produce(
    generation: Generation,
    prepared: PreparedGeneration,
    stream: bool,
    publisher: live.Publisher | None,
) -> llm.Completion:
    """Call the model; publish the text to followers (in this process, and through Redis in
    others), saving partial text at an interval."""
    if not stream:
        completion = await llm.complete(messages=prepared.turns, options=prepared.options)
        if completion.text:
            _publish(generation, publisher, TextDelta(completion.text))
        if completion.refusal:
            _publish(generation, publisher, TextDelta(completion.refusal, refusal=True))
        return completion
    final: llm.Completion | None = None
    last_saved: float | None = None
    save_interval = settings.CHAT_STREAM_SAVE_INTERVAL
    message_id = prepared.message.pk
    # A partial save runs beside the stream, never in its way (the database may be busy), one
    # at a time; the outcome is recorded after it, and a late one cannot overwrite the outcome
    # (it only updates a message still in progress).
    saving: asyncio.Future[None] | None = None
    try:
        async for event in llm.stream(messages=prepared.turns, options=prepared.options):
            if isinstance(event, llm.Delta):
                _publish(generation, publisher, TextDelta(event.text, refusal=event.refusal))
                now = time.monotonic()
                due = last_saved is None or now - last_saved >= save_interval
                if due and (saving is None or saving.done()):
                    last_saved = now
                    saving = asyncio.ensure_future(
                        _save_partial(message_id, generation.text, generation.refusal)
                    )
            else:
                final = event
    finally:
        if saving is not None:
            await saving
    assert final is not None
    return final


async def _save_partial(message_id: int, text: str, refusal: str) -> None:
    try:
        await db.run(_record_partial, message_id, text, refusal)
    except Exception:
        # Best effort: the outcome is stored whole at the end either way.
        logger.warning("could not save the partial text of message %s", message_id, exc_info=True)


def _record_partial(message_id: int, text: str, refusal: str) -> None:
    Message.objects.filter(pk=message_id, status__in=IN_PROGRESS_STATUSES).update(
        response=text, refusal=refusal, status=MessageStatus.STREAMING, updated_at=timezone.now()
    )


_OUTCOME_FIELDS = [
    "response",
    "refusal",
    "status",
    "model",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "error_code",
    "error_message",
    "error_details",
    "completed_at",
    "updated_at",
]


def _settle(
    prepared: PreparedGeneration,
    *,
    outcome: str,
    usage: tuple[int, int] | None,
    produced: str,
    prompt_consumed: bool,
) -> int | None:
    """Charge the call to its user's budget (inside the caller's transaction, before it writes
    the message: the billing account's lock comes first). With upstream's `usage` that is
    exact; without it (a stream stopped or cut short, a server that reports none) the text is
    counted: the prompt when upstream consumed it, and what was produced. Returns the cost."""
    if prepared.reservation is None:
        return None
    if usage is not None:
        prompt_tokens, completion_tokens = usage
        source = "upstream"
    else:
        prompt_tokens = prepared.counted_tokens if prompt_consumed or produced else 0
        completion_tokens = tokens.count_text(produced, model=prepared.options.model)
        source = "counted"
    entry = billing.settle(
        reservation=prepared.reservation,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        usage_source=source,
        outcome=outcome,
    )
    return entry.cost if entry is not None else None


def _record_completion(prepared: PreparedGeneration, completion: llm.Completion) -> None:
    message = prepared.message
    message.response = completion.text
    message.refusal = completion.refusal
    refused = bool(completion.refusal) and not completion.text
    message.status = MessageStatus.REFUSED if refused else MessageStatus.COMPLETED
    message.model = completion.model
    message.finish_reason = completion.finish_reason or ""
    message.prompt_tokens = completion.prompt_tokens
    message.completion_tokens = completion.completion_tokens
    message.latency_ms = completion.latency_ms
    message.error_code = message.error_message = ""
    message.error_details = {}
    message.completed_at = timezone.now()
    usage = None
    if completion.prompt_tokens is not None and completion.completion_tokens is not None:
        usage = (completion.prompt_tokens, completion.completion_tokens)
    with transaction.atomic():
        message.cost = _settle(
            prepared,
            outcome=message.status,
            usage=usage,
            produced=completion.text + completion.refusal,
            prompt_consumed=True,
        )
        # An update of a row deleted meanwhile is an error, never a silent re-insert.
        message.save(update_fields=[*_OUTCOME_FIELDS, "cost"])


def _record_stop(
    prepared: PreparedGeneration,
    *,
    status: str,
    error: ApplicationError | None,
    text: str,
    refusal: str,
    latency_ms: int,
) -> None:
    message = prepared.message
    message.response = text
    message.refusal = refusal
    message.status = status
    message.error_code = error.code if error else ""
    message.error_message = error.message if error else ""
    message.error_details = stored_details(error) if error else {}
    message.latency_ms = latency_ms
    message.completed_at = timezone.now()
    # Upstream consumed the prompt if it started answering, timed out, or was stopped while
    # it worked; a refusal of the request itself (HTTP error) costs nothing.
    consumed = status != MessageStatus.FAILED or isinstance(error, UpstreamTimeout)
    with transaction.atomic():
        message.cost = _settle(
            prepared, outcome=status, usage=None, produced=text + refusal, prompt_consumed=consumed
        )
        message.save(update_fields=[*_OUTCOME_FIELDS, "cost"])


def _outcome_of_stop(generation: Generation) -> tuple[str, ApplicationError | None]:
    if generation.stop_reason == "user":
        return MessageStatus.CANCELLED, None
    return MessageStatus.INTERRUPTED, GenerationInterrupted()


async def _generate(generation: Generation, prepared: PreparedGeneration, stream: bool) -> None:
    """Produce the reply and store the outcome."""
    message = prepared.message
    started = time.monotonic()
    error: ApplicationError | None = None
    status: str = MessageStatus.FAILED
    cancelled = False
    completion: llm.Completion | None = None
    publisher = live.Publisher(message) if live.is_enabled() else None
    try:
        completion = await _produce(generation, prepared, stream, publisher)
    except ApplicationError as exc:
        error = exc
        if isinstance(exc, UpstreamTruncated):
            status = MessageStatus.TRUNCATED
    except asyncio.CancelledError:
        cancelled = True
        status, error = _outcome_of_stop(generation)
    except Exception:  # a bug of ours: still never leave the message pending
        logger.exception("generation of message %s failed", message.pk)
        error = InternalError()

    try:
        if completion is not None:
            await db.run(_record_completion, prepared, completion)
        else:
            if error is not None:
                error.extra["message_id"] = message.pk
            latency_ms = int((time.monotonic() - started) * 1000)
            await db.run(
                _record_stop,
                prepared,
                status=status,
                error=error,
                text=generation.text,
                refusal=generation.refusal,
                latency_ms=latency_ms,
            )
    except Exception:
        logger.exception("could not store the outcome of message %s", message.pk)
        error = error or InternalError(extra={"message_id": message.pk})
    finally:
        generation.finish(Finished(message, error))
        metrics.record_generation_outcome(message.status)
        if publisher is not None:
            # After the outcome is stored: followers elsewhere read it when they see the end.
            publisher.end()
            await asyncio.shield(publisher.close())

    if cancelled:
        raise asyncio.CancelledError
    if (
        completion is not None
        and message.status == MessageStatus.COMPLETED
        and prepared.new_conversation
        and settings.CHAT_TITLE_FROM_MODEL
    ):
        generations.run_detached(_title_from_model(message))


TITLE_INSTRUCTION = (
    "Write a title of at most six words for a conversation that starts with the message "
    "below. Answer with the title only, no quotes."
)
TITLE_LENGTH = 60


def auto_title(prompt: str) -> str:
    """A conversation title cut from its first prompt, at a word boundary."""
    text = " ".join(prompt.split())
    if len(text) <= TITLE_LENGTH:
        return text
    cut = text[:TITLE_LENGTH].rsplit(" ", 1)[0] or text[:TITLE_LENGTH]
    return cut + "…"


def _set_generated_title(conversation_id: int, expected: str, title: str) -> None:
    # Only if nobody renamed the conversation in the meantime.
    Conversation.objects.filter(pk=conversation_id, title=expected).update(title=title)


def _reserve_title_call(message: Message, options: llm.GenerationOptions) -> Reservation | None:
    with transaction.atomic():
        try:
            reservation = billing.reserve(
                user=message.owner_id,
                model=options.model,
                prompt_tokens=tokens.prompt_tokens_upper_bound(
                    _title_turns(message),
                    model=options.model,
                    counted=tokens.count_turns(_title_turns(message), model=options.model),
                ),
                max_completion_tokens=options.completion_token_cap,
                worker_id=generations.WORKER_ID,
                message=message.pk,
            )
        except (BudgetExceeded, TooManyConcurrent):
            return None
    return reservation


def _settle_title_call(
    reservation: Reservation, message: Message, completion: llm.Completion | None
) -> None:
    if (
        completion
        and completion.prompt_tokens is not None
        and completion.completion_tokens is not None
    ):
        prompt_tokens, completion_tokens = completion.prompt_tokens, completion.completion_tokens
        source = "upstream"
    else:
        prompt_tokens = tokens.count_turns(_title_turns(message), model=settings.OPENAI_MODEL)
        completion_tokens = tokens.count_text(
            completion.text if completion else "", model=settings.OPENAI_MODEL
        )
        source = "counted"
    with transaction.atomic():
        billing.settle(
            reservation=reservation,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            usage_source=source,
            outcome=MessageStatus.COMPLETED if completion else MessageStatus.FAILED,
            kind=LedgerKind.TITLE,
        )


def _title_turns(message: Message) -> list[llm.ChatTurn]:
    return [
        {"role": "system", "content": TITLE_INSTRUCTION},
        {"role": "user", "content": message.prompt_message[:2000]},
    ]


async def _title_from_model(message: Message) -> None:
    """Best effort, charged to the message's user like any call: a failure, or a budget that
    cannot cover it, leaves the title cut from the prompt."""
    options = llm.GenerationOptions(model=settings.OPENAI_MODEL, max_tokens=20)
    reservation = await db.run(_reserve_title_call, message, options)
    if reservation is None:
        return
    completion = None
    try:
        completion = await llm.complete(messages=_title_turns(message), options=options)
    except ApplicationError as exc:
        logger.info("title generation failed: %s", exc.code)
    finally:
        await asyncio.shield(db.run(_settle_title_call, reservation, message, completion))
    title = " ".join(completion.text.strip().strip('"').split())[:200] if completion else ""
    if title:
        await db.run(
            _set_generated_title,
            message.conversation_id,
            auto_title(message.prompt_message),
            title,
        )


# --- Orphans: generations whose process died ------------------------------------------------


def interrupt_orphans(*, message_ids: list[int] | None = None) -> list[int]:
    """Store as `interrupted` (with the text saved so far) every generation whose process has
    not marked it alive for CHAT_GENERATION_DEAD_AFTER seconds: its process died, on whatever
    host. Safe to run from any number of processes at once. Returns the ids interrupted."""
    now = timezone.now()
    stale = Q(
        status__in=IN_PROGRESS_STATUSES,
        updated_at__lt=now - timedelta(seconds=settings.CHAT_GENERATION_DEAD_AFTER),
    )
    candidates = Message.objects.filter(stale)
    if message_ids is not None:
        candidates = candidates.filter(pk__in=message_ids)
    interrupted = []
    for message_id in candidates.values_list("id", flat=True)[:500]:
        with transaction.atomic():
            # The dead process's reservation is charged for what it produced (its text saved
            # so far), before the message is written: the billing account's lock comes first.
            _settle_orphan(message_id)
            # Conditional: a process that is alive after all, or another sweeper, wins.
            # A generation its user had asked to stop ends as they asked: cancelled.
            updated = Message.objects.filter(stale, pk=message_id).update(
                status=Case(
                    When(cancel_requested=True, then=Value(MessageStatus.CANCELLED)),
                    default=Value(MessageStatus.INTERRUPTED),
                ),
                error_code=Case(
                    When(cancel_requested=True, then=Value("")),
                    default=Value(GenerationInterrupted.code),
                ),
                error_message=Case(
                    When(cancel_requested=True, then=Value("")),
                    default=Value(GenerationInterrupted.default_message),
                ),
                completed_at=now,
                updated_at=now,
            )
            if not updated:
                transaction.set_rollback(True)
        if updated:
            interrupted.append(message_id)
    return interrupted


def _settle_orphan(message_id: int) -> None:
    message = Message.objects.filter(pk=message_id).first()
    for reservation in Reservation.objects.filter(message_id=message_id):
        produced = (message.response + message.refusal) if message else ""
        entry = billing.settle(
            reservation=reservation,
            prompt_tokens=reservation.prompt_tokens,
            completion_tokens=tokens.count_text(produced, model=reservation.model),
            usage_source="counted",
            outcome=MessageStatus.INTERRUPTED,
        )
        if entry is not None and message is not None:
            Message.objects.filter(pk=message_id).update(cost=entry.cost)


def settle_expired_reservations() -> int:
    """Charge the reservations that expired without their generation's message being found
    in progress (e.g. a title call of a dead process): each for its prompt. Returns how many."""
    settled = 0
    for reservation in billing.expired_reservations().exclude(
        message__status__in=IN_PROGRESS_STATUSES
    )[:500]:
        with transaction.atomic():
            entry = billing.settle(
                reservation=reservation,
                prompt_tokens=reservation.prompt_tokens,
                completion_tokens=0,
                usage_source="counted",
                outcome=MessageStatus.INTERRUPTED,
            )
        settled += entry is not None
    return settled


def mark_alive(*, message_ids: list[int]) -> None:
    """The heartbeat of this process's generations (see `interrupt_orphans`)."""
    now = timezone.now()
    for start in range(0, len(message_ids), 500):
        Message.objects.filter(
            pk__in=message_ids[start : start + 500], status__in=IN_PROGRESS_STATUSES
        ).update(updated_at=now)


def stop_requested(*, message_ids: list[int]) -> list[int]:
    """Which of these messages a user asked to stop (possibly through another process)."""
    found: list[int] = []
    for start in range(0, len(message_ids), 500):
        found += Message.objects.filter(
            pk__in=message_ids[start : start + 500], cancel_requested=True
        ).values_list("id", flat=True)
    return found
