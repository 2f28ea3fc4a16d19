"""The one place where exceptions become HTTP error responses.

Every 4xx/5xx JSON body has the same shape:

    {"error": {"status": 400, "code": "invalid", "message": "...", ...extra}}

Validation errors add `fields` (field name -> list of messages); upstream failures add
`message_id` (the stored prompt) and, for rate limits, `retry_after`.
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404, HttpRequest, JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import set_rollback

from chat import metrics
from chat.errors import ApplicationError

logger = logging.getLogger(__name__)


class RequestTooLarge(drf_exceptions.APIException):
    status_code = 413
    default_code = "request_too_large"

    def __init__(self) -> None:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        super().__init__(f"The request body is larger than the limit of {limit} bytes.")


def _flatten(detail: Any) -> list[str]:
    if isinstance(detail, dict):
        return [f"{key}: {msg}" for key, value in detail.items() for msg in _flatten(value)]
    if isinstance(detail, list):
        return [msg for item in detail for msg in _flatten(item)]
    return [str(detail)]


def _plain(detail: Any) -> Any:
    if isinstance(detail, dict):
        return {key: _plain(value) for key, value in detail.items()}
    if isinstance(detail, list):
        return [_plain(item) for item in detail]
    return str(detail)


def error_payload(exc: BaseException) -> tuple[dict[str, Any], int, dict[str, str]]:
    """(body, status, headers) for an exception, or raise it back if it is not ours to map."""
    if isinstance(exc, ApplicationError):
        return {"error": exc.as_dict()}, exc.status_code, exc.headers
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = drf_exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge()
    if not isinstance(exc, drf_exceptions.APIException):
        raise exc
    headers: dict[str, str] = {}
    if isinstance(exc, drf_exceptions.ValidationError):
        detail = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        fields = _plain(detail)
        body = {
            "status": exc.status_code,
            "code": "invalid",
            "message": "Invalid input. " + " ".join(_flatten(detail)),
            "fields": fields,
        }
    else:
        codes = exc.get_codes()
        body = {
            "status": exc.status_code,
            "code": codes if isinstance(codes, str) else "error",
            "message": " ".join(_flatten(exc.detail)),
        }
    auth_header = getattr(exc, "auth_header", None)
    if auth_header:
        headers["WWW-Authenticate"] = auth_header
    wait = getattr(exc, "wait", None)
    if wait:
        headers["Retry-After"] = str(int(wait))
        body["retry_after"] = int(wait)
    return {"error": body}, exc.status_code, headers


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's EXCEPTION_HANDLER: every error an API view raises goes through here."""
    try:
        body, status, headers = error_payload(exc)
    except Exception:
        return None  # not an expected error: Django's handler500 (below) answers
    set_rollback()
    if status == 429:
        metrics.record_rejection(body["error"]["code"])
    if status >= 500:
        logger.warning("%s %s", status, body["error"].get("code"))
    return Response(body, status=status, headers=headers)


def _json_error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse(
        {"error": {"status": status, "code": code, "message": message}}, status=status
    )


def not_found_view(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return _json_error(404, "not_found", f"No such endpoint: {request.path}")


def server_error_view(request: HttpRequest) -> JsonResponse:
    return _json_error(500, "internal_error", "The server failed to complete the request.")


def bad_request_view(request: HttpRequest, exception: Exception | None = None) -> JsonResponse:
    return _json_error(400, "bad_request", "Bad request.")


def permission_denied_view(
    request: HttpRequest, exception: Exception | None = None
) -> JsonResponse:
    return _json_error(403, "permission_denied", "You do not have permission to do this.")
