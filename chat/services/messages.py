"""Messages: send a prompt (streamed or not), follow a generation, regenerate, stop.

The prompt is committed before the model is called (chat.services.generation does the rest), so
an upstream failure never loses it: it is stored as failed, and `message_regenerate` retries it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.utils import timezone
from redis.exceptions import RedisError

from billing import limits
from billing import services as billing
from billing.models import Reservation
from billing.money import usd_str
from chat import db, generations, live, llm, selectors, tokens
from chat.context import build_context
from chat.errors import (
    ApplicationError,
    IdempotencyKeyMismatch,
    InvalidRequest,
    MessageInProgress,
    ServiceNotConfigured,
    UpstreamError,
    rebuild,
)
from chat.generations import Finished, GenerationEvent, Heartbeat, TextDelta
from chat.models import IN_PROGRESS_STATUSES, Conversation, Message, MessageStatus
from chat.services import generation as generation_service
from chat.services.generation import PreparedGeneration, auto_title

logger = logging.getLogger(__name__)

# How long a stop request waits for the generation to record its final state.
STOP_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class StartedMessage:
    message: Message
    # True when an Idempotency-Key matched an earlier request: nothing new was started.
    replayed: bool


@dataclass(frozen=True)
class _Plan:
    """A new message before it is stored: where it goes, how it is generated, what is sent."""

    conversation_id: int | None  # None: the message starts a new conversation
    options: llm.GenerationOptions
    turns: list[llm.ChatTurn]
    context_ids: list[int]
    prompt_token_count: int | None
    # Tokens of all the turns as counted offline, and the most upstream can charge for them.
    counted_tokens: int
    reserved_tokens: int
    fingerprint: str
    # The message an earlier request with the same Idempotency-Key stored, if any.
    replay: Message | None = None


def _resolve_options(
    conversation: Conversation | None,
    *,
    model: str | None,
    temperature: float | None,
    max_tokens: int | None,
) -> llm.GenerationOptions:
    """The request's values, else the conversation's, else the server's defaults."""
    if temperature is None and conversation is not None:
        temperature = conversation.temperature
    if max_tokens is None and conversation is not None:
        max_tokens = conversation.max_tokens
    return llm.GenerationOptions(
        model=model or (conversation and conversation.model) or settings.OPENAI_MODEL,
        temperature=temperature,
        max_tokens=max_tokens,
    )


