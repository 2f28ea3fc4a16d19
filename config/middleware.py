"""The outermost middleware: a request id, the HTTP metrics and one log line per request.

- The request id is the client's `X-Request-ID` when it is valid (chat.request_context), else a
  new one. It is kept in a context variable for the request's logs and every model API call made
  for it (sent upstream as `X-Request-ID`, chat.llm), and returned in `X-Request-ID`.
- `chat_http_requests_total` and `chat_http_request_duration_seconds` are recorded by URL
  pattern name (`route`), never by raw path.
- One line on the `chat.request` logger: method, route, path (no query string), status,
  duration_ms, user_id (when authenticated), client_ip, request_id. Never headers or bodies.

Event streams (async streaming responses) are measured and logged when the stream ends — or
when the client goes away (`disconnected: true`); other streaming responses (files) when the
response starts.

Async only: it runs on the event loop, never on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from asgiref.sync import markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponseBase
from django.utils.functional import SimpleLazyObject, empty

from chat import metrics, request_context

logger = logging.getLogger("chat.request")

UNMATCHED_ROUTE = "unmatched"
STATIC_ROUTE = "static"


def route_of(request: HttpRequest) -> str:
    """The URL pattern name that served the request (e.g. `message-create`, `admin:index`)."""
    match = getattr(request, "resolver_match", None)
    if match is not None:
        return match.view_name or UNMATCHED_ROUTE
    if request.path.startswith(_static_prefix()):
        return STATIC_ROUTE
    return UNMATCHED_ROUTE


def _static_prefix() -> str:
    return "/" + settings.STATIC_URL.lstrip("/")


def _user_id(request: HttpRequest) -> int | None:
    """The authenticated user's id, if the request already resolved its user (never a database
    query here: a lazy user nobody looked at stays unknown)."""
    user = request.__dict__.get("user")
    if isinstance(user, SimpleLazyObject):
        user = user._wrapped
        if user is empty:
            return None
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    return user.pk


class RequestObservabilityMiddleware:
    async_capable = True
    sync_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], Awaitable[HttpResponseBase]]):
        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter()
        request_id = request_context.accept_or_new(request.META.get(request_context.META_KEY))
        # Tasks started while handling the request (a generation) copy the id with the rest of
        # the context; it is reset afterwards, so that nothing run later in this context (the
        # test client, a sync server) inherits it.
        token = request_context.set_request_id(request_id)
        try:
            response = await self.get_response(request)
        finally:
            request_context.reset_request_id(token)
        response[request_context.HEADER] = request_id
        if response.streaming and getattr(response, "is_async", False):
            response.streaming_content = _observed(  # type: ignore[attr-defined]
                response.streaming_content,  # type: ignore[attr-defined]
                request,
                response.status_code,
                started,
                request_id,
            )
        else:
            _finish(request, response.status_code, started, request_id)
        return response


async def _observed(
    content: AsyncIterator[bytes],
    request: HttpRequest,
    status: int,
    started: float,
    request_id: str,
) -> AsyncIterator[bytes]:
    """`content`, with the request id set while it is produced, recording the request when it
    ends. A client that goes away leaves the stream to be closed by the event loop's
    async-generator finalizer, shortly after."""
    token = request_context.set_request_id(request_id)
    disconnected = False
    try:
        async for chunk in content:
            yield chunk
    except (asyncio.CancelledError, GeneratorExit):
        disconnected = True
        raise
    finally:
        _finish(request, status, started, request_id, disconnected=disconnected)
        with contextlib.suppress(ValueError):  # closed by the finalizer, in another context
            request_context.reset_request_id(token)


def _finish(
    request: HttpRequest,
    status: int,
    started: float,
    request_id: str,
    *,
    disconnected: bool = False,
) -> None:
    seconds = time.perf_counter() - started
    route = route_of(request)
    metrics.observe_http_request(
        route=route, method=request.method or "", status=status, seconds=seconds
    )
    if not logger.isEnabledFor(logging.INFO):
        return
    duration_ms = round(seconds * 1000, 1)
    fields: dict[str, Any] = {
        "request_id": request_id,
        "method": request.method,
        "route": route,
        "path": request.path,
        "status": status,
        "duration_ms": duration_ms,
        "user_id": _user_id(request),
        "client_ip": request_context.client_ip(request.META),
    }
    if disconnected:
        fields["disconnected"] = True
    logger.info("%s %s %s %sms", request.method, request.path, status, duration_ms, extra=fields)
