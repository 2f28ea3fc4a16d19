"""Conversation exports: JSON (the API's own representations) and Markdown (for people)."""

from __future__ import annotations

import json
from typing import Any

FORMATS = ("json", "markdown")


def _markdown(conversation: dict[str, Any], messages: list[dict[str, Any]]) -> str:
    lines = [f"# {conversation['title'] or 'Conversation ' + str(conversation['id'])}", ""]
    lines.append(f"- Conversation: {conversation['id']}")
    lines.append(f"- Created: {conversation['created_at']}")
    if conversation["model"]:
        lines.append(f"- Model: {conversation['model']}")
    lines.append("")
    if conversation["system_prompt"]:
        lines += ["## System", "", conversation["system_prompt"], ""]
    for message in messages:
        lines += [f"## User — {message['created_at']}", "", message["prompt_message"], ""]
        status = message["status"]
        heading = f"## Assistant ({message['model']})"
        if status != "completed":
            heading += f" — {status}"
        if message.get("refusal"):
            lines += [heading, "", f"_Refused: {message['refusal']}_", ""]
        else:
            lines += [heading, "", message["response"] or "_(no reply)_", ""]
    return "\n".join(lines)


def render(
    export_format: str, *, conversation: dict[str, Any], messages: list[dict[str, Any]]
) -> tuple[str, str, str]:
    """(body, content type, file extension)."""
    if export_format == "markdown":
        return _markdown(conversation, messages), "text/markdown; charset=utf-8", "md"
    body = json.dumps(
        {"conversation": conversation, "messages": messages}, ensure_ascii=False, indent=2
    )
    return body, "application/json", "json"
