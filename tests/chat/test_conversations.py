"""Conversations: context sent to the model, budget, parameters, regenerate, search, export."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from billing.prices import ModelPrice
from chat import tokens
from chat.models import Conversation, Message
from tests.conftest import JSON
from tests.factories import amake_message

pytestmark = pytest.mark.django_db(transaction=True)

CREATE_URL = "/api/messages/create/"


async def send(client, **body):
    return await client.post(CREATE_URL, json=body, headers=JSON)


async def test_a_message_without_conversation_starts_one_titled_from_the_prompt(api, fake_openai):
    response = await send(api, prompt_message="How do tides   work on Mars?")
    assert response.status_code == 201
    conversation_id = response.json()["conversation"]
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert conversation.title == "How do tides work on Mars?"

    long = "word " * 40
    other = await send(api, prompt_message=long)
    title = (await Conversation.objects.aget(pk=other.json()["conversation"])).title
    assert len(title) <= 61 and title.endswith("…") and title.startswith("word word")
    assert other.json()["conversation"] != conversation_id


async def test_three_turns_send_exactly_the_expected_messages(api, fake_openai):
    created = await api.post(
        "/api/conversations/",
        json={"title": "Trip", "system_prompt": "You are terse."},
        headers=JSON,
    )
    assert created.status_code == 201
    conversation = created.json()["id"]

    replies = []
    for prompt in ["First question", "Second question", "Third question"]:
        response = await send(api, prompt_message=prompt, conversation=conversation)
        assert response.status_code == 201
        assert response.json()["conversation"] == conversation
        replies.append(response.json())

    sent = [r.json["messages"] for r in fake_openai.chat_requests()]
    system = {"role": "system", "content": "You are terse."}
    assert sent[0] == [system, {"role": "user", "content": "First question"}]
    assert sent[1] == [
        system,
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "Echo: First question"},
        {"role": "user", "content": "Second question"},
    ]
    assert sent[2] == [
        system,
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "Echo: First question"},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "Echo: Second question"},
        {"role": "user", "content": "Third question"},
    ]
    assert replies[2]["context_message_ids"] == [replies[0]["id"], replies[1]["id"]]


async def test_streaming_in_a_conversation_sends_the_context_too(api, fake_openai):
    first = await send(api, prompt_message="one")
    conversation = first.json()["conversation"]
    response = await send(api, prompt_message="two", conversation=conversation, stream=True)
    assert response.status_code == 200
    assert "event: message" in response.text
    assert fake_openai.chat_requests()[-1].json["messages"] == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "Echo: one"},
        {"role": "user", "content": "two"},
    ]


async def test_failed_turns_are_not_sent_as_context(api, fake_openai):
    first = await send(api, prompt_message="kept")
    conversation = first.json()["conversation"]
    fake_openai.fail_next("500")
    failed = await send(api, prompt_message="lost", conversation=conversation)
    assert failed.status_code == 502
    await send(api, prompt_message="next", conversation=conversation)
    assert fake_openai.chat_requests()[-1].json["messages"] == [
        {"role": "user", "content": "kept"},
        {"role": "assistant", "content": "Echo: kept"},
        {"role": "user", "content": "next"},
    ]


def count_sent(messages, model="gpt-3.5-turbo") -> int:
    counter = tokens.counter_for_model(model)
    total = tokens.TOKENS_PER_REPLY
    for message in messages:
        total += tokens.TOKENS_PER_TURN + counter.count(message["content"])
    return total


async def test_a_long_conversation_is_cut_oldest_first_within_the_budget(
    api, fake_openai, settings
):
    settings.CHAT_CONTEXT_TOKEN_BUDGET = 120
    conversation = (
        await api.post(
            "/api/conversations/",
            json={"system_prompt": "Be brief."},
            headers=JSON,
        )
    ).json()["id"]
    ids = []
    for turn in range(12):
        prompt = f"Turn {turn}: tell me something about the number {turn}."
        response = await send(api, prompt_message=prompt, conversation=conversation)
        assert response.status_code == 201
        ids.append(response.json()["id"])

    last_sent = fake_openai.chat_requests()[-1].json["messages"]
    assert count_sent(last_sent) <= 120
    assert last_sent[0] == {"role": "system", "content": "Be brief."}
    assert last_sent[-1]["content"].startswith("Turn 11:")
    # What was kept is the most recent history, contiguous up to the new prompt.
    kept_prompts = [m["content"] for m in last_sent[1:-1] if m["role"] == "user"]
    assert kept_prompts, "some history fits in 120 tokens"
    first_kept = int(kept_prompts[0].split(":")[0].split()[1])
    assert kept_prompts == [
        f"Turn {t}: tell me something about the number {t}." for t in range(first_kept, 11)
    ]
    assert first_kept > 0  # the oldest turns were dropped
    # Every request stayed within the budget, and the record says what was sent.
    for request in fake_openai.chat_requests():
        assert count_sent(request.json["messages"]) <= 120
    last = await Message.objects.aget(pk=ids[-1])
    assert last.context_message_ids == ids[first_kept:11]


async def test_system_prompt_and_new_prompt_are_kept_even_over_budget(api, fake_openai, settings):
    settings.CHAT_CONTEXT_TOKEN_BUDGET = 10
    first = await send(api, prompt_message="earlier turn")
    conversation = first.json()["conversation"]
    await api.patch(
        f"/api/conversations/{conversation}/",
        json={"system_prompt": "A long system prompt " * 5},
        headers=JSON,
    )
    response = await send(api, prompt_message="new prompt " * 10, conversation=conversation)
    assert response.status_code == 201
    sent = fake_openai.chat_requests()[-1].json["messages"]
    assert [m["role"] for m in sent] == ["system", "user"]
    assert response.json()["context_message_ids"] == []


async def test_token_counts_are_cached_on_the_messages(api, fake_openai):
    first = await send(api, prompt_message="hello world")
    conversation = first.json()["conversation"]
    second = await send(api, prompt_message="again", conversation=conversation)
    # Counted once while building the context, and kept for later contexts.
    counted_on_insert = await Message.objects.aget(pk=second.json()["id"])
    assert counted_on_insert.prompt_token_count == tokens.count_text("again", model="gpt-3.5-turbo")
    stored = await Message.objects.aget(pk=first.json()["id"])
    assert stored.prompt_token_count == 2  # "hello world" in cl100k_base
    assert stored.response_token_count == tokens.count_text(
        "Echo: hello world", model="gpt-3.5-turbo"
    )


def test_token_counting_is_exact_offline_and_estimates_unknown_models():
    assert tokens.count_text("hello world", model="gpt-3.5-turbo") == 2
    assert tokens.counter_for_model("gpt-4o").encoding_name == "o200k_base"
    unknown = tokens.counter_for_model("some-local-model")
    assert not unknown.exact
    assert unknown.count("x" * 10) == 3


# --- Parameters -------------------------------------------------------------------------------


async def test_per_request_model_and_parameters_are_sent(api, fake_openai):
    response = await send(
        api, prompt_message="hi", model="gpt-4o-mini", temperature=0.2, max_tokens=50
    )
    assert response.status_code == 201
    body = response.json()
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("gpt-4o-mini", 0.2, 50)
    sent = fake_openai.chat_requests()[-1].json
    assert (sent["model"], sent["temperature"], sent["max_tokens"]) == ("gpt-4o-mini", 0.2, 50)


async def test_conversation_settings_apply_and_requests_override_them(api, fake_openai):
    conversation = (
        await api.post(
            "/api/conversations/",
            json={"model": "gpt-4o", "temperature": 1.5, "max_tokens": 99},
            headers=JSON,
        )
    ).json()["id"]
    await send(api, prompt_message="a", conversation=conversation)
    sent = fake_openai.chat_requests()[-1].json
    assert (sent["model"], sent["temperature"], sent["max_tokens"]) == ("gpt-4o", 1.5, 99)
    await send(api, prompt_message="b", conversation=conversation, temperature=0)
    assert fake_openai.chat_requests()[-1].json["temperature"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "gpt-9-ultra"}, "model"),
        ({"model": 5}, "model"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"conversation": "abc"}, "conversation"),
        ({"conversation": 987654}, "conversation"),
    ],
)
async def test_disallowed_parameters_are_a_400_naming_them(api, fake_openai, body, field):
    response = await send(api, prompt_message="hi", **body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert field in error["fields"]
    if field == "model" and body["model"] == "gpt-9-ultra":
        assert "gpt-9-ultra" in error["fields"]["model"][0]
    assert fake_openai.chat_requests() == []
    assert await Message.objects.acount() == 0


async def test_the_allow_list_comes_from_settings(api, fake_openai, settings):
    settings.OPENAI_ALLOWED_MODELS = ["gpt-3.5-turbo", "my-local-model"]
    settings.CHAT_MODEL_PRICES = {
        **settings.CHAT_MODEL_PRICES,
        "my-local-model": ModelPrice("my-local-model", Decimal(0), Decimal(0)),
    }
    ok = await send(api, prompt_message="hi", model="my-local-model")
    assert ok.status_code == 201
    refused = await send(api, prompt_message="hi", model="gpt-4o")
    assert refused.status_code == 400


# --- Conversation resource --------------------------------------------------------------------


async def test_conversation_crud(api, fake_openai):
    created = await api.post("/api/conversations/", json={"title": "Plans"}, headers=JSON)
    assert created.status_code == 201
    conversation = created.json()
    assert conversation["title"] == "Plans" and conversation["model"] == ""
    url = f"/api/conversations/{conversation['id']}/"

    renamed = await api.patch(
        url,
        json={"title": "Holiday plans", "model": "gpt-4o"},
        headers=JSON,
    )
    assert renamed.status_code == 200
    assert renamed.json()["title"] == "Holiday plans" and renamed.json()["model"] == "gpt-4o"
    bad = await api.patch(url, json={"model": "nope"}, headers=JSON)
    assert bad.status_code == 400 and "model" in bad.json()["error"]["fields"]

    assert (await api.get(url)).json()["title"] == "Holiday plans"
    await send(api, prompt_message="x", conversation=conversation["id"])
    messages = await api.get(f"{url}messages/")
    assert messages.json()["count"] == 1

    deleted = await api.delete(url)
    assert deleted.status_code == 204
    assert (await api.get(url)).status_code == 404
    assert await Message.objects.acount() == 0


async def test_conversations_are_listed_newest_activity_first(api, fake_openai):
    a = (await send(api, prompt_message="a")).json()["conversation"]
    b = (await send(api, prompt_message="b")).json()["conversation"]
    listing = (await api.get("/api/conversations/")).json()
    assert [c["id"] for c in listing["results"]] == [b, a]
    await send(api, prompt_message="a again", conversation=a)
    listing = (await api.get("/api/conversations/")).json()
    assert [c["id"] for c in listing["results"]] == [a, b]
    assert listing["count"] == 2


async def test_conversation_messages_are_in_order_and_404_for_unknown(api, fake_openai):
    first = await send(api, prompt_message="1")
    conversation = first.json()["conversation"]
    for prompt in ["2", "3"]:
        await send(api, prompt_message=prompt, conversation=conversation)
    await send(api, prompt_message="elsewhere")
    body = (await api.get(f"/api/conversations/{conversation}/messages/")).json()
    assert [m["prompt_message"] for m in body["results"]] == ["1", "2", "3"]
    missing = await api.get("/api/conversations/999999/messages/")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


# --- Regenerate -------------------------------------------------------------------------------


async def test_regenerate_replaces_the_reply_with_the_same_context_and_keeps_the_old(
    api, fake_openai
):
    first = await send(api, prompt_message="context")
    conversation = first.json()["conversation"]
    second = (await send(api, prompt_message="question", conversation=conversation)).json()
    original_context = fake_openai.chat_requests()[-1].json["messages"]

    fake_openai.reply = "A better answer"
    response = await api.post(f"/api/messages/{second['id']}/regenerate/", headers=JSON)

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == second["id"]
    assert body["response"] == "A better answer" and body["status"] == "completed"
    assert body["previous_replies"][0]["response"] == "Echo: question"
    assert fake_openai.chat_requests()[-1].json["messages"] == original_context
    assert await Message.objects.acount() == 2


async def test_a_failed_message_is_retried_by_regenerate(api, fake_openai):
    fake_openai.fail_next("503")
    failed = await send(api, prompt_message="try again")
    message_id = failed.json()["error"]["message_id"]
    response = await api.post(
        f"/api/messages/{message_id}/regenerate/",
        json={"model": "gpt-4o-mini"},
        headers=JSON,
    )
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "completed" and body["response"] == "Echo: try again"
    assert body["model"] == "gpt-4o-mini" and body["error"] is None
    assert body["previous_replies"][0]["status"] == "failed"


async def test_regenerate_can_stream(api, fake_openai):
    message = (await send(api, prompt_message="s")).json()
    response = await api.post(
        f"/api/messages/{message['id']}/regenerate/",
        json={"stream": True},
        headers=JSON,
    )
    body = response.text
    assert "event: message" in body and '"status":"completed"' in body


async def test_regenerating_a_message_still_generating_is_a_409(api, fake_openai):
    pending = await amake_message(status="streaming")
    response = await api.post(f"/api/messages/{pending.pk}/regenerate/", headers=JSON)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "message_in_progress"
    missing = await api.post("/api/messages/999999/regenerate/", headers=JSON)
    assert missing.status_code == 404


# --- Titles, search, export -------------------------------------------------------------------


async def test_titles_can_come_from_the_model(api, fake_openai, settings):
    settings.CHAT_TITLE_FROM_MODEL = True
    response = await send(api, prompt_message="Explain [[reply:Quantum basics]] to me")
    conversation = response.json()["conversation"]
    # The title call runs after the reply is stored; wait for it.
    from chat import generations

    for task in generations.pending_tasks():
        await task
    title = (await Conversation.objects.aget(pk=conversation)).title
    assert title == "Quantum basics"
    title_request = fake_openai.chat_requests()[-1].json
    assert title_request["messages"][0]["role"] == "system"
    assert title_request["max_tokens"] == 20


async def test_search_is_case_insensitive_over_prompts_and_replies(api, fake_openai):
    hello = (await send(api, prompt_message="Привет, мир!")).json()
    weather = (await send(api, prompt_message="weather [[reply:Sunny in BERLIN]]")).json()
    await send(api, prompt_message="unrelated")

    def ids(body):
        return [m["id"] for m in body["results"]]

    assert ids((await api.get("/api/messages/?search=привет")).json()) == [hello["id"]]
    assert ids((await api.get("/api/messages/?search=berlin")).json()) == [weather["id"]]
    conversation = hello["conversation"]
    filtered = (await api.get(f"/api/messages/?conversation={conversation}")).json()
    assert ids(filtered) == [hello["id"]]
    bad = await api.get("/api/messages/?conversation=abc")
    assert bad.status_code == 400 and "conversation" in bad.json()["error"]["fields"]


async def test_export_as_json_and_markdown(api, fake_openai):
    first = (await send(api, prompt_message="Export me")).json()
    conversation = first["conversation"]
    await send(api, prompt_message="And me", conversation=conversation)

    as_json = await api.get(f"/api/conversations/{conversation}/export/?format=json")
    assert as_json.status_code == 200
    assert "attachment" in as_json.headers["Content-Disposition"]
    data = json.loads(as_json.content)
    assert data["conversation"]["id"] == conversation
    assert [m["prompt_message"] for m in data["messages"]] == ["Export me", "And me"]

    as_md = await api.get(f"/api/conversations/{conversation}/export/?format=markdown")
    assert as_md.headers["Content-Type"].startswith("text/markdown")
    text = as_md.text
    assert text.startswith("# Export me")
    assert text.index("Export me") < text.index("Echo: Export me") < text.index("And me")

    bad = await api.get(f"/api/conversations/{conversation}/export/?format=pdf")
    assert bad.status_code == 400 and "format" in bad.json()["error"]["fields"]
