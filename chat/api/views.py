"""Thin views: validate with a serializer, call a service or selector, serialize the result.

Every view acts for `self.owner` (chat.api.base): the authenticated user, or the shared
anonymous user while anonymous use is on. Another user's ids are simply not found.
"""

from __future__ import annotations

import hmac
import ipaddress
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
)
from rest_framework import exceptions, status
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from billing.money import usd_str
from billing.prices import price_for
from billing.selectors import budget_status, usage_summary
from chat import db, exports, metrics, redis_client, request_context, selectors
from chat.api import sse
from chat.api.base import APIView
from chat.api.converters import parse_id
from chat.api.errors import error_payload
from chat.api.pagination import CURSOR_PARAM, CursorPagination, PageNumberPagination
from chat.api.schema import RATE_LIMITS, UPSTREAM, WHITESPACE_CLASS, errors
from chat.api.serializers import (
    MESSAGE_LIST,
    SSE_DESCRIPTION,
    ConversationExportSerializer,
    ConversationSerializer,
    ExportQuerySerializer,
    KeysetQuerySerializer,
    MessageCreateSerializer,
    MessageListQuerySerializer,
    MessageSerializer,
    ModelListSerializer,
    PageQuerySerializer,
    PaginatedConversationSerializer,
    RegenerateSerializer,
    ServerSentEventSerializer,
    UsageQuerySerializer,
    UsageReportSerializer,
)
from chat.errors import (
    ApplicationError,
    InvalidRequest,
    MetricsAuthenticationRequired,
    MetricsForbidden,
)
from chat.models import Message
from chat.services import conversations, lifecycle, messages

IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENCY_META_KEY = "HTTP_IDEMPOTENCY_KEY"  # how Django stores the header in request.META
IDEMPOTENCY_KEY_MAX_LENGTH = 255
# The longest span of days one usage report covers.
USAGE_MAX_DAYS = 366


# --- Schema pieces shared by the operations -------------------------------------------------

IDEMPOTENCY_PARAMETER = OpenApiParameter(
    IDEMPOTENCY_HEADER,
    {
        "type": "string",
        "minLength": 1,
        "maxLength": IDEMPOTENCY_KEY_MAX_LENGTH,
        "pattern": f"[^{WHITESPACE_CLASS}]",
    },
    OpenApiParameter.HEADER,
    description="Any unique string (e.g. a UUID) per logical request, 1 to 255 characters, not "
    "only whitespace.",
)
REPLAYED_HEADER = OpenApiParameter(
    "Idempotent-Replayed",
    {"type": "string", "enum": ["true"]},
    OpenApiParameter.HEADER,
    response=[201],
    description="Present when the `Idempotency-Key` matched an earlier request: this is its "
    "message, and the model was not called again.",
)
SSE_RESPONSE = OpenApiResponse(
    ServerSentEventSerializer,
    description=SSE_DESCRIPTION,
    examples=[
        OpenApiExample(
            "A piece of the reply",
            value={"event": "delta", "data": '{"content":"Hel"}'},
            response_only=True,
            status_codes=["200"],
            media_type=sse.CONTENT_TYPE,
        )
    ],
)
LIST_DESCRIPTION = (
    "Page-number pages (`?page=`, `?page_size=`) answer `{count, next, previous, results}`; "
    "keyset pages (`?cursor=`, empty for the first page) answer `{next, previous, results}`, "
    "each page an index range whatever its depth."
)

# MessageSerializer keeps no per-call state: one instance serves every response.
_message_serializer = MessageSerializer()


def _serialize(message: Message) -> dict[str, Any]:
    return _message_serializer.to_representation(message)


