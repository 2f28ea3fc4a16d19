from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.core.validators import RegexValidator
from drf_spectacular.utils import PolymorphicProxySerializer, extend_schema_field
from rest_framework import serializers
from rest_framework.fields import empty

from billing.money import usd_str
from chat.api.converters import MAX_ID
from chat.api.pagination import MAX_PAGE_SIZE, PAGE_SIZE
from chat.api.schema import NO_NUL_PATTERN, NON_BLANK_PATTERN, ModelNameField
from chat.exports import FORMATS
from chat.models import Conversation, Message


def _iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z, as DRF's DateTimeField renders it."""
    if value is None:
        return None
    text = value.astimezone(UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class StrictCharField(serializers.CharField):
    """A string that must arrive as a JSON string: 42 or true are errors, not "42" or "True".
    `max_length` bounds the string as sent (before any trimming), as the schema says."""

    default_error_messages = {"invalid": "Must be a string."}

    def run_validation(self, data: Any = empty) -> Any:
        if isinstance(data, str) and self.max_length is not None and len(data) > self.max_length:
            self.fail("max_length", max_length=self.max_length)
        return super().run_validation(data)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class StrictIntegerField(serializers.IntegerField):
    default_error_messages = {"invalid": "Must be an integer."}

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class MaxTokensField(StrictIntegerField):
    """`max_tokens`: 1 to CHAT_MAX_COMPLETION_TOKENS (the setting as it is now)."""

    def to_internal_value(self, data: Any) -> int:
        value = super().to_internal_value(data)
        limit = settings.CHAT_MAX_COMPLETION_TOKENS
        if value > limit:
            self.fail("max_value", max_value=limit)
        return value


class StrictFloatField(serializers.FloatField):
    default_error_messages = {"invalid": "Must be a number."}

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            self.fail("invalid")
        return super().to_internal_value(data)


class GenerationSettingsMixin(serializers.Serializer):
    """`model`, `temperature`, `max_tokens`, checked against the server's allow-list/ranges.

    `model` and `max_tokens` follow the settings: they are built per instance (so the schema,
    generated from these fields, documents the allowed models and the largest `max_tokens` of
    the running configuration).
    """

    # A conversation's model may be blank: the server default.
    model_allows_blank = False

    temperature = StrictFloatField(
        required=False, allow_null=True, min_value=0.0, max_value=2.0, help_text="0 to 2."
    )

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields["model"] = ModelNameField(
            required=False,
            allow_blank=self.model_allows_blank,
            help_text=(
                "One of OPENAI_ALLOWED_MODELS; blank: the server default (OPENAI_MODEL)."
                if self.model_allows_blank
                else "One of OPENAI_ALLOWED_MODELS; default: the conversation's, else OPENAI_MODEL."
            ),
        )
        fields["max_tokens"] = MaxTokensField(
            required=False,
            allow_null=True,
            min_value=1,
            help_text="Longest reply in tokens, 1 to CHAT_MAX_COMPLETION_TOKENS.",
        )
        return fields

    def validate_model(self, value: str) -> str:
        if value not in settings.OPENAI_ALLOWED_MODELS:
            allowed = ", ".join(settings.OPENAI_ALLOWED_MODELS)
            raise serializers.ValidationError(
                f"Model {value!r} is not allowed on this server; choose one of: {allowed}.",
                code="not_allowed",
            )
        return value


class MessageCreateSerializer(GenerationSettingsMixin, serializers.Serializer):
    """A prompt to send, with optional generation settings (else the conversation's, else the
    server's)."""

    stream = StrictBooleanField(
        required=False,
        default=False,
        help_text="Stream the reply as Server-Sent Events instead of answering 201 at the end.",
    )
    conversation = StrictIntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=MAX_ID,
        help_text="Continue this conversation (its earlier turns are sent as context). "
        "Without it a new conversation is started; its id comes back as `conversation`.",
    )

    def get_fields(self) -> dict[str, serializers.Field]:
        prompt = StrictCharField(
            trim_whitespace=False,
            max_length=settings.CHAT_MAX_PROMPT_CHARS,
            help_text="The text to send to the model: a JSON string of 1 to "
            "CHAT_MAX_PROMPT_CHARS characters, not only whitespace.",
        )
        prompt.schema_pattern = NON_BLANK_PATTERN  # type: ignore[attr-defined]
        return {"prompt_message": prompt, **super().get_fields()}

    def validate_prompt_message(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("This field may not be blank.", code="blank")
        return value


class TokenUsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField(allow_null=True)
    completion_tokens = serializers.IntegerField(allow_null=True)
    total_tokens = serializers.IntegerField(allow_null=True)


class MessageErrorSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class MessageSerializer(serializers.ModelSerializer):
    """A stored exchange. The first four fields are the original contract's."""

    refusal = serializers.SerializerMethodField(
        help_text="The model's explanation when it declined to answer (status `refused`).",
    )
    usage = serializers.SerializerMethodField()
    cost_usd = serializers.SerializerMethodField(
        help_text="What this reply was charged, in USD (a decimal string); null until charged."
    )
    error = serializers.SerializerMethodField()

    class Meta:
        model = Message
        fields = [
            "id",
            "prompt_message",
            "response",
            "created_at",
            "conversation",
            "status",
            "refusal",
            "model",
            "temperature",
            "max_tokens",
            "finish_reason",
            "usage",
            "cost_usd",
            "latency_ms",
            "error",
            "completed_at",
            "context_message_ids",
            "previous_replies",
        ]
        read_only_fields = fields

    def to_representation(self, message: Message) -> dict[str, Any]:
        # Hand-written for speed (this runs for every message sent and listed); the declared
        # fields above still define the schema. test_representation_matches_declared_fields
        # keeps the two in step.
        return {
            "id": message.pk,
            "prompt_message": message.prompt_message,
            "response": message.response,
            "created_at": _iso(message.created_at),
            "conversation": message.conversation_id,
            "status": message.status,
            "refusal": self.get_refusal(message),
            "model": message.model,
            "temperature": message.temperature,
            "max_tokens": message.max_tokens,
            "finish_reason": message.finish_reason,
            "usage": self.get_usage(message),
            "cost_usd": self.get_cost_usd(message),
            "latency_ms": message.latency_ms,
            "error": self.get_error(message),
            "completed_at": _iso(message.completed_at),
            "context_message_ids": message.context_message_ids,
            "previous_replies": message.previous_replies,
        }

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_refusal(self, message: Message) -> str | None:
        return message.refusal or None

    @extend_schema_field(serializers.CharField(allow_null=True))
    def get_cost_usd(self, message: Message) -> str | None:
        return None if message.cost is None else usd_str(message.cost)

    @extend_schema_field(TokenUsageSerializer)
    def get_usage(self, message: Message) -> dict[str, int | None]:
        return {
            "prompt_tokens": message.prompt_tokens,
            "completion_tokens": message.completion_tokens,
            "total_tokens": message.total_tokens,
        }

    @extend_schema_field(MessageErrorSerializer(allow_null=True))
    def get_error(self, message: Message) -> dict[str, str] | None:
        if not message.error_code:
            return None
        return {"code": message.error_code, "message": message.error_message}


# --- Lists (schema only) -----------------------------------------------------------------------

COUNT_HELP = (
    "How many items the whole list has: exact up to CHAT_LIST_EXACT_COUNT_LIMIT items; above "
    "that, an exact count cached for CHAT_LIST_COUNT_CACHE_SECONDS seconds (it may lag by that "
    "long). Read a deep history with `?cursor=` instead."
)


class PageSerializer(serializers.Serializer):
    """A page-number page: `{count, next, previous, results}`."""

    count = serializers.IntegerField(min_value=0, help_text=COUNT_HELP)
    next = serializers.URLField(allow_null=True, help_text="The next page, or null.")
    previous = serializers.URLField(allow_null=True, help_text="The previous page, or null.")


class KeysetPageSerializer(serializers.Serializer):
    """A keyset page (`?cursor=`): `{next, previous, results}`, no `count`."""

    next = serializers.URLField(
        allow_null=True, help_text="The next page (its `cursor`), or null at the end."
    )
    previous = serializers.URLField(
        allow_null=True, help_text="The previous page (its `cursor`), or null at the start."
    )


class PaginatedMessageSerializer(PageSerializer):
    results = MessageSerializer(many=True)


class MessageKeysetPageSerializer(KeysetPageSerializer):
    results = MessageSerializer(many=True)


MESSAGE_LIST = PolymorphicProxySerializer(
    component_name="MessageList",
    serializers=[PaginatedMessageSerializer, MessageKeysetPageSerializer],
    resource_type_field_name=None,
    many=False,
)


class RegenerateSerializer(GenerationSettingsMixin, serializers.Serializer):
    """Optional overrides of the message's generation settings (an empty body keeps them)."""

    stream = StrictBooleanField(required=False, default=False)


class ConversationSerializer(GenerationSettingsMixin, serializers.ModelSerializer):
    """A conversation: its title, system prompt and the generation settings its messages
    use unless they set their own."""

    title = StrictCharField(required=False, allow_blank=True, max_length=200)
    system_prompt = StrictCharField(
        required=False, allow_blank=True, trim_whitespace=False, max_length=32000
    )
    model_allows_blank = True

    class Meta:
        model = Conversation
        fields = [
            "id",
            "title",
            "system_prompt",
            "model",
            "temperature",
            "max_tokens",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]

    def validate_model(self, value: str) -> str:
        return value and super().validate_model(value)


class PaginatedConversationSerializer(PageSerializer):
    results = ConversationSerializer(many=True)


class PageQuerySerializer(serializers.Serializer):
    """`?page=&page_size=` (schema only: chat.api.pagination validates them)."""

    page = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_ID,
        help_text="Page number, from 1 (default 1); past the last page: 404.",
    )
    page_size = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_ID,
        help_text=f"Items per page (default {PAGE_SIZE}); more than {MAX_PAGE_SIZE} is served "
        f"as {MAX_PAGE_SIZE}.",
    )


