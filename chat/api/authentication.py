"""Who is asking: DRF's token and session authentication, and the anonymous-use setting.

API clients send `Authorization: Token <key>` (DRF's scheme) or `Authorization: Bearer <key>`
(what OpenAI-style clients send); the chat page and the admin use Django's session, with CSRF
enforced on writes by DRF's SessionAuthentication. With CHAT_ALLOW_ANONYMOUS on, a request
without credentials is let through and acts as one shared user (see `chat.services.users`).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request

TOKEN_KEYWORDS = (b"token", b"bearer")


class TokenAuthentication(authentication.TokenAuthentication):
    """DRF's TokenAuthentication, accepting the `Bearer` keyword as well as `Token`."""

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        parts = authentication.get_authorization_header(request).split()
        if not parts or parts[0].lower() not in TOKEN_KEYWORDS:
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "Invalid Authorization header: expected 'Token <key>' or 'Bearer <key>'."
            )
        try:
            key = parts[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed(
                "Invalid token: it contains characters that are not allowed."
            ) from None
        return self.authenticate_credentials(key)

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
