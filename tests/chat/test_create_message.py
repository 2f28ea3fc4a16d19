"""POST /api/messages/create/: the contract, validation and upstream failures."""

from __future__ import annotations

import json

import pytest

from chat.models import Message
from tests.conftest import JSON, error_of

pytestmark = pytest.mark.django_db(transaction=True)

CREATE_URL = "/api/messages/create/"


async def post_json(client, body, **kwargs):
    payload = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return await client.post(CREATE_URL, content=payload, headers=JSON, **kwargs)


async def test_create_returns_the_contract_fields_and_stores_prompt_and_reply(api, fake_openai):
    response = await post_json(api, {"prompt_message": "Привет!"})

    assert response.status_code == 201
    body = response.json()
    assert {"id", "prompt_message", "response", "created_at"} <= set(body)
    assert body["prompt_message"] == "Привет!"
    assert body["response"] == "Echo: Привет!"
    assert body["created_at"].endswith("Z")
    assert body["status"] == "completed"
    assert body["model"] == "gpt-3.5-turbo"
    assert body["usage"]["completion_tokens"] > 0
    assert body["usage"]["total_tokens"] == (
        body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )

    stored = await Message.objects.aget(pk=body["id"])
    assert stored.prompt_message == "Привет!"
    assert stored.response == "Echo: Привет!"
    assert stored.latency_ms is not None

    [sent] = fake_openai.chat_requests()
    assert sent.json["model"] == "gpt-3.5-turbo"
    assert sent.json["messages"] == [{"role": "user", "content": "Привет!"}]
    assert sent.headers["authorization"] == "Bearer test-key"


async def test_the_model_comes_from_settings(api, fake_openai, settings):
    settings.OPENAI_MODEL = "gpt-4o-mini"
    response = await post_json(api, {"prompt_message": "hi"})
    assert response.status_code == 201
    assert response.json()["model"] == "gpt-4o-mini"
    assert fake_openai.chat_requests()[0].json["model"] == "gpt-4o-mini"


async def test_the_prompt_is_sent_verbatim_with_its_whitespace(api, fake_openai):
    response = await post_json(api, {"prompt_message": "  two  spaces \n"})
    assert response.status_code == 201
    assert response.json()["prompt_message"] == "  two  spaces \n"
    assert fake_openai.chat_requests()[0].json["messages"][0]["content"] == "  two  spaces \n"


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        ({}, "required"),
        ({"prompt_message": None}, "null"),
        ({"prompt_message": 42}, "string"),
        ({"prompt_message": 4.2}, "string"),
        ({"prompt_message": True}, "string"),
        ({"prompt_message": ["hi"]}, "string"),
        ({"prompt_message": {"text": "hi"}}, "string"),
        ({"prompt_message": ""}, "blank"),
        ({"prompt_message": "   \n\t"}, "blank"),
        ({"prompt_message": "hi", "stream": "yes"}, "true or false"),
    ],
    ids=["missing", "null", "int", "float", "bool", "list", "object", "empty", "blank", "stream"],
)
async def test_invalid_prompt_is_a_400_naming_the_field(api, fake_openai, body, message_part):
    response = await post_json(api, body)

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid"
    field = "stream" if "stream" in body else "prompt_message"
    assert field in error["fields"]
    assert message_part in " ".join(error["fields"][field]).lower()
    assert field in error["message"]
    assert await Message.objects.acount() == 0
    assert fake_openai.chat_requests() == []


async def test_too_long_prompt_is_a_400(api, fake_openai, settings):
    settings.CHAT_MAX_PROMPT_CHARS = 10
    response = await post_json(api, {"prompt_message": "x" * 11})
    assert response.status_code == 400
    error = error_of(response)
    assert "10 characters" in error["fields"]["prompt_message"][0]
    ok = await post_json(api, {"prompt_message": "x" * 10})
    assert ok.status_code == 201


@pytest.mark.parametrize(
    "raw",
    [
        '{"prompt_message": "hi"',
        "not json",
        '["hi"]',
        "42",
        '{"prompt_message": NaN}',
        b'{"prompt_message": "\xff"}',  # not UTF-8
    ],
)
async def test_body_that_is_not_a_json_object_is_a_400(api, fake_openai, raw):
    response = await post_json(api, raw)
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] in {"parse_error", "invalid"}
    assert await Message.objects.acount() == 0


