"""Conversations: create, change, delete."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from chat import selectors
from chat.errors import MessageInProgress
from chat.models import IN_PROGRESS_STATUSES, Conversation

CONVERSATION_FIELDS = ("title", "system_prompt", "model", "temperature", "max_tokens")


def conversation_create(
    *,
    owner: User,
    title: str = "",
    system_prompt: str = "",
    model: str = "",
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> Conversation:
    now = timezone.now()
    return Conversation.objects.create(
        owner=owner,
        title=title,
        system_prompt=system_prompt,
        model=model,
        temperature=temperature,
        max_tokens=max_tokens,
        created_at=now,
        updated_at=now,
    )


def conversation_update(
    *, owner: User, conversation_id: int, changes: dict[str, object]
) -> Conversation:
    """Rename, or change the system prompt, model or generation parameters."""
    unknown = set(changes) - set(CONVERSATION_FIELDS)
    if unknown:
        raise ValueError(f"Unknown conversation fields: {', '.join(sorted(unknown))}.")
    with transaction.atomic():
        conversation = selectors.conversation_get(
            owner=owner, conversation_id=conversation_id, for_update=True
        )
        for field, value in changes.items():
            setattr(conversation, field, value)
        if changes:
            conversation.updated_at = timezone.now()
            conversation.save(update_fields=[*changes, "updated_at"])
    return conversation


def conversation_delete(*, owner: User, conversation_id: int) -> None:
    """Delete a conversation with its messages; refused while one is still generating, on any
    process. Atomic with sending: storing a new message locks the conversation's row too."""
    with transaction.atomic():
        conversation = selectors.conversation_get(
            owner=owner, conversation_id=conversation_id, for_update=True
        )
        busy = conversation.messages.filter(status__in=IN_PROGRESS_STATUSES).values_list(
            "id", flat=True
        )[:1]
        if busy:
            raise MessageInProgress(
                "A reply in this conversation is still being generated; stop it or wait for "
                "it to finish, then delete the conversation.",
                extra={"message_id": busy[0]},
            )
        conversation.delete()
