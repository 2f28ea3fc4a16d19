"""Plain factories for rows the tests need to exist before they act."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model

from chat.models import Conversation, Message
from chat.services import users


def make_user(username: str, **fields: Any):
    return get_user_model().objects.create_user(username=username, **fields)


def make_conversation(**fields: Any) -> Conversation:
    fields.setdefault("owner", users.anonymous_user())
    return Conversation.objects.create(**fields)


def make_message(conversation: Conversation | None = None, **fields: Any) -> Message:
    conversation = conversation or make_conversation(
        **({"owner": fields["owner"]} if "owner" in fields else {})
    )
    fields.setdefault("owner", conversation.owner)
    fields.setdefault("prompt_message", "a prompt")
    fields.setdefault("model", "gpt-3.5-turbo")
    return Message.objects.create(conversation=conversation, **fields)


def make_token(username: str) -> str:
    """The API token of `username` (the user is created if needed)."""
    return users.token_for(username=username)[0]


async def amake_token(username: str) -> str:
    from asgiref.sync import sync_to_async

    return await sync_to_async(make_token)(username)


async def amake_message(conversation: Conversation | None = None, **fields: Any) -> Message:
    from asgiref.sync import sync_to_async

    return await sync_to_async(make_message)(conversation, **fields)