def _fingerprint(
    *, prompt: str, conversation_id: int | None, options: llm.GenerationOptions
) -> str:
    """What makes two requests "the same" for Idempotency-Key purposes."""
    canonical = json.dumps(
        {
            "prompt": prompt,
            "conversation": conversation_id,
            "model": options.model,
            "temperature": options.temperature,
            "max_tokens": options.max_tokens,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def _missing_conversation(conversation_id: int) -> InvalidRequest:
    text = f"Conversation {conversation_id} does not exist."
    return InvalidRequest(text, extra={"fields": {"conversation": [text]}})


def _earlier_request(owner: User, idempotency_key: str, fingerprint: str) -> Message:
    """The message an earlier request with this key stored; the same body is required."""
    existing = Message.objects.get(owner=owner, idempotency_key=idempotency_key)
    if existing.request_fingerprint != fingerprint:
        raise IdempotencyKeyMismatch(extra={"message_id": existing.pk})
    return existing


def _plan(
    *,
    owner: User,
    prompt: str,
    conversation_id: int | None,
    model: str | None,
    temperature: float | None,
    max_tokens: int | None,
    idempotency_key: str | None,
) -> _Plan:
    """Options and context of a new message (reads the conversation's history, if any)."""
    conversation = None
    if conversation_id is not None:
        conversation = Conversation.objects.filter(pk=conversation_id, owner=owner).first()
        if conversation is None:
            raise _missing_conversation(conversation_id)
    options = _resolve_options(
        conversation, model=model, temperature=temperature, max_tokens=max_tokens
    )
    # Only a request with an Idempotency-Key is ever compared with another.
    fingerprint = ""
    replay = None
    if idempotency_key is not None:
        fingerprint = _fingerprint(prompt=prompt, conversation_id=conversation_id, options=options)
        try:
            replay = _earlier_request(owner, idempotency_key, fingerprint)
        except Message.DoesNotExist:
            pass
    if conversation is None:
        # A first message sends no history.
        turns: list[llm.ChatTurn] = [{"role": "user", "content": prompt}]
        counted = tokens.count_turns(turns, model=options.model)
        return _Plan(
            conversation_id=None,
            options=options,
            turns=turns,
            context_ids=[],
            prompt_token_count=counted - tokens.TOKENS_PER_TURN - tokens.TOKENS_PER_REPLY,
            counted_tokens=counted,
            reserved_tokens=tokens.prompt_tokens_upper_bound(
                turns, model=options.model, counted=counted
            ),
            fingerprint=fingerprint,
            replay=replay,
        )
    context = build_context(
        conversation_id=conversation.pk,
        prompt=prompt,
        model=options.model,
        system_prompt=conversation.system_prompt,
    )
    return _Plan(
        conversation_id=conversation.pk,
        options=options,
        turns=context.turns,
        context_ids=context.message_ids,
        prompt_token_count=context.prompt_token_count,
        counted_tokens=context.token_count,
        reserved_tokens=tokens.prompt_tokens_upper_bound(
            context.turns, model=options.model, counted=context.token_count
        ),
        fingerprint=fingerprint,
        replay=replay,
    )


def _store_prompt(
    *,
    owner: User,
    plan: _Plan,
    prompt: str,
    idempotency_key: str | None,
    pending_hit: limits.PendingHit | None,
) -> tuple[Message, Reservation | None]:
    """Store the prompt as a pending message (and its new conversation) with its budget
    reservation, in one transaction: (message, reservation id).

    The rate limit's `pending_hit` (database backend) is recorded first, then the conversation
    is locked (one deleted meanwhile is a clear 400, never a dangling message), then the
    reservation locks the user's billing account — the order every writer of these takes, so
    none waits on another in a cycle. Over the rate, the budget or the concurrency cap the
    transaction rolls back: nothing is stored, counted or sent upstream. Without an API key
    the prompt is stored as failed (retriable), with no reservation.
    """
    options = plan.options
    configured = llm.is_configured()
    with transaction.atomic():
        if pending_hit is not None:
            pending_hit.record()
        now = timezone.now()
        if plan.conversation_id is None:
            conversation = Conversation.objects.create(
                owner=owner, title=auto_title(prompt), created_at=now, updated_at=now
            )
        else:
            locked = (
                Conversation.objects.select_for_update()
                .filter(pk=plan.conversation_id, owner=owner)
                .first()
            )
            if locked is None:
                raise _missing_conversation(plan.conversation_id)
            conversation = locked
            conversation.updated_at = now
            conversation.save(update_fields=["updated_at"])
        message = Message(
            owner=owner,
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
        if not configured:
            error = ServiceNotConfigured()
            message.status = MessageStatus.FAILED
            message.error_code, message.error_message = error.code, error.message
            message.completed_at = now
        message.save(force_insert=True)
        if not configured:
            return message, None
        reservation = billing.reserve(
            user=owner,
            model=options.model,
            prompt_tokens=plan.reserved_tokens,
            max_completion_tokens=options.completion_token_cap,
            worker_id=generations.WORKER_ID,
            message=message,
            now=now,
        )
    return message, reservation


def _replay_after_race(*, owner: User, plan: _Plan, idempotency_key: str) -> Message:
    """A concurrent request with the same key stored its message first: that one is ours."""
    try:
        return _earlier_request(owner, idempotency_key, plan.fingerprint)
    except Message.DoesNotExist:
        # Not a key conflict after all; e.g. the conversation was deleted at that moment.
        if (
            plan.conversation_id is not None
            and not Conversation.objects.filter(pk=plan.conversation_id, owner=owner).exists()
        ):
            raise _missing_conversation(plan.conversation_id) from None
        raise


async def message_start(
    *,
    owner: User,
    prompt: str,
    conversation_id: int | None = None,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    stream: bool = False,
    idempotency_key: str | None = None,
    client_ip: str | None = None,
) -> StartedMessage:
    """Store the prompt and start generating the reply in the background.

    Without `conversation_id` a new conversation is started. With an `idempotency_key` already
    used by an earlier request of this owner with the same body, the earlier message is returned
    (`replayed=True`) and nothing new is started; with a different body,
    `IdempotencyKeyMismatch` is raised. Requests of anonymous users give their `client_ip`,
    which their rate limit counts by.
    """
    request = {
        "owner": owner,
        "prompt": prompt,
        "conversation_id": conversation_id,
        "model": model,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "idempotency_key": idempotency_key,
    }
    if conversation_id is None and idempotency_key is None:
        plan = _plan(**request)  # type: ignore[arg-type]  # no database read needed
    else:
        plan = await db.run(_plan, **request)  # type: ignore[arg-type]
    if plan.replay is not None:
        return StartedMessage(message=plan.replay, replayed=True)
    pending_hit = await _throttle(owner, client_ip)
    try:
        message, reservation = await db.run(
            _store_prompt,
            owner=owner,
            plan=plan,
            prompt=prompt,
            idempotency_key=idempotency_key,
            pending_hit=pending_hit,
        )
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = await db.run(
            _replay_after_race, owner=owner, plan=plan, idempotency_key=idempotency_key
        )
        return StartedMessage(message=existing, replayed=True)
    if message.status == MessageStatus.FAILED:
        raise ServiceNotConfigured(extra={"message_id": message.pk})
    generation_service.launch(
        PreparedGeneration(
            message=message,
            turns=plan.turns,
            options=plan.options,
            counted_tokens=plan.counted_tokens,
            reservation=reservation,
            new_conversation=plan.conversation_id is None,
        ),
        stream=stream,
    )
    return StartedMessage(message=message, replayed=False)


async def _throttle(owner: User, client_ip: str | None) -> limits.PendingHit | None:
    """The rate limit of calls that reach the model: per user, or per client IP for anonymous
    requests (`client_ip` is given for those only). Raises RateLimited; a PendingHit is to be
    recorded in the transaction that admits the call."""
    return await limits.throttle(user_id=None if client_ip else owner.pk, client_ip=client_ip)


async def message_send(
    *,
    owner: User,
    prompt: str,
    conversation_id: int | None = None,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    idempotency_key: str | None = None,
    client_ip: str | None = None,
) -> StartedMessage:
    """Non-streaming use case: store the prompt, get the reply; the stored message once it is
    final, and whether it was an idempotent replay. Raises the generation's error if it
    failed."""
    started = await message_start(
        owner=owner,
        prompt=prompt,
        conversation_id=conversation_id,
        model=model,
        temperature=temperature,
        max_tokens=max_tokens,
        idempotency_key=idempotency_key,
        client_ip=client_ip,
    )
    final = await message_wait(message=started.message)
    return StartedMessage(message=final, replayed=started.replayed)


def _archived_reply(message: Message) -> dict:
    return {
        "response": message.response,
        "refusal": message.refusal,
        "status": message.status,
        "model": message.model,
        "finish_reason": message.finish_reason,
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "cost_usd": None if message.cost is None else usd_str(message.cost),
        "error_code": message.error_code,
        "completed_at": message.completed_at.isoformat() if message.completed_at else None,
    }


def _prepare_regeneration(
    *,
    owner: User,
    message_id: int,
    model: str | None,
    temperature: float | None,
    max_tokens: int | None,
    pending_hit: limits.PendingHit | None,
) -> PreparedGeneration:
    """Count the rate limit's `pending_hit`, reserve the budget, archive the current reply and
    reset the message for a new generation, in one transaction."""
    current = selectors.message_get(owner=owner, message_id=message_id)
    conversation = current.conversation
    options = _resolve_options(
        None,
        model=model or current.model or conversation.model,
        temperature=temperature if temperature is not None else current.temperature,
        max_tokens=max_tokens if max_tokens is not None else current.max_tokens,
    )
    context = build_context(
        conversation_id=conversation.pk,
        prompt=current.prompt_message,
        model=options.model,
        system_prompt=conversation.system_prompt,
        before_id=current.pk,
    )
    with transaction.atomic():
        # The rate limit, the conversation, then the billing account, as every admission locks
        # them (see _store_prompt), then the message.
        if pending_hit is not None:
            pending_hit.record()
        Conversation.objects.select_for_update().filter(pk=conversation.pk).first()
        reservation = billing.reserve(
            user=owner,
            model=options.model,
            prompt_tokens=tokens.prompt_tokens_upper_bound(
                context.turns, model=options.model, counted=context.token_count
            ),
            max_completion_tokens=options.completion_token_cap,
            worker_id=generations.WORKER_ID,
            message=current.pk,
        )
        message = selectors.message_get(owner=owner, message_id=message_id, for_update=True)
        if not message.is_finished:
            raise MessageInProgress(extra={"message_id": message.pk})
        message.previous_replies = [*message.previous_replies, _archived_reply(message)]
        message.response = message.refusal = ""
        message.status = MessageStatus.PENDING
        message.cancel_requested = False
        message.model = options.model
        message.temperature = options.temperature
        message.max_tokens = options.max_tokens
        message.finish_reason = ""
        message.prompt_tokens = message.completion_tokens = message.latency_ms = None
        message.cost = None
        message.response_token_count = None
        message.error_code = message.error_message = ""
        message.error_details = {}
        message.completed_at = None
        message.context_message_ids = context.message_ids
        message.prompt_token_count = context.prompt_token_count
        message.save()
        Conversation.objects.filter(pk=conversation.pk).update(updated_at=timezone.now())
    return PreparedGeneration(
        message=message,
        turns=context.turns,
        options=options,
        counted_tokens=context.token_count,
        reservation=reservation,
    )


async def message_regenerate(
    *,
    owner: User,
    message_id: int,
    model: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    stream: bool = False,
    client_ip: str | None = None,
) -> Message:
    """Ask the model again for a stored prompt with the same context; the reply it replaces
    (or the failure) is kept in `previous_replies`. Also the way to retry a failed message."""
    await db.run(selectors.message_get, owner=owner, message_id=message_id)  # 404 first
    if not llm.is_configured():
        raise ServiceNotConfigured(extra={"message_id": message_id})
    pending_hit = await _throttle(owner, client_ip)
    prepared = await db.run(
        _prepare_regeneration,
        owner=owner,
        message_id=message_id,
        pending_hit=pending_hit,
        model=model,
        temperature=temperature,
        max_tokens=max_tokens,
    )
    generation_service.launch(prepared, stream=stream)
    return prepared.message


def _stored_error(message: Message) -> ApplicationError | None:
    """The error of a message that ended badly, as its generation raised it."""
    if message.status in (
        MessageStatus.COMPLETED,
        MessageStatus.REFUSED,
        MessageStatus.CANCELLED,
        *IN_PROGRESS_STATUSES,
    ):
        return None
    return rebuild(
        message.error_code or UpstreamError.code,
        message.error_message,
        extra={**message.error_details, "message_id": message.pk},
    )


async def message_follow(
    *, message: Message, heartbeat: float | None = None
) -> AsyncIterator[GenerationEvent]:
    """Replay what a message's generation produced so far, then follow it to the end, with a
    `Heartbeat` whenever `heartbeat` seconds pass without news. The caller has checked that
    the message is the requester's.

    A generation of this process is followed live. One in another process is followed live
    through Redis when REDIS_URL is set, else read from the database, polled at the
    partial-save interval. Either way it is followed until it ends — or until its process is
    found dead (no heartbeat for CHAT_GENERATION_DEAD_AFTER seconds), whereupon it is stored
    as interrupted: no follower waits forever.
    """
    generation = generations.get(message.pk)
    if generation is not None:
        async for event in generation.follow(heartbeat=heartbeat):
            yield event
        return
    sent = {False: "", True: ""}  # text already sent, by refusal or not
    if not message.is_finished and live.is_enabled():
        try:
            async for event in _follow_live(message, heartbeat, sent):
                yield event
            return
        except (RedisError, OSError):
            logger.warning("following message %s through Redis failed", message.pk)
    async for event in _follow_database(message, heartbeat, sent):
        yield event


def _news(state: Message, sent: dict[bool, str]) -> list[TextDelta]:
    """What `state` holds beyond the text already `sent` (which it updates)."""
    news = []
    for refusal, text in ((False, state.response), (True, state.refusal)):
        if len(text) > len(sent[refusal]) and text.startswith(sent[refusal]):
            news.append(TextDelta(text[len(sent[refusal]) :], refusal=refusal))
            sent[refusal] = text
    return news


async def _follow_live(
    message: Message, heartbeat: float | None, sent: dict[bool, str]
) -> AsyncIterator[GenerationEvent]:
    state: Message | None = message
    async for news in live.follow(message, heartbeat=heartbeat or settings.CHAT_HEARTBEAT_INTERVAL):
        if isinstance(news, TextDelta):
            sent[news.refusal] += news.text
            yield news
            continue
        # The end, or a quiet spell: the database says how it ended, or whether its process
        # is still alive (a writer that died publishes no end).
        state = await db.run(_poll, message.pk)
        if state is None or state.is_finished:
            break
        if isinstance(news, live.Ended):  # regenerated since: the next generation goes on
            continue
        if heartbeat is not None:
            yield Heartbeat()
    async for event in _follow_database(state, heartbeat, sent, original=message):
        yield event


async def _follow_database(
    message: Message | None,
    heartbeat: float | None,
    sent: dict[bool, str],
    *,
    original: Message | None = None,
) -> AsyncIterator[GenerationEvent]:
    quiet_since = time.monotonic()
    state = message
    while True:
        if state is None:  # deleted meanwhile
            gone = original or message
            assert gone is not None
            yield Finished(gone, rebuild("not_found", "The message was deleted.", extra={}))
            return
        for delta in _news(state, sent):
            yield delta
            quiet_since = time.monotonic()
        if state.is_finished:
            yield Finished(state, _stored_error(state))
            return
        if heartbeat is not None and time.monotonic() - quiet_since >= heartbeat:
            yield Heartbeat()
            quiet_since = time.monotonic()
        await asyncio.sleep(settings.CHAT_STREAM_SAVE_INTERVAL)
        state = await db.run(_poll, state.pk)


def _poll(message_id: int) -> Message | None:
    """The message as stored now, after storing it as interrupted if its process died."""
    state = selectors.message_state(message_id=message_id)
    if state is not None and not state.is_finished:
        dead_after = settings.CHAT_GENERATION_DEAD_AFTER
        if (timezone.now() - state.updated_at).total_seconds() > dead_after:
            generation_service.interrupt_orphans(message_ids=[message_id])
            state = selectors.message_state(message_id=message_id)
    return state


async def message_wait(*, message: Message) -> Message:
    """The message once its generation has ended; raises its error if it failed."""
    generation = generations.get(message.pk)
    if generation is not None:
        finished = await generation.wait()
    else:
        finished = await _finished(message)
    if finished.error is not None:
        raise finished.error
    return finished.message


async def _finished(message: Message) -> Finished:
    async for event in message_follow(message=message):
        if isinstance(event, Finished):
            return event
    raise AssertionError("message_follow ended without Finished")  # pragma: no cover


def _request_stop(message_id: int) -> None:
    Message.objects.filter(pk=message_id, status__in=IN_PROGRESS_STATUSES).update(
        cancel_requested=True
    )


async def message_cancel(*, owner: User, message_id: int) -> Message:
    """Stop a reply being generated, on whatever process generates it; the text so far is kept
    and the message ends `cancelled`. A message that has already ended is returned as it is."""
    message = await db.run(selectors.message_get, owner=owner, message_id=message_id)
    if message.is_finished:
        return message
    generation = generations.get(message_id)
    if generation is None:
        # Another process runs it: told through Redis at once when configured; in any case it
        # looks for stop requests in the database every CHAT_CANCEL_POLL_INTERVAL.
        await db.run(_request_stop, message_id)
        await live.request_stop(message_id)
    else:
        generation_service.stop(generation, reason="user")
    try:
        async with asyncio.timeout(STOP_WAIT_SECONDS):
            return (await _finished(message)).message
    except TimeoutError:
        return await db.run(selectors.message_get, owner=owner, message_id=message_id)