class KeysetQuerySerializer(PageQuerySerializer):
    cursor = serializers.CharField(
        required=False,
        allow_blank=True,
        help_text="Keyset pagination for deep histories: empty for the first page, then follow "
        "`next` / `previous`. Answers `{next, previous, results}` (no `count`). Not together "
        "with `page` (400); an unknown cursor: 404.",
    )


class MessageListQuerySerializer(KeysetQuerySerializer):
    conversation = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=MAX_ID,
        help_text="Only this conversation's messages.",
    )

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields["search"] = serializers.CharField(
            required=False,
            allow_blank=True,
            max_length=settings.CHAT_SEARCH_MAX_LENGTH,
            validators=[RegexValidator(NO_NUL_PATTERN)],
            help_text="Case-insensitive text search over prompts and replies, at most "
            "CHAT_SEARCH_MAX_LENGTH characters, no NUL (PostgreSQL: full-text search, "
            "web-search syntax, or a substring).",
        )
        return fields


class ExportQuerySerializer(serializers.Serializer):
    format = serializers.ChoiceField(
        choices=list(FORMATS), required=False, help_text="Default: json."
    )


class ConversationExportSerializer(serializers.Serializer):
    """`?format=json`: the conversation and all its messages (schema only)."""

    conversation = ConversationSerializer()
    messages = MessageSerializer(many=True)


