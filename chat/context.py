"""Builds what the model is sent for a message: system prompt, earlier turns, the new prompt.

The earlier turns are cut, oldest first, to fit the model's token budget; the system prompt and
the new prompt are always kept. History is read newest first in small batches and reading stops
as soon as the budget is spent, with each message's token count cached on the row, so the cost
of building a context depends on the budget, not on the length of the conversation.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings

from chat import tokens
from chat.llm import ChatTurn
from chat.models import Message, MessageStatus

HISTORY_BATCH = 32


@dataclass(frozen=True)
class Context:
    turns: list[ChatTurn]
    # Earlier messages whose prompt and reply were sent, oldest first.
    message_ids: list[int]
    # Tokens of the new prompt's text alone: the message caches it for later contexts.
    prompt_token_count: int
    # Tokens of everything sent (framing included), as counted offline.
    token_count: int


def token_budget(model: str) -> int:
    return settings.CHAT_CONTEXT_TOKEN_BUDGETS.get(model, settings.CHAT_CONTEXT_TOKEN_BUDGET)


def build_context(
    *,
    conversation_id: int,
    prompt: str,
    model: str,
    system_prompt: str = "",
    before_id: int | None = None,
) -> Context:
    """The turns to send for a new `prompt` in a conversation, after its completed messages
    (those before message `before_id` when regenerating). Runs on a database thread."""
    counter = tokens.counter_for_model(model)
    budget = token_budget(model)
    prompt_token_count = counter.count(prompt)
    used = tokens.TOKENS_PER_REPLY + tokens.TOKENS_PER_TURN + prompt_token_count
    if system_prompt:
        used += tokens.TOKENS_PER_TURN + counter.count(system_prompt)

    kept: list[Message] = []
    newly_counted: list[Message] = []
    exhausted = False
    while not exhausted:
        history = Message.objects.filter(
            conversation_id=conversation_id, status=MessageStatus.COMPLETED
        )
        if before_id is not None:
            history = history.filter(id__lt=before_id)
        batch = list(
            history.order_by("-id").only(
                "id", "prompt_message", "response", "prompt_token_count", "response_token_count"
            )[:HISTORY_BATCH]
        )
        for earlier in batch:
            if earlier.prompt_token_count is None or earlier.response_token_count is None:
                earlier.prompt_token_count = counter.count(earlier.prompt_message)
                earlier.response_token_count = counter.count(earlier.response)
                newly_counted.append(earlier)
            cost = 2 * tokens.TOKENS_PER_TURN + earlier.prompt_token_count
            cost += earlier.response_token_count
            if used + cost > budget:
                exhausted = True
                break
            used += cost
            kept.append(earlier)
        if len(batch) < HISTORY_BATCH:
            exhausted = True
        elif batch:
            before_id = batch[-1].pk

    if newly_counted:
        Message.objects.bulk_update(newly_counted, ["prompt_token_count", "response_token_count"])

    kept.reverse()
    turns: list[ChatTurn] = []
    if system_prompt:
        turns.append({"role": "system", "content": system_prompt})
    for earlier in kept:
        turns.append({"role": "user", "content": earlier.prompt_message})
        turns.append({"role": "assistant", "content": earlier.response})
    turns.append({"role": "user", "content": prompt})
    return Context(
        turns=turns,
        message_ids=[m.pk for m in kept],
        prompt_token_count=prompt_token_count,
        token_count=used,
    )
