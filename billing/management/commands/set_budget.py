"""manage.py set_budget USERNAME USD|unlimited|default"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing import selectors, services
from billing.models import BudgetMode
from billing.money import usd_str
from chat.errors import ApplicationError


class Command(BaseCommand):
    help = (
        "Set a user's budget per period: an amount in USD (0 or more), 'unlimited', or "
        "'default' (back to CHAT_USER_BUDGET_USD)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument("usd", metavar="USD", help="e.g. 5, 12.50, unlimited, default")

    def handle(self, *args, username: str, usd: str, **options) -> None:
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(f"No user named {username!r}.") from None
        value = usd.strip().lower()
        if value in (BudgetMode.UNLIMITED, BudgetMode.DEFAULT):
            mode, amount = value, None
        else:
            try:
                amount = Decimal(value.removeprefix("$"))
            except InvalidOperation:
                raise CommandError(
                    f"{usd!r} is not an amount in USD, 'unlimited' or 'default'."
                ) from None
            mode = BudgetMode.LIMITED
        try:
            account = services.set_budget(user=user, mode=mode, usd=amount)
        except ApplicationError as exc:
            raise CommandError(exc.message) from None
        status = selectors.budget_status(user=user)
        budget = "unlimited" if status.budget is None else f"${usd_str(status.budget)}"
        per = "" if status.budget is None else f" per {status.period}"
        source = " (the default, CHAT_USER_BUDGET_USD)" if mode == BudgetMode.DEFAULT else ""
        self.stdout.write(f"{username}: budget {budget}{per}{source} [{account.budget_mode}]")
