"""Thin views: validate with a serializer, call a service or selector, serialize the result."""

from __future__ import annotations

from django.http import HttpResponseBase
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
)
from rest_framework import status
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from chat import db, selectors, services
from chat.api import sse
from chat.api.base import AsyncAPIView
from chat.api.pagination import MessagePagination
from chat.api.serializers import (
    MessageCreateSerializer,
    MessageSerializer,
    PaginatedMessageSerializer,
)
from chat.errors import InvalidRequest

IDEMPOTENCY_HEADER = "Idempotency-Key"

ERROR_EXAMPLE = {
    "error": {
        "status": 504,
        "code": "upstream_timeout",
        "message": "The model API did not answer in time.",
        "message_id": 7,
    }
}


def _serialize(message) -> dict:
    return MessageSerializer(message).data


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > 255:
        raise InvalidRequest(
            "The Idempotency-Key header must be 1 to 255 characters.",
            extra={"fields": {IDEMPOTENCY_HEADER: ["Must be 1 to 255 characters."]}},
        )
    return key


def _wants_stream(request: Request, data: dict) -> bool:
    return bool(data.get("stream")) or sse.CONTENT_TYPE in request.headers.get("Accept", "")


class MessageCreateView(AsyncAPIView):
    renderer_classes = [JSONRenderer, sse.EventStreamRenderer]

    @extend_schema(
        operation_id="messages_create",
        summary="Send a prompt to the model and store prompt and reply",
        description=(
            "Stores the prompt, asks the model, stores the reply and answers 201 with the "
            'message. With `"stream": true` (or `Accept: text/event-stream`) answers 200 '
            "`text/event-stream`: `start`, `delta`..., then `message` (or `error`). The "
            "generation always runs to the end and is stored, even if the client disconnects. "
            "An `Idempotency-Key` header makes retries safe: the same key and body return the "
            "same message without calling the model again (a second request racing the first "
            "waits for it); the same key with another body is a 422."
        ),
        request=MessageCreateSerializer,
        parameters=[
            OpenApiParameter(
                IDEMPOTENCY_HEADER,
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                required=False,
                description="Any unique string (e.g. a UUID) per logical request.",
            )
        ],
        responses={
            201: MessageSerializer,
            200: OpenApiResponse(description="text/event-stream when streaming"),
            400: OpenApiResponse(description="Invalid input (error shape with `fields`)"),
            415: OpenApiResponse(description="Body is not JSON"),
            422: OpenApiResponse(description="Idempotency-Key reused with a different body"),
            502: OpenApiResponse(description="Upstream failure; the prompt is stored"),
            503: OpenApiResponse(description="API key not configured, or upstream rate limit"),
            504: OpenApiResponse(description="Upstream timeout; the prompt is stored"),
        },
        examples=[
            OpenApiExample("Request", value={"prompt_message": "Привет!"}, request_only=True),
            OpenApiExample(
                "Created",
                value={
                    "id": 1,
                    "prompt_message": "Привет!",
                    "response": "Здравствуйте!",
                    "created_at": "2023-06-09T12:37:45Z",
                },
                response_only=True,
                status_codes=["201"],
            ),
            OpenApiExample(
                "Upstream timeout", value=ERROR_EXAMPLE, response_only=True, status_codes=["504"]
            ),
        ],
    )
    async def post(self, request: Request) -> HttpResponseBase:
        serializer = MessageCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        key = _idempotency_key(request)
        fields = {"prompt": data["prompt_message"], "idempotency_key": key}
        if _wants_stream(request, data):
            started = await services.start_message(stream=True, **fields)
            events = services.follow_message(message_id=started.message.pk)
            return sse.event_stream_response(started.message, events, _serialize)
        message, replayed = await services.send_message(**fields)
        headers = {"Idempotent-Replayed": "true"} if replayed else None
        return Response(_serialize(message), status=status.HTTP_201_CREATED, headers=headers)


class MessageListView(AsyncAPIView):
    @extend_schema(
        operation_id="messages_list",
        summary="List all messages, oldest first",
        parameters=[
            OpenApiParameter("page", OpenApiTypes.INT, description="Page number (from 1)."),
            OpenApiParameter("page_size", OpenApiTypes.INT, description="Up to 100 (default 20)."),
        ],
        responses=PaginatedMessageSerializer,
    )
    async def get(self, request: Request) -> Response:
        return await db.run(self._page, request)

    def _page(self, request: Request) -> Response:
        paginator = MessagePagination()
        page = paginator.paginate_queryset(selectors.message_list(), request, view=self)
        return paginator.get_paginated_response(MessageSerializer(page, many=True).data)


class MessageDetailView(AsyncAPIView):
    @extend_schema(operation_id="messages_retrieve", responses=MessageSerializer)
    async def get(self, request: Request, message_id: int) -> Response:
        message = await db.run(selectors.message_get, message_id=message_id)
        return Response(_serialize(message))


class MessageStreamView(AsyncAPIView):
    renderer_classes = [sse.EventStreamRenderer, JSONRenderer]

    @extend_schema(
        operation_id="messages_stream",
        summary="Re-attach to a message's generation (Server-Sent Events)",
        description=(
            "Replays the text generated so far as one `delta`, then follows the generation live "
            "to its `message` (or `error`) event. For a message that has ended, sends `start` "
            "and `message` at once."
        ),
        responses={200: OpenApiResponse(description="text/event-stream")},
    )
    async def get(self, request: Request, message_id: int) -> HttpResponseBase:
        message = await db.run(selectors.message_get, message_id=message_id)
        events = services.follow_message(message_id=message.pk)
        return sse.event_stream_response(message, events, _serialize)
