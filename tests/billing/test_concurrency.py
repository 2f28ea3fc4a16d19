"""Bursts of concurrent admissions, each thread on its own database connection (as separate
server processes would be): the budget and the concurrency cap hold exactly. Runs on SQLite
and on PostgreSQL (DATABASE_URL)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import transaction
from django.db.models import Sum

from billing import selectors, services
from billing.models import Account, DailyUsage, LedgerEntry, Reservation
from billing.money import to_pico
from chat.errors import BudgetExceeded, TooManyConcurrent
from tests.billing.conftest import run_in_threads

pytestmark = pytest.mark.django_db(transaction=True)

THREADS = 12
PROMPT, COMPLETION = 300, 200  # "cheap": 300 * 1 + 200 * 2 = 700 micro-dollars a call
AMOUNT = 700 * 10**6


def _reserve(user_id: int, worker: str):
    try:
        with transaction.atomic():
            return services.reserve(
                user=user_id,
                model="cheap",
                prompt_tokens=PROMPT,
                max_completion_tokens=COMPLETION,
                worker_id=worker,
            )
    except (BudgetExceeded, TooManyConcurrent) as exc:
        return exc


def _settle_in_full(reservation_id: int):
    with transaction.atomic():
        return services.settle(
            reservation=reservation_id,
            prompt_tokens=PROMPT,
            completion_tokens=COMPLETION,
            usage_source="upstream",
            outcome="completed",
        )


def test_a_burst_of_reservations_admits_only_what_fits_the_budget(billing_settings, user):
    # $0.0025 fits three calls of $0.0007 (0.0021), not four. The account does not exist yet:
    # the threads also race to create it.
    billing_settings.CHAT_USER_BUDGET_USD = Decimal("0.0025")
    billing_settings.CHAT_MAX_CONCURRENT_PER_USER = 0
    assert not Account.objects.exists()

    results = run_in_threads(THREADS, lambda i: _reserve(user.pk, f"worker-{i % 3}"))

    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert len(admitted) == 3, results
    assert len(refused) == THREADS - 3, results
    assert Account.objects.count() == 1
    assert Reservation.objects.aggregate(total=Sum("amount"))["total"] == 3 * AMOUNT

    # Each settled at its full amount (concurrently too): the ledger never passes the budget.
    settled = run_in_threads(len(admitted), lambda i: _settle_in_full(admitted[i].pk))
    assert all(isinstance(entry, LedgerEntry) for entry in settled), settled
    spent = LedgerEntry.objects.aggregate(total=Sum("cost"))["total"]
    assert spent == 3 * AMOUNT <= to_pico(billing_settings.CHAT_USER_BUDGET_USD)
    assert DailyUsage.objects.aggregate(total=Sum("cost"))["total"] == spent

    # The budget is spent: another burst admits nothing.
    results = run_in_threads(THREADS, lambda i: _reserve(user.pk, "worker-x"))
    assert all(isinstance(r, BudgetExceeded) for r in results), results


def test_reserving_and_settling_concurrently_never_overshoots(billing_settings, make_user):
    # Threads loop reserve -> settle (at the full amount) until refused, for two users at
    # once; each user's ledger stops at the last call that fit in the budget.
    billing_settings.CHAT_USER_BUDGET_USD = Decimal("0.01")  # 14 calls of 0.0007 = 0.0098
    billing_settings.CHAT_MAX_CONCURRENT_PER_USER = 0
    users = [make_user(), make_user()]

    def spend(index: int) -> int:
        user_id = users[index % 2].pk
        calls = 0
        while True:
            reservation = _reserve(user_id, f"worker-{index}")
            if isinstance(reservation, BudgetExceeded):
                return calls
            assert _settle_in_full(reservation.pk) is not None
            calls += 1

    calls = run_in_threads(8, spend, timeout=120)
    assert all(isinstance(n, int) for n in calls), calls
    assert sum(calls) == 28
    for user in users:
        spent = LedgerEntry.objects.filter(user=user).aggregate(total=Sum("cost"))["total"]
        assert spent == 14 * AMOUNT
        assert selectors.budget_status(user=user).spent == spent
    assert not Reservation.objects.exists()


def test_a_burst_admits_only_the_concurrency_cap(billing_settings, user):
    billing_settings.CHAT_USER_BUDGET_USD = None
    billing_settings.CHAT_MAX_CONCURRENT_PER_USER = 3

    results = run_in_threads(THREADS, lambda i: _reserve(user.pk, f"worker-{i}"))

    admitted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, TooManyConcurrent)]
    assert (len(admitted), len(refused)) == (3, THREADS - 3), results
    assert Reservation.objects.filter(user=user).count() == 3
    assert all(r.extra == {"limit": 3} for r in refused)