# --- Server-Sent Events (schema only) -----------------------------------------------------------

SSE_DESCRIPTION = (
    "`text/event-stream`: the reply as it is generated. Each event is `event: NAME` then "
    "`data: JSON` then an empty line; `: keep-alive` comment lines come when the stream is "
    "quiet.\n\n"
    "| event | data |\n"
    "|---|---|\n"
    "| `start` | the stored `Message` as it is when the stream begins (first, once) |\n"
    '| `delta` | `{"content": "..."}`: the next piece of the reply; `{"refusal": "..."}`: of '
    "the model's refusal |\n"
    "| `message` | the complete stored `Message` (last, once, when the reply was generated) |\n"
    "| `error` | the `Error` shape, naming the stored message in `message_id` (last, once, "
    "when the reply failed) |\n\n"
    "The stream ends after `message` or `error`. OpenAPI 3.0 cannot type an event stream: the "
    "schema describes one event as an event-stream parser reads it (`event`, `data`), as "
    "OpenAPI 3.2's `itemSchema` does.\n\n"
    "```\n"
    "event: start\n"
    'data: {"id":7,"prompt_message":"Hi","response":"","status":"pending",...}\n\n'
    "event: delta\n"
    'data: {"content":"Hel"}\n\n'
    ": keep-alive\n\n"
    "event: delta\n"
    'data: {"content":"lo!"}\n\n'
    "event: message\n"
    'data: {"id":7,"prompt_message":"Hi","response":"Hello!","status":"completed",...}\n'
    "```\n"
)


class ServerSentEventSerializer(serializers.Serializer):
    """One event of a reply's event stream (see the operation's description)."""

    event = serializers.ChoiceField(choices=["start", "delta", "message", "error"])
    data = serializers.CharField(  # type: ignore[assignment]
        help_text='JSON: `start` and `message`: a Message; `delta`: `{"content": str}` or '
        '`{"refusal": str}`; `error`: an Error.'
    )


class ModelSerializer(serializers.Serializer):
    id = serializers.CharField()
    input_usd_per_million = serializers.CharField(help_text="USD per million prompt tokens.")
    output_usd_per_million = serializers.CharField(help_text="USD per million reply tokens.")


class ModelListSerializer(serializers.Serializer):
    """The models a request may choose (schema only)."""

    default = serializers.CharField()
    results = ModelSerializer(many=True)


class UsageQuerySerializer(serializers.Serializer):
    """`?from=&to=` of the usage report (their names are Python keywords)."""

    def get_fields(self) -> dict[str, serializers.Field]:
        return {
            "from": serializers.DateField(required=False),
            "to": serializers.DateField(required=False),
        }


class UsageUserSerializer(serializers.Serializer):
    username = serializers.CharField()
    anonymous = serializers.BooleanField()


class UsageDaySerializer(serializers.Serializer):
    day = serializers.DateField()
    model = serializers.CharField()
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    cost_usd = serializers.CharField()


class UsageReportSerializer(serializers.Serializer):
    """The usage report (schema only). Money is in USD, as decimal strings."""

    user = UsageUserSerializer()
    period = serializers.ChoiceField(choices=["day", "week", "month"])
    period_start = serializers.DateTimeField()
    period_end = serializers.DateTimeField(help_text="Exclusive: when the budget resets.")
    budget_usd = serializers.CharField(allow_null=True, help_text="Null: unlimited.")
    spent_usd = serializers.CharField()
    reserved_usd = serializers.CharField(help_text="Held by replies being generated.")
    remaining_usd = serializers.CharField(allow_null=True, help_text="Null: unlimited.")
    in_flight = serializers.IntegerField(help_text="Replies being generated now.")
    days = UsageDaySerializer(many=True)

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        fields["from"] = serializers.DateField()
        fields["to"] = serializers.DateField()
        return fields
