"""Budgets that hold under concurrency: reserve before a model call, settle after it.

All functions are synchronous ORM work (run them on the ORM thread pool: `await db.run(...)`).
`reserve` and `settle` run inside the caller's `transaction.atomic()`, so the prompt (or the
reply) and the money move together. Both first lock the user's Account row (SELECT ... FOR
UPDATE on PostgreSQL; on SQLite every transaction is BEGIN IMMEDIATE, which serializes writers),
so the budget check and the write that follows see every earlier admission and settlement of
that user, whatever process made it.
(This relies on PostgreSQL's default READ COMMITTED isolation: each statement after the lock
sees what the previous lock holder committed.)

Money is in integer pico-dollars (billing.money).
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from billing import selectors
from billing.models import (
    Account,
    BudgetMode,
    DailyUsage,
    LedgerEntry,
    LedgerKind,
    Reservation,
    UsageSource,
)
from billing.money import MAX_DECIMALS, PICO_PER_USD, usd_display, usd_str
from billing.periods import ADJECTIVES, period_bounds
from billing.prices import ModelPrice, price_for
from billing.selectors import UserRef
from chat import metrics
from chat.errors import BudgetExceeded, InvalidRequest, TooManyConcurrent
from chat.models import Message

__all__ = [
    "charge",
    "expired_reservations",
    "extend_reservations",
    "reserve",
    "set_budget",
    "settle",
]

OUTCOME_MAX_LENGTH: int = LedgerEntry._meta.get_field("outcome").max_length  # type: ignore[assignment]
# A chat message, its id, or None.
MessageRef = Message | int | None

WORKER_ID_MAX_LENGTH: int = Reservation._meta.get_field("worker_id").max_length  # type: ignore[assignment]
_budget_field = Account._meta.get_field("budget_usd")
MAX_BUDGET_USD = Decimal(10) ** (_budget_field.max_digits - _budget_field.decimal_places)


def _user_id(user: UserRef) -> int:
    return user if isinstance(user, int) else user.pk


def _require_transaction(name: str) -> None:
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError(
            f"billing.services.{name}() must run inside transaction.atomic() (together with "
            "the message it is for)."
        )


def _check_tokens(**counts: int) -> None:
    for name, value in counts.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, not {value!r}")


def lock_account(user_id: int) -> Account:
    """The user's Account row, locked until the transaction ends; created if missing (two
    transactions creating it at once both succeed: the loser's insert is ignored)."""
    try:
        return Account.objects.select_for_update().get(user_id=user_id)
    except Account.DoesNotExist:
        Account.objects.bulk_create([Account(user_id=user_id)], ignore_conflicts=True)
        return Account.objects.select_for_update().get(user_id=user_id)


def _check_admission(*, user_id: int, amount: int, cap: int, now: dt.datetime) -> None:
    """The atomic check of `reserve`: the concurrency cap and the budget against the
    reservations and spending read under the user's lock.

    On SQLite the transaction (BEGIN IMMEDIATE) holds the database's write lock already. On
    PostgreSQL the account row is locked first, and the totals are read by the next statement,
    which sees everything the previous holder of the lock committed (READ COMMITTED). With
    neither a cap nor a budget there is nothing to check: no lock, so that one user's calls
    are not serialized for nothing (a budget set meanwhile applies from its commit on).
    """
    period = settings.CHAT_USER_BUDGET_PERIOD
    start, end = period_bounds(period, now)

    def read_totals(*, lock: bool) -> selectors.Totals | None:
        if lock:
            lock_account(user_id)  # creating the account if it is missing
        return selectors.account_totals(user_id=user_id, now=now, start=start, end=end)

    row_locks = transaction.get_connection().features.has_select_for_update
    if row_locks and not cap:
        unlocked = read_totals(lock=False)
        if unlocked is not None and unlocked.budget is None:
            return
    totals = read_totals(lock=row_locks)
    if totals is None:  # SQLite, no account yet
        totals = read_totals(lock=True)
        assert totals is not None
    budget = totals.budget
    if cap and totals.in_flight >= cap:
        raise TooManyConcurrent(
            f"You already have {totals.in_flight} "
            f"{'reply' if totals.in_flight == 1 else 'replies'} being generated, the most "
            "allowed at once; wait for one to finish.",
            extra={"limit": cap},
            headers={"Retry-After": "1"},
        )
    if budget is not None and totals.spent + totals.reserved + amount > budget:
        raise budget_exceeded(
            budget=budget,
            spent=totals.spent,
            reserved=totals.reserved,
            required=amount,
            period=period,
            resets_at=end,
            now=now,
        )


