"""GET /api/messages/ and /api/messages/{id}/."""

from __future__ import annotations

import pytest
from django.utils import timezone

from chat.models import Message
from tests.factories import make_conversation

pytestmark = pytest.mark.django_db(transaction=True)


def make_messages(count: int) -> list[Message]:
    now = timezone.now()
    conversation = make_conversation()
    return Message.objects.bulk_create(
        Message(
            owner=conversation.owner,
            conversation=conversation,
            prompt_message=f"prompt {i}",
            response=f"reply {i}",
            status="completed",
            model="gpt-3.5-turbo",
            # Equal timestamps in pairs: the order must still be stable (by id).
            created_at=now + timezone.timedelta(seconds=i // 2),
        )
        for i in range(count)
    )


def test_empty_list_has_the_contract_envelope(client):
    response = client.get("/api/messages/")
    assert response.status_code == 200
    assert response.json() == {"count": 0, "next": None, "previous": None, "results": []}


def test_25_messages_are_listed_exactly_once_across_pages_oldest_first(client):
    created = make_messages(25)

    seen, url, pages = [], "/api/messages/", 0
    while url:
        response = client.get(url)
        assert response.status_code == 200
        body = response.json()
        assert body["count"] == 25
        seen.extend(body["results"])
        url, pages = body["next"], pages + 1

    assert pages == 2
    assert [m["id"] for m in seen] == [m.pk for m in created]
    first = seen[0]
    assert {"id", "prompt_message", "response", "created_at"} <= set(first)
    assert first["prompt_message"] == "prompt 0" and first["response"] == "reply 0"
    assert "timestamp" not in first


def test_page_size_is_honoured_and_capped(client):
    make_messages(120)
    assert len(client.get("/api/messages/?page_size=10").json()["results"]) == 10
    assert len(client.get("/api/messages/?page_size=1000").json()["results"]) == 100
    last = client.get("/api/messages/?page=2&page_size=100").json()
    assert len(last["results"]) == 20 and last["next"] is None and last["previous"]


def test_a_page_past_the_end_is_a_json_404(client):
    make_messages(3)
    response = client.get("/api/messages/?page=9")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_retrieve_one_message(client):
    [message] = make_messages(1)
    response = client.get(f"/api/messages/{message.pk}/")
    assert response.status_code == 200
    assert response.json()["id"] == message.pk
    assert response.json()["response"] == "reply 0"


def test_unknown_message_is_a_json_404(client):
    response = client.get("/api/messages/999999/")
    assert response.status_code == 404
    assert response.json()["error"] == {
        "status": 404,
        "code": "not_found",
        "message": "Message 999999 does not exist.",
    }


def test_unknown_url_is_a_json_404(client):
    response = client.get("/api/nope/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_list_is_read_only(client):
    response = client.post("/api/messages/", {}, content_type="application/json")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_representation_matches_declared_fields():
    """The hand-written fast representation agrees with DRF's generic rendering."""
    from rest_framework import serializers

    from chat.api.serializers import MessageSerializer

    message = make_messages(1)[0]
    message.refresh_from_db()
    fast = MessageSerializer(message).data
    generic = serializers.Serializer.to_representation(MessageSerializer(message), message)
    assert dict(fast) == dict(generic)


def test_health_and_readiness(client, settings):
    assert client.get("/healthz").json() == {"status": "ok"}
    settings.OPENAI_API_KEY = ""
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "database": "ok",
        "redis": "not_configured",
        "openai_configured": False,
    }
    settings.OPENAI_API_KEY = "k"
    assert client.get("/readyz").json()["openai_configured"] is True
