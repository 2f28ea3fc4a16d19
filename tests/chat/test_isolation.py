"""Users never see or touch each other's data: another user's id is answered exactly like an id
that does not exist (404, never 403, never a hint), and lists, searches, usage and idempotency
keys are per user.

The walk is data-driven: every route of chat/api/urls.py that takes an id, with every method
its view implements, must have a case below (test_every_id_route_and_method_is_walked), so a
new endpoint cannot be forgotten.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest
from django.urls import URLPattern, reverse

from chat.api import urls as api_urls
from chat.models import Conversation, Message
from tests.conftest import authenticated, error_of, parse_sse
from tests.factories import amake_token

pytestmark = pytest.mark.django_db(transaction=True)

CREATE_URL = "/api/messages/create/"
MISSING_ID = 999_999_999
# Words only A's data contains: B's answers must never include them.
SECRET = "zebra"
IMPLEMENTED = ("get", "post", "put", "patch", "delete")


def id_routes() -> dict[str, tuple[str, ...]]:
    """Route name -> the methods its view implements, for every route that takes an id."""
    routes = {}
    for pattern in api_urls.urlpatterns:
        assert isinstance(pattern, URLPattern)
        if not pattern.pattern.converters:
            continue
        view = pattern.callback.view_class
        routes[pattern.name] = tuple(m.upper() for m in IMPLEMENTED if hasattr(view, m))
    return routes


@dataclass
class AliceData:
    conversation: int
    message: int  # in `conversation`
    keyed: int  # sent with an Idempotency-Key
    streamed: int
    key: str
    keyed_body: dict


@dataclass(frozen=True)
class Case:
    """One request that names one of A's ids, and what A gets for it (the control)."""

    label: str
    route: str | None  # a route of chat/api/urls.py that takes the id in its path
    method: str
    ids: Callable[[AliceData], dict[str, int]]
    # The JSON body, given the ids: e.g. lambda ids: {"conversation": ids["conversation_id"]}.
    body: Callable[[dict[str, int]], dict] | None = None
    query: str = ""
    path: str | None = None  # for requests that take the id elsewhere (query, body)
    control_status: int = 200
    # B's answer: 404 not_found, except a body field, which is a 400 naming the field.
    status: int = 404
    code: str = "not_found"
    headers: dict[str, str] = field(default_factory=dict)

    def _ids(self, data: AliceData, missing: bool) -> dict[str, int]:
        return {k: MISSING_ID if missing else v for k, v in self.ids(data).items()}

    def url(self, data: AliceData, *, missing: bool = False) -> str:
        ids = self._ids(data, missing)
        path = reverse(self.route, kwargs=ids) if self.route else self.path
        return path + self.query.format(**ids)

    def payload(self, data: AliceData, *, missing: bool = False) -> dict | None:
        return None if self.body is None else self.body(self._ids(data, missing))


def message(data: AliceData) -> dict[str, int]:
    return {"message_id": data.message}


def streamed(data: AliceData) -> dict[str, int]:
    return {"message_id": data.streamed}


def conversation(data: AliceData) -> dict[str, int]:
    return {"conversation_id": data.conversation}


# Controls run in this order, after all of B's attempts: the DELETE comes last.
CASES = [
    Case("message detail", "message-detail", "GET", message),
    Case("message stream (finished)", "message-stream", "GET", streamed),
    Case("message stream (text/event-stream)", "message-stream", "GET", message,
         headers={"Accept": "text/event-stream"}),
    Case("regenerate", "message-regenerate", "POST", message),
    Case("regenerate streamed", "message-regenerate", "POST", streamed,
         body=lambda ids: {"stream": True}),
    Case("regenerate with settings", "message-regenerate", "POST", message,
         body=lambda ids: {"model": "gpt-4o-mini", "temperature": 0.5}),
    Case("cancel", "message-cancel", "POST", message),
    Case("conversation detail", "conversation-detail", "GET", conversation),
    Case("conversation update", "conversation-detail", "PATCH", conversation,
         body=lambda ids: {"title": "renamed", "system_prompt": "be someone else"}),
    Case("conversation messages", "conversation-messages", "GET", conversation),
    Case("conversation messages, a page", "conversation-messages", "GET", conversation,
         query="?page=1&page_size=1"),
    Case("export json", "conversation-export", "GET", conversation, query="?format=json"),
    Case("export markdown", "conversation-export", "GET", conversation, query="?format=markdown"),
    Case("message list ?conversation=", None, "GET", conversation, path="/api/messages/",
         query="?conversation={conversation_id}"),
    Case("search within ?conversation=", None, "GET", conversation, path="/api/messages/",
         query=f"?conversation={{conversation_id}}&search={SECRET}"),
    Case("send into the conversation", None, "POST", conversation, path=CREATE_URL,
         body=lambda ids: {"prompt_message": "my turn", "conversation": ids["conversation_id"]},
         control_status=201, status=400, code="invalid"),
    Case("conversation delete", "conversation-detail", "DELETE", conversation,
         control_status=204),
]  # fmt: skip