def reserve(
    *,
    user: UserRef,
    model: str,
    prompt_tokens: int,
    max_completion_tokens: int,
    worker_id: str,
    message: MessageRef = None,
    now: dt.datetime | None = None,
) -> Reservation:
    """Admit a model call: hold its worst-case cost, or refuse it.

    `user` is a user or a user id; `message` a chat.Message, its id, or None. Raises
    TooManyConcurrent when the user already has CHAT_MAX_CONCURRENT_PER_USER unexpired
    reservations, BudgetExceeded when spent + reserved + this call's worst case would pass the
    period's budget, ImproperlyConfigured when the model has no price. The caller's transaction
    then rolls back whatever it wrote with it.
    """
    _require_transaction("reserve")
    _check_tokens(prompt_tokens=prompt_tokens, max_completion_tokens=max_completion_tokens)
    if not worker_id or len(worker_id) > WORKER_ID_MAX_LENGTH:
        raise ValueError(f"worker_id must be 1 to {WORKER_ID_MAX_LENGTH} characters")
    now = now or timezone.now()
    user_id = _user_id(user)
    price = price_for(model)
    amount = price.cost(prompt_tokens=prompt_tokens, completion_tokens=max_completion_tokens)

    _check_admission(
        user_id=user_id, amount=amount, cap=settings.CHAT_MAX_CONCURRENT_PER_USER, now=now
    )
    return Reservation.objects.create(
        user_id=user_id,
        message_id=message if message is None or isinstance(message, int) else message.pk,
        model=model,
        amount=amount,
        prompt_tokens=prompt_tokens,
        max_completion_tokens=max_completion_tokens,
        input_usd_per_million=price.input,
        output_usd_per_million=price.output,
        worker_id=worker_id,
        created_at=now,
        expires_at=now + dt.timedelta(seconds=settings.CHAT_RESERVATION_TTL_SECONDS),
    )


def budget_exceeded(
    *,
    budget: int,
    spent: int,
    reserved: int,
    required: int,
    period: str,
    resets_at: dt.datetime,
    now: dt.datetime,
) -> BudgetExceeded:
    """The error for a call of `required` pico-dollars that the budget does not cover."""
    remaining = max(0, budget - spent - reserved)
    resets = resets_at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    retry_after = max(1, math.ceil((resets_at - now).total_seconds()))
    cost = f"${usd_display(required, round_up=True)}"
    whole = f"${usd_display(budget)} {ADJECTIVES[period]} budget"
    if required > budget:
        message = (
            f"This request could cost up to {cost}, more than your whole {whole}; send a "
            "shorter prompt, ask for a shorter reply (max_tokens) or use a cheaper model."
        )
    else:
        held = (
            f" (${usd_display(reserved, round_up=True)} is held for replies still being generated)"
            if reserved
            else ""
        )
        message = (
            f"This request could cost up to {cost} but only ${usd_display(remaining)} of your "
            f"{whole} remains{held}; it resets at {resets}."
        )
    return BudgetExceeded(
        message,
        extra={
            "budget_usd": usd_str(budget),
            "spent_usd": usd_str(spent),
            "reserved_usd": usd_str(reserved),
            "remaining_usd": usd_str(remaining),
            "required_usd": usd_str(required),
            "resets_at": resets,
            "retry_after": retry_after,
        },
        headers={"Retry-After": str(retry_after)},
    )


def settle(
    *,
    reservation: Reservation | int,
    prompt_tokens: int,
    completion_tokens: int,
    usage_source: str,
    outcome: str,
    kind: str = LedgerKind.REPLY,
    model: str | None = None,
    now: dt.datetime | None = None,
) -> LedgerEntry | None:
    """Turn a reservation into a ledger entry for what the call really used.

    `reservation` is the Reservation `reserve` returned, or its id (then read first). Deletes
    the reservation and records the entry (priced with the current unit prices of `model`, by
    default the reservation's) and its day's DailyUsage. Idempotent: when the reservation is
    gone (already settled, e.g. by the crash sweeper racing a late finish) it writes nothing
    and returns None, so a call is never charged twice.
    """
    _require_transaction("settle")
    _check_entry(prompt_tokens, completion_tokens, usage_source, outcome, kind)
    now = now or timezone.now()
    if isinstance(reservation, int):
        found = Reservation.objects.filter(pk=reservation).first()
        if found is None:
            return None
        reservation = found
    # Deleting the row decides which of two racing settlements charges it. No account lock:
    # `reserve` reads the reservations and the spending in one statement (one snapshot), so it
    # sees this settlement either whole or not at all, never the call counted zero times.
    deleted, _ = Reservation.objects.filter(pk=reservation.pk).delete()
    if not deleted:  # settled by someone else meanwhile
        return None
    user_id = reservation.user_id
    model = model or reservation.model
    try:
        price = price_for(model)
    except ImproperlyConfigured:
        if model != reservation.model:
            raise
        # The model lost its price since it was reserved (a restart with other settings).
        price = ModelPrice(
            model=model,
            input=reservation.input_usd_per_million,
            output=reservation.output_usd_per_million,
        )
    return _record(
        user_id=user_id,
        message_id=reservation.message_id,
        price=price,
        kind=kind,
        outcome=outcome,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        usage_source=usage_source,
        now=now,
    )


