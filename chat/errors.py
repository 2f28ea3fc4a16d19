"""The application's error family. One exception handler (chat.api.errors) maps each to JSON.

Every error carries an HTTP status, a stable machine-readable `code` and a human `message`;
`extra` adds fields to the error body (e.g. the id of the stored message an upstream failure
belongs to), `headers` adds response headers (e.g. Retry-After).
"""

from __future__ import annotations

import functools
import re
from typing import Any

# Anything shaped like an API key or bearer credential: OpenAI's `sk-...` keys (and the `sess-`,
# `org-` ids), and the value of an Authorization header.
_SECRET_SHAPED = re.compile(
    r"\b(?:sk|sess|org)-[A-Za-z0-9_\-*.]{4,}|\b(?:Bearer|Token)\s+[A-Za-z0-9_\-.=:/+]{8,}"
)


def redact_secrets(text: str) -> str:
    """`text` with anything shaped like a key or credential replaced by `[redacted]`."""
    return _SECRET_SHAPED.sub("[redacted]", text)


class ApplicationError(Exception):
    status_code: int = 400
    code: str = "error"
    default_message: str = "The request could not be completed."

    def __init__(
        self,
        message: str | None = None,
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.extra: dict[str, Any] = dict(extra or {})
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(self.message)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status_code,
            "code": self.code,
            "message": self.message,
            **self.extra,
        }


class NotFound(ApplicationError):
    status_code = 404
    code = "not_found"
    default_message = "Not found."


class InvalidRequest(ApplicationError):
    status_code = 400
    code = "invalid"


class MessageInProgress(ApplicationError):
    status_code = 409
    code = "message_in_progress"
    default_message = "The message's reply is still being generated; wait for it to finish."


class IdempotencyKeyMismatch(ApplicationError):
    status_code = 422
    code = "idempotency_key_reused"
    default_message = "This Idempotency-Key was already used with a different request body."


class InternalError(ApplicationError):
    status_code = 500
    code = "internal_error"
    default_message = "The server failed to complete the request."


class DatabaseUnavailable(ApplicationError):
    status_code = 503
    code = "database_unavailable"
    default_message = "The database does not answer."


class RedisUnavailable(ApplicationError):
    status_code = 503
    code = "redis_unavailable"
    default_message = "Redis (REDIS_URL) does not answer."


class MetricsAuthenticationRequired(ApplicationError):
    """/metrics without the right `Authorization: Bearer <METRICS_TOKEN>`."""

    status_code = 401
    code = "not_authenticated"
    default_message = "The metrics need `Authorization: Bearer <METRICS_TOKEN>`."


class MetricsForbidden(ApplicationError):
    """/metrics from an address outside METRICS_ALLOWED_IPS (no METRICS_TOKEN set)."""

    status_code = 403
    code = "permission_denied"
    default_message = "The metrics are not served to this address."


class ServiceNotConfigured(ApplicationError):
    status_code = 503
    code = "openai_not_configured"
    default_message = (
        "The OpenAI API key is not configured on the server (set OPENAI_API_KEY); "
        "messages can be listed but not sent."
    )


class UpstreamError(ApplicationError):
    """The model API failed. The prompt is stored; `message_id` names the stored message."""

    status_code = 502
    code = "upstream_error"
    default_message = "The model API failed to answer."


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "upstream_timeout"
    default_message = "The model API did not answer in time."


class UpstreamRateLimited(UpstreamError):
    status_code = 503
    code = "upstream_rate_limited"
    default_message = "The model API is rate limiting this service; try again later."


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"
    default_message = "The model API could not be reached or failed with a server error."


class UpstreamBadResponse(UpstreamError):
    code = "upstream_bad_response"
    default_message = "The model API sent a reply that could not be understood."


class UpstreamAuthenticationFailed(UpstreamError):
    code = "upstream_auth_failed"
    default_message = (
        "The model API rejected this service's API key; the server operator must fix "
        "OPENAI_API_KEY."
    )


class UpstreamRejected(UpstreamError):
    code = "upstream_rejected"
    default_message = "The model API rejected the request."


class UpstreamTruncated(UpstreamError):
    code = "upstream_truncated"
    default_message = "The model API ended the reply stream before the reply was finished."


class GenerationInterrupted(UpstreamError):
    status_code = 503
    code = "generation_interrupted"
    default_message = "The server stopped while the reply was being generated."


def _all_subclasses(cls: type[ApplicationError]) -> list[type[ApplicationError]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


@functools.cache
def _classes_by_code() -> dict[str, type[ApplicationError]]:
    return {cls.code: cls for cls in _all_subclasses(ApplicationError)}


def rebuild(code: str, message: str, *, extra: dict[str, Any]) -> ApplicationError:
    """The error a stored failure recorded, by its code (for replays and followers); a
    `retry_after` in `extra` is also sent as the Retry-After header, as when it was raised."""
    error_class = _classes_by_code().get(code, UpstreamError)
    retry_after = extra.get("retry_after")
    headers = {"Retry-After": str(retry_after)} if isinstance(retry_after, int) else None
    error = error_class(message or None, extra=extra, headers=headers)
    error.code = code
    return error


def stored_details(error: ApplicationError) -> dict[str, Any]:
    """What of an error's extra fields is stored with a failed message (its id is not)."""
    return {key: value for key, value in error.extra.items() if key != "message_id"}


# --- Billing (raised by billing.services and billing.limits) -------------------------------


class RateLimited(ApplicationError):
    """Too many requests from this user or client; `retry_after` (seconds) and Retry-After."""

    status_code = 429
    code = "rate_limited"
    default_message = "Too many requests; try again later."


class TooManyConcurrent(ApplicationError):
    """The user already has the most replies generating at once; `limit`, Retry-After: 1."""

    status_code = 429
    code = "too_many_concurrent"
    default_message = (
        "You already have as many replies being generated as allowed at once; wait for one "
        "to finish."
    )


class BudgetExceeded(ApplicationError):
    """The request could cost more than what remains of the user's budget for the period.
    Adds budget_usd, spent_usd, reserved_usd, remaining_usd, required_usd (money strings),
    resets_at (ISO 8601 UTC) and retry_after (seconds to the reset), and Retry-After."""

    status_code = 429
    code = "budget_exceeded"
    default_message = "Your usage budget does not cover this request."
