"""Middleware for the API's handler (see config.asgi).

Django runs a classic middleware's hooks through `sync_to_async`, a hop to a thread (created
per request) and back, twice per middleware per request. These hooks do no I/O, so on the API
path they are called inline on the event loop instead; behaviour is Django's own.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponseBase
from django.middleware import common, security


class InlineHooksMixin:
    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response = None
        if hasattr(self, "process_request"):
            response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class SecurityMiddleware(InlineHooksMixin, security.SecurityMiddleware):
    pass


class CommonMiddleware(InlineHooksMixin, common.CommonMiddleware):
    pass