def charge(
    *,
    user: UserRef,
    message: MessageRef,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    usage_source: str,
    outcome: str,
    kind: str,
    now: dt.datetime | None = None,
) -> LedgerEntry:
    """Record a model call that had no reservation (same pricing as settle). Runs in the
    caller's transaction if there is one, else in its own."""
    _check_entry(prompt_tokens, completion_tokens, usage_source, outcome, kind)
    now = now or timezone.now()
    user_id = _user_id(user)
    price = price_for(model)
    with transaction.atomic(savepoint=False):
        lock_account(user_id)
        return _record(
            user_id=user_id,
            message_id=message if message is None or isinstance(message, int) else message.pk,
            price=price,
            kind=kind,
            outcome=outcome,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            usage_source=usage_source,
            now=now,
        )


def _check_entry(
    prompt_tokens: int, completion_tokens: int, usage_source: str, outcome: str, kind: str
) -> None:
    _check_tokens(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    if usage_source not in UsageSource.values:
        raise ValueError(f"usage_source must be one of {UsageSource.values}, not {usage_source!r}")
    if kind not in LedgerKind.values:
        raise ValueError(f"kind must be one of {LedgerKind.values}, not {kind!r}")
    if not outcome or len(outcome) > OUTCOME_MAX_LENGTH:
        raise ValueError(f"outcome must be 1 to {OUTCOME_MAX_LENGTH} characters")


def _record(
    *,
    user_id: int,
    message_id: int | None,
    price: ModelPrice,
    kind: str,
    outcome: str,
    prompt_tokens: int,
    completion_tokens: int,
    usage_source: str,
    now: dt.datetime,
) -> LedgerEntry:
    """The ledger entry and its day's aggregate, in the current transaction (the account is
    locked by the caller)."""
    cost = price.cost(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    entry = LedgerEntry.objects.create(
        user_id=user_id,
        message_id=message_id,
        model=price.model,
        kind=kind,
        outcome=outcome,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        usage_source=usage_source,
        input_usd_per_million=price.input,
        output_usd_per_million=price.output,
        cost=cost,
        created_at=now,
    )
    day = now.astimezone(dt.UTC).date()
    # Add in SQL to the day's row; the first charge of a day inserts it first (a concurrent
    # insert is ignored) and adds again.
    today = DailyUsage.objects.filter(user_id=user_id, day=day, model=price.model)
    increments = {
        "requests": F("requests") + 1,
        "prompt_tokens": F("prompt_tokens") + prompt_tokens,
        "completion_tokens": F("completion_tokens") + completion_tokens,
        "cost": F("cost") + cost,
    }
    if not today.update(**increments):
        DailyUsage.objects.bulk_create(
            [DailyUsage(user_id=user_id, day=day, model=price.model)], ignore_conflicts=True
        )
        today.update(**increments)
    # Counted once the charge is committed (never for a transaction rolled back).
    transaction.on_commit(
        functools.partial(
            metrics.record_usage,
            model=price.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost=cost / PICO_PER_USD,
        )
    )
    return entry


def extend_reservations(*, worker_id: str, now: dt.datetime | None = None) -> int:
    """Keep a live process's reservations from expiring: expires_at = now + TTL for all of
    `worker_id`'s reservations. Returns how many there were."""
    now = now or timezone.now()
    expires_at = now + dt.timedelta(seconds=settings.CHAT_RESERVATION_TTL_SECONDS)
    return Reservation.objects.filter(worker_id=worker_id).update(expires_at=expires_at)


def expired_reservations(*, now: dt.datetime | None = None) -> QuerySet[Reservation]:
    """Reservations whose process stopped extending them (it died), oldest first: the crash
    sweeper settles each for what was produced."""
    now = now or timezone.now()
    return Reservation.objects.filter(expires_at__lte=now).order_by("expires_at", "id")


def set_budget(*, user: UserRef, mode: str, usd: Decimal | None) -> Account:
    """Set a user's budget: mode `default` (CHAT_USER_BUDGET_USD), `unlimited`, or `limited`
    with `usd` >= 0 per period (at most 6 decimals). InvalidRequest when inconsistent."""
    if mode not in BudgetMode.values:
        raise InvalidRequest(f"Budget mode must be one of {', '.join(BudgetMode.values)}.")
    if mode == BudgetMode.LIMITED:
        if usd is None:
            raise InvalidRequest("A limited budget needs an amount in USD.")
        usd = Decimal(usd)
        if not usd.is_finite() or usd < 0 or usd >= MAX_BUDGET_USD:
            raise InvalidRequest(f"A budget must be from 0 USD to less than {MAX_BUDGET_USD}.")
        if usd != usd.quantize(Decimal(1).scaleb(-MAX_DECIMALS)):
            raise InvalidRequest(f"A budget has at most {MAX_DECIMALS} decimals.")
    elif usd is not None:
        raise InvalidRequest(f"Budget mode {mode!r} takes no amount.")
    with transaction.atomic(savepoint=False):
        account = lock_account(_user_id(user))
        account.budget_mode = mode
        account.budget_usd = usd
        account.save(update_fields=["budget_mode", "budget_usd", "updated_at"])
    return account
