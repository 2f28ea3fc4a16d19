"""Builds the list of turns sent to the model for a message."""

from __future__ import annotations

from chat.llm import ChatTurn
from chat.models import Message


def build_turns(message: Message) -> list[ChatTurn]:
    return [{"role": "user", "content": message.prompt_message}]