async def test_form_body_is_a_415(api, fake_openai):
    response = await api.post(CREATE_URL, data={"prompt_message": "hi"})
    assert response.status_code == 415
    assert error_of(response)["code"] == "unsupported_media_type"


@pytest.mark.parametrize("method", ["get", "put", "patch", "delete"])
async def test_wrong_method_is_a_405(api, fake_openai, method):
    response = await getattr(api, method)(CREATE_URL)
    assert response.status_code == 405
    assert error_of(response)["code"] == "method_not_allowed"


async def test_without_an_api_key_sending_is_a_503_and_listing_works(api, fake_openai, settings):
    settings.OPENAI_API_KEY = ""
    response = await post_json(api, {"prompt_message": "hi"})
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "openai_not_configured"
    assert "OPENAI_API_KEY" in error["message"]
    listing = await api.get("/api/messages/")
    assert listing.status_code == 200
    # The prompt is kept, failed, and goes through once a key is configured.
    [kept] = listing.json()["results"]
    assert kept["id"] == error["message_id"] and kept["status"] == "failed"
    assert kept["error"]["code"] == "openai_not_configured"
    assert fake_openai.chat_requests() == []
    settings.OPENAI_API_KEY = "test-key"
    retried = await api.post(f"/api/messages/{kept['id']}/regenerate/", headers=JSON)
    assert retried.status_code == 200 and retried.json()["response"] == "Echo: hi"


@pytest.mark.parametrize(
    ("fault", "kwargs", "status", "code"),
    [
        ("429", {"retry_after": 7}, 503, "upstream_rate_limited"),
        ("429", {}, 503, "upstream_rate_limited"),
        ("500", {}, 502, "upstream_unavailable"),
        ("503", {}, 502, "upstream_unavailable"),
        ("401", {}, 502, "upstream_auth_failed"),
        ("400", {}, 502, "upstream_rejected"),
        ("malformed", {}, 502, "upstream_bad_response"),
        ("drop", {}, 502, "upstream_unavailable"),
        ("timeout", {"delay": 3}, 504, "upstream_timeout"),
    ],
)
async def test_upstream_failure_maps_to_a_json_error_and_keeps_the_prompt(
    api, fake_openai, settings, http_client, fault, kwargs, status, code
):
    settings.OPENAI_TIMEOUT = 0.5
    fake_openai.fail_next(fault, **kwargs)

    response = await post_json(api, {"prompt_message": "keep me"})

    assert response.status_code == status
    error = error_of(response)
    assert error["code"] == code
    if fault == "429" and kwargs:
        assert response.headers["Retry-After"] == "7"
        assert error["retry_after"] == 7
    elif fault == "429":
        assert "Retry-After" not in response.headers
    assert "test-key" not in response.text

    stored = await Message.objects.aget(pk=error["message_id"])
    assert stored.prompt_message == "keep me"
    assert stored.status == "failed"
    assert stored.error_code == code

    detail = await api.get(f"/api/messages/{stored.pk}/")
    assert detail.json()["status"] == "failed"
    assert detail.json()["error"]["code"] == code


async def test_upstream_rejecting_our_key_says_so_without_the_key(api, fake_openai):
    fake_openai.fail_next("401")
    response = await post_json(api, {"prompt_message": "hi"})
    error = error_of(response)
    assert "API key" in error["message"]
    assert "test-key" not in json.dumps(error) and "-key" not in json.dumps(error)


async def test_transient_failures_are_retried_within_the_budget(api, fake_openai, settings):
    settings.OPENAI_MAX_RETRIES = 2
    fake_openai.fail_next("503", count=1)
    fake_openai.fail_next("drop", count=1)
    response = await post_json(api, {"prompt_message": "eventually"})
    assert response.status_code == 201
    assert response.json()["response"] == "Echo: eventually"
    assert len(fake_openai.chat_requests()) == 3
    assert await Message.objects.acount() == 1


async def test_a_retry_after_longer_than_the_timeout_is_not_waited_for(api, fake_openai, settings):
    settings.OPENAI_MAX_RETRIES = 2
    settings.OPENAI_TIMEOUT = 2
    fake_openai.fail_next("429", retry_after=30)
    response = await post_json(api, {"prompt_message": "hi"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "30"
    assert len(fake_openai.chat_requests()) == 1