async def send(client: httpx.AsyncClient, case: Case, data: AliceData, *, missing: bool = False):
    body = case.payload(data, missing=missing)
    return await client.request(
        case.method,
        case.url(data, missing=missing),
        content=None if body is None else json.dumps(body),
        headers={"Content-Type": "application/json", **case.headers},
    )


def without_ids(text: str, *ids: int) -> str:
    for number in sorted(ids, key=lambda n: -len(str(n))):
        text = re.sub(rf"\b{number}\b", "<id>", text)
    return text


def test_every_id_route_and_method_is_walked():
    walked: dict[str, set[str]] = {}
    for case in CASES:
        if case.route:
            walked.setdefault(case.route, set()).add(case.method)
    routes = id_routes()
    assert set(routes) == set(walked), "a route that takes an id has no case in CASES"
    for route, methods in routes.items():
        assert set(methods) == walked[route], f"{route}: walk every method of its view"
    # The ids in query strings and bodies are walked too.
    assert {c.label for c in CASES if c.route is None} >= {
        "message list ?conversation=",
        "search within ?conversation=",
        "send into the conversation",
    }


async def _alice_data(alice: httpx.AsyncClient) -> AliceData:
    created = await alice.post(
        "/api/conversations/", json={"title": f"alpha {SECRET}", "system_prompt": "alpha system"}
    )
    assert created.status_code == 201, created.text
    conversation_id = created.json()["id"]
    first = await alice.post(
        CREATE_URL, json={"prompt_message": f"alpha {SECRET} one", "conversation": conversation_id}
    )
    assert first.status_code == 201, first.text
    keyed_body = {"prompt_message": f"alpha {SECRET} keyed"}
    keyed = await alice.post(CREATE_URL, json=keyed_body, headers={"Idempotency-Key": "key-1"})
    assert keyed.status_code == 201, keyed.text
    streamed = await alice.post(
        CREATE_URL, json={"prompt_message": f"alpha {SECRET} streamed", "stream": True}
    )
    assert streamed.status_code == 200
    [message_event] = [e for e in parse_sse(streamed.text) if e.event == "message"]
    assert message_event.data["status"] == "completed"
    return AliceData(
        conversation=conversation_id,
        message=first.json()["id"],
        keyed=keyed.json()["id"],
        streamed=message_event.data["id"],
        key="key-1",
        keyed_body=keyed_body,
    )


async def _snapshot() -> list[tuple]:
    return [
        row
        async for row in Message.objects.order_by("id").values_list(
            "id", "owner_id", "conversation_id", "prompt_message", "response", "status",
            "previous_replies", "model",
        )
    ] + [
        row
        async for row in Conversation.objects.order_by("id").values_list(
            "id", "owner_id", "title", "system_prompt", "model", "temperature"
        )
    ]  # fmt: skip


