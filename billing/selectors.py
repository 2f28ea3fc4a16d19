"""Reads: a user's budget status for the current period, and usage reports."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from django.db.models import Count, Sum
from django.utils import timezone

from billing.models import Account, BudgetMode, DailyUsage, Reservation
from billing.money import MAX_DECIMALS, to_pico, usd_str
from billing.periods import period_bounds

# A user, or a user's id (callers often hold only message.owner_id).
UserRef = User | int

__all__ = [
    "BudgetStatus",
    "Totals",
    "UsageRow",
    "UsageSummary",
    "UserRef",
    "account_totals",
    "budget_of",
    "budget_status",
    "effective_budget",
    "period_bounds",
    "spent_between",
    "unexpired_reservations",
    "usage_summary",
]


def _user_id(user: UserRef) -> int:
    return user if isinstance(user, int) else user.pk


def effective_budget(account: Account | None) -> int | None:
    """The budget per period in pico-dollars, None when unlimited. No account row: default."""
    if account is None:
        return budget_of(mode=BudgetMode.DEFAULT, usd=None)
    return budget_of(mode=account.budget_mode, usd=account.budget_usd)


def budget_of(*, mode: str, usd: Decimal | None) -> int | None:
    """The budget per period in pico-dollars of an account's `mode` and `usd`; None: unlimited."""
    if mode == BudgetMode.UNLIMITED:
        return None
    if mode == BudgetMode.LIMITED:
        # The database refuses a limited account without an amount; 0 would fail closed.
        return to_pico(usd) if usd is not None else 0
    default = settings.CHAT_USER_BUDGET_USD
    return None if default is None else to_pico(default)


def spent_between(*, user_id: int, start: dt.datetime, end: dt.datetime) -> int:
    """Pico-dollars settled on the UTC days [start, end) (both midnights)."""
    total = DailyUsage.objects.filter(
        user_id=user_id, day__gte=start.date(), day__lt=end.date()
    ).aggregate(total=Sum("cost"))["total"]
    return int(total or 0)


@dataclass(frozen=True)
class Totals:
    """A user's budget (pico-dollars per period; None: unlimited) with, read in the same
    statement, the reservations in flight (count and pico-dollars held) and the pico-dollars
    spent in a period."""

    budget: int | None
    in_flight: int
    reserved: int
    spent: int


def account_totals(
    *, user_id: int, now: dt.datetime, start: dt.datetime, end: dt.datetime
) -> Totals | None:
    """The user's budget and totals (spent: on the UTC days [start, end)) in one query; None
    when the user has no Account row.

    Raw SQL through the cursor: every admission runs it. The same totals built with the ORM
    cost about thirty times as much CPU, and this statement read through `Account.objects.raw()`
    three times as much (BENCHMARKS.md, "The admission path"). The budget is read as text, so
    that it converts to a Decimal exactly on both databases."""
    ops = connection.ops
    moment = ops.adapt_datetimefield_value(now)
    first_day = ops.adapt_datefield_value(start.date())
    last_day = ops.adapt_datefield_value(end.date())
    with connection.cursor() as cursor:
        cursor.execute(_ACCOUNT_TOTALS_SQL, [moment, moment, first_day, last_day, user_id])
        row = cursor.fetchone()
    if row is None:
        return None
    mode, usd, in_flight, reserved, spent = row
    # As the ORM's converter does: SQLite keeps a decimal as a REAL.
    amount = None if usd is None else Decimal(usd).quantize(Decimal(1).scaleb(-MAX_DECIMALS))
    return Totals(
        budget=budget_of(mode=mode, usd=amount),
        in_flight=int(in_flight),
        reserved=int(reserved),
        spent=int(spent),
    )


_ACCOUNT_TOTALS_SQL = f"""
SELECT a.budget_mode, CAST(a.budget_usd AS TEXT),
    (SELECT COUNT(*) FROM {Reservation._meta.db_table} r
        WHERE r.user_id = a.user_id AND r.expires_at > %s),
    (SELECT COALESCE(SUM(r.amount), 0) FROM {Reservation._meta.db_table} r
        WHERE r.user_id = a.user_id AND r.expires_at > %s),
    (SELECT COALESCE(SUM(d.cost), 0) FROM {DailyUsage._meta.db_table} d
        WHERE d.user_id = a.user_id AND d.day >= %s AND d.day < %s)
FROM {Account._meta.db_table} a
WHERE a.user_id = %s
"""  # noqa: S608 (table names from the models; every value is a parameter)


def unexpired_reservations(*, user_id: int, now: dt.datetime) -> tuple[int, int]:
    """(count, pico-dollars held) of the user's reservations that have not expired."""
    row = Reservation.objects.filter(user_id=user_id, expires_at__gt=now).aggregate(
        count=Count("id"), amount=Sum("amount")
    )
    return int(row["count"] or 0), int(row["amount"] or 0)


@dataclass(frozen=True)
class BudgetStatus:
    """A user's budget in the current period. Money in pico-dollars; `budget` and `remaining`
    are None when the budget is unlimited; `remaining` is never negative."""

    period: str
    period_start: dt.datetime
    period_end: dt.datetime
    budget: int | None
    spent: int
    reserved: int
    remaining: int | None
    in_flight: int

    def as_dict(self) -> dict[str, Any]:
        """For API responses: money as plain decimal strings (None when unlimited)."""
        return {
            "period": self.period,
            "period_start": _iso(self.period_start),
            "period_end": _iso(self.period_end),
            "budget_usd": None if self.budget is None else usd_str(self.budget),
            "spent_usd": usd_str(self.spent),
            "reserved_usd": usd_str(self.reserved),
            "remaining_usd": None if self.remaining is None else usd_str(self.remaining),
            "in_flight": self.in_flight,
        }


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def budget_status(*, user: UserRef, now: dt.datetime | None = None) -> BudgetStatus:
    """Reads without locking: a snapshot for display (reserve() does the locked check)."""
    now = now or timezone.now()
    user_id = _user_id(user)
    period = settings.CHAT_USER_BUDGET_PERIOD
    start, end = period_bounds(period, now)
    budget = effective_budget(Account.objects.filter(user_id=user_id).first())
    spent = spent_between(user_id=user_id, start=start, end=end)
    in_flight, reserved = unexpired_reservations(user_id=user_id, now=now)
    remaining = None if budget is None else max(0, budget - spent - reserved)
    return BudgetStatus(
        period=period,
        period_start=start,
        period_end=end,
        budget=budget,
        spent=spent,
        reserved=reserved,
        remaining=remaining,
        in_flight=in_flight,
    )


@dataclass(frozen=True)
class UsageRow:
    day: dt.date
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: int  # pico-dollars


@dataclass(frozen=True)
class UsageSummary:
    """Rows per UTC day and model (by day, then model) and their totals."""

    date_from: dt.date
    date_to: dt.date
    rows: list[UsageRow]
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: int  # pico-dollars


def usage_summary(*, user: UserRef, date_from: dt.date, date_to: dt.date) -> UsageSummary:
    """The user's usage on the UTC days date_from..date_to, both included."""
    rows = [
        UsageRow(
            day=row.day,
            model=row.model,
            requests=row.requests,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            cost=row.cost,
        )
        for row in DailyUsage.objects.filter(
            user_id=_user_id(user), day__gte=date_from, day__lte=date_to
        ).order_by("day", "model")
    ]
    return UsageSummary(
        date_from=date_from,
        date_to=date_to,
        rows=rows,
        requests=sum(r.requests for r in rows),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        completion_tokens=sum(r.completion_tokens for r in rows),
        cost=sum(r.cost for r in rows),
    )
