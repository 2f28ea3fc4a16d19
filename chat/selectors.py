"""Reads. Views and services get messages through here, never by building querysets inline."""

from __future__ import annotations

from django.db.models import QuerySet

from chat.errors import NotFound
from chat.models import Message


def message_list() -> QuerySet[Message]:
    """All messages, oldest first, in a stable order (served by `message_created_idx`)."""
    return Message.objects.order_by("created_at", "id")


def message_get(*, message_id: int) -> Message:
    try:
        return Message.objects.get(pk=message_id)
    except Message.DoesNotExist:
        raise NotFound(f"Message {message_id} does not exist.") from None