def _invalid(field: str, text: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: {text}", extra={"fields": {field: [text]}})


def _idempotency_key(request: Request) -> str | None:
    key = request.META.get(IDEMPOTENCY_META_KEY)
    if key is None:
        return None
    if len(key) > IDEMPOTENCY_KEY_MAX_LENGTH or not key.strip():
        raise _invalid(IDEMPOTENCY_HEADER, "Must be 1 to 255 characters, not only whitespace.")
    return key.strip()


def _event_stream(message: Message) -> HttpResponseBase:
    """SSE of a message's generation: what it has so far, then live, with keep-alives."""
    events = messages.message_follow(message=message, heartbeat=settings.CHAT_SSE_KEEPALIVE_SECONDS)
    return sse.event_stream_response(message, events, _serialize)


def _wants_stream(request: Request, data: dict[str, Any]) -> bool:
    return bool(data.get("stream")) or sse.CONTENT_TYPE in request.META.get("HTTP_ACCEPT", "")


def _id_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    number = parse_id(raw)
    if number is None:
        raise _invalid(name, "Must be a positive integer id.")
    return number


def _paginated(
    request: Request,
    view: APIView,
    queryset: QuerySet,
    serializer: Any,
    *,
    keyset: tuple[str, ...] | None = None,
) -> Response:
    """Page-number pages; keyset pages (`?cursor=`) where the list has a `keyset` order."""
    paginator: PageNumberPagination | CursorPagination
    if keyset is not None and CURSOR_PARAM in request.query_params:
        if "page" in request.query_params:
            raise _invalid("cursor", "Give either `page` or `cursor`, not both.")
        paginator = CursorPagination(keyset)
    else:
        paginator = PageNumberPagination()
    page = paginator.paginate_queryset(queryset, request, view=view)
    return paginator.get_paginated_response(serializer(page, many=True).data)


class MessageCreateView(APIView):
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
        parameters=[IDEMPOTENCY_PARAMETER, REPLAYED_HEADER],
        responses={
            (201, "application/json"): MessageSerializer,
            (200, sse.CONTENT_TYPE): SSE_RESPONSE,
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
        ],
    )
    @errors("idempotency_key_reused", *RATE_LIMITS, *UPSTREAM)
    async def post(self, request: Request) -> HttpResponseBase:
        serializer = MessageCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        fields = {
            "owner": self.owner,
            "prompt": data["prompt_message"],
            "conversation_id": data.get("conversation"),
            "model": data.get("model"),
            "temperature": data.get("temperature"),
            "max_tokens": data.get("max_tokens"),
            "idempotency_key": _idempotency_key(request),
            "client_ip": self.client_ip,
        }
        if _wants_stream(request, data):
            started = await messages.message_start(stream=True, **fields)
            return _event_stream(started.message)
        sent = await messages.message_send(**fields)
        headers = {"Idempotent-Replayed": "true"} if sent.replayed else None
        return Response(_serialize(sent.message), status=status.HTTP_201_CREATED, headers=headers)


class MessageListView(APIView):
    @extend_schema(
        operation_id="messages_list",
        summary="List messages, oldest first",
        description=LIST_DESCRIPTION,
        parameters=[MessageListQuerySerializer],
        responses=MESSAGE_LIST,
    )
    @errors("invalid", "not_found")
    def get(self, request: Request) -> Response:
        search = request.query_params.get("search", "")
        if len(search) > settings.CHAT_SEARCH_MAX_LENGTH:
            raise _invalid(
                "search", f"Must be at most {settings.CHAT_SEARCH_MAX_LENGTH} characters."
            )
        if "\x00" in search:  # PostgreSQL's text cannot hold it: a 500 there, not a search
            raise _invalid("search", "Must not contain NUL characters.")
        search = search.strip()
        conversation_id = _id_param(request, "conversation")
        if conversation_id is not None:
            # Another user's conversation is not found, like one that does not exist (404).
            selectors.conversation_get(owner=self.owner, conversation_id=conversation_id)
        queryset = selectors.message_list(
            owner=self.owner, search=search or None, conversation_id=conversation_id
        )
        keyset = selectors.MESSAGE_ORDER if conversation_id is None else ("id",)
        return _paginated(request, self, queryset, MessageSerializer, keyset=keyset)


class MessageDetailView(APIView):
    @extend_schema(
        operation_id="messages_retrieve", summary="A message", responses=MessageSerializer
    )
    def get(self, request: Request, message_id: int) -> Response:
        return Response(_serialize(selectors.message_get(owner=self.owner, message_id=message_id)))


class MessageStreamView(APIView):
    renderer_classes = [sse.EventStreamRenderer, JSONRenderer]

    @extend_schema(
        operation_id="messages_stream",
        summary="Re-attach to a message's generation (Server-Sent Events)",
        description=(
            "Replays the text generated so far as one `delta`, then follows the generation live "
            "to its `message` (or `error`) event. For a message that has ended, sends `start` "
            "and `message` at once."
        ),
        responses={(200, sse.CONTENT_TYPE): SSE_RESPONSE},
    )
    async def get(self, request: Request, message_id: int) -> HttpResponseBase:
        message = await db.run(selectors.message_get, owner=self.owner, message_id=message_id)
        return _event_stream(message)


