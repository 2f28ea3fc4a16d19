"""Who is asking: DRF's token and session authentication, and the anonymous-use setting.

API clients send `Authorization: Token <key>` (DRF's scheme) or `Authorization: Bearer <key>`
(what OpenAI-style clients send); the chat page and the admin use Django's session, with CSRF
enforced on writes by DRF's SessionAuthentication. With CHAT_ALLOW_ANONYMOUS on, a request
without credentials is let through and acts as one shared user (see `chat.services.users`).

A valid token's user is remembered in-process for CHAT_TOKEN_CACHE_SECONDS (0: never), so a
client's requests in a row read it once: a token deleted or rotated, or a user changed or
deleted, is forgotten at once by the process that made the change and within that time by
the others.
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.conf import settings
from django.core.cache import caches
from django.http import HttpRequest
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request

TOKEN_KEYWORDS = (b"token", b"bearer")
# An in-process cache of its own (config.settings CACHES), whatever the default cache is: a
# lookup must not wait on a network (it runs on the event loop).
TOKEN_CACHE = "tokens"


def _token_cache_key(key: str) -> str:
    # A digest, so that no token is ever a key of the cache.
    return "token:" + hashlib.sha256(key.encode()).hexdigest()


def forget_cached_tokens(*, key: str | None = None) -> None:
    """Forget the cached user of token `key`, or of every token."""
    cache = caches[TOKEN_CACHE]
    if key is None:
        cache.clear()
    else:
        cache.delete(_token_cache_key(key))


class TokenAuthentication(authentication.TokenAuthentication):
    """DRF's TokenAuthentication, accepting the `Bearer` keyword as well as `Token`, with the
    users of valid tokens cached (see the module's docstring)."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        key = self._key(request)
        return None if key is None else self.authenticate_credentials(key)

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        cached = self.cached_credentials(key)
        if cached is not None:
            return cached
        user, token = super().authenticate_credentials(key)
        if settings.CHAT_TOKEN_CACHE_SECONDS > 0:
            caches[TOKEN_CACHE].set(
                _token_cache_key(key), (user, token), timeout=settings.CHAT_TOKEN_CACHE_SECONDS
            )
        return user, token

    @staticmethod
    def cached_credentials(key: str) -> tuple[Any, Any] | None:
        """(user, token) of a valid `key` remembered from an earlier request, else None."""
        if settings.CHAT_TOKEN_CACHE_SECONDS <= 0:
            return None
        return caches[TOKEN_CACHE].get(_token_cache_key(key))

    @classmethod
    def credentials_from_cache(cls, request: HttpRequest) -> tuple[Any, Any] | None:
        """(user, token) when `request` authenticates with a token whose user is cached: read
        without the database, so on the event loop."""
        try:
            key = cls._key(request)
        except exceptions.AuthenticationFailed:
            return None
        return None if key is None else cls.cached_credentials(key)

    @staticmethod
    def _key(request: Request | HttpRequest) -> str | None:
        """The token of a `Token <key>` or `Bearer <key>` Authorization header, else None."""
        if "HTTP_AUTHORIZATION" not in request.META:
            return None
        parts = authentication.get_authorization_header(request).split()  # type: ignore[arg-type]
        if not parts or parts[0].lower() not in TOKEN_KEYWORDS:
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "Invalid Authorization header: expected 'Token <key>' or 'Bearer <key>'."
            )
        try:
            return parts[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed(
                "Invalid token: it contains characters that are not allowed."
            ) from None

    def authenticate_header(self, request: Request) -> str:
        return 'Token realm="api", Bearer realm="api"'


class IsUserOrAnonymousAllowed(permissions.BasePermission):
    """Authenticated users; anyone while CHAT_ALLOW_ANONYMOUS is on."""

    message = "Authentication credentials were not provided."
    code = "not_authenticated"

    def has_permission(self, request: Request, view: Any) -> bool:
        if request.user is not None and request.user.is_authenticated:
            return True
        return bool(settings.CHAT_ALLOW_ANONYMOUS)
