"""The OpenAPI schema (drf-spectacular): what it cannot infer from the views by itself.

- **Errors.** Every 4xx/5xx body has one shape, the `Error` component. Every operation
  documents every status it can answer, each narrowed to the codes that operation can produce
  there (`allOf: [Error, {code: enum}]`). The common ones follow from the view
  (`ChatAutoSchema.error_codes`: credentials, CSRF on writes, ids in the path, a JSON body,
  content negotiation); the rest are declared on the handler with `@errors(...)`.
- **Authentication.** `Authorization: Token <key>` or `Bearer <key>`, or Django's session; while
  CHAT_ALLOW_ANONYMOUS is on, none (the operations' security lists `{}`).
- **Limits that follow the settings** when the schema is generated: the allowed models
  (`ModelNameField`), the largest `max_tokens` (`MaxTokensField`), both for requests only (a
  stored value may date from another configuration); the serializers build their
  settings-bound fields in `get_fields()`. Request strings reject NUL (`pattern`), and a prompt
  must not be only whitespace, as Python's `str.strip()` sees it (`NON_BLANK_PATTERN`).
- **Server-Sent Events** (`ServerSentEvent`) and the list envelopes are in
  chat.api.serializers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from django.conf import settings
from drf_spectacular.extensions import (
    OpenApiAuthenticationExtension,
    OpenApiSerializerExtension,
    OpenApiSerializerFieldExtension,
)
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiParameter
from rest_framework import exceptions as drf_exceptions
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import SAFE_METHODS

from chat import errors as app_errors
from chat.api.converters import MAX_ID
from chat.api.errors import RequestTooLarge

F = TypeVar("F", bound=Callable[..., Any])

# --- Error codes ------------------------------------------------------------------------------

# DRF's own errors that reach the exception handler (chat.api.errors): code -> (status, message).
_DRF_ERRORS: dict[str, tuple[int, str]] = {
    "parse_error": (400, str(drf_exceptions.ParseError.default_detail)),
    "not_authenticated": (401, str(drf_exceptions.NotAuthenticated.default_detail)),
    "authentication_failed": (401, "Invalid token."),
    "permission_denied": (403, "CSRF Failed: CSRF token missing."),
    "method_not_allowed": (405, 'Method "PUT" not allowed.'),
    "not_acceptable": (406, str(drf_exceptions.NotAcceptable.default_detail)),
    RequestTooLarge.default_code: (413, "The request body is larger than the limit."),
    "unsupported_media_type": (415, 'Unsupported media type "text/plain" in request.'),
    # Django's handler400 (e.g. a Host header not in ALLOWED_HOSTS).
    "bad_request": (400, "Bad request."),
}


def _application_errors() -> list[type[app_errors.ApplicationError]]:
    found, pending = [], [app_errors.ApplicationError]
    while pending:
        for sub in pending.pop().__subclasses__():
            found.append(sub)
            pending.append(sub)
    return found


ERRORS: dict[str, tuple[int, str]] = {
    **{cls.code: (cls.status_code, cls.default_message) for cls in _application_errors()},
    **_DRF_ERRORS,
}
ERRORS["invalid"] = (400, "Invalid input. prompt_message: This field is required.")
ERROR_CODES = sorted(ERRORS)

# Groups for the `@errors` declarations of the views.
RATE_LIMITS = ("rate_limited", "too_many_concurrent", "budget_exceeded")
UPSTREAM = (
    *(cls.code for cls in _application_errors() if issubclass(cls, app_errors.UpstreamError)),
    "upstream_error",
    app_errors.ServiceNotConfigured.code,
)

# Statuses whose answers carry Retry-After: always (429), or when the upstream sent one (503).
RETRY_AFTER_STATUSES = {429: True, 503: False}

# What each code means, for the descriptions of the error responses.
CODE_DESCRIPTIONS = {
    "invalid": "a value is missing, of the wrong type or out of its limits (`fields` names it)",
    "parse_error": "the body is not valid JSON",
    "bad_request": "a request Django refuses before the API sees it",
    "authentication_failed": "the token is wrong",
    "not_authenticated": "no credentials (anonymous use is off)",
    "permission_denied": "a session-authenticated write without its CSRF token",
    "not_found": "nothing with this id among your own, or no such page or cursor",
    "method_not_allowed": "a method this path does not have (`Allow` lists them)",
    "not_acceptable": "the `Accept` header asks for what this operation does not produce",
    "message_in_progress": "a reply is still being generated (`message_id`)",
    "request_too_large": "the body is larger than the server accepts",
    "unsupported_media_type": "the body is not `application/json`",
    "idempotency_key_reused": "this `Idempotency-Key` came with another body (`message_id`)",
    "rate_limited": "too many requests (`retry_after`)",
    "too_many_concurrent": "as many of your replies are generating as allowed (`limit`)",
    "budget_exceeded": "the request could cost more than what remains of your budget",
    "internal_error": "a failure of the server",
    "database_unavailable": "the database does not answer",
    "redis_unavailable": "Redis (REDIS_URL) does not answer",
    "openai_not_configured": "no API key is configured: the prompt is stored (`message_id`)",
    "generation_interrupted": "the server stopped during the reply (text so far kept)",
    # The model API's failures: the prompt is stored (`message_id`), to be regenerated.
    "upstream_error": "the model API failed (`message_id`)",
    "upstream_unavailable": "the model API could not be reached, or failed (`message_id`)",
    "upstream_bad_response": "the model API's answer could not be understood (`message_id`)",
    "upstream_auth_failed": "the model API rejected this service's key (`message_id`)",
    "upstream_rejected": "the model API rejected the request (`message_id`)",
    "upstream_truncated": "the reply stream broke off, text so far kept (`message_id`)",
    "upstream_rate_limited": "the model API rate-limits this service (`message_id`)",
    "upstream_timeout": "the model API did not answer in time (`message_id`)",
}


def describe(code: str) -> str:
    return CODE_DESCRIPTIONS.get(code, code)


def errors(*codes: str) -> Callable[[F], F]:
    """Declare the error codes a handler produces beyond the common ones (ChatAutoSchema)."""
    unknown = set(codes) - set(ERRORS)
    if unknown:
        raise ValueError(f"Unknown error codes: {', '.join(sorted(unknown))}")

    def mark(handler: F) -> F:
        handler.error_codes = (*getattr(handler, "error_codes", ()), *codes)  # type: ignore[attr-defined]
        return handler

    return mark


class ErrorDetailSerializer(serializers.Serializer):
    """The content of every error response (the optional fields appear where they apply)."""

    status = serializers.IntegerField(min_value=400, max_value=599, help_text="The HTTP status.")
    code = serializers.ChoiceField(
        choices=ERROR_CODES,
        help_text="Stable and machine-readable; each operation documents the codes it can give.",
    )
    message = serializers.CharField(help_text="For people.")
    message_id = serializers.IntegerField(
        required=False,
        min_value=1,
        help_text="The stored message the error belongs to (its prompt is kept: regenerate it).",
    )
    retry_after = serializers.IntegerField(
        required=False, min_value=0, help_text="Seconds to wait, as in `Retry-After`."
    )
    upstream_status = serializers.IntegerField(
        required=False, help_text="The HTTP status the model API answered."
    )
    limit = serializers.IntegerField(
        required=False, help_text="`too_many_concurrent`: replies allowed to generate at once."
    )
    budget_usd = serializers.CharField(required=False, help_text="`budget_exceeded`, in USD.")
    spent_usd = serializers.CharField(required=False)
    reserved_usd = serializers.CharField(required=False)
    remaining_usd = serializers.CharField(required=False)
    required_usd = serializers.CharField(
        required=False, help_text="The most this request could cost."
    )
    resets_at = serializers.DateTimeField(required=False, help_text="When the budget resets.")

    def get_fields(self) -> dict[str, serializers.Field]:
        fields = super().get_fields()
        # `fields` is a Serializer attribute: this field cannot be declared on the class.
        problems = serializers.DictField(
            child=serializers.ListField(child=serializers.CharField()),
            required=False,
            help_text="`invalid`: what is wrong with each field (or `non_field_errors`).",
        )
        ordered = {}
        for name, field in fields.items():
            ordered[name] = field
            if name == "message":
                ordered["fields"] = problems
        return ordered


class ErrorSerializer(serializers.Serializer):
    """Every 4xx/5xx response, and the `error` event of an event stream."""

    error = ErrorDetailSerializer()


def error_example(status: int, code: str) -> dict[str, Any]:
    return {"error": {"status": status, "code": code, "message": ERRORS[code][1]}}


# --- Strings and fields whose schema follows the settings -------------------------------------

# What Python counts as whitespace (str.isspace, what str.strip() removes), as the body of a
# regex character class that Python's `re` and ECMA-262 read alike.
WHITESPACE_CLASS = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Every string field rejects NUL characters (DRF's CharField). Non-empty: a field that may be
# blank is documented as `oneOf: [this, ""]`, and the two must not overlap.
NO_NUL_PATTERN = r"^[^\x00]+$"
# Not only whitespace, and no NUL.
NON_BLANK_PATTERN = rf"^[^\x00]*[^\x00{WHITESPACE_CLASS}][^\x00]*$"


class StrictCharFieldExtension(OpenApiSerializerFieldExtension):
    """Request strings: no NUL characters, or the field's own `schema_pattern`."""

    target_class = "chat.api.serializers.StrictCharField"
    match_subclasses = True

    def map_serializer_field(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        if direction == "request":
            schema["pattern"] = getattr(self.target, "schema_pattern", NO_NUL_PATTERN)
        return schema


class ModelNameField(serializers.CharField):
    """A model name: one of OPENAI_ALLOWED_MODELS (checked by the serializer), as an enum."""

    default_error_messages = {"invalid": "Must be a string."}

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class ModelNameFieldExtension(OpenApiSerializerFieldExtension):
    target_class = ModelNameField

    def map_serializer_field(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        if direction == "response":
            # A stored model may have been allowed by an earlier configuration.
            return {"type": "string"}
        choices = list(settings.OPENAI_ALLOWED_MODELS)
        if self.target.allow_blank:
            choices.append("")
        schema: dict[str, Any] = {"type": "string", "enum": choices}
        if self.target.allow_null:
            schema["nullable"] = True
        return schema


class KeysetPageExtension(OpenApiSerializerExtension):
    """A keyset page has no `count`: that is what tells it from a page-number page (the
    lists' `oneOf`)."""

    target_class = "chat.api.serializers.KeysetPageSerializer"
    match_subclasses = True

    def map_serializer(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        schema["not"] = {"required": ["count"]}
        return schema


class MaxTokensFieldExtension(OpenApiSerializerFieldExtension):
    """`max_tokens` is at most CHAT_MAX_COMPLETION_TOKENS when sent; a stored one may come
    from an earlier configuration (responses document no maximum)."""

    target_class = "chat.api.serializers.MaxTokensField"

    def map_serializer_field(self, auto_schema: AutoSchema, direction: str) -> dict[str, Any]:
        schema = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        if direction == "request":
            schema["maximum"] = settings.CHAT_MAX_COMPLETION_TOKENS
        return schema


# --- Authentication ---------------------------------------------------------------------------


class TokenScheme(OpenApiAuthenticationExtension):
    """chat.api.authentication.TokenAuthentication: `Token <key>` or `Bearer <key>`."""

    target_class = "chat.api.authentication.TokenAuthentication"
    name = ["tokenAuth", "bearerAuth"]
    priority = 1

    def get_security_definition(self, auto_schema: AutoSchema) -> list[dict[str, Any]]:
        return [
            {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "`Authorization: Token <key>` (DRF's scheme; `Bearer <key>` works "
                "too, see bearerAuth). `python manage.py create_token USERNAME` prints a user's "
                "key; admins also create them in the admin.",
            },
            {
                "type": "http",
                "scheme": "bearer",
                "description": "`Authorization: Bearer <key>`: the same keys, as OpenAI-style "
                "clients send them.",
            },
        ]

    def get_security_requirement(self, auto_schema: AutoSchema) -> list[dict[str, list]]:
        return [{"tokenAuth": []}, {"bearerAuth": []}]


# --- The schema class -------------------------------------------------------------------------


class ChatAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema, plus every error response and optional credentials."""

    def get_auth(self) -> list[dict[str, Any]]:
        auths = super().get_auth()
        if getattr(self.view, "acts_for_user", False) and settings.CHAT_ALLOW_ANONYMOUS:
            auths.append({})  # no credentials: the shared anonymous user
        return auths

    def get_override_parameters(self) -> list[Any]:
        """The ids in paths: positive 64-bit integers (chat.api.converters.IdConverter)."""
        ids = [
            OpenApiParameter(
                name,
                {"type": "integer", "format": "int64", "minimum": 1, "maximum": MAX_ID},
                OpenApiParameter.PATH,
                description="An id: 1 to 2^63-1 (anything else is a 404).",
            )
            for name in re.findall(r"{(\w+)}", self.path)
        ]
        return [*ids, *super().get_override_parameters()]

    def _handler(self) -> Any:
        return getattr(self.view, self.method.lower(), None)

    def error_codes(self) -> set[str]:
        """Every error code this operation can answer with."""
        codes = set(getattr(self._handler(), "error_codes", ()))
        codes |= {"not_acceptable", "internal_error"}
        authenticators = self.view.get_authenticators()
        if authenticators:
            codes.add("authentication_failed")
            if getattr(self.view, "acts_for_user", False) and not settings.CHAT_ALLOW_ANONYMOUS:
                codes.add("not_authenticated")
            if self.method not in SAFE_METHODS and any(
                isinstance(auth, SessionAuthentication) for auth in authenticators
            ):
                codes.add("permission_denied")  # CSRF
        if "{" in self.path:
            codes.add("not_found")
        if self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None:
            codes |= {"invalid", "parse_error", "request_too_large", "unsupported_media_type"}
        return codes

    def error_statuses(self) -> dict[int, list[str]]:
        by_status: dict[int, list[str]] = {}
        for code in sorted(self.error_codes()):
            by_status.setdefault(ERRORS[code][0], []).append(code)
        return dict(sorted(by_status.items()))

    def _error_response(self, status: int, codes: Iterable[str]) -> dict[str, Any]:
        codes = list(codes)
        narrowed = {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {
                        "status": {"type": "integer", "enum": [status]},
                        "code": {"type": "string", "enum": codes},
                    },
                }
            },
        }
        error_ref = self.resolve_serializer(ErrorSerializer, "response").ref
        response: dict[str, Any] = {
            "description": "; ".join(f"`{code}`: {describe(code)}" for code in codes) + ".",
            "content": {
                "application/json": {
                    "schema": {"allOf": [error_ref, narrowed]},
                    "example": error_example(status, codes[0]),
                }
            },
        }
        headers = {}
        if status in RETRY_AFTER_STATUSES:
            headers["Retry-After"] = {
                "schema": {"type": "integer", "minimum": 0},
                "required": RETRY_AFTER_STATUSES[status],
                "description": "Seconds to wait before trying again"
                + ("." if RETRY_AFTER_STATUSES[status] else " (when known)."),
            }
        if status == 401:
            headers["WWW-Authenticate"] = {
                "schema": {"type": "string"},
                "required": True,
                "description": 'The accepted schemes: `Token realm="api", Bearer realm="api"`.',
            }
        if headers:
            response["headers"] = headers
        return response

    def get_operation(self, path, path_regex, path_prefix, method, registry):
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if operation is None:
            return None
        responses = operation["responses"]
        for status, codes in self.error_statuses().items():
            responses[str(status)] = self._error_response(status, codes)
        operation["responses"] = dict(sorted(responses.items()))
        return operation
