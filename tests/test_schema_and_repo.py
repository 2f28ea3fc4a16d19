"""The OpenAPI schema, the docs page, and the repository's hygiene."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# OpenAI secret keys: "sk-" (optionally "sk-proj-" etc.) then a long run of key characters.
KEY_SHAPED = re.compile(r"sk-(?:[A-Za-z0-9]+-)?[A-Za-z0-9_\-]{20,}")


@pytest.mark.django_db
def test_schema_documents_the_contract(client):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    schema = response.json()
    paths = schema["paths"]
    assert "post" in paths["/api/messages/create/"]
    assert "get" in paths["/api/messages/"]
    assert "/api/messages/{message_id}/" in paths
    message = schema["components"]["schemas"]["Message"]["properties"]
    assert {"id", "prompt_message", "response", "created_at"} <= set(message)
    text = response.content.decode()
    assert "Привет!" in text  # the contract's example
    assert "created_at" in schema["info"]["description"]


@pytest.mark.django_db
def test_swagger_ui_is_served(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


def test_no_tracked_file_contains_an_openai_key():
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert files, "git ls-files returned nothing"
    offenders = []
    for name in files:
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        if KEY_SHAPED.search(text):
            offenders.append(name)
    assert offenders == []


def test_the_key_detector_detects_keys():
    fake = "sk-" + "proj-" + "A1b2" * 10
    assert KEY_SHAPED.search(fake)
    assert not KEY_SHAPED.search("test-key sk-short")


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    import os
    import sys

    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", **env},
        capture_output=True,
        text=True,
    )


def test_https_production_settings_pass_the_deploy_check():
    secret = "x9" * 30 + "-a-long-random-looking-secret-for-this-test-only"
    result = _manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_HTTPS="true",
        DJANGO_SECRET_KEY=secret,
        DJANGO_DEBUG="false",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_https_without_a_secret_key_refuses_to_start():
    result = _manage("check", DJANGO_HTTPS="true", DJANGO_SECRET_KEY="")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr


# --- The schema tells the truth (make test-schema checks the live service against it) ----------


def _schema(client) -> dict:
    response = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    return response.json()


def _operations(schema: dict):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def _codes(response: dict) -> tuple[list[int], list[str]]:
    """The status and code enums of a documented error response."""
    schema = response["content"]["application/json"]["schema"]
    assert schema["allOf"][0] == {"$ref": "#/components/schemas/Error"}
    narrowed = schema["allOf"][1]["properties"]["error"]["properties"]
    return narrowed["status"]["enum"], narrowed["code"]["enum"]


@pytest.mark.django_db
def test_every_operation_documents_its_errors_in_the_one_error_shape(client):
    from chat.api.schema import CODE_DESCRIPTIONS, ERRORS

    assert set(CODE_DESCRIPTIONS) == set(ERRORS)
    schema = _schema(client)
    error = schema["components"]["schemas"]["ErrorDetail"]
    assert set(error["required"]) == {"status", "code", "message"}
    assert {"fields", "message_id", "retry_after", "upstream_status", "limit"} <= set(
        error["properties"]
    )
    assert {"budget_usd", "spent_usd", "reserved_usd", "remaining_usd", "required_usd"} <= set(
        error["properties"]
    )
    assert "resets_at" in error["properties"]
    operations = list(_operations(schema))
    assert len(operations) == 17
    for path, method, operation in operations:
        statuses = {int(status) for status in operation["responses"]}
        label = f"{method.upper()} {path}"
        assert any(400 <= s < 500 for s in statuses), label
        assert 500 in statuses and 406 in statuses, label
        for status, response in operation["responses"].items():
            if int(status) < 400:
                continue
            documented_statuses, codes = _codes(response)
            assert documented_statuses == [int(status)], label
            assert codes and all(ERRORS[code][0] == int(status) for code in codes), label
            assert all(f"`{code}`" in response["description"] for code in codes), label
        if "{" in path:
            assert _codes(operation["responses"]["404"])[1] == ["not_found"], label
        if method in ("post", "patch", "delete"):
            assert "403" in operation["responses"], label  # CSRF of session writes


@pytest.mark.django_db
def test_the_schema_lists_the_error_codes_of_an_operation(client):
    responses = _schema(client)["paths"]["/api/messages/create/"]["post"]["responses"]
    codes = {
        status: _codes(response)[1] for status, response in responses.items() if status >= "400"
    }
    assert codes["400"] == ["invalid", "parse_error"]
    assert codes["401"] == ["authentication_failed"]
    assert codes["403"] == ["permission_denied"]
    assert codes["413"] == ["request_too_large"]
    assert codes["415"] == ["unsupported_media_type"]
    assert codes["422"] == ["idempotency_key_reused"]
    assert codes["429"] == ["budget_exceeded", "rate_limited", "too_many_concurrent"]
    assert "openai_not_configured" in codes["503"] and "generation_interrupted" in codes["503"]
    assert "upstream_rate_limited" in codes["503"]
    assert codes["504"] == ["upstream_timeout"]
    assert {"upstream_unavailable", "upstream_bad_response", "upstream_truncated"} <= set(
        codes["502"]
    )
    assert "404" not in codes and "409" not in codes
    assert responses["429"]["headers"]["Retry-After"]["required"] is True
    assert responses["503"]["headers"]["Retry-After"]["required"] is False
    assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True
    assert "Idempotent-Replayed" in responses["201"]["headers"]

    regenerate = _schema(client)["paths"]["/api/messages/{message_id}/regenerate/"]["post"]
    assert _codes(regenerate["responses"]["409"])[1] == ["message_in_progress"]
    probe = _schema(client)["paths"]["/readyz"]["get"]
    assert _codes(probe["responses"]["503"])[1] == ["database_unavailable", "redis_unavailable"]
    assert "401" not in probe["responses"] and probe["security"] == [{}]


@pytest.mark.django_db
def test_enums_and_limits_follow_the_settings(client, settings):
    settings.OPENAI_MODEL = "gpt-4o"
    settings.OPENAI_ALLOWED_MODELS = ["gpt-4o", "local-llama"]
    settings.CHAT_MAX_PROMPT_CHARS = 1234
    settings.CHAT_MAX_COMPLETION_TOKENS = 77
    settings.CHAT_SEARCH_MAX_LENGTH = 33
    schema = _schema(client)
    components = schema["components"]["schemas"]
    assert components["ModelEnum"]["enum"] == ["gpt-4o", "local-llama"]
    create = components["MessageCreateRequest"]["properties"]
    assert create["model"] == {"$ref": "#/components/schemas/ModelEnum"} or create["model"][
        "allOf"
    ] == [{"$ref": "#/components/schemas/ModelEnum"}]
    prompt = create["prompt_message"]
    assert prompt["maxLength"] == 1234 and prompt["minLength"] == 1
    assert create["max_tokens"]["maximum"] == 77 and create["max_tokens"]["minimum"] == 1
    assert create["temperature"]["minimum"] == 0 and create["temperature"]["maximum"] == 2
    assert create["conversation"]["maximum"] == 2**63 - 1
    # What was stored under an earlier configuration is not bound by today's settings.
    stored = components["Conversation"]["properties"]
    assert stored["model"]["type"] == "string" and "enum" not in stored["model"]
    assert "maximum" not in stored["max_tokens"]
    # A conversation's model may also be blank (the server default).
    conversation_model = components["ConversationRequest"]["properties"]["model"]["oneOf"]
    assert {"$ref": "#/components/schemas/BlankEnum"} in conversation_model
    parameters = {p["name"]: p for p in schema["paths"]["/api/messages/"]["get"]["parameters"]}
    assert parameters["search"]["schema"]["oneOf"][0]["maxLength"] == 33
    assert parameters["page_size"]["schema"]["minimum"] == 1
    assert parameters["page"]["schema"]["minimum"] == 1
    assert {"conversation", "cursor", "page", "page_size", "search"} == set(parameters)
    export = schema["paths"]["/api/conversations/{conversation_id}/export/"]["get"]
    export_parameters = {p["name"]: p for p in export["parameters"]}
    assert export_parameters["format"]["schema"]["enum"] == ["json", "markdown"]
    assert export_parameters["conversation_id"]["schema"] == {
        "type": "integer",
        "format": "int64",
        "minimum": 1,
        "maximum": 2**63 - 1,
    }
    header = schema["paths"]["/api/messages/create/"]["post"]["parameters"][0]
    assert header["name"] == "Idempotency-Key" and header["in"] == "header"
    assert (header["schema"]["minLength"], header["schema"]["maxLength"]) == (1, 255)


@pytest.mark.django_db
def test_the_prompt_pattern_is_what_the_server_calls_blank(settings):
    import re
    import sys

    from chat.api.schema import NON_BLANK_PATTERN, WHITESPACE_CLASS

    whitespace = re.compile(f"[{WHITESPACE_CLASS}]")
    every = (chr(c) for c in range(sys.maxunicode + 1))
    assert [c for c in every if bool(whitespace.fullmatch(c)) != c.isspace()] == []
    pattern = re.compile(NON_BLANK_PATTERN)
    for text, valid in [("hi", True), (" \u3000\x1f\n", False), ("a\x00", False), ("\ufeff", True)]:
        assert bool(pattern.search(text)) is valid, text
        assert bool(text.strip() and "\x00" not in text) is valid, text


@pytest.mark.django_db
def test_security_documents_tokens_and_follows_anonymous_use(client, settings):
    schema = _schema(client)
    schemes = schema["components"]["securitySchemes"]
    assert schemes["tokenAuth"]["type"] == "apiKey" and schemes["tokenAuth"]["in"] == "header"
    assert "Token <key>" in schemes["tokenAuth"]["description"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    listing = schema["paths"]["/api/messages/"]["get"]
    assert listing["security"] == [
        {"tokenAuth": []},
        {"bearerAuth": []},
        {"cookieAuth": []},
        {},
    ]
    assert _codes(listing["responses"]["401"])[1] == ["authentication_failed"]

    settings.CHAT_ALLOW_ANONYMOUS = False
    listing = _schema(client)["paths"]["/api/messages/"]["get"]
    assert {} not in listing["security"]
    assert _codes(listing["responses"]["401"])[1] == ["authentication_failed", "not_authenticated"]


@pytest.mark.django_db
def test_event_streams_and_lists_are_documented(client):
    from chat.api.serializers import ServerSentEventSerializer

    schema = _schema(client)
    components = schema["components"]["schemas"]
    for path, method, status in [
        ("/api/messages/create/", "post", "200"),
        ("/api/messages/{message_id}/regenerate/", "post", "200"),
        ("/api/messages/{message_id}/stream/", "get", "200"),
    ]:
        response = schema["paths"][path][method]["responses"][status]
        stream = response["content"]["text/event-stream"]
        assert stream["schema"] == {"$ref": "#/components/schemas/ServerSentEvent"}
        assert "keep-alive" in response["description"]
    event = components["ServerSentEvent"]["properties"]["event"]
    events = components[event["$ref"].rsplit("/", 1)[1]]["enum"]
    assert events == list(ServerSentEventSerializer().fields["event"].choices)
    assert set(events) == {"start", "delta", "message", "error"}
    assert set(components["ServerSentEvent"]["required"]) == {"event", "data"}

    listing = schema["paths"]["/api/messages/"]["get"]["responses"]["200"]
    assert listing["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MessageList"
    }
    one_of = components["MessageList"]["oneOf"]
    pages = [components[item["$ref"].rsplit("/", 1)[1]] for item in one_of]
    assert set(pages[0]["required"]) == {"count", "next", "previous", "results"}
    assert "CHAT_LIST_EXACT_COUNT_LIMIT" in pages[0]["properties"]["count"]["description"]
    assert set(pages[1]["required"]) == {"next", "previous", "results"}
    assert pages[1]["not"] == {"required": ["count"]}
    for path in ("/healthz", "/readyz"):
        assert "200" in schema["paths"][path]["get"]["responses"]


async def test_answered_error_codes_are_the_documented_ones(api, transactional_db):
    """A few errors the service answers, each found in the schema of its operation."""
    schema = (await api.get("/api/schema/", headers={"Accept": "application/json"})).json()
    cases = [
        ("get", "/api/models/", "/api/models/", {"Accept": "text/html"}, None),
        (
            "post",
            "/api/conversations/",
            "/api/conversations/",
            {"Content-Type": "text/plain"},
            b"x",
        ),
        (
            "post",
            "/api/conversations/",
            "/api/conversations/",
            {"Content-Type": "application/json"},
            b"{",
        ),
        ("get", "/api/messages/?page_size=0", "/api/messages/", {}, None),
        ("get", "/api/messages/?page=9", "/api/messages/", {}, None),
        ("get", "/api/usage/?to=", "/api/usage/", {}, None),
        ("get", "/api/messages/7/", "/api/messages/{message_id}/", {}, None),
        ("get", "/api/messages/", "/api/messages/", {"Authorization": "Bearer nope"}, None),
    ]
    huge = b'{"title": "' + b"x" * 3_000_000 + b'"}'
    cases.append(
        (
            "post",
            "/api/conversations/",
            "/api/conversations/",
            {"Content-Type": "application/json"},
            huge,
        )
    )
    for method, url, path, headers, body in cases:
        response = await api.request(method.upper(), url, headers=headers, content=body)
        error = response.json()["error"]
        documented = schema["paths"][path][method]["responses"][str(response.status_code)]
        assert error["code"] in _codes(documented)[1], (url, error)


def test_the_hooks_know_the_usage_span():
    from chat.api.views import USAGE_MAX_DAYS
    from tests.schema.hooks import USAGE_MAX_DAYS as HOOKS_USAGE_MAX_DAYS

    assert HOOKS_USAGE_MAX_DAYS == USAGE_MAX_DAYS


def test_a_session_write_without_its_csrf_token_is_the_documented_403(transactional_db):
    from django.contrib.auth import get_user_model
    from django.test import Client

    schema = _schema(Client())
    client = Client(enforce_csrf_checks=True)
    client.force_login(get_user_model().objects.create_user("csrf-user"))
    response = client.post("/api/conversations/", {}, content_type="application/json")
    error = response.json()["error"]
    documented = schema["paths"]["/api/conversations/"]["post"]["responses"]["403"]
    assert response.status_code == 403 and error["code"] in _codes(documented)[1]