class MessageRegenerateView(APIView):
    renderer_classes = [JSONRenderer, sse.EventStreamRenderer]

    @extend_schema(
        operation_id="messages_regenerate",
        summary="Ask the model again for a stored prompt (also: retry a failed message)",
        description=(
            "Sends the same prompt with the same conversation context again and replaces the "
            "stored reply; the replaced reply (or failure) is kept in `previous_replies`. "
            "Optional `model`, `temperature`, `max_tokens` override the message's. Answers 200 "
            'with the message, or streams like create with `"stream": true`. 409 while the '
            "message is still generating."
        ),
        request=RegenerateSerializer,
        responses={
            (200, "application/json"): OpenApiResponse(
                MessageSerializer,
                description="`application/json`: the message with its new reply. With "
                '`"stream": true`, ' + SSE_DESCRIPTION,
            ),
            (200, sse.CONTENT_TYPE): SSE_RESPONSE,
        },
    )
    @errors("message_in_progress", *RATE_LIMITS, *UPSTREAM)
    async def post(self, request: Request, message_id: int) -> HttpResponseBase:
        # A bare POST (no body, whatever content type) regenerates with the message's settings.
        serializer = RegenerateSerializer(data=request.data if request.body else {})
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        stream = _wants_stream(request, data)
        message = await messages.message_regenerate(
            owner=self.owner,
            message_id=message_id,
            model=data.get("model"),
            temperature=data.get("temperature"),
            max_tokens=data.get("max_tokens"),
            stream=stream,
            client_ip=self.client_ip,
        )
        if stream:
            return _event_stream(message)
        return Response(_serialize(await messages.message_wait(message=message)))


class MessageCancelView(APIView):
    @extend_schema(
        operation_id="messages_cancel",
        summary="Stop a reply being generated",
        description=(
            "Stops the generation, on whichever server process runs it, and answers 200 with the "
            "message: `cancelled` with the text generated so far. A message that has already "
            "ended is returned as it is."
        ),
        request=None,
        responses={200: MessageSerializer},
    )
    async def post(self, request: Request, message_id: int) -> Response:
        message = await messages.message_cancel(owner=self.owner, message_id=message_id)
        return Response(_serialize(message))


class ConversationListView(APIView):
    @extend_schema(
        operation_id="conversations_list",
        summary="List conversations, newest activity first",
        parameters=[PageQuerySerializer],
        responses=PaginatedConversationSerializer,
    )
    @errors("invalid", "not_found")
    def get(self, request: Request) -> Response:
        queryset = selectors.conversation_list(owner=self.owner)
        return _paginated(request, self, queryset, ConversationSerializer)

    @extend_schema(
        operation_id="conversations_create",
        summary="Start a conversation (optional title, system prompt, model, parameters)",
        request=ConversationSerializer,
        responses={201: ConversationSerializer},
    )
    def post(self, request: Request) -> Response:
        serializer = ConversationSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        conversation = conversations.conversation_create(
            owner=self.owner, **serializer.validated_data
        )
        return Response(ConversationSerializer(conversation).data, status=status.HTTP_201_CREATED)


