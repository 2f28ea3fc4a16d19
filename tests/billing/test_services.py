"""Reserve, settle and charge on the real database: admissions, exact costs, the daily
aggregate, idempotency, expiry, errors."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Count, Sum

from billing import selectors, services
from billing.models import Account, DailyUsage, LedgerEntry, Reservation
from billing.money import to_pico
from chat.api.errors import error_payload
from chat.errors import BudgetExceeded, InvalidRequest, TooManyConcurrent
from tests.factories import make_message

pytestmark = pytest.mark.django_db

NOW = dt.datetime(2026, 11, 20, 12, 0, tzinfo=dt.UTC)
MICRO = 10**6  # pico-dollars in a micro-dollar: "cheap" costs 1 per input token, 2 per output


def reserve(user, *, prompt=100, completion=200, model="cheap", now=NOW, **kwargs):
    with transaction.atomic():
        return services.reserve(
            user=user,
            model=model,
            prompt_tokens=prompt,
            max_completion_tokens=completion,
            worker_id=kwargs.pop("worker_id", "worker-1"),
            now=now,
            **kwargs,
        )


def settle(reservation, *, prompt=100, completion=200, now=NOW, **kwargs):
    with transaction.atomic():
        return services.settle(
            reservation=reservation.pk,
            prompt_tokens=prompt,
            completion_tokens=completion,
            usage_source=kwargs.pop("usage_source", "upstream"),
            outcome=kwargs.pop("outcome", "completed"),
            now=now,
            **kwargs,
        )


def test_reserve_holds_the_worst_case_and_settle_charges_the_real_use(billing_settings, user):
    message = make_message()
    reservation = reserve(user, prompt=100, completion=200, message=message)
    assert reservation.amount == (100 * 1 + 200 * 2) * MICRO
    assert reservation.message_id == message.pk
    assert reservation.expires_at == NOW + dt.timedelta(seconds=60)
    assert Account.objects.filter(user=user).count() == 1  # created on first use

    status = selectors.budget_status(user=user, now=NOW)
    assert (status.spent, status.reserved, status.in_flight) == (0, 500 * MICRO, 1)
    assert status.remaining == to_pico(Decimal(1)) - 500 * MICRO

    entry = settle(reservation, prompt=90, completion=40, usage_source="counted")
    assert entry.cost == (90 + 80) * MICRO
    assert (entry.model, entry.kind, entry.outcome, entry.usage_source) == (
        "cheap",
        "reply",
        "completed",
        "counted",
    )
    assert entry.message_id == message.pk
    assert (entry.input_usd_per_million, entry.output_usd_per_million) == (1, 2)
    assert not Reservation.objects.exists()
    status = selectors.budget_status(user=user, now=NOW)
    assert (status.spent, status.reserved, status.in_flight) == (170 * MICRO, 0, 0)


def test_settle_is_idempotent(billing_settings, user):
    reservation = reserve(user)
    assert settle(reservation) is not None
    assert settle(reservation) is None
    assert settle(reservation, prompt=5, completion=5, outcome="interrupted") is None
    assert LedgerEntry.objects.count() == 1
    assert DailyUsage.objects.get().requests == 1


def test_settle_can_price_another_model_and_kind(billing_settings, user):
    reservation = reserve(user)
    entry = settle(reservation, prompt=1000, completion=10, model="gpt-4o", kind="title")
    assert (entry.model, entry.kind) == ("gpt-4o", "title")
    assert entry.cost == to_pico(Decimal("0.0025") + Decimal("0.0001"))
    assert DailyUsage.objects.get().model == "gpt-4o"


def test_settle_uses_the_reserved_prices_if_the_model_lost_its_price(billing_settings, user):
    reservation = reserve(user)
    billing_settings.CHAT_MODEL_PRICES = {
        k: v for k, v in billing_settings.CHAT_MODEL_PRICES.items() if k != "cheap"
    }
    entry = settle(reservation, prompt=10, completion=10)
    assert entry.cost == 30 * MICRO


def test_charge_records_a_call_without_reservation(billing_settings, user):
    message = make_message()
    entry = services.charge(
        user=user,
        message=message,
        model="gpt-4o-mini",
        prompt_tokens=13,
        completion_tokens=1,
        usage_source="upstream",
        outcome="completed",
        kind="title",
        now=NOW,
    )
    assert entry.cost == 2_550_000  # $0.00000255
    assert selectors.budget_status(user=user, now=NOW).spent == 2_550_000
    with pytest.raises(ImproperlyConfigured):
        services.charge(
            user=user,
            message=None,
            model="unpriced",
            prompt_tokens=1,
            completion_tokens=1,
            usage_source="upstream",
            outcome="completed",
            kind="reply",
        )


def test_daily_usage_equals_the_ledger_sums(billing_settings, make_user):
    alice, bob = make_user("alice"), make_user("bob")
    billing_settings.CHAT_USER_BUDGET_USD = None
    billing_settings.CHAT_MAX_CONCURRENT_PER_USER = 0
    days = [NOW, NOW + dt.timedelta(hours=13), NOW - dt.timedelta(days=1)]
    for i in range(12):
        user = (alice, bob)[i % 2]
        when = days[i % 3]
        model = ("cheap", "gpt-4o", "free")[i % 3 if i % 4 else 0]
        reservation = reserve(user, model=model, now=when)
        settle(reservation, prompt=10 + i, completion=3 * i, now=when)
    services.charge(
        user=alice,
        message=None,
        model="gpt-4o",
        prompt_tokens=7,
        completion_tokens=7,
        usage_source="counted",
        outcome="failed",
        kind="reply",
        now=NOW,
    )
    expected = {}
    for entry in LedgerEntry.objects.all():
        key = (entry.user_id, entry.created_at.date(), entry.model)
        row = expected.setdefault(key, [0, 0, 0, 0])
        row[0] += 1
        row[1] += entry.prompt_tokens
        row[2] += entry.completion_tokens
        row[3] += entry.cost
    actual = {
        (u.user_id, u.day, u.model): [u.requests, u.prompt_tokens, u.completion_tokens, u.cost]
        for u in DailyUsage.objects.all()
    }
    assert actual == expected
    assert len(actual) > 3
    totals = LedgerEntry.objects.aggregate(n=Count("id"), cost=Sum("cost"))
    assert DailyUsage.objects.aggregate(n=Sum("requests"))["n"] == totals["n"] == 13
    assert DailyUsage.objects.aggregate(cost=Sum("cost"))["cost"] == totals["cost"]

    summary = selectors.usage_summary(
        user=alice, date_from=NOW.date() - dt.timedelta(days=1), date_to=NOW.date()
    )
    assert [(r.day, r.model) for r in summary.rows] == sorted(
        (r.day, r.model) for r in summary.rows
    )
    assert summary.cost == sum(
        e.cost
        for e in LedgerEntry.objects.filter(user=alice, created_at__lt=NOW + dt.timedelta(hours=12))
    )
    assert summary.requests == sum(r.requests for r in summary.rows)


def test_the_admission_totals_agree_with_the_ledger_and_reservations(billing_settings, make_user):
    alice, bob = make_user("alice"), make_user("bob")
    billing_settings.CHAT_USER_BUDGET_USD = None
    billing_settings.CHAT_MAX_CONCURRENT_PER_USER = 0
    start, end = dt.datetime(2026, 11, 1, tzinfo=dt.UTC), dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    for user, when in [
        (alice, start - dt.timedelta(seconds=1)),  # last period: not counted
        (alice, start),
        (alice, NOW),
        (alice, end - dt.timedelta(seconds=1)),
        (alice, end),  # next period: not counted
        (bob, NOW),
    ]:
        settle(reserve(user, prompt=100, completion=0, now=when), prompt=7, completion=5, now=when)
    held = [reserve(alice, prompt=10, completion=20), reserve(alice, prompt=30, completion=0)]
    reserve(alice, prompt=1000, completion=0, now=NOW - dt.timedelta(seconds=61))  # expired
    reserve(bob, prompt=1000, completion=0)
    services.set_budget(user=alice, mode="limited", usd=Decimal("12.345678"))

    totals = selectors.account_totals(user_id=alice.pk, now=NOW, start=start, end=end)
    assert totals is not None
    assert totals.budget == to_pico(Decimal("12.345678"))  # exact
    assert (totals.in_flight, totals.reserved) == (2, sum(r.amount for r in held))
    assert (totals.in_flight, totals.reserved) == selectors.unexpired_reservations(
        user_id=alice.pk, now=NOW
    )
    assert totals.spent == selectors.spent_between(user_id=alice.pk, start=start, end=end)
    assert totals.spent == 3 * (7 * 1 + 5 * 2) * MICRO
    for usd, budget in [("999999.999999", to_pico(Decimal("999999.999999"))), ("0", 0)]:
        services.set_budget(user=alice, mode="limited", usd=Decimal(usd))
        assert selectors.account_totals(user_id=alice.pk, now=NOW, start=start, end=end).budget == (
            budget
        )
    services.set_budget(user=alice, mode="unlimited", usd=None)
    assert selectors.account_totals(user_id=alice.pk, now=NOW, start=start, end=end).budget is None
    assert selectors.account_totals(user_id=make_user().pk, now=NOW, start=start, end=end) is None


def test_with_neither_cap_nor_budget_anything_is_admitted(billing_settings, user):
    billing_settings.CHAT_USER_BUDGET_USD = None
    billing_settings.CHAT_MAX_CONCURRENT_PER_USER = 0
    for _ in range(5):
        reserve(user, prompt=10**6, completion=10**6)
    assert Reservation.objects.filter(user=user).count() == 5


def test_budget_refuses_what_could_overshoot(billing_settings, user):
    billing_settings.CHAT_USER_BUDGET_USD = Decimal("0.002")  # 2000 micro-dollars
    first = reserve(user, prompt=500, completion=500)  # 1500
    with pytest.raises(BudgetExceeded) as refused:
        reserve(user, prompt=100, completion=250)  # 600 > 500 left
    error = refused.value
    assert error.status_code == 429 and error.code == "budget_exceeded"
    assert error.extra == {
        "budget_usd": "0.002",
        "spent_usd": "0",
        "reserved_usd": "0.0015",
        "remaining_usd": "0.0005",
        "required_usd": "0.0006",
        "resets_at": "2026-12-01T00:00:00Z",
        "retry_after": 10 * 86400 + 12 * 3600,  # 1 December 00:00 - 20 November 12:00
    }
    assert error.headers == {"Retry-After": str(10 * 86400 + 12 * 3600)}
    assert error.message == (
        "This request could cost up to $0.0006 but only $0.0005 of your $0.002 monthly budget "
        "remains ($0.0015 is held for replies still being generated); it resets at "
        "2026-12-01T00:00:00Z."
    )
    body, status, _ = error_payload(error)
    assert status == 429 and body["error"]["code"] == "budget_exceeded"
    assert body["error"]["required_usd"] == "0.0006"

    # What fits exactly is admitted; settling for less frees the rest.
    second = reserve(user, prompt=100, completion=200)  # 500: exactly the rest
    with pytest.raises(BudgetExceeded):
        reserve(user, model="cheap", prompt=1, completion=0)
    settle(first, prompt=100, completion=100)  # 300 instead of 1500
    reserve(user, prompt=200, completion=500)  # 1200 = 2000 - 300 - 500
    assert selectors.budget_status(user=user, now=NOW).remaining == 0
    # A free model still fits in an exhausted budget (but counts against the cap).
    reserve(user, model="free", prompt=10**6, completion=10**6)
    assert second.pk


def test_a_request_larger_than_the_whole_budget_says_so(billing_settings, user):
    billing_settings.CHAT_USER_BUDGET_USD = Decimal("0.001")
    with pytest.raises(BudgetExceeded) as refused:
        reserve(user, prompt=1000, completion=1000)
    assert "more than your whole $0.001 monthly budget" in refused.value.message
    assert refused.value.extra["required_usd"] == "0.003"


def test_spending_of_earlier_periods_does_not_count(billing_settings, user):
    billing_settings.CHAT_USER_BUDGET_USD = Decimal("0.001")
    last_month = dt.datetime(2026, 10, 31, 23, 59, tzinfo=dt.UTC)
    settle(
        reserve(user, prompt=1000, completion=0, now=last_month),
        prompt=1000,
        completion=0,
        now=last_month,
    )
    with pytest.raises(BudgetExceeded):
        reserve(user, prompt=1, completion=0, now=last_month)
    reserve(user, prompt=1000, completion=0, now=dt.datetime(2026, 11, 1, tzinfo=dt.UTC))


def test_daily_and_weekly_periods(billing_settings, user):
    billing_settings.CHAT_USER_BUDGET_USD = Decimal("0.001")
    billing_settings.CHAT_USER_BUDGET_PERIOD = "week"
    sunday = dt.datetime(2026, 11, 22, 23, 0, tzinfo=dt.UTC)
    settle(
        reserve(user, prompt=1000, completion=0, now=sunday), prompt=1000, completion=0, now=sunday
    )
    with pytest.raises(BudgetExceeded) as refused:
        reserve(user, prompt=1, completion=0, now=sunday)
    assert refused.value.extra["resets_at"] == "2026-11-23T00:00:00Z"
    assert refused.value.extra["retry_after"] == 3600
    assert "weekly budget" in refused.value.message
    reserve(user, prompt=1000, completion=0, now=sunday + dt.timedelta(hours=1))
    billing_settings.CHAT_USER_BUDGET_PERIOD = "day"
    status = selectors.budget_status(user=user, now=sunday)
    assert (status.period, status.spent) == ("day", 1000 * MICRO)


def test_the_concurrency_cap(billing_settings, user):
    billing_settings.CHAT_USER_BUDGET_USD = None
    billing_settings.CHAT_MAX_CONCURRENT_PER_USER = 2
    first = reserve(user)
    reserve(user)
    with pytest.raises(TooManyConcurrent) as refused:
        reserve(user)
    assert refused.value.extra == {"limit": 2}
    assert refused.value.headers == {"Retry-After": "1"}
    assert refused.value.status_code == 429 and refused.value.code == "too_many_concurrent"
    settle(first)
    reserve(user)
    billing_settings.CHAT_MAX_CONCURRENT_PER_USER = 0  # no cap
    for _ in range(5):
        reserve(user)


def test_expired_reservations_stop_counting_and_extension_keeps_them(billing_settings, make_user):
    user, other = make_user(), make_user()
    billing_settings.CHAT_USER_BUDGET_USD = Decimal("0.001")
    billing_settings.CHAT_MAX_CONCURRENT_PER_USER = 1
    kept = reserve(user, prompt=1000, completion=0, worker_id="alive")
    dying = reserve(other, prompt=1000, completion=0, worker_id="dead")
    later = NOW + dt.timedelta(seconds=50)
    assert services.extend_reservations(worker_id="alive", now=later) == 1
    after_ttl = NOW + dt.timedelta(seconds=61)
    # The dead worker's reservation expired: it holds nothing and blocks nothing any more.
    assert list(services.expired_reservations(now=after_ttl)) == [dying]
    assert selectors.budget_status(user=other, now=after_ttl).reserved == 0
    reserve(other, prompt=1000, completion=0, now=after_ttl)
    # The extended one still counts (and caps).
    assert selectors.budget_status(user=user, now=after_ttl).reserved == 1000 * MICRO
    with pytest.raises(TooManyConcurrent):
        reserve(user, prompt=1, completion=0, now=after_ttl)
    kept.refresh_from_db()
    assert kept.expires_at == later + dt.timedelta(seconds=60)
    # The sweeper settles an expired reservation for what was produced; a late settle by the
    # owner is then a no-op.
    assert settle(dying, prompt=1000, completion=0, outcome="interrupted").cost == 1000 * MICRO
    assert settle(dying, prompt=1000, completion=0) is None


@pytest.mark.django_db(transaction=True)
def test_reserve_and_settle_need_the_callers_transaction(billing_settings, user):
    with pytest.raises(RuntimeError, match=r"transaction\.atomic"):
        services.reserve(
            user=user, model="cheap", prompt_tokens=1, max_completion_tokens=1, worker_id="w"
        )
    reservation = reserve(user)
    with pytest.raises(RuntimeError, match=r"transaction\.atomic"):
        services.settle(
            reservation=reservation.pk,
            prompt_tokens=1,
            completion_tokens=1,
            usage_source="upstream",
            outcome="completed",
        )
    assert Reservation.objects.filter(pk=reservation.pk).exists()


def test_a_refusal_rolls_back_the_callers_writes(billing_settings, user):
    billing_settings.CHAT_USER_BUDGET_USD = Decimal(0)
    with pytest.raises(BudgetExceeded), transaction.atomic():
        message = make_message(prompt_message="never kept")
        services.reserve(
            user=user,
            model="cheap",
            prompt_tokens=1,
            max_completion_tokens=1,
            worker_id="w",
            message=message,
        )
    from chat.models import Message

    assert not Message.objects.filter(prompt_message="never kept").exists()


def test_invalid_arguments(billing_settings, user):
    with pytest.raises(ImproperlyConfigured, match="no price"):
        reserve(user, model="unpriced")
    with pytest.raises(ValueError):
        reserve(user, prompt=-1)
    with pytest.raises(ValueError):
        reserve(user, worker_id="w" * 65)
    reservation = reserve(user)
    with pytest.raises(ValueError):
        settle(reservation, usage_source="guessed")
    with pytest.raises(ValueError):
        settle(reservation, kind="summary")
    assert Reservation.objects.filter(pk=reservation.pk).exists()


def test_budget_modes(billing_settings, user):
    billing_settings.CHAT_USER_BUDGET_USD = Decimal("0.000001")
    with pytest.raises(BudgetExceeded):
        reserve(user, prompt=2, completion=0)
    account = services.set_budget(user=user, mode="unlimited", usd=None)
    assert account.budget_mode == "unlimited"
    reserve(user, prompt=10**6, completion=10**6)
    assert selectors.budget_status(user=user, now=NOW).remaining is None
    services.set_budget(user=user, mode="limited", usd=Decimal("5"))
    assert selectors.budget_status(user=user, now=NOW).budget == 5 * 10**12
    services.set_budget(user=user, mode="default", usd=None)
    assert selectors.budget_status(user=user, now=NOW).budget == MICRO
    billing_settings.CHAT_USER_BUDGET_USD = None
    assert selectors.budget_status(user=user, now=NOW).budget is None
    for mode, usd in [
        ("limited", None),
        ("limited", Decimal("-1")),
        ("limited", Decimal("0.0000001")),
        ("limited", Decimal("1e30")),
        ("default", Decimal("1")),
        ("yearly", None),
    ]:
        with pytest.raises(InvalidRequest):
            services.set_budget(user=user, mode=mode, usd=usd)
    assert Account.objects.get(user=user).budget_mode == "default"


def test_budget_status_as_dict(billing_settings, user):
    reserve(user, prompt=1, completion=0)
    assert selectors.budget_status(user=user, now=NOW).as_dict() == {
        "period": "month",
        "period_start": "2026-11-01T00:00:00Z",
        "period_end": "2026-12-01T00:00:00Z",
        "budget_usd": "1",
        "spent_usd": "0",
        "reserved_usd": "0.000001",
        "remaining_usd": "0.999999",
        "in_flight": 1,
    }
