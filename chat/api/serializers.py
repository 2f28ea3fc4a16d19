from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from billing.money import usd_str
from chat.api.converters import MAX_ID
from chat.models import Conversation, Message


def _iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z, as DRF's DateTimeField renders it."""
    if value is None:
        return None
    text = value.astimezone(UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class StrictCharField(serializers.CharField):
    """A string that must arrive as a JSON string: 42 or true are errors, not "42" or "True"."""

    default_error_messages = {"invalid": "Must be a string."}

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


class StrictFloatField(serializers.FloatField):
    default_error_messages = {"invalid": "Must be a number."}

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            self.fail("invalid")
        return super().to_internal_value(data)


class GenerationSettingsMixin(serializers.Serializer):
    """`model`, `temperature`, `max_tokens`, checked against the server's allow-list/ranges."""

    model = StrictCharField(
        required=False,
        allow_blank=False,
        max_length=100,
        help_text="One of OPENAI_ALLOWED_MODELS; default: the conversation's, else OPENAI_MODEL.",
    )
    temperature = StrictFloatField(
        required=False, allow_null=True, min_value=0.0, max_value=2.0, help_text="0 to 2."
    )
    max_tokens = StrictIntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        help_text="Longest reply in tokens, 1 to CHAT_MAX_COMPLETION_TOKENS.",
    )

    def validate_model(self, value: str) -> str:
        if value not in settings.OPENAI_ALLOWED_MODELS:
            allowed = ", ".join(settings.OPENAI_ALLOWED_MODELS)
            raise serializers.ValidationError(
                f"Model {value!r} is not allowed on this server; choose one of: {allowed}.",
                code="not_allowed",
            )
        return value

    def validate_max_tokens(self, value: int | None) -> int | None:
        limit = settings.CHAT_MAX_COMPLETION_TOKENS
        if value is not None and value > limit:
            raise serializers.ValidationError(
                f"Ensure this value is less than or equal to {limit}.", code="max_value"
            )
        return value


class MessageCreateSerializer(GenerationSettingsMixin, serializers.Serializer):
    prompt_message = StrictCharField(
        trim_whitespace=False,
        help_text="The text to send to the model: a non-blank JSON string, at most "
        "CHAT_MAX_PROMPT_CHARS characters.",
    )
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

    def validate_prompt_message(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("This field may not be blank.", code="blank")
        limit = settings.CHAT_MAX_PROMPT_CHARS
        if len(value) > limit:
            raise serializers.ValidationError(
                f"Ensure this field has no more than {limit} characters.", code="max_length"
            )
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


class PaginatedMessageSerializer(serializers.Serializer):
    """The list envelope (schema only)."""

    count = serializers.IntegerField()
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = MessageSerializer(many=True)


class RegenerateSerializer(GenerationSettingsMixin, serializers.Serializer):
    stream = StrictBooleanField(required=False, default=False)


class ConversationSerializer(GenerationSettingsMixin, serializers.ModelSerializer):
    title = StrictCharField(required=False, allow_blank=True, max_length=200)
    system_prompt = StrictCharField(
        required=False, allow_blank=True, trim_whitespace=False, max_length=32000
    )
    model = StrictCharField(
        required=False,
        allow_blank=True,
        max_length=100,
        help_text="One of OPENAI_ALLOWED_MODELS; blank: the server default (OPENAI_MODEL).",
    )

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


class PaginatedConversationSerializer(serializers.Serializer):
    """The list envelope (schema only)."""

    count = serializers.IntegerField()
    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = ConversationSerializer(many=True)


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
