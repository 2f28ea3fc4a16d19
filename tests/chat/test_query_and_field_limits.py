"""Values the schema declares invalid are refused, and hand-made cursors are a 404, not a 500.

Found by `make test-schema` (schemathesis against the live service's /api/schema/): each of
these was accepted (or crashed) while the schema said otherwise.
"""

from __future__ import annotations

import base64

import pytest

from tests.factories import make_conversation, make_message

pytestmark = pytest.mark.django_db(transaction=True)

CREATE_URL = "/api/messages/create/"


def cursor(position: str) -> str:
    return base64.b64encode(f"p={position}".encode()).decode()


def error(response, status: int) -> dict:
    assert response.status_code == status, response.content
    return response.json()["error"]


@pytest.mark.parametrize(
    "position", ["abc", "99999999999999999999", "-1", "2024-13-45 00:00:00", "2024-01-01x"]
)
def test_a_cursor_whose_position_does_not_fit_is_a_404_not_a_500(client, position):
    conversation = make_conversation()
    make_message(conversation)
    for url in (
        "/api/messages/",  # ordered by created_at
        f"/api/messages/?conversation={conversation.pk}&",  # by id
        f"/api/conversations/{conversation.pk}/messages/",  # by id
    ):
        sep = "" if url.endswith("&") else "?"
        response = client.get(f"{url}{sep}cursor={cursor(position)}")
        assert error(response, 404)["code"] == "not_found", url


def test_real_cursors_still_page(client):
    conversation = make_conversation()
    for _ in range(3):
        make_message(conversation)
    for url in (
        "/api/messages/?cursor=&page_size=2",
        f"/api/conversations/{conversation.pk}/messages/?cursor=&page_size=2",
    ):
        first = client.get(url).json()
        second = client.get(first["next"]).json()
        assert len(first["results"]) == 2 and len(second["results"]) == 1


@pytest.mark.parametrize("value", ["0", "-1", "abc", "", "1.5", "\u0661", "99999999999999999999"])
def test_page_and_page_size_must_be_positive_integers(client, value):
    for param in ("page", "page_size"):
        for url in ("/api/messages/", "/api/conversations/", "/api/messages/?cursor="):
            if param == "page" and "cursor" in url:
                continue
            sep = "&" if "?" in url else "?"
            response = client.get(f"{url}{sep}{param}={value}")
            assert param in error(response, 400)["fields"], (url, param)


def test_a_page_past_the_end_is_a_404_and_large_pages_are_capped(client):
    make_message()
    assert error(client.get("/api/messages/?page=2"), 404)["code"] == "not_found"
    assert client.get("/api/messages/?page=1&page_size=1000").status_code == 200
    assert error(client.get("/api/messages/?page=last"), 400)["fields"]["page"]


def test_an_empty_conversation_filter_is_invalid(client):
    assert "conversation" in error(client.get("/api/messages/?conversation="), 400)["fields"]


def test_empty_usage_dates_are_invalid(client):
    for param in ("from", "to"):
        assert param in error(client.get(f"/api/usage/?{param}="), 400)["fields"]
    assert client.get("/api/usage/?from=2026-01-01&to=2026-01-31").status_code == 200


def test_search_limits_apply_to_the_term_as_sent(client, settings):
    settings.CHAT_SEARCH_MAX_LENGTH = 5
    # Over the limit with its spaces, even if it is shorter once trimmed.
    assert "search" in error(client.get("/api/messages/", {"search": "  abc  "}), 400)["fields"]
    assert client.get("/api/messages/", {"search": " abc "}).status_code == 200
    # NUL cannot be searched for (PostgreSQL's text cannot hold it: it used to be a 500 there).
    assert "search" in error(client.get("/api/messages/", {"search": "a\x00"}), 400)["fields"]


def test_string_lengths_apply_to_the_string_as_sent(client):
    padded = " " * 10 + "t" * 195  # 205 characters, 195 once trimmed
    response = client.post(
        "/api/conversations/", {"title": padded}, content_type="application/json"
    )
    assert "title" in error(response, 400)["fields"]
    response = client.post(
        "/api/conversations/", {"title": " " * 201}, content_type="application/json"
    )
    assert "title" in error(response, 400)["fields"]
    ok = client.post("/api/conversations/", {"title": " " * 200}, content_type="application/json")
    assert ok.status_code == 201 and ok.json()["title"] == ""


def test_an_idempotency_key_is_bounded_as_sent(client):
    response = client.post(
        CREATE_URL,
        {"prompt_message": "hi"},
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY=" " + "k" * 255,
    )
    assert "Idempotency-Key" in error(response, 400)["fields"]


def test_models_not_allowed_are_named_in_the_error(client, settings):
    settings.OPENAI_ALLOWED_MODELS = ["gpt-4o"]
    settings.OPENAI_MODEL = "gpt-4o"
    response = client.post(
        CREATE_URL, {"prompt_message": "hi", "model": "x" * 150}, content_type="application/json"
    )
    assert "not allowed" in error(response, 400)["fields"]["model"][0]
    response = client.post("/api/conversations/", {"model": 3}, content_type="application/json")
    assert error(response, 400)["fields"]["model"] == ["Must be a string."]
