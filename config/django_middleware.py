"""Async-native variants of the Django middleware whose hooks do no I/O.

Under ASGI, Django runs each hook of its built-in (sync) middleware through `sync_to_async`: a
hop to the request's thread and back, twice per middleware and request. These classes are
Django's own, with their hooks called directly on the event loop instead. That is only right
for hooks that never touch the database or the network, which holds for the five below with the
settings this project uses (CSRF tokens in a cookie, not in the session). The session and message
middleware do I/O only when there is something to save (a modified session, new or unread
messages): their variants run the hooks on the loop and send only that case to a thread.

Django's ASGI handler gives each request that makes such a hop a thread of its own (asgiref's
ThreadSensitiveContext), started and joined per request: one stock middleware left in the chain
costs every API request a thread.

Measured (BENCHMARKS.md): about 2-3 ms of server CPU per chat on the 2-core machine; the tests in
tests/test_django_middleware.py check that each keeps Django's behaviour, errors included.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
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


class SessionMiddleware(sessions.SessionMiddleware):
    """The session is lazy: setting it up reads nothing. Only saving it is I/O."""

    sync_capable = False
    async_capable = True

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        self.process_request(request)
        response = await self.get_response(request)  # type: ignore[misc]
        session = getattr(request, "session", None)
        # The condition under which Django's process_response saves (and reads the expiry).
        if session is not None and (
            (session.modified or settings.SESSION_SAVE_EVERY_REQUEST) and not session.is_empty()
        ):
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)


class MessageMiddleware(messages.MessageMiddleware):
    """The message storage is lazy: it reads or writes only messages that were added or read."""

    sync_capable = False
    async_capable = True

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        self.process_request(request)
        response = await self.get_response(request)  # type: ignore[misc]
        storage = getattr(request, "_messages", None)
        if storage is not None and (storage.used or storage.added_new):
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)
