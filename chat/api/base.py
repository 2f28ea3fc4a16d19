"""The base of the API's views: DRF's APIView, dispatched as a coroutine.

Why not adrf: its dispatch runs DRF's `initial()` (authentication, permissions, throttles)
through `sync_to_async`, i.e. on the request's own thread, which opens a database connection
per request. Here everything that may touch the database runs on the bounded threads of
`chat.db`:

- `initial()` — token and session lookups — and plain `def` handlers run there (one hop);
  a request without credentials, or with a token whose user is cached
  (`chat.api.authentication`), skips that hop: its authentication reads nothing and the
  anonymous user is cached;
- `async def` handlers are awaited on the event loop (they call `chat.db.run` themselves).

The rest is DRF's own: request parsing, content negotiation, the exception handler
(`chat.api.errors`), response finalization.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponseBase
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView as DRFAPIView

from chat import db, request_context
from chat.api.authentication import TokenAuthentication
from chat.services import users


class APIView(DRFAPIView):
    view_is_async = True  # dispatch is a coroutine whatever the handlers are
    # Whether handlers act for a user (`self.owner`); off for the health probes.
    acts_for_user = True

    owner: User
    # The client's address for anonymous requests (their rate limits), else None.
    client_ip: str | None = None

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        if not self.acts_for_user:
            return
        if request.user is not None and request.user.is_authenticated:
            self.owner = request.user
        else:  # let through by the permission: anonymous use is on
            self.owner = users.anonymous_user()
            self.client_ip = request_context.client_ip(request.META)

    def _authenticated_from_cache(self, request: Request) -> bool:
        """Authenticate `request` now if it carries a token whose user is cached (`initial()`
        then finds its user set and looks nothing up): whether it did."""
        # Only when the token is what DRF would try first.
        if not request.authenticators or not isinstance(
            request.authenticators[0], TokenAuthentication
        ):
            return False
        credentials = TokenAuthentication.credentials_from_cache(request._request)
        if credentials is None:
            return False
        request.user, request.auth = credentials
        return True

    def _initial_reads_the_database(self, request: Request) -> bool:
        django_request = request._request
        has_credentials = bool(self.authentication_classes) and (
            "HTTP_AUTHORIZATION" in django_request.META  # a token to look up
            or settings.SESSION_COOKIE_NAME in django_request.COOKIES  # a session to load
        )
        return has_credentials or (self.acts_for_user and not users.anonymous_user_is_cached())

    def _handler(self, request: Request) -> Callable[..., Any]:
        method = (request.method or "").lower()
        if method in self.http_method_names:
            return getattr(self, method, self.http_method_not_allowed)
        return self.http_method_not_allowed

    def _initial_then(
        self, handler: Callable[..., Any], request: Request, *args: Any, **kwargs: Any
    ) -> Any:
        self.initial(request, *args, **kwargs)
        return handler(request, *args, **kwargs)

    async def dispatch(  # type: ignore[override]  # a coroutine: view_is_async
        self, request: HttpRequest, *args: Any, **kwargs: Any
    ) -> HttpResponseBase:
        self.args = args
        self.kwargs = kwargs
        request = self.initialize_request(request, *args, **kwargs)
        self.request = request
        self.headers = self.default_response_headers
        try:
            handler = self._handler(request)
            if inspect.iscoroutinefunction(handler):
                if self._authenticated_from_cache(request) or not (
                    self._initial_reads_the_database(request)
                ):
                    self.initial(request, *args, **kwargs)
                else:
                    await db.run(self.initial, request, *args, **kwargs)
                response = await handler(request, *args, **kwargs)
            else:
                response = await db.run(self._initial_then, handler, request, *args, **kwargs)
        except Exception as exc:
            response = self.handle_exception(exc)
        final = self.finalize_response(request, response, *args, **kwargs)
        self.response = final  # type: ignore[assignment]  # or a streaming response
        return final

    def finalize_response(  # type: ignore[override]  # streaming responses too
        self, request: Request, response: HttpResponseBase, *args: Any, **kwargs: Any
    ) -> HttpResponseBase:
        response = super().finalize_response(request, response, *args, **kwargs)  # type: ignore[arg-type]
        # Errors are JSON whatever the client asked for (e.g. Accept: text/event-stream).
        if isinstance(response, Response) and response.status_code >= 400:
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = JSONRenderer.media_type
        return response
