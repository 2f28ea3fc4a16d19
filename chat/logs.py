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


def redact(text: str) -> str:
    """`text` without anything secret-shaped, nor the configured API key."""
    text = redact_secrets(text)
    key = settings.OPENAI_API_KEY if settings.configured else ""
    if key and len(key) >= MIN_LITERAL_KEY_LENGTH and key in text:
        text = text.replace(key, REDACTED)
    return text


class RedactSecretsFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it as usual
            return True
        redacted = redact(message)
        if redacted != message:
            # The arguments are merged into the message, so none of them is formatted again.
            record.msg, record.args = redacted, ()
        for name, value in record.__dict__.items():
            if isinstance(value, str) and name not in _STANDARD_ATTRIBUTES:
                cleaned = redact(value)
                if cleaned != value:
                    record.__dict__[name] = cleaned
        if record.exc_info:
            # Formatted once here, redacted, and handed to the formatters as text (they use
            # `exc_text` when `exc_info` is gone; python-json-logger too).
            record.exc_text = redact(_exception_formatter.formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
