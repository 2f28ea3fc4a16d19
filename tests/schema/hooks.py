"""Schemathesis hooks of `make test-schema` (tests/schema/run.sh loads them).

The schema documents a few constraints in words only, because OpenAPI 3.0 cannot express them:
they tie several values together, or depend on what is stored. Schema-valid (positive) cases
that break one would be answered 400/422 and reported as "schema-valid request rejected", so
this hook makes such cases keep them, right before they are sent:

- `page` and `cursor` are exclusive (a keyset list answers 400 to both): `page` is dropped;
- the usage report spans at most USAGE_MAX_DAYS days, `from` not after `to`, where a missing
  one is the current period's bound: the dates are swapped / brought within the span;
- an `Idempotency-Key` reused with another body is a 422 (as the IETF draft on the header
  requires): a case's key is made its own, derived from the key and the body (the same key
  and body still replay);
- `conversation` in a new message must name a conversation of the requester (else 400): an id
  that does not is replaced by null (a new conversation).

Schema-violating (negative) cases are sent as generated, and every check stays on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import urllib.error
import urllib.request
from typing import Any

import schemathesis

# chat.api.views.USAGE_MAX_DAYS (tests/test_schema_and_repo.py keeps the two equal).
USAGE_MAX_DAYS = 366
BASE_URL = os.environ.get("SCHEMA_BASE_URL", "")
AUTHORIZATION = os.environ.get("SCHEMA_AUTHORIZATION", "")


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return
    path = case.operation.path
    if isinstance(case.query, dict):
        if "cursor" in case.query:
            case.query.pop("page", None)
        if path == "/api/usage/":
            _usage_span(case.query)
    if path == "/api/messages/create/":
        _own_idempotency_key(case)
        if isinstance(case.body, dict):
            _existing_conversation(case.body)


def _date(value: Any) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _usage_span(query: dict[str, Any]) -> None:
    first, last = _date(query.get("from")), _date(query.get("to"))
    if first is None and last is None:
        return
    today = dt.datetime.now(dt.UTC).date()
    if last is None:  # the server's default: the end of the current period
        query["from"] = today.isoformat()
        return
    if first is None:  # the server's default: the start of the current period
        query["to"] = today.isoformat()
        return
    first, last = min(first, last), max(first, last)
    if (last - first).days > USAGE_MAX_DAYS:
        first = last - dt.timedelta(days=USAGE_MAX_DAYS)
    query["from"], query["to"] = first.isoformat(), last.isoformat()


def _own_idempotency_key(case: Any) -> None:
    headers = case.headers or {}
    name = next((key for key in headers if key.lower() == "idempotency-key"), None)
    if name is None:
        return
    body = json.dumps(case.body, sort_keys=True, default=str)
    headers[name] = hashlib.sha256(f"{headers[name]}\n{body}".encode()).hexdigest()


def _existing_conversation(body: dict[str, Any]) -> None:
    conversation = body.get("conversation")
    if not isinstance(conversation, int) or isinstance(conversation, bool):
        return
    request = urllib.request.Request(f"{BASE_URL}/api/conversations/{conversation}/")
    if AUTHORIZATION:
        request.add_header("Authorization", AUTHORIZATION)
    try:
        with urllib.request.urlopen(request, timeout=10):
            return
    except urllib.error.HTTPError:
        body["conversation"] = None
