"""Streaming (`"stream": true`), re-attaching, idempotency and lifecycle, in process."""

from __future__ import annotations

import asyncio
import json

import pytest
from django.utils import timezone

from chat import generations
from chat.models import Message
from chat.services import lifecycle, messages
from tests.conftest import JSON, parse_sse
from tests.factories import amake_message

pytestmark = pytest.mark.django_db(transaction=True)

CREATE_URL = "/api/messages/create/"


async def post_stream(client, body, headers=None):
    return await client.post(CREATE_URL, json={**body, "stream": True}, headers=headers)


async def test_a_streamed_reply_is_sent_in_deltas_and_stored_whole(api, fake_openai, http_client):
    fake_openai.stream_chunks = 6
    fake_openai.latency = 0.3
    response = await post_stream(api, {"prompt_message": "stream this please"})

    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    names = [e.event for e in events]
    assert names[0] == "start" and names[-1] == "message"
    assert names.count("delta") >= 5
    start, final = events[0].data, events[-1].data
    assert start["status"] in {"pending", "streaming"} and start["response"] == ""
    text = "".join(e.data["content"] for e in events if e.event == "delta")
    assert text == "Echo: stream this please"
    assert final["id"] == start["id"]
    assert final["response"] == text and final["status"] == "completed"
    assert final["usage"]["completion_tokens"] > 0

    stored = await Message.objects.aget(pk=start["id"])
    assert stored.response == text and stored.status == "completed"
    assert stored.completion_tokens == final["usage"]["completion_tokens"]
    [sent] = fake_openai.chat_requests()
    assert sent.json["stream"] is True
    assert sent.json["stream_options"] == {"include_usage": True}


async def test_accept_event_stream_also_streams(api, fake_openai):
    response = await api.post(
        CREATE_URL,
        json={"prompt_message": "hi"},
        headers={"Accept": "text/event-stream"},
    )
    assert response.status_code == 200
    events = parse_sse(response.text)
    assert events[-1].event == "message"


async def test_validation_errors_are_json_even_when_asking_for_a_stream(api, fake_openai):
    response = await api.post(
        CREATE_URL, content="{}", headers={**JSON, "Accept": "text/event-stream"}
    )
    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    assert "prompt_message" in response.json()["error"]["fields"]


async def test_an_upstream_error_becomes_an_error_event_and_the_prompt_is_kept(api, fake_openai):
    fake_openai.fail_next("500")
    events = parse_sse((await post_stream(api, {"prompt_message": "x"})).text)
    assert [e.event for e in events] == ["start", "error"]
    error = events[-1].data["error"]
    assert error["code"] == "upstream_unavailable" and error["status"] == 502
    stored = await Message.objects.aget(pk=error["message_id"])
    assert stored.status == "failed" and stored.prompt_message == "x"


async def test_a_stream_cut_without_finish_reason_is_stored_as_truncated(
    api, fake_openai, http_client
):
    fake_openai.stream_chunks = 10
    fake_openai.fail_next("cut")
    body = (await post_stream(api, {"prompt_message": "a b c d e f"})).text
    events = parse_sse(body)
    assert events[-1].event == "error"
    assert events[-1].data["error"]["code"] == "upstream_truncated"
    partial = "".join(e.data["content"] for e in events if e.event == "delta")
    assert partial and partial != "Echo: a b c d e f"
    assert "Echo: a b c d e f".startswith(partial)
    stored = await Message.objects.aget(pk=events[0].data["id"])
    assert stored.status == "truncated"
    assert stored.response == partial


async def test_partial_text_is_saved_while_streaming(anonymous, api, fake_openai, settings):
    settings.CHAT_STREAM_SAVE_INTERVAL = 0.1
    fake_openai.latency = 1.0
    fake_openai.stream_chunks = 10
    started = await messages.message_start(
        owner=anonymous, prompt="one two three four five six", stream=True
    )
    await asyncio.sleep(0.5)
    midway = await Message.objects.aget(pk=started.message.pk)
    assert midway.status == "streaming"
    assert 0 < len(midway.response) < len("Echo: one two three four five six")
    await generations.get(started.message.pk).wait()
    final = await Message.objects.aget(pk=started.message.pk)
    assert final.status == "completed" and final.response == "Echo: one two three four five six"


async def test_reattach_replays_then_follows_live(anonymous, api, fake_openai):
    fake_openai.latency = 0.6
    fake_openai.stream_chunks = 6
    started = await messages.message_start(
        owner=anonymous, prompt="follow me closely now", stream=True
    )
    await asyncio.sleep(0.25)  # some deltas are out already

    response = await api.get(f"/api/messages/{started.message.pk}/stream/")
    assert response.status_code == 200
    events = parse_sse(response.text)

    assert events[0].event == "start"
    deltas = [e.data["content"] for e in events if e.event == "delta"]
    assert len(deltas) >= 2  # the replay, then at least one live delta
    assert "".join(deltas) == "Echo: follow me closely now"
    assert events[-1].event == "message"
    assert events[-1].data["status"] == "completed"


async def test_reattach_to_a_finished_message_gives_the_final_message(anonymous, api, fake_openai):
    message = (await messages.message_send(owner=anonymous, prompt="done already")).message
    response = await api.get(f"/api/messages/{message.pk}/stream/")
    events = parse_sse(response.text)
    assert [e.event for e in events] == ["start", "delta", "message"]
    assert events[-1].data["response"] == "Echo: done already"