async def test_another_users_ids_are_not_found_and_change_nothing(api, fake_openai, settings):
    settings.CHAT_ALLOW_ANONYMOUS = False
    alice = authenticated(api, await amake_token("alice"))
    bob = authenticated(api, await amake_token("bob"))
    async with alice, bob:
        data = await _alice_data(alice)
        upstream_calls = len(fake_openai.chat_requests())
        before = await _snapshot()

        for case in CASES:
            theirs = await send(bob, case, data)
            missing = await send(bob, case, data, missing=True)
            where = f"{case.label}: {case.method} {case.url(data)}"
            assert theirs.status_code == case.status, (where, theirs.text)
            error = error_of(theirs)
            assert error["code"] == case.code, where
            assert SECRET not in theirs.text and "alpha" not in theirs.text, where
            # Exactly what an id that names nothing gets: not a byte more.
            assert missing.status_code == theirs.status_code, where
            alices_ids = [v for v in vars(data).values() if isinstance(v, int)]
            assert without_ids(theirs.text, *alices_ids) == without_ids(missing.text, MISSING_ID)
            assert set(theirs.headers) - {"content-length"} == set(missing.headers) - {
                "content-length"
            }, where

        # Nothing of A's changed, nothing reached the model.
        assert await _snapshot() == before
        assert len(fake_openai.chat_requests()) == upstream_calls

        # B's lists, searches and usage show nothing of A's.
        for path in [
            "/api/messages/",
            "/api/conversations/",
            f"/api/messages/?search={SECRET}",
            "/api/messages/?search=alpha",
        ]:
            listed = await bob.get(path)
            assert listed.status_code == 200, path
            assert listed.json()["count"] == 0 and listed.json()["results"] == [], path
        usage = (await bob.get("/api/usage/")).json()
        assert usage["user"]["username"] == "bob"
        assert usage["spent_usd"] == "0" and usage["days"] == []
        assert (await alice.get("/api/usage/")).json()["spent_usd"] != "0"

        # Controls: A can use every one of them (the DELETE last).
        for case in CASES:
            mine = await send(alice, case, data)
            assert mine.status_code == case.control_status, (case.label, mine.text)
        assert not await Conversation.objects.filter(pk=data.conversation).aexists()


async def test_an_idempotency_key_is_per_user(api, fake_openai, settings):
    settings.CHAT_ALLOW_ANONYMOUS = False
    alice = authenticated(api, await amake_token("alice"))
    bob = authenticated(api, await amake_token("bob"))
    async with alice, bob:
        data = await _alice_data(alice)
        calls = len(fake_openai.chat_requests())
        headers = {"Idempotency-Key": data.key}

        bobs = await bob.post(CREATE_URL, json=data.keyed_body, headers=headers)
        assert bobs.status_code == 201, bobs.text
        assert "Idempotent-Replayed" not in bobs.headers
        assert bobs.json()["id"] != data.keyed
        assert bobs.json()["conversation"] != data.conversation
        assert len(fake_openai.chat_requests()) == calls + 1  # the model was asked again
        stored = await Message.objects.select_related("owner").aget(pk=bobs.json()["id"])
        assert stored.owner.username == "bob"

        # Each replays their own.
        again = await bob.post(CREATE_URL, json=data.keyed_body, headers=headers)
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json()["id"] == bobs.json()["id"]
        alices = await alice.post(CREATE_URL, json=data.keyed_body, headers=headers)
        assert alices.headers["Idempotent-Replayed"] == "true"
        assert alices.json()["id"] == data.keyed
        assert len(fake_openai.chat_requests()) == calls + 1

        # B's search finds B's own message with those words, never A's.
        found = (await bob.get(f"/api/messages/?search={SECRET}")).json()
        assert [m["id"] for m in found["results"]] == [bobs.json()["id"]]
        # B's different body under the same key: 422 naming B's message, not A's.
        reused = await bob.post(CREATE_URL, json={"prompt_message": "other"}, headers=headers)
        assert reused.status_code == 422
        assert error_of(reused)["message_id"] == bobs.json()["id"]


async def test_anonymous_and_users_are_isolated_too(api, fake_openai, settings):
    settings.CHAT_ALLOW_ANONYMOUS = True
    mine = await api.post(CREATE_URL, json={"prompt_message": f"anonymous {SECRET}"})
    assert mine.status_code == 201
    async with authenticated(api, await amake_token("alice")) as alice:
        response = await alice.get(f"/api/messages/{mine.json()['id']}/")
        assert response.status_code == 404
        assert (await alice.get(f"/api/messages/?search={SECRET}")).json()["count"] == 0
        theirs = await alice.post(CREATE_URL, json={"prompt_message": f"alice {SECRET}"})
    response = await api.get(f"/api/messages/{theirs.json()['id']}/")
    assert response.status_code == 404
    listed = (await api.get(f"/api/messages/?search={SECRET}")).json()
    assert [m["id"] for m in listed["results"]] == [mine.json()["id"]]
