"""The id of the request being served, readable anywhere below it (logs, the model API call).

A `contextvars.ContextVar`: set by the request middleware (config.middleware) in the request's
task, it is copied into every task started from there, so a generation launched by a request
(chat.generations) keeps its request's id for the model call and its logs. Outside a request
(startup, the maintenance loop) it is None.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from contextvars import ContextVar, Token
from typing import Any

from rest_framework.settings import api_settings

HEADER = "X-Request-ID"
# How Django stores the incoming header in request.META.
META_KEY = "HTTP_X_REQUEST_ID"
MAX_LENGTH = 128
# An incoming id is kept only if it is short and made of these (safe in logs and headers).
_VALID = re.compile(rf"[A-Za-z0-9._:\-]{{1,{MAX_LENGTH}}}")

_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_or_new(incoming: str | None) -> str:
    """The client's id when it is valid (1 to MAX_LENGTH of `A-Z a-z 0-9 . _ : -`), else a
    new one."""
    if incoming and _VALID.fullmatch(incoming):
        return incoming
    return new_request_id()


def get_request_id() -> str | None:
    return _request_id.get()


def set_request_id(request_id: str | None) -> Token[str | None]:
    return _request_id.set(request_id)


def reset_request_id(token: Token[str | None]) -> None:
    _request_id.reset(token)


def client_ip(meta: Mapping[str, Any]) -> str:
    """The client's address from a request's META, as DRF's `BaseThrottle.get_ident` gives it:
    the X-Forwarded-For entry added by the outermost trusted proxy (NUM_PROXIES, our
    CHAT_TRUSTED_PROXIES), else the peer's address. Read from META directly: DRF's builds the
    whole `request.headers` (about 20 µs) for it."""
    remote = meta.get("REMOTE_ADDR", "")
    proxies = api_settings.NUM_PROXIES
    forwarded = meta.get("HTTP_X_FORWARDED_FOR")
    if forwarded is None or proxies == 0:
        return remote
    if proxies is None:
        return "".join(forwarded.split())
    addresses = forwarded.split(",")
    return addresses[-min(proxies, len(addresses))].strip()
