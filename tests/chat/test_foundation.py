"""Regression tests of the foundation: waits with deadlines, the generations registry, refusals,
stop requests, races with deletion, bounded search, ids out of range, pagination of deep lists.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.utils import timezone

from chat import generations, llm
from chat.models import Conversation, Message
from chat.services import lifecycle, messages
from tests.conftest import JSON, error_of, parse_sse
from tests.factories import amake_message

pytestmark = pytest.mark.django_db(transaction=True)

CREATE_URL = "/api/messages/create/"


async def send(client, **body):
    return await client.post(CREATE_URL, json=body)


async def make_orphan(**fields) -> Message:
    """A message left in progress by a process that died: nobody marks it alive any more."""
    message = await amake_message(**fields)
    await Message.objects.filter(pk=message.pk).aupdate(
        updated_at=timezone.now() - timezone.timedelta(minutes=5)
    )
    return message


# --- Every wait has a deadline ----------------------------------------------------------------


async def test_reattaching_to_a_dead_processs_generation_ends_as_interrupted(api, settings):
    settings.CHAT_GENERATION_DEAD_AFTER = 2
    settings.CHAT_STREAM_SAVE_INTERVAL = 0.05
    orphan = await make_orphan(prompt_message="lost", response="half a rep", status="streaming")

    async with asyncio.timeout(10):
        response = await api.get(f"/api/messages/{orphan.pk}/stream/")

    events = parse_sse(response.text)
    assert [e.event for e in events] == ["start", "delta", "error"]
    assert events[1].data == {"content": "half a rep"}
    assert events[-1].data["error"]["code"] == "generation_interrupted"
    stored = await Message.objects.aget(pk=orphan.pk)
    assert stored.status == "interrupted" and stored.response == "half a rep"


async def test_an_idempotent_retry_of_a_dead_processs_message_does_not_wait_forever(
    api, fake_openai, settings
):
    settings.CHAT_GENERATION_DEAD_AFTER = 2
    settings.CHAT_STREAM_SAVE_INTERVAL = 0.05
    body = json.dumps({"prompt_message": "retry me"})
    first = await api.post(CREATE_URL, content=body, headers={**JSON, "Idempotency-Key": "k"})
    assert first.status_code == 201
    # As if the process that started it had died right after storing the prompt.
    await Message.objects.filter(pk=first.json()["id"]).aupdate(
        status="pending", updated_at=timezone.now() - timezone.timedelta(minutes=5)
    )

    async with asyncio.timeout(10):
        retry = await api.post(CREATE_URL, content=body, headers={**JSON, "Idempotency-Key": "k"})

    assert retry.status_code == 503
    assert error_of(retry)["code"] == "generation_interrupted"
    assert len(fake_openai.chat_requests()) == 1


async def test_any_process_interrupts_orphans_and_spares_live_generations(
    anonymous, fake_openai, settings
):
    settings.CHAT_GENERATION_DEAD_AFTER = 1
    fake_openai.latency = 2.5
    live = await messages.message_start(owner=anonymous, prompt="alive", stream=True)
    orphan = await make_orphan(prompt_message="dead", status="pending")
    stopped = await make_orphan(prompt_message="asked to stop", status="streaming")
    await Message.objects.filter(pk=stopped.pk).aupdate(cancel_requested=True, response="so far")

    await asyncio.sleep(1.2)  # the live one is now older than the bound, but marked alive:
    await lifecycle.maintain_once()

    assert (await Message.objects.aget(pk=orphan.pk)).status == "interrupted"
    cancelled = await Message.objects.aget(pk=stopped.pk)
    assert (cancelled.status, cancelled.response, cancelled.error_code) == (
        "cancelled",
        "so far",
        "",
    )
    assert (await Message.objects.aget(pk=live.message.pk)).status in {"pending", "streaming"}
    await generations.get(live.message.pk).wait()
    assert (await Message.objects.aget(pk=live.message.pk)).status == "completed"


# --- The registry -----------------------------------------------------------------------------


async def test_a_regenerate_is_not_dropped_from_the_registry_by_the_previous_task(
    anonymous, api, fake_openai, settings
):
    settings.CHAT_TITLE_FROM_MODEL = True
    # After the first reply the model titles the conversation, which takes a while (the
    # marker slows the title call as well); the regenerate starts meanwhile.
    first = await send(api, prompt_message="Name it [[latency:0.6]]")
    assert first.status_code == 201
    message_id = first.json()["id"]
    title_tasks = generations.pending_tasks()
    assert title_tasks, "the title call runs as its own tracked task"
    # The regenerate's model call hangs (its prompt's marker would make it as quick as the
    # title call), so it is still generating at shutdown however slow the machine: queued once
    # the title call has reached the server.
    for _ in range(200):
        if len(fake_openai.chat_requests()) >= 2:
            break
        await asyncio.sleep(0.01)
    fake_openai.fail_next("timeout", delay=30)
    await messages.message_regenerate(owner=anonymous, message_id=message_id, stream=True)
    current = generations.get(message_id)
    assert current is not None and current.task not in title_tasks

    await asyncio.wait(title_tasks)  # the previous generation's last task ends

    assert generations.get(message_id) is current
    assert current.task in generations.pending_tasks()
    # Shutdown sees (and stops) the live generation.
    await lifecycle.on_server_shutdown()
    assert (await Message.objects.aget(pk=message_id)).status == "interrupted"


# --- Refusals ---------------------------------------------------------------------------------


async def test_a_refusal_is_stored_as_such_and_kept_out_of_the_context(api, fake_openai):
    refused = await send(api, prompt_message="Do the bad thing [[refusal:I can't help with that.]]")
    assert refused.status_code == 201
    body = refused.json()
    assert body["status"] == "refused"
    assert body["response"] == "" and body["refusal"] == "I can't help with that."

    follow_up = await send(
        api, prompt_message="Then something else", conversation=body["conversation"]
    )
    assert follow_up.status_code == 201
    sent = fake_openai.chat_requests()[-1].json["messages"]
    assert sent == [{"role": "user", "content": "Then something else"}]
    assert follow_up.json()["context_message_ids"] == []


async def test_a_streamed_refusal_arrives_as_refusal_deltas(api, fake_openai):
    response = await send(api, prompt_message="No [[refusal:Sorry, no.]] [[chunks:3]]", stream=True)
    events = parse_sse(response.text)
    assert events[-1].event == "message" and events[-1].data["status"] == "refused"
    deltas = [e.data for e in events if e.event == "delta"]
    assert deltas and all(set(d) == {"refusal"} for d in deltas)
    assert "".join(d["refusal"] for d in deltas) == "Sorry, no."


# --- Stop -------------------------------------------------------------------------------------


async def test_stop_keeps_the_text_so_far_and_ends_cancelled(anonymous, api, fake_openai):
    fake_openai.latency = 3
    fake_openai.stream_chunks = 30
    started = await messages.message_start(owner=anonymous, prompt="a long story", stream=True)
    generation = generations.get(started.message.pk)
    while not generation.text:
        await asyncio.sleep(0.05)

    stopped = await api.post(f"/api/messages/{started.message.pk}/cancel/")

    assert stopped.status_code == 200
    body = stopped.json()
    assert body["status"] == "cancelled" and body["error"] is None
    assert body["response"] and body["response"] != "Echo: a long story"
    assert "Echo: a long story".startswith(body["response"])
    again = await api.post(f"/api/messages/{started.message.pk}/cancel/")
    assert again.json()["status"] == "cancelled"


async def test_a_stop_request_reaches_a_generation_of_another_process(
    anonymous, api, fake_openai, settings
):
    settings.CHAT_CANCEL_POLL_INTERVAL = 0.1
    fake_openai.latency = 3
    fake_openai.stream_chunks = 30
    started = await messages.message_start(owner=anonymous, prompt="go on and on", stream=True)
    generation = generations.get(started.message.pk)
    while not generation.text:
        await asyncio.sleep(0.05)
    # The stop request arrives at a process where the generation is not: only the database flag.
    await Message.objects.filter(pk=started.message.pk).aupdate(cancel_requested=True)

    await lifecycle.maintain_once(heartbeat=False)  # what the other process's loop does
    finished = await generation.wait()

    assert finished.error is None and finished.message.status == "cancelled"
    assert (await Message.objects.aget(pk=started.message.pk)).response == generation.text


# --- Deleting while generating ----------------------------------------------------------------


async def test_a_conversation_cannot_be_deleted_while_a_reply_generates_anywhere(api):
    # In progress on another process (not in this one's registry), alive.
    message = await amake_message(status="streaming")
    url = f"/api/conversations/{message.conversation_id}/"
    refused = await api.delete(url)
    assert refused.status_code == 409 and error_of(refused)["code"] == "message_in_progress"
    await Message.objects.filter(pk=message.pk).aupdate(status="completed")
    assert (await api.delete(url)).status_code == 204


async def test_sending_into_a_conversation_being_deleted_never_fails_with_a_500(api, fake_openai):
    fake_openai.latency = 0.05
    conversation = (await send(api, prompt_message="first")).json()["conversation"]

    async def send_keyed(n: int):
        return await api.post(
            CREATE_URL,
            json={"prompt_message": f"n{n}", "conversation": conversation},
            headers={"Idempotency-Key": f"race-{n}"},
        )

    async def delete_soon():
        for _ in range(50):
            response = await api.delete(f"/api/conversations/{conversation}/")
            if response.status_code == 204:
                return response
            await asyncio.sleep(0.02)
        return response

    results = await asyncio.gather(*(send_keyed(n) for n in range(12)), delete_soon())
    statuses = {r.status_code for r in results[:-1]}
    assert statuses <= {201, 400}, [r.text for r in results[:-1] if r.status_code >= 500]
    for response in results[:-1]:
        if response.status_code == 400:
            assert "conversation" in error_of(response)["fields"]
    assert results[-1].status_code == 204
    assert not await Conversation.objects.filter(pk=conversation).aexists()


async def test_storing_a_prompt_into_a_conversation_deleted_after_planning_is_a_400(
    anonymous, fake_openai
):
    conversation = await sync_to_async(Conversation.objects.create)(owner=anonymous)
    plan = await sync_to_async(messages._plan)(
        owner=anonymous,
        prompt="late",
        conversation_id=conversation.pk,
        model=None,
        temperature=None,
        max_tokens=None,
        idempotency_key="late-key",
    )
    await Conversation.objects.filter(pk=conversation.pk).adelete()
    with pytest.raises(Exception) as caught:
        await sync_to_async(messages._store_prompt)(
            owner=anonymous,
            plan=plan,
            prompt="late",
            idempotency_key="late-key",
            pending_hit=None,
        )
    assert caught.value.status_code == 400
    assert "conversation" in caught.value.extra["fields"]


# --- Search, ids, pagination ------------------------------------------------------------------


async def test_search_terms_are_bounded_and_scan_a_bounded_window(api, fake_openai, settings):
    settings.CHAT_SEARCH_MAX_LENGTH = 20
    too_long = await api.get("/api/messages/", params={"search": "x" * 21})
    assert too_long.status_code == 400 and "search" in error_of(too_long)["fields"]

    settings.CHAT_SEARCH_SCAN_LIMIT = 3
    old = (await send(api, prompt_message="needle in the oldest")).json()
    for n in range(3):
        await send(api, prompt_message=f"hay {n}")
    newest = (await send(api, prompt_message="needle again")).json()
    # Where no index serves the term (SQLite; PostgreSQL for terms under 3 characters) only the
    # 3 newest messages are scanned: the oldest needle is out of the window.
    term = "NEEDLE" if connection.vendor != "postgresql" else "NE"
    found = (await api.get("/api/messages/", params={"search": term})).json()
    assert [m["id"] for m in found["results"]] == [newest["id"]]
    if connection.vendor == "postgresql":  # an indexed term searches everything
        found = (await api.get("/api/messages/", params={"search": "needle"})).json()
        assert [m["id"] for m in found["results"]] == [old["id"], newest["id"]]
    settings.CHAT_SEARCH_SCAN_LIMIT = 0  # 0: everything
    found = (await api.get("/api/messages/", params={"search": "needle"})).json()
    assert [m["id"] for m in found["results"]] == [old["id"], newest["id"]]


HUGE = "99999999999999999999"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", f"/api/messages/{HUGE}/"),
        ("get", f"/api/messages/{HUGE}/stream/"),
        ("post", f"/api/messages/{HUGE}/regenerate/"),
        ("post", f"/api/messages/{HUGE}/cancel/"),
        ("get", f"/api/conversations/{HUGE}/"),
        ("patch", f"/api/conversations/{HUGE}/"),
        ("delete", f"/api/conversations/{HUGE}/"),
        ("get", f"/api/conversations/{HUGE}/messages/"),
        ("get", f"/api/conversations/{HUGE}/export/"),
        ("get", "/api/messages/9223372036854775808/"),
        ("get", "/api/messages/0/"),
    ],
)
async def test_ids_out_of_range_in_paths_are_404(api, method, path):
    response = await getattr(api, method)(path)
    assert response.status_code == 404
    assert error_of(response)["code"] == "not_found"


@pytest.mark.parametrize("value", [HUGE, "9223372036854775808", "0", "-1", "1e3", "١٢"])
async def test_ids_out_of_range_in_queries_and_bodies_are_400(api, fake_openai, value):
    listed = await api.get("/api/messages/", params={"conversation": value})
    assert listed.status_code == 400 and "conversation" in error_of(listed)["fields"]
    if value.lstrip("-").isascii() and value.lstrip("-").isdigit():
        sent = await send(api, prompt_message="hi", conversation=int(value))
        assert sent.status_code == 400 and "conversation" in error_of(sent)["fields"]
    assert fake_openai.chat_requests() == []


async def test_the_largest_id_is_a_plain_404(api):
    response = await api.get("/api/messages/9223372036854775807/")
    assert response.status_code == 404


async def test_deep_history_by_cursor_and_a_bounded_count(api, fake_openai, settings):
    for n in range(7):
        await send(api, prompt_message=f"m{n}")
    settings.CHAT_LIST_EXACT_COUNT_LIMIT = 5
    page = (await api.get("/api/messages/", params={"page_size": 3})).json()
    assert page["count"] == 7
    await send(api, prompt_message="m7")
    # Above the exact limit the count is cached for a while: it may lag.
    assert (await api.get("/api/messages/", params={"page_size": 3})).json()["count"] == 7

    seen, url = [], "/api/messages/?cursor=&page_size=3"
    while url:
        body = (await api.get(url)).json()
        assert set(body) == {"next", "previous", "results"}
        seen += [m["prompt_message"] for m in body["results"]]
        url = body["next"]
    assert seen == [f"m{n}" for n in range(8)]
    both = await api.get("/api/messages/", params={"cursor": "", "page": 2})
    assert both.status_code == 400


# --- Secrets ----------------------------------------------------------------------------------


async def test_nothing_of_ours_that_can_be_logged_holds_the_api_key(fake_openai, settings):
    settings.OPENAI_API_KEY = "distinctive-test-credential-0123456789"
    upstream = llm._upstream()
    held = [repr(upstream), str(vars(llm)), upstream.settings_digest, repr(llm._clients)]
    assert all(settings.OPENAI_API_KEY not in text for text in held)


async def test_a_stored_rate_limit_failure_keeps_its_retry_after(api, fake_openai):
    fake_openai.fail_next("429", retry_after=7)
    headers = {**JSON, "Idempotency-Key": "limited"}
    body = json.dumps({"prompt_message": "later"})
    first = await api.post(CREATE_URL, content=body, headers=headers)
    replay = await api.post(CREATE_URL, content=body, headers=headers)
    for response in (first, replay):
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "7"
        assert error_of(response)["retry_after"] == 7
    reattached = parse_sse(
        (await api.get(f"/api/messages/{first.json()['error']['message_id']}/stream/")).text
    )
    assert reattached[-1].data["error"]["retry_after"] == 7
