"""The admin pages of the billing app, and `manage.py set_budget`."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from django.utils import timezone

from billing import services
from billing.models import Account, DailyUsage, LedgerEntry, Reservation
from tests.factories import make_message

pytestmark = pytest.mark.django_db


@pytest.fixture
def activity(billing_settings, user):
    """Some of alice's usage: a settled reply, a title, one reservation in flight."""
    now = timezone.now()
    message = make_message()
    with transaction.atomic():
        done = services.reserve(
            user=user,
            model="cheap",
            prompt_tokens=100,
            max_completion_tokens=100,
            worker_id="worker-a",
            message=message,
        )
        services.settle(
            reservation=done.pk,
            prompt_tokens=90,
            completion_tokens=50,
            usage_source="upstream",
            outcome="completed",
        )
        services.charge(
            user=user,
            message=message,
            model="gpt-4o-mini",
            prompt_tokens=20,
            completion_tokens=5,
            usage_source="counted",
            outcome="completed",
            kind="title",
            now=now - dt.timedelta(days=3),
        )
        services.reserve(
            user=user,
            model="cheap",
            prompt_tokens=10,
            max_completion_tokens=10,
            worker_id="worker-b",
        )
    return message


def test_admin_pages_render_for_a_superuser(admin_client, activity, user):
    account = Account.objects.get(user=user)
    pages = [
        "/admin/billing/account/",
        "/admin/billing/account/?q=alice",
        "/admin/billing/account/?budget_mode__exact=default",
        "/admin/billing/account/add/",
        f"/admin/billing/account/{account.pk}/change/",
        "/admin/billing/ledgerentry/",
        "/admin/billing/ledgerentry/?model=cheap&kind__exact=reply&outcome=completed",
        f"/admin/billing/ledgerentry/{LedgerEntry.objects.first().pk}/change/",
        "/admin/billing/dailyusage/",
        "/admin/billing/dailyusage/?model=gpt-4o-mini",
        f"/admin/billing/dailyusage/{DailyUsage.objects.first().pk}/change/",
        "/admin/billing/reservation/",
        f"/admin/billing/reservation/{Reservation.objects.first().pk}/change/",
    ]
    for page in pages:
        response = admin_client.get(page)
        assert response.status_code == 200, page


def test_the_account_page_shows_the_budget_status_and_recent_usage(admin_client, activity, user):
    account = Account.objects.get(user=user)
    page = admin_client.get(f"/admin/billing/account/{account.pk}/change/").content.decode()
    assert "Budget status" in page
    assert "$1" in page  # the budget
    assert "$0.00019" in page  # spent: 90 + 2 * 50 micro-dollars
    assert "$0.00003" in page  # reserved: 10 + 2 * 10
    assert "gpt-4o-mini" in page and "cheap" in page  # usage by model
    listing = admin_client.get("/admin/billing/account/?q=alice").content.decode()
    assert "alice" in listing and "$0.00019" in listing
    assert "sk-" not in page


def test_the_ledger_is_read_only(admin_client, activity):
    entry = LedgerEntry.objects.first()
    assert admin_client.get("/admin/billing/ledgerentry/add/").status_code == 403
    response = admin_client.post(f"/admin/billing/ledgerentry/{entry.pk}/delete/", {"post": "yes"})
    assert response.status_code == 403
    assert LedgerEntry.objects.filter(pk=entry.pk).exists()


def test_an_admin_sets_a_budget_override(admin_client, user):
    response = admin_client.post(
        "/admin/billing/account/add/",
        {"user": user.pk, "budget_mode": "limited", "budget_usd": "2.5"},
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert Account.objects.get(user=user).budget_usd == Decimal("2.5")
    # A limited budget without an amount is refused by the form.
    account = Account.objects.get(user=user)
    response = admin_client.post(
        f"/admin/billing/account/{account.pk}/change/",
        {"user": user.pk, "budget_mode": "limited", "budget_usd": ""},
    )
    assert response.status_code == 200 and b"needs an amount" in response.content


def _set_budget(*args: str) -> str:
    out = StringIO()
    call_command("set_budget", *args, stdout=out)
    return out.getvalue().strip()


def test_set_budget_command(billing_settings, user):
    assert _set_budget("alice", "5") == "alice: budget $5 per month [limited]"
    assert Account.objects.get(user=user).budget_usd == Decimal(5)
    assert _set_budget("alice", "0.25") == "alice: budget $0.25 per month [limited]"
    assert _set_budget("alice", "0") == "alice: budget $0 per month [limited]"
    assert _set_budget("alice", "unlimited") == "alice: budget unlimited [unlimited]"
    assert _set_budget("alice", "default") == (
        "alice: budget $1 per month (the default, CHAT_USER_BUDGET_USD) [default]"
    )
    billing_settings.CHAT_USER_BUDGET_USD = None
    assert _set_budget("alice", "Default") == (
        "alice: budget unlimited (the default, CHAT_USER_BUDGET_USD) [default]"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nobody", "5"), "No user named 'nobody'."),
        (("alice", "-1"), "A budget must be from 0 USD"),
        (("alice", "lots"), "'lots' is not an amount in USD, 'unlimited' or 'default'."),
        (("alice", "0.0000001"), "at most 6 decimals"),
        (("alice", "NaN"), "A budget must be from 0 USD"),
    ],
)
def test_set_budget_command_errors(billing_settings, user, args, message):
    with pytest.raises(CommandError, match=message.replace(".", r"\.").replace("(", r"\(")):
        _set_budget(*args)
    assert not Account.objects.filter(budget_mode="limited").exists()