class ConversationDetailView(APIView):
    @extend_schema(
        operation_id="conversations_retrieve",
        summary="A conversation",
        responses=ConversationSerializer,
    )
    def get(self, request: Request, conversation_id: int) -> Response:
        conversation = selectors.conversation_get(owner=self.owner, conversation_id=conversation_id)
        return Response(ConversationSerializer(conversation).data)

    @extend_schema(
        operation_id="conversations_update",
        summary="Rename, or change the system prompt, model or parameters",
        request=ConversationSerializer,
        responses=ConversationSerializer,
    )
    def patch(self, request: Request, conversation_id: int) -> Response:
        serializer = ConversationSerializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        conversation = conversations.conversation_update(
            owner=self.owner, conversation_id=conversation_id, changes=serializer.validated_data
        )
        return Response(ConversationSerializer(conversation).data)

    @extend_schema(
        operation_id="conversations_destroy",
        summary="Delete a conversation with its messages (409 while a reply is generating)",
        responses={204: None},
    )
    @errors("message_in_progress")
    def delete(self, request: Request, conversation_id: int) -> Response:
        conversations.conversation_delete(owner=self.owner, conversation_id=conversation_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class ConversationMessagesView(APIView):
    @extend_schema(
        operation_id="conversations_messages",
        summary="A conversation's messages, in order",
        description=LIST_DESCRIPTION,
        parameters=[KeysetQuerySerializer],
        responses=MESSAGE_LIST,
    )
    @errors("invalid")
    def get(self, request: Request, conversation_id: int) -> Response:
        selectors.conversation_get(owner=self.owner, conversation_id=conversation_id)
        queryset = selectors.message_list(owner=self.owner, conversation_id=conversation_id)
        return _paginated(request, self, queryset, MessageSerializer, keyset=("id",))


class ConversationExportView(APIView):
    @extend_schema(
        operation_id="conversations_export",
        summary="Download a conversation as JSON or Markdown",
        parameters=[
            ExportQuerySerializer,
            OpenApiParameter(
                "Content-Disposition",
                OpenApiTypes.STR,
                OpenApiParameter.HEADER,
                response=[200],
                required=True,
                description='`attachment; filename="conversation-ID.json"` (or `.md`).',
            ),
        ],
        responses={
            (200, "application/json"): OpenApiResponse(
                ConversationExportSerializer, description="The conversation with all its messages."
            ),
            (200, "text/markdown"): OpenApiTypes.STR,
        },
    )
    @errors("invalid")
    def get(self, request: Request, conversation_id: int) -> HttpResponseBase:
        export_format = request.query_params.get("format", "json")
        if export_format not in exports.FORMATS:
            raise _invalid("format", f"Choose one of: {', '.join(exports.FORMATS)}.")
        conversation = selectors.conversation_get(owner=self.owner, conversation_id=conversation_id)
        stored = selectors.conversation_messages(owner=self.owner, conversation_id=conversation_id)
        body, content_type, extension = exports.render(
            export_format,
            conversation=ConversationSerializer(conversation).data,
            messages=list(MessageSerializer(stored, many=True).data),
        )
        response = HttpResponse(body, content_type=content_type)
        response["Content-Disposition"] = (
            f'attachment; filename="conversation-{conversation.pk}.{extension}"'
        )
        return response


class ModelListView(APIView):
    @extend_schema(
        operation_id="models_list",
        summary="The models a message or conversation may choose, with their prices",
        responses=ModelListSerializer,
    )
    async def get(self, request: Request) -> Response:
        return Response(
            {
                "default": settings.OPENAI_MODEL,
                "results": [
                    {
                        "id": model,
                        "input_usd_per_million": _plain(price_for(model).input),
                        "output_usd_per_million": _plain(price_for(model).output),
                    }
                    for model in settings.OPENAI_ALLOWED_MODELS
                ],
            }
        )


def _plain(amount: Decimal) -> str:
    return format(amount.normalize(), "f")


class UsageView(APIView):
    @extend_schema(
        operation_id="usage_retrieve",
        summary="Your budget, spending and usage",
        description=(
            "The current period's budget, spent, reserved (calls in flight) and remaining, in "
            "USD as decimal strings, and tokens and cost by day and model between `from` and "
            "`to` (inclusive UTC dates; default: the current period)."
        ),
        parameters=[UsageQuerySerializer],
        responses=UsageReportSerializer,
    )
    @errors("invalid")
    def get(self, request: Request) -> Response:
        # A plain dict: DRF would read an empty `?to=` of a QueryDict as no `to` at all.
        dates = UsageQuerySerializer(data=request.query_params.dict())
        dates.is_valid(raise_exception=True)
        status_now = budget_status(user=self.owner)
        date_from = dates.validated_data.get("from") or status_now.period_start.date()
        date_to = (
            dates.validated_data.get("to") or (status_now.period_end - timedelta(days=1)).date()
        )
        if date_from > date_to:
            raise _invalid("from", "Must be on or before `to`.")
        if (date_to - date_from).days > USAGE_MAX_DAYS:
            raise _invalid("to", f"At most {USAGE_MAX_DAYS} days after `from`.")
        summary = usage_summary(user=self.owner, date_from=date_from, date_to=date_to)
        return Response(
            {
                "user": {
                    "username": self.owner.get_username(),
                    "anonymous": self.client_ip is not None,
                },
                **status_now.as_dict(),
                "from": date_from.isoformat(),
                "to": date_to.isoformat(),
                "days": [
                    {
                        "day": row.day.isoformat(),
                        "model": row.model,
                        "requests": row.requests,
                        "prompt_tokens": row.prompt_tokens,
                        "completion_tokens": row.completion_tokens,
                        "cost_usd": usd_str(row.cost),
                    }
                    for row in summary.rows
                ],
            }
        )


class _ProbeView(APIView):
    authentication_classes: list = []
    permission_classes = [AllowAny]
    acts_for_user = False


class LivenessView(_ProbeView):
    """The process is up and serving (no I/O: for a load balancer's frequent probe)."""

    @extend_schema(
        operation_id="healthz",
        summary="Liveness probe",
        responses={
            200: {
                "type": "object",
                "required": ["status"],
                "properties": {"status": {"type": "string", "enum": ["ok"]}},
            }
        },
    )
    async def get(self, request: Request) -> Response:
        return Response({"status": "ok"})


class ReadinessView(_ProbeView):
    """The service can take traffic: its database answers. Also says whether sending is
    possible (OPENAI_API_KEY configured); without it the service is up but read-only."""

    @extend_schema(
        operation_id="readyz",
        summary="Readiness probe",
        responses={
            200: {
                "type": "object",
                "required": ["status", "database", "openai_configured"],
                "properties": {
                    "status": {"type": "string", "enum": ["ready"]},
                    "database": {"type": "string", "enum": ["ok"]},
                    "openai_configured": {
                        "type": "boolean",
                        "description": "Whether sending is possible (OPENAI_API_KEY is set).",
                    },
                },
            }
        },
    )
    @errors("database_unavailable", "redis_unavailable")
    async def get(self, request: Request) -> Response:
        await db.run(selectors.database_ping)
        redis_state = "ok" if await redis_client.ping() else "not_configured"
        return Response(
            {
                "status": "ready",
                "database": "ok",
                "redis": redis_state,
                "openai_configured": lifecycle.can_send(),
            }
        )


# --- Metrics ------------------------------------------------------------------------------------


def _metrics_access(request: HttpRequest) -> None:
    """With METRICS_TOKEN: the request must carry `Authorization: Bearer <token>`. Without: the
    client's address (as the rate limits see it, CHAT_TRUSTED_PROXIES) must be in
    METRICS_ALLOWED_IPS, and a request forwarded by a proxy that is not trusted is refused (the
    proxy's own address would otherwise look local)."""
    token = settings.METRICS_TOKEN
    if token:
        scheme, _, given = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), token.encode()
        ):
            raise MetricsAuthenticationRequired(
                headers={"WWW-Authenticate": 'Bearer realm="metrics"'}
            )
        return
    forwarded = "HTTP_X_FORWARDED_FOR" in request.META or "HTTP_FORWARDED" in request.META
    if forwarded and not settings.REST_FRAMEWORK.get("NUM_PROXIES"):
        raise MetricsForbidden()
    try:
        address = ipaddress.ip_address(request_context.client_ip(request.META))
    except ValueError:
        raise MetricsForbidden() from None
    if not any(address in network for network in settings.METRICS_ALLOWED_IPS):
        raise MetricsForbidden()


@csrf_exempt  # read-only; any other method is a 405
async def metrics_view(request: HttpRequest) -> HttpResponseBase:
    """`GET /metrics`: the Prometheus metrics of all the server's processes (chat.metrics).
    Not part of the API: no user authentication, its own protection (`_metrics_access`)."""
    try:
        if request.method not in ("GET", "HEAD"):
            raise exceptions.MethodNotAllowed(request.method or "")
        _metrics_access(request)
    except (ApplicationError, exceptions.APIException) as exc:
        body, status_code, headers = error_payload(exc)
        return JsonResponse(body, status=status_code, headers=headers)
    text, content_type = metrics.render(request.META.get("HTTP_ACCEPT"))
    return HttpResponse(text, content_type=content_type)
