"""The filters of the log handler configured in config/settings.py (LOGGING).

- `RequestIdFilter` gives every record the id of the request it was logged for
  (chat.request_context, or `extra={"request_id": ...}`), "-" outside a request.
- `RedactSecretsFilter` replaces anything shaped like a key or credential
  (`chat.errors.redact_secrets`), and the configured OPENAI_API_KEY itself, in the message, its
  arguments, the `extra=` fields, the traceback and the stack, before any formatter sees them.

They are handler filters (not logger filters), so they apply to the records of every logger
that reaches the handler, the SDK's and Django's included.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from chat import request_context
from chat.errors import redact_secrets

REDACTED = "[redacted]"
# Shorter configured keys are not searched for literally (they would match ordinary words).
MIN_LITERAL_KEY_LENGTH = 8

# The attributes every LogRecord has; any other was added with `extra=`.
_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "request_id",
}
_exception_formatter = logging.Formatter()


class RequestIdFilter(logging.Filter):
    """`record.request_id`: the one given with `extra=`, else the current request's, else "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_context.get_request_id() or "-"
        return True


def _configured_key() -> str:
    """The API key to search for literally ("" if too short to search for, or unknown)."""
    try:
        key = settings.OPENAI_API_KEY
    except ImproperlyConfigured:  # logging before the settings are loaded
        return ""
    return key if len(key) >= MIN_LITERAL_KEY_LENGTH else ""


def redact(text: str, key: str | None = None) -> str:
    """`text` without anything secret-shaped, nor the configured API key (`key`, when the
    caller has looked it up already)."""
    text = redact_secrets(text)
    if key is None:
        key = _configured_key()
    if key and key in text:
        text = text.replace(key, REDACTED)
    return text


class RedactSecretsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        key = _configured_key()
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        fields = record.__dict__
        extras = [
            name
            for name in fields.keys() - _STANDARD_ATTRIBUTES  # the `extra=` fields
            if isinstance(fields[name], str)
        ]
        if not (record.exc_info or record.exc_text or record.stack_info):
            # The common case, in one pass: nothing to redact.
            everything = "\n".join([message, *(fields[name] for name in extras)])
            if redact(everything, key) == everything:
                return True
        redacted = redact(message, key)
        if redacted != message:
            # The arguments are merged into the message, so none of them is formatted again.
            record.msg, record.args = redacted, ()
        for name in extras:
            fields[name] = redact(fields[name], key)
        if record.exc_info:
            # Formatted once here, redacted, and handed to the formatters as text (they use
            # `exc_text` when `exc_info` is gone; python-json-logger too).
            record.exc_text = redact(_exception_formatter.formatException(record.exc_info), key)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text, key)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, key)
        return True
