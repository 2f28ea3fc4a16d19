from __future__ import annotations

from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from chat.models import Message


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


class MessageCreateSerializer(serializers.Serializer):
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

    def validate_prompt_message(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("This field may not be blank.", code="blank")
        limit = settings.CHAT_MAX_PROMPT_CHARS
        if len(value) > limit:
            raise serializers.ValidationError(
                f"Ensure this field has no more than {limit} characters.", code="max_length"
            )
        return value


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField(allow_null=True)
    completion_tokens = serializers.IntegerField(allow_null=True)
    total_tokens = serializers.IntegerField(allow_null=True)


class MessageErrorSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()


class MessageSerializer(serializers.ModelSerializer):
    """A stored exchange. The first four fields are the original contract's."""

    usage = serializers.SerializerMethodField()
    error = serializers.SerializerMethodField()

    class Meta:
        model = Message
        fields = [
            "id",
            "prompt_message",
            "response",
            "created_at",
            "status",
            "model",
            "finish_reason",
            "usage",
            "latency_ms",
            "error",
            "completed_at",
        ]
        read_only_fields = fields

    @extend_schema_field(UsageSerializer)
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
