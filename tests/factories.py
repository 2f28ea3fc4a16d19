"""Plain factories for rows the tests need to exist before they act."""

from __future__ import annotations

from typing import Any

from chat.models import Conversation, Message


def make_conversation(**fields: Any) -> Conversation:
    return Conversation.objects.create(**fields)


def make_message(conversation: Conversation | None = None, **fields: Any) -> Message:
    fields.setdefault("prompt_message", "a prompt")
    fields.setdefault("model", "gpt-3.5-turbo")
    return Message.objects.create(conversation=conversation or make_conversation(), **fields)


async def amake_message(conversation: Conversation | None = None, **fields: Any) -> Message:
    from asgiref.sync import sync_to_async

    return await sync_to_async(make_message)(conversation, **fields)
