"""Server-Sent Events for a message's generation.

Events, in order: `start` (the stored message as it is when the stream begins), `delta`
(`{"content": "..."}`, one per piece of text; `{"refusal": "..."}` for a piece of the model's
refusal), then either `message` (the complete stored
message, same shape as the 201 body) or `error` (the common error shape, naming the stored
message). A client re-attaching gets the text so far as one `delta`, then live ones.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from django.http import StreamingHttpResponse
from rest_framework.renderers import BaseRenderer

from chat.api.errors import error_payload
from chat.generations import Finished, GenerationEvent, Heartbeat, TextDelta
from chat.models import Message

CONTENT_TYPE = "text/event-stream"


class EventStreamRenderer(BaseRenderer):
    """Lets content negotiation accept `Accept: text/event-stream`."""

    media_type = CONTENT_TYPE
    format = "sse"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type=None, renderer_context=None) -> bytes:
        return json.dumps(data).encode()


def format_event(name: str, data: Any) -> bytes:
    # Bytes, not str: Django would encode a str per event after looking up the charset.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {payload}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


async def _events(
    start: Message,
    events: AsyncIterator[GenerationEvent],
    serialize: Callable[[Message], dict[str, Any]],
) -> AsyncIterator[bytes]:
    yield format_event("start", serialize(start))
    async for event in events:
        if isinstance(event, Heartbeat):
            yield KEEPALIVE
            continue
        if isinstance(event, TextDelta):
            yield format_event("delta", {"refusal" if event.refusal else "content": event.text})
        elif isinstance(event, Finished):
            if event.error is not None:
                body, _, _ = error_payload(event.error)
                yield format_event("error", body)
            else:
                yield format_event("message", serialize(event.message))


def event_stream_response(
    start: Message,
    events: AsyncIterator[GenerationEvent],
    serialize: Callable[[Message], dict[str, Any]],
) -> StreamingHttpResponse:
    response = StreamingHttpResponse(_events(start, events, serialize), content_type=CONTENT_TYPE)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # tell nginx-style proxies not to buffer the stream
    return response
