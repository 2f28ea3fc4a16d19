"""Budgets, reservations, the ledger of model calls, and rate-limit hits.

Every amount of money is an integer number of pico-dollars (1e-12 USD; billing.money), stored
in a BigIntegerField: exact on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone


class BudgetMode(models.TextChoices):
    DEFAULT = "default", "Default (CHAT_USER_BUDGET_USD)"
    LIMITED = "limited", "Limited (budget_usd)"
    UNLIMITED = "unlimited", "Unlimited"


class Account(models.Model):
    """A user's billing settings. Its row is also the lock that serializes the user's
    admissions (reserve) and settlements, so budget checks see a consistent total."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="billing_account"
    )
    budget_mode = models.CharField(
        max_length=16, choices=BudgetMode.choices, default=BudgetMode.DEFAULT
    )
    budget_usd = models.DecimalField(
        "budget (USD)",
        max_digits=18,
        decimal_places=6,
        null=True,
        blank=True,
        help_text="Budget per period when the mode is 'limited'.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["user_id"]
        constraints = [
            models.CheckConstraint(
                condition=~models.Q(budget_mode=BudgetMode.LIMITED)
                | models.Q(budget_usd__isnull=False),
                name="billing_account_limited_has_budget",
            ),
            models.CheckConstraint(
                condition=models.Q(budget_usd__isnull=True) | models.Q(budget_usd__gte=0),
                name="billing_account_budget_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"Billing account of {self.user}"

    def clean(self) -> None:
        if self.budget_mode == BudgetMode.LIMITED and self.budget_usd is None:
            raise ValidationError({"budget_usd": "A limited budget needs an amount."})
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ValidationError({"budget_usd": "A budget cannot be negative."})


class Reservation(models.Model):
    """Money held for a model call in flight: its worst case (the prompt estimate at the input
    price plus max_completion_tokens at the output price). It counts against the budget until
    settled or until `expires_at` (extended by its process's heartbeat)."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="billing_reservations"
    )
    message = models.ForeignKey(
        "chat.Message",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="billing_reservations",
    )
    model = models.CharField(max_length=100)
    amount = models.BigIntegerField(help_text="Pico-dollars held.")
    prompt_tokens = models.PositiveIntegerField(help_text="The prompt estimate reserved for.")
    max_completion_tokens = models.PositiveIntegerField()
    # The unit prices the amount was computed with: settle falls back to them if the model has
    # lost its price since (e.g. a restart with another CHAT_MODEL_PRICES).
    input_usd_per_million = models.DecimalField(max_digits=18, decimal_places=6)
    output_usd_per_million = models.DecimalField(max_digits=18, decimal_places=6)
    worker_id = models.CharField(max_length=64, help_text="The server process generating.")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(fields=["user", "expires_at"], name="billing_resv_user_expiry_idx"),
            models.Index(fields=["worker_id"], name="billing_resv_worker_idx"),
        ]

    def __str__(self) -> str:
        return f"Reservation {self.pk} ({self.model})"


class LedgerKind(models.TextChoices):
    REPLY = "reply", "Reply"
    TITLE = "title", "Title"


class UsageSource(models.TextChoices):
    UPSTREAM = "upstream", "Reported by the API"
    COUNTED = "counted", "Counted offline"


class LedgerEntry(models.Model):
    """One settled model call, priced with the unit prices in force when it was settled."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="billing_ledger"
    )
    message = models.ForeignKey(
        "chat.Message",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="billing_ledger_entries",
    )
    model = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=LedgerKind.choices, default=LedgerKind.REPLY)
    outcome = models.CharField(
        max_length=32, help_text="completed, failed, truncated, interrupted, cancelled, refused…"
    )
    prompt_tokens = models.PositiveIntegerField()
    completion_tokens = models.PositiveIntegerField()
    usage_source = models.CharField(max_length=16, choices=UsageSource.choices)
    input_usd_per_million = models.DecimalField(max_digits=18, decimal_places=6)
    output_usd_per_million = models.DecimalField(max_digits=18, decimal_places=6)
    cost = models.BigIntegerField(help_text="Pico-dollars.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "ledger entries"
        indexes = [models.Index(fields=["user", "created_at"], name="billing_ledger_user_time_idx")]

    def __str__(self) -> str:
        return f"Ledger entry {self.pk} ({self.model}, {self.kind})"


class DailyUsage(models.Model):
    """Per user, UTC day and model: the sums of the day's ledger entries, maintained in the
    same transaction as each entry."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="billing_daily_usage"
    )
    day = models.DateField()
    model = models.CharField(max_length=100)
    requests = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost = models.BigIntegerField(default=0, help_text="Pico-dollars.")

    class Meta:
        ordering = ["-day", "model"]
        verbose_name_plural = "daily usage"
        constraints = [
            models.UniqueConstraint(
                fields=["user", "day", "model"], name="billing_daily_usage_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{self.user} {self.day} {self.model}"


class RateLimitHit(models.Model):
    """One admitted request of a rate-limited key (the database backend of billing.limits,
    used when REDIS_URL is not set)."""

    key = models.CharField(max_length=255)
    at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["key", "at"], name="billing_ratelimit_key_at_idx")]

    def __str__(self) -> str:
        return f"{self.key} @ {self.at.isoformat()}"
