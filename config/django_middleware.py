"""Async-native variants of the Django middleware whose hooks do no I/O.

Under ASGI, Django runs each hook of its built-in (sync) middleware through `sync_to_async`: a
hop to the request's thread and back, twice per middleware and request. These classes are
Django's own, with their hooks called directly on the event loop instead. That is only right
for hooks that never touch the database or the network, which holds for the five below with the
settings this project uses (CSRF tokens in a cookie, not in the session). SessionMiddleware (it
saves a modified session) and MessageMiddleware (it may fall back to the session) stay Django's.

Measured (BENCHMARKS.md): about 3 ms of server CPU per chat on the 2-core machine; the tests in
tests/test_django_middleware.py check that each keeps Django's behaviour, errors included.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings
from django.contrib.auth import middleware as auth
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponseBase
from django.middleware import clickjacking, common, csrf, security


class HooksOnTheLoop:
    """Mix in before a Django middleware class whose hooks do no I/O."""

    sync_capable = False
    async_capable = True

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]] = self.get_response  # type: ignore[attr-defined]
        response = response or await get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class SecurityMiddleware(HooksOnTheLoop, security.SecurityMiddleware):
    pass


class CommonMiddleware(HooksOnTheLoop, common.CommonMiddleware):
    pass


class CsrfViewMiddleware(HooksOnTheLoop, csrf.CsrfViewMiddleware):
    def __init__(self, get_response: Any) -> None:
        if settings.CSRF_USE_SESSIONS:
            raise ImproperlyConfigured(
                "config.django_middleware.CsrfViewMiddleware keeps CSRF tokens in a cookie; with "
                "CSRF_USE_SESSIONS use django.middleware.csrf.CsrfViewMiddleware."
            )
        super().__init__(get_response)

    async def process_view(  # type: ignore[override]  # a coroutine: Django awaits it
        self,
        request: HttpRequest,
        callback: Callable[..., HttpResponseBase],
        callback_args: tuple[Any, ...],
        callback_kwargs: dict[str, Any],
    ) -> HttpResponseBase | None:
        # A coroutine, so that Django awaits it instead of sending it to a thread.
        return super().process_view(request, callback, callback_args, callback_kwargs)


class AuthenticationMiddleware(HooksOnTheLoop, auth.AuthenticationMiddleware):
    """Sets the lazy `request.user`; the user is only loaded when something reads it."""


class XFrameOptionsMiddleware(HooksOnTheLoop, clickjacking.XFrameOptionsMiddleware):
    pass
