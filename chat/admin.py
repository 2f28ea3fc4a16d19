from django.contrib import admin

from chat.models import Conversation, Message

USAGE_FIELDS = (
    "status",
    "model",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
    "error_code",
    "error_message",
    "context_message_ids",
    "prompt_token_count",
    "response_token_count",
    "previous_replies",
    "idempotency_key",
    "created_at",
    "updated_at",
    "completed_at",
)


class MessageInline(admin.TabularInline):
    model = Message
    fields = ("id", "prompt_message", "response", "status", "model", "created_at")
    readonly_fields = fields
    extra = 0
    show_change_link = True
    can_delete = False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ("id", "title", "model", "created_at", "updated_at")
    search_fields = ("title", "system_prompt")
    list_filter = ("model",)
    readonly_fields = ("created_at", "updated_at")
    inlines = [MessageInline]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "short_prompt",
        "status",
        "model",
        "prompt_tokens",
        "completion_tokens",
        "latency_ms",
        "created_at",
    )
    list_filter = ("status", "model")
    search_fields = ("prompt_message", "response")
    readonly_fields = USAGE_FIELDS
    raw_id_fields = ("conversation",)
    list_select_related = ("conversation",)
    date_hierarchy = "created_at"

    @admin.display(description="Prompt")
    def short_prompt(self, message: Message) -> str:
        return message.prompt_message[:80]
