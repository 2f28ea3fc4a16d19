"""Async-native variants of the Django middleware whose hooks do no I/O.

Under ASGI, Django runs each hook of its built-in (sync) middleware through `sync_to_async`: a
hop to the request's thread and back, twice per middleware and request. These classes are
Django's own, with their hooks called directly on the event loop instead. That is only right
for hooks that never touch the database or the network, which holds for the five below with the
settings this project uses (CSRF tokens in a cookie, not in the session). The session and message
middleware do I/O only when there is something to save (a modified session, new or unread
messages): their variants run the hooks on the loop and send only that case to a thread.

Each such hop goes to the request's own thread (asgiref's ThreadSensitiveContext; config/asgi.py
lends each request a reused one): one stock middleware left in the chain costs every API request
two more hops.

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
    """Mix in before a Django middleware class whose hooks do no I/O (or, for process_response,
    none unless `response_needs_a_thread` says so)."""

    sync_capable = False
    async_capable = True

    def response_needs_a_thread(self, request: HttpRequest) -> bool:
        """Whether this request's process_response does I/O (it then runs on a thread)."""
        return False

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]] = self.get_response  # type: ignore[attr-defined]
        response = response or await get_response(request)
        if hasattr(self, "process_response"):
            if self.response_needs_a_thread(request):
                response = await sync_to_async(self.process_response)(request, response)
            else:
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


class SessionMiddleware(HooksOnTheLoop, sessions.SessionMiddleware):
    """The session is lazy: setting it up reads nothing. Only saving it is I/O."""

    def response_needs_a_thread(self, request: HttpRequest) -> bool:
        session = getattr(request, "session", None)
        # The condition under which Django's process_response saves (and reads the expiry).
        return session is not None and (
            (session.modified or settings.SESSION_SAVE_EVERY_REQUEST) and not session.is_empty()
        )


class MessageMiddleware(HooksOnTheLoop, messages.MessageMiddleware):
    """The message storage is lazy: it reads or writes only messages that were added or read."""

    def response_needs_a_thread(self, request: HttpRequest) -> bool:
        storage = getattr(request, "_messages", None)
        return storage is not None and (storage.used or storage.added_new)
