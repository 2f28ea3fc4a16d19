"""An async APIView: DRF's request parsing, negotiation, permissions and exception handling,
with `async def` handlers awaited on the event loop and plain `def` handlers (DRF generics,
anything that uses the ORM) run on the database threads of `chat.db`, so every view of the API
holds no thread while it waits and shares the same few database connections.

Why not adrf: its dispatch runs DRF's `initial()` through `sync_to_async`, a hop to a
per-request thread on every call; removing such hops took the server's CPU per chat from 14 to
8.7 ms (BENCHMARKS.md). Nothing in `initial()` does I/O here (no authenticator or throttle
touches the database yet), so it runs inline; when one does, it moves to `chat.db.run`.
"""

from __future__ import annotations

import inspect
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from chat import db

# Accept headers that every JSON renderer satisfies as they stand.
_ANY_JSON = frozenset(("", "*/*", "application/json"))


class ContentNegotiation(DefaultContentNegotiation):
    """DRF's negotiation, with the answer for the Accept headers nearly every API client sends
    (none, `*/*`, `application/json`) known without parsing them: a tenth of a millisecond per
    request in DRF's media-type parsing."""

    def select_renderer(
        self, request: Any, renderers: list[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        accept = request.META.get("HTTP_ACCEPT", "")
        first = renderers[0]
        if (
            accept in _ANY_JSON
            and first.media_type == "application/json"
            and not format_suffix
            and not self.settings.URL_FORMAT_OVERRIDE
        ):
            return first, first.media_type
        return super().select_renderer(request, renderers, format_suffix)


class AsyncAPIView(APIView):
    view_is_async = True  # dispatch is a coroutine whatever the handlers are
    content_negotiation_class = ContentNegotiation

    async def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        self.args = args
        self.kwargs = kwargs
        request = self.initialize_request(request, *args, **kwargs)
        self.request = request
        self.headers = self.default_response_headers
        try:
            self.initial(request, *args, **kwargs)
            method = request.method.lower()
            handler = (
                getattr(self, method, self.http_method_not_allowed)
                if method in self.http_method_names
                else self.http_method_not_allowed
            )
            if inspect.iscoroutinefunction(handler):
                response = await handler(request, *args, **kwargs)
            else:
                response = await db.run(handler, request, *args, **kwargs)
        except Exception as exc:
            response = self.handle_exception(exc)
        final = self.finalize_response(request, response, *args, **kwargs)
        if isinstance(final, Response):
            rendered = _rendered(final)
            final.renderer_context = None
        else:
            rendered = final  # e.g. an event stream
        # DRF ties the view, its request and its response to each other (parser and renderer
        # contexts); untied, all three are freed by reference counting when the request ends
        # instead of waiting, alive, for a garbage collection.
        request.parser_context = None
        self.request = self.response = None
        return rendered

    def finalize_response(self, request, response, *args, **kwargs):  # type: ignore[override]
        response = super().finalize_response(request, response, *args, **kwargs)
        # Errors are JSON whatever the client asked for (e.g. Accept: text/event-stream).
        if isinstance(response, Response) and response.status_code >= 400:
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = JSONRenderer.media_type
        return response


def _rendered(response: Response) -> HttpResponse:
    """Render here, on the event loop: Django renders a template-style response (a DRF Response
    is one) through sync_to_async, a hop to a thread for a few microseconds of JSON encoding."""
    response.render()
    plain = HttpResponse(response.content, status=response.status_code)
    if not response.has_header("Content-Type"):
        del plain["Content-Type"]  # e.g. 204 No Content
    for header, value in response.items():
        plain[header] = value
    plain.cookies = response.cookies
    return plain
