from django.conf import settings
from django.db import models
from django.utils import timezone


class MessageStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    STREAMING = "streaming", "Streaming"
    COMPLETED = "completed", "Completed"
    # The model declined to answer: `refusal` holds its explanation, `response` stays empty.
    REFUSED = "refused", "Refused"
    FAILED = "failed", "Failed"
    # The upstream stream ended without a finish_reason: the text is kept but is not whole.
    TRUNCATED = "truncated", "Truncated"
    # The server stopped (shutdown, or its process died) while generating: text so far kept.
    INTERRUPTED = "interrupted", "Interrupted"
    # Stopped by its user: the text so far is kept.
    CANCELLED = "cancelled", "Cancelled"


IN_PROGRESS_STATUSES = (MessageStatus.PENDING, MessageStatus.STREAMING)


class Conversation(models.Model):
    """A multi-turn chat. Its settings apply to every message unless a request overrides them."""

    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="chat_conversations",
        db_index=False,  # served by conversation_owner_idx
    )
    title = models.CharField(max_length=200, blank=True, default="")
    system_prompt = models.TextField(blank=True, default="")
    # Blank means the server default (OPENAI_MODEL); nulls mean the model's own defaults.
    model = models.CharField(max_length=100, blank=True, default="")
    temperature = models.FloatField(null=True, blank=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    # Bumped by every new message: the list shows the newest activity first.
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-updated_at", "-id"]
        indexes = [
            models.Index(fields=["owner", "-updated_at", "-id"], name="conversation_owner_idx"),
        ]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.pk}"


class Message(models.Model):
    """One exchange: the user's prompt and the model's reply, with what an operator needs."""

    # Always the conversation's owner (denormalized: a user's message list is one index range).
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="chat_messages",
        db_index=False,  # served by message_owner_created_idx
    )
    conversation = models.ForeignKey(
        Conversation,
        on_delete=models.CASCADE,
        related_name="messages",
        db_index=False,  # served by message_conversation_idx (conversation, id)
    )
    prompt_message = models.TextField()
    response = models.TextField(blank=True, default="")
    refusal = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)
    # Also the generation's heartbeat: its process touches it while the reply is generated.
    updated_at = models.DateTimeField(auto_now=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    status = models.CharField(
        max_length=16, choices=MessageStatus.choices, default=MessageStatus.PENDING
    )
    # Set by a stop request; the process running the generation stops it.
    cancel_requested = models.BooleanField(default=False)
    model = models.CharField(max_length=100)
    temperature = models.FloatField(null=True, blank=True)
    max_tokens = models.PositiveIntegerField(null=True, blank=True)
    finish_reason = models.CharField(max_length=32, blank=True, default="")
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    # What the current reply was charged, in 1e-12 USD (billing.money); null until charged.
    cost = models.BigIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField(
        null=True, blank=True, help_text="Time spent waiting on the upstream API."
    )
    error_code = models.CharField(max_length=64, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    # The error's other fields, e.g. {"upstream_status": 429, "retry_after": 7}.
    error_details = models.JSONField(default=dict, blank=True)

    # Ids of the earlier turns of the conversation that were sent as context, oldest first.
    context_message_ids = models.JSONField(default=list, blank=True)
    # Token counts of the prompt and the reply text alone, cached for building later contexts.
    prompt_token_count = models.PositiveIntegerField(null=True, blank=True)
    response_token_count = models.PositiveIntegerField(null=True, blank=True)
    # Earlier replies replaced by "regenerate", oldest first.
    previous_replies = models.JSONField(default=list, blank=True)

    # NULL (not "") when absent, so the unique constraint ignores messages without a key.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    request_fingerprint = models.CharField(max_length=64, blank=True, default="")

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(fields=["owner", "created_at", "id"], name="message_owner_created_idx"),
            models.Index(fields=["created_at", "id"], name="message_created_idx"),
            models.Index(fields=["status", "updated_at"], name="message_status_idx"),
            models.Index(fields=["conversation", "id"], name="message_conversation_idx"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="message_unique_owner_idempotency_key",
            )
        ]

    def __str__(self) -> str:
        return f"Message {self.pk} ({self.status})"

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        return self.prompt_tokens + self.completion_tokens

    @property
    def is_finished(self) -> bool:
        return self.status not in IN_PROGRESS_STATUSES