async def test_reattach_to_a_generation_in_another_process_follows_the_database(fake_openai):
    # No generation for this message in this process: as if another server process runs it.
    message = await amake_message(
        prompt_message="elsewhere", response="Echo: el", status="streaming", model="m"
    )

    async def other_process_finishes() -> None:
        await asyncio.sleep(0.15)
        await Message.objects.filter(pk=message.pk).aupdate(response="Echo: elsew")
        await asyncio.sleep(0.15)
        await Message.objects.filter(pk=message.pk).aupdate(
            response="Echo: elsewhere", status="completed"
        )

    finisher = asyncio.create_task(other_process_finishes())
    events = [e async for e in messages.message_follow(message=message)]
    await finisher
    text = "".join(e.text for e in events if isinstance(e, generations.TextDelta))
    assert text == "Echo: elsewhere"
    assert isinstance(events[-1], generations.Finished) and events[-1].error is None


async def test_reattach_to_unknown_message_is_a_json_404(api):
    response = await api.get("/api/messages/424242/stream/")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


# --- Idempotency ------------------------------------------------------------------------------


async def test_a_retried_post_with_the_same_key_returns_the_same_message(api, fake_openai):
    body = json.dumps({"prompt_message": "once"})
    headers = {"Idempotency-Key": "key-1"}
    first = await api.post(CREATE_URL, content=body, headers={**JSON, **headers})
    second = await api.post(CREATE_URL, content=body, headers={**JSON, **headers})

    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert len(fake_openai.chat_requests()) == 1
    assert await Message.objects.acount() == 1


async def test_two_racing_requests_with_the_same_key_make_one_message_and_one_call(
    api, fake_openai
):
    fake_openai.latency = 0.4
    body = json.dumps({"prompt_message": "race"})
    headers = {"Idempotency-Key": "race-key"}

    first, second = await asyncio.gather(
        api.post(CREATE_URL, content=body, headers={**JSON, **headers}),
        api.post(CREATE_URL, content=body, headers={**JSON, **headers}),
    )

    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"]
    assert first.json()["response"] == second.json()["response"] == "Echo: race"
    assert len(fake_openai.chat_requests()) == 1
    assert await Message.objects.acount() == 1


async def test_reusing_a_key_with_another_body_is_a_422(api, fake_openai):
    headers = {"Idempotency-Key": "key-2"}
    await api.post(CREATE_URL, content='{"prompt_message": "a"}', headers={**JSON, **headers})
    response = await api.post(
        CREATE_URL, content='{"prompt_message": "b"}', headers={**JSON, **headers}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "idempotency_key_reused"
    assert len(fake_openai.chat_requests()) == 1


async def test_a_replayed_failure_answers_the_same_error_without_calling_again(api, fake_openai):
    fake_openai.fail_next("500")
    headers = {"Idempotency-Key": "key-3"}
    body = '{"prompt_message": "fails"}'
    first = await api.post(CREATE_URL, content=body, headers={**JSON, **headers})
    second = await api.post(CREATE_URL, content=body, headers={**JSON, **headers})
    assert first.status_code == second.status_code == 502
    assert first.json()["error"]["message_id"] == second.json()["error"]["message_id"]
    assert len(fake_openai.chat_requests()) == 1


async def test_a_streamed_retry_with_the_same_key_reattaches(api, fake_openai):
    fake_openai.latency = 0.3
    headers = {"Idempotency-Key": "key-4"}
    first, second = await asyncio.gather(
        post_stream(api, {"prompt_message": "s"}, headers=headers),
        post_stream(api, {"prompt_message": "s"}, headers=headers),
    )
    a = parse_sse(first.text)
    b = parse_sse(second.text)
    assert a[-1].data["id"] == b[-1].data["id"]
    assert a[-1].data["response"] == b[-1].data["response"] == "Echo: s"
    assert len(fake_openai.chat_requests()) == 1


async def test_a_blank_or_huge_idempotency_key_is_a_400(api, fake_openai):
    response = await api.post(
        CREATE_URL,
        content='{"prompt_message": "a"}',
        headers={**JSON, "Idempotency-Key": "x" * 300},
    )
    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]["fields"]


# --- Lifecycle --------------------------------------------------------------------------------


async def test_shutdown_marks_generations_in_flight_interrupted_with_their_text(
    anonymous, fake_openai
):
    fake_openai.latency = 3.0
    fake_openai.stream_chunks = 6
    started = await messages.message_start(
        owner=anonymous, prompt="long one two three", stream=True
    )
    generation = generations.get(started.message.pk)
    while not generation.text:
        await asyncio.sleep(0.05)

    await lifecycle.on_server_shutdown()

    stored = await Message.objects.aget(pk=started.message.pk)
    assert stored.status == "interrupted"
    assert stored.response and stored.response == generation.text
    assert stored.error_code == "generation_interrupted"
    assert generations.get(started.message.pk) is None


async def test_startup_marks_stale_generations_of_dead_processes_interrupted(settings):
    settings.CHAT_STALE_GENERATION_SECONDS = 60
    stale = await amake_message(prompt_message="old", status="streaming")
    fresh = await amake_message(prompt_message="new", status="pending")
    await Message.objects.filter(pk=stale.pk).aupdate(
        updated_at=timezone.now() - timezone.timedelta(minutes=5)
    )

    await lifecycle.on_server_startup()

    assert (await Message.objects.aget(pk=stale.pk)).status == "interrupted"
    assert (await Message.objects.aget(pk=fresh.pk)).status == "pending"


async def test_a_quiet_stream_gets_keepalive_comments(api, fake_openai, settings):
    settings.CHAT_SSE_KEEPALIVE_SECONDS = 0.05
    fake_openai.latency = 0.6
    fake_openai.stream_chunks = 2
    response = await post_stream(api, {"prompt_message": "slow one"})
    body = response.text
    assert ": keep-alive\n\n" in body
    events = parse_sse(body)
    assert events[-1].event == "message"
    assert "".join(e.data["content"] for e in events if e.event == "delta") == "Echo: slow one"
