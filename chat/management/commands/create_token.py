"""manage.py create_token USERNAME [--rotate]: print a user's API token (and only that).

The user is created if needed, without a password (an API-only user: nobody can log in as it
until an admin sets one). The one line on stdout is the token key, so scripts can capture it:

    TOKEN=$(python manage.py create_token alice)
    curl -H "Authorization: Token $TOKEN" http://127.0.0.1:8000/api/messages/
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.services import users


class Command(BaseCommand):
    help = (
        "Print the API token of USERNAME (the user and the token are created if needed). "
        "--rotate replaces an existing token: the old one stops working."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")
        parser.add_argument(
            "--rotate",
            action="store_true",
            help="replace the user's existing token by a new one",
        )

    def handle(
        self, *args: object, username: str, rotate: bool, verbosity: int = 1, **options: object
    ) -> None:
        User = get_user_model()
        username = username.strip()
        if username == settings.CHAT_ANONYMOUS_USERNAME:
            raise CommandError(
                f"{username!r} is the shared user of requests without credentials "
                "(CHAT_ANONYMOUS_USERNAME); give tokens to real users."
            )
        field = User._meta.get_field(User.USERNAME_FIELD)
        try:
            field.clean(username, None)  # type: ignore[union-attr]
        except ValidationError as exc:
            raise CommandError(f"Invalid username {username!r}: {' '.join(exc.messages)}") from None
        key, created = users.token_for(username=username, rotate=rotate)
        if verbosity >= 2:
            self.stderr.write("new token" if created else "existing token")
        self.stdout.write(key)
