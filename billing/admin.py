"""Budgets per user (with the current period and the last 31 days of usage), and the ledger,
daily usage and reservations, read-only."""

from __future__ import annotations

import datetime as dt

from django.contrib import admin
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from billing import selectors
from billing.models import Account, DailyUsage, LedgerEntry, Reservation
from billing.money import usd_str

USAGE_DAYS = 31


def _usd(pico: int | None) -> str:
    return "unlimited" if pico is None else f"${usd_str(pico)}"


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written only by billing.services: viewable, never edited here."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    list_display = (
        "user",
        "budget_mode",
        "budget_usd",
        "budget_now",
        "spent_now",
        "reserved_now",
        "remaining_now",
        "updated_at",
    )
    list_filter = ("budget_mode",)
    search_fields = ("user__username", "user__email")
    list_select_related = ("user",)
    raw_id_fields = ("user",)
    readonly_fields = ("updated_at", "current_period", "recent_usage")
    fieldsets = (
        (None, {"fields": ("user", "budget_mode", "budget_usd", "updated_at")}),
        ("Current period", {"fields": ("current_period",)}),
        (f"Usage, last {USAGE_DAYS} days (UTC)", {"fields": ("recent_usage",)}),
    )

    def _status(self, account: Account) -> selectors.BudgetStatus:
        # One status per account and page view, shared by the columns below.
        status = getattr(account, "_billing_status", None)
        if status is None:
            status = selectors.budget_status(user=account.user_id)
            account._billing_status = status  # type: ignore[attr-defined]
        return status

    @admin.display(description="Budget now")
    def budget_now(self, account: Account) -> str:
        return _usd(self._status(account).budget)

    @admin.display(description="Spent")
    def spent_now(self, account: Account) -> str:
        return _usd(self._status(account).spent)

    @admin.display(description="Reserved")
    def reserved_now(self, account: Account) -> str:
        return _usd(self._status(account).reserved)

    @admin.display(description="Remaining")
    def remaining_now(self, account: Account) -> str:
        return _usd(self._status(account).remaining)

    @admin.display(description="Budget status")
    def current_period(self, account: Account) -> SafeString | str:
        if account.pk is None:
            return "—"
        status = self._status(account)
        rows = [
            (
                "Period",
                f"{status.period} from {status.period_start:%Y-%m-%d} "
                f"until {status.period_end:%Y-%m-%d} (UTC)",
            ),
            ("Budget", _usd(status.budget)),
            ("Spent", _usd(status.spent)),
            ("Reserved (replies in progress)", f"{_usd(status.reserved)} ({status.in_flight})"),
            ("Remaining", _usd(status.remaining)),
        ]
        return format_html(
            "<table>{}</table>",
            format_html_join("", "<tr><th>{}</th><td>{}</td></tr>", rows),
        )

    @admin.display(description="Usage by day and model")
    def recent_usage(self, account: Account) -> SafeString | str:
        if account.pk is None:
            return "—"
        today = timezone.now().astimezone(dt.UTC).date()
        summary = selectors.usage_summary(
            user=account.user_id, date_from=today - dt.timedelta(days=USAGE_DAYS - 1), date_to=today
        )
        if not summary.rows:
            return "No usage."
        header = mark_safe(
            "<tr><th>Day</th><th>Model</th><th>Requests</th><th>Prompt tokens</th>"
            "<th>Completion tokens</th><th>Cost</th></tr>"
        )
        body = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (r.day, r.model, r.requests, r.prompt_tokens, r.completion_tokens, _usd(r.cost))
                for r in summary.rows
            ),
        )
        total = format_html(
            "<tr><th>Total</th><th></th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr>",
            summary.requests,
            summary.prompt_tokens,
            summary.completion_tokens,
            _usd(summary.cost),
        )
        return format_html("<table>{}{}{}</table>", header, body, total)


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "created_at",
        "user",
        "model",
        "kind",
        "outcome",
        "prompt_tokens",
        "completion_tokens",
        "usage_source",
        "cost_usd",
        "message",
    )
    list_filter = ("model", "kind", "outcome", "usage_source", "created_at")
    search_fields = ("user__username", "model")
    date_hierarchy = "created_at"
    list_select_related = ("user",)

    @admin.display(description="Cost", ordering="cost")
    def cost_usd(self, entry: LedgerEntry) -> str:
        return _usd(entry.cost)


@admin.register(DailyUsage)
class DailyUsageAdmin(ReadOnlyAdmin):
    list_display = (
        "day",
        "user",
        "model",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cost_usd",
    )
    list_filter = ("model", "day")
    search_fields = ("user__username", "model")
    date_hierarchy = "day"
    list_select_related = ("user",)

    @admin.display(description="Cost", ordering="cost")
    def cost_usd(self, usage: DailyUsage) -> str:
        return _usd(usage.cost)


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "user",
        "model",
        "amount_usd",
        "prompt_tokens",
        "max_completion_tokens",
        "worker_id",
        "created_at",
        "expires_at",
        "message",
    )
    list_filter = ("model", "worker_id")
    search_fields = ("user__username", "worker_id")
    list_select_related = ("user",)

    @admin.display(description="Held", ordering="amount")
    def amount_usd(self, reservation: Reservation) -> str:
        return _usd(reservation.amount)
