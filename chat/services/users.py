"""Users as the chat sees them: API tokens, and the shared user of anonymous requests."""

from __future__ import annotations

import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from rest_framework.authtoken.models import Token

# The anonymous user, looked up once a minute rather than on every anonymous request.
ANONYMOUS_USER_TTL = 60.0
_anonymous: tuple[User, float] | None = None


def anonymous_user() -> User:
    """The one user that requests without credentials act as (CHAT_ALLOW_ANONYMOUS), created
    on first use with an unusable password: nobody can log in as it."""
    global _anonymous
    if _anonymous is None or not anonymous_user_is_cached():
        _anonymous = (_get_or_create_anonymous_user(), time.monotonic())
    return _anonymous[0]


def anonymous_user_is_cached() -> bool:
    """Whether `anonymous_user()` would answer without reading the database."""
    return _anonymous is not None and time.monotonic() - _anonymous[1] <= ANONYMOUS_USER_TTL


def forget_anonymous_user() -> None:
    """Drop the cached anonymous user (tests that empty the database)."""
    global _anonymous
    _anonymous = None


def _get_or_create_anonymous_user() -> User:
    User = get_user_model()
    username = settings.CHAT_ANONYMOUS_USERNAME
    try:
        return User.objects.get(username=username)
    except User.DoesNotExist:
        pass
    try:
        with transaction.atomic():
            return User.objects.create(username=username, password=make_password(None))
    except IntegrityError:  # another process created it first
        return User.objects.get(username=username)


def token_for(*, username: str, rotate: bool = False) -> tuple[str, bool]:
    """The API token of `username` (the user is created if needed, without a password):
    (key, created). With `rotate`, any existing token is replaced by a new one."""
    User = get_user_model()
    with transaction.atomic():
        user, _ = User.objects.get_or_create(
            username=username, defaults={"password": make_password(None)}
        )
        if rotate:
            Token.objects.filter(user=user).delete()
        token, created = Token.objects.get_or_create(user=user)
    return token.key, created
