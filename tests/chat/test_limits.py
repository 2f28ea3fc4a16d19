"""Rate limits, the concurrency cap and budgets, through the API: what is refused never reaches
the model and is never stored; what is admitted is charged exactly what upstream reported (or,
without a report, what was counted), and the ledger never passes the budget.

Prices are set so the arithmetic is easy (`prices`): gpt-3.5-turbo costs 1 micro-dollar per
prompt token and 2 per reply token; gpt-4o-mini 3 and 4.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
from decimal import Decimal

import httpx
import pytest
import redis
from asgiref.sync import sync_to_async
from django.core.management import call_command
from django.db.models import Sum
from django.utils import timezone

from billing.limits import REDIS_KEY_PREFIX
from billing.models import LedgerEntry, RateLimitHit, Reservation
from billing.money import to_pico, usd_str
from billing.periods import period_bounds
from billing.prices import parse_model_prices, price_for
from chat import tokens
from chat.models import Message
from tests.billing.conftest import REDIS_TEST_URL, redis_or_skip
from tests.conftest import authenticated, error_of, parse_sse
from tests.factories import amake_token

pytestmark = pytest.mark.django_db(transaction=True)

CREATE_URL = "/api/messages/create/"
MODEL = "gpt-3.5-turbo"
MICRO = 10**6  # pico-dollars in a micro-dollar


@pytest.fixture
def prices(settings) -> None:
    settings.CHAT_MODEL_PRICES = parse_model_prices(
        f"{MODEL}=1:2,gpt-4o-mini=3:4", allowed_models=settings.OPENAI_ALLOWED_MODELS
    )


@pytest.fixture
async def alice(api) -> httpx.AsyncClient:
    async with authenticated(api, await amake_token("alice")) as client:
        yield client


@pytest.fixture
async def bob(api) -> httpx.AsyncClient:
    async with authenticated(api, await amake_token("bob")) as client:
        yield client


def other_ip(api: httpx.AsyncClient, ip: str) -> httpx.AsyncClient:
    """A client of the same application from another address: another anonymous bucket."""
    transport = httpx.ASGITransport(app=api._transport.app, client=(ip, 1))
    return httpx.AsyncClient(transport=transport, base_url=api.base_url)


async def burst(client: httpx.AsyncClient, bodies: list[dict]) -> list[httpx.Response]:
    return list(await asyncio.gather(*(client.post(CREATE_URL, json=b) for b in bodies)))


def statuses(responses: list[httpx.Response]) -> list[int]:
    return sorted(r.status_code for r in responses)


def reservation_for(prompt: str, max_tokens: int, model: str = MODEL) -> int:
    """What a first message's admission holds: its worst case, in pico-dollars."""
    turns = [{"role": "user", "content": prompt}]
    counted = tokens.count_turns(turns, model=model)
    bound = tokens.prompt_tokens_upper_bound(turns, model=model, counted=counted)
    return price_for(model).cost(prompt_tokens=bound, completion_tokens=max_tokens)


async def ledger_of(message_id: int) -> LedgerEntry:
    return await LedgerEntry.objects.aget(message_id=message_id)


async def ledger_total(username: str) -> int:
    total = await LedgerEntry.objects.filter(user__username=username).aaggregate(s=Sum("cost"))
    return int(total["s"] or 0)


# --- Rate limits ------------------------------------------------------------------------------


@pytest.fixture(params=["database", "redis"])
async def limits_backend(request, settings):
    """Where the rate limits are kept: the database, or Redis (REDIS_TEST_URL's database)."""
    from chat.redis_client import close_redis

    if request.param == "database":
        settings.REDIS_URL = ""
        yield request.param
        return
    redis_or_skip()
    settings.REDIS_URL = REDIS_TEST_URL
    yield request.param
    await close_redis()
    client = redis.Redis.from_url(REDIS_TEST_URL)
    ids = [pk async for pk in Message.objects.values_list("id", flat=True)]
    users = [pk async for pk in Message.objects.values_list("owner_id", flat=True).distinct()]
    keys = [f"chat:generation:{pk}" for pk in ids] + [
        f"{REDIS_KEY_PREFIX}user:{pk}" for pk in users
    ]
    if keys:
        client.delete(*keys)
    client.close()


async def test_a_burst_over_the_user_rate_admits_exactly_the_rate(
    alice, bob, fake_openai, settings, limits_backend
):
    settings.CHAT_THROTTLE_USER = "5/min"
    responses = await burst(alice, [{"prompt_message": f"burst {i}"} for i in range(12)])

    assert statuses(responses) == [201] * 5 + [429] * 7
    for refused in (r for r in responses if r.status_code == 429):
        error = error_of(refused)
        assert error["code"] == "rate_limited"
        assert 1 <= error["retry_after"] <= 60
        assert refused.headers["Retry-After"] == str(error["retry_after"])
    # Nothing of the refused ones reached the model or was stored.
    assert len(fake_openai.chat_requests()) == 5
    assert await Message.objects.acount() == 5
    admitted = {r.json()["prompt_message"] for r in responses if r.status_code == 201}
    assert {r.json["messages"][-1]["content"] for r in fake_openai.chat_requests()} == admitted
    # Refusals are not recorded.
    if limits_backend == "database":
        assert await RateLimitHit.objects.acount() == 5
    else:
        alice_id = (await Message.objects.afirst()).owner_id
        client = redis.Redis.from_url(REDIS_TEST_URL)
        assert client.zcard(f"{REDIS_KEY_PREFIX}user:{alice_id}") == 5
        client.close()
        assert await RateLimitHit.objects.acount() == 0

    # Another user has their own limit.
    assert (await bob.post(CREATE_URL, json={"prompt_message": "mine"})).status_code == 201


async def test_anonymous_clients_are_limited_per_ip(api, alice, fake_openai, settings):
    settings.CHAT_ALLOW_ANONYMOUS = True
    settings.CHAT_THROTTLE_ANON = "5/min"
    responses = await burst(api, [{"prompt_message": f"anon {i}"} for i in range(12)])
    assert statuses(responses) == [201] * 5 + [429] * 7
    assert {error_of(r)["code"] for r in responses if r.status_code == 429} == {"rate_limited"}
    assert all("Retry-After" in r.headers for r in responses if r.status_code == 429)
    assert len(fake_openai.chat_requests()) == 5
    assert await Message.objects.acount() == 5

    # Another address is another bucket (of the same shared anonymous user).
    async with other_ip(api, "10.0.0.2") as elsewhere:
        more = await burst(elsewhere, [{"prompt_message": f"there {i}"} for i in range(7)])
        assert statuses(more) == [201] * 5 + [429] * 2
        seen = (await elsewhere.get("/api/messages/?page_size=100")).json()["count"]
    assert seen == 10
    assert len(fake_openai.chat_requests()) == 10
    # Users are not counted with anonymous clients (CHAT_THROTTLE_USER is unset here).
    assert (await alice.post(CREATE_URL, json={"prompt_message": "user"})).status_code == 201


async def test_regenerate_is_throttled_too(alice, fake_openai, settings):
    settings.CHAT_THROTTLE_USER = "3/min"
    created = (await alice.post(CREATE_URL, json={"prompt_message": "again"})).json()
    url = f"/api/messages/{created['id']}/regenerate/"
    assert (await alice.post(url)).status_code == 200
    assert (await alice.post(url, json={"stream": True})).status_code == 200

    refused = await alice.post(url)
    assert refused.status_code == 429 and error_of(refused)["code"] == "rate_limited"
    refused = await alice.post(url, json={"stream": True})  # an error, not an event stream
    assert refused.status_code == 429 and error_of(refused)["code"] == "rate_limited"
    assert len(fake_openai.chat_requests()) == 3
    stored = await Message.objects.aget(pk=created["id"])
    assert stored.status == "completed" and len(stored.previous_replies) == 2


async def test_an_idempotent_replay_is_not_counted(alice, fake_openai, settings):
    settings.CHAT_THROTTLE_USER = "2/min"
    key = {"Idempotency-Key": "once"}
    first = await alice.post(CREATE_URL, json={"prompt_message": "keyed"}, headers=key)
    assert first.status_code == 201
    for _ in range(4):
        replay = await alice.post(CREATE_URL, json={"prompt_message": "keyed"}, headers=key)
        assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert (await alice.post(CREATE_URL, json={"prompt_message": "second"})).status_code == 201
    third = await alice.post(CREATE_URL, json={"prompt_message": "third"})
    assert third.status_code == 429 and error_of(third)["code"] == "rate_limited"
    # Even now, a replay is answered (it costs nothing and calls nothing).
    replay = await alice.post(CREATE_URL, json={"prompt_message": "keyed"}, headers=key)
    assert replay.status_code == 201 and replay.json()["id"] == first.json()["id"]
    assert len(fake_openai.chat_requests()) == 2


# --- Concurrency cap --------------------------------------------------------------------------


async def test_the_concurrency_cap_refuses_a_third_slow_stream(alice, bob, fake_openai, settings):
    settings.CHAT_MAX_CONCURRENT_PER_USER = 2
    slow = {"prompt_message": "slow [[latency:2]]", "stream": True}
    started = asyncio.get_running_loop().time()
    responses = await asyncio.gather(
        *(alice.post(CREATE_URL, json=slow) for _ in range(3)),
        bob.post(CREATE_URL, json=slow),  # another user: their own cap
    )
    *alices, bobs = responses
    assert statuses(alices) == [200, 200, 429]
    [refused] = [r for r in alices if r.status_code == 429]
    error = error_of(refused)
    assert error["code"] == "too_many_concurrent" and error["limit"] == 2
    assert refused.headers["Retry-After"] == "1"
    assert bobs.status_code == 200
    for response in [*alices, bobs]:
        if response.status_code == 200:
            assert parse_sse(response.text)[-1].data["status"] == "completed"
    assert asyncio.get_running_loop().time() - started >= 2
    assert len(fake_openai.chat_requests()) == 3
    assert await Message.objects.acount() == 3

    # Once they have finished, there is room again.
    assert await Reservation.objects.acount() == 0
    again = await alice.post(CREATE_URL, json={"prompt_message": "now"})
    assert again.status_code == 201


# --- Budgets ------------------------------------------------------------------------------------


async def test_on_the_database_a_request_refused_for_its_budget_uses_no_rate(
    alice, fake_openai, settings, prices
):
    settings.REDIS_URL = ""
    settings.CHAT_THROTTLE_USER = "1/min"
    settings.CHAT_USER_BUDGET_USD = Decimal("0.00005")  # less than any reply's worst case
    refused = await alice.post(CREATE_URL, json={"prompt_message": "hi", "max_tokens": 100})
    assert error_of(refused)["code"] == "budget_exceeded"
    # Counted in the prompt's transaction, the hit was rolled back with it.
    assert await RateLimitHit.objects.acount() == 0
    settings.CHAT_USER_BUDGET_USD = None
    admitted = await alice.post(CREATE_URL, json={"prompt_message": "hi", "max_tokens": 100})
    assert admitted.status_code == 201
    limited = await alice.post(CREATE_URL, json={"prompt_message": "hi", "max_tokens": 100})
    assert error_of(limited)["code"] == "rate_limited"
    assert await RateLimitHit.objects.acount() == 1
    assert len(fake_openai.chat_requests()) == 1


async def test_a_burst_admits_only_what_fits_the_budget(alice, fake_openai, settings, prices):
    prompt, max_tokens = "burst [[latency:2]]", 20
    reservation = reservation_for(prompt, max_tokens)
    budget = 3 * reservation + reservation // 2
    settings.CHAT_USER_BUDGET_USD = Decimal(budget) / 10**12
    settings.CHAT_USER_BUDGET_PERIOD = "month"
    body = {"prompt_message": prompt, "max_tokens": max_tokens}
    responses = await asyncio.gather(
        *(alice.post(CREATE_URL, json=body) for _ in range(8)),
        alice.post(CREATE_URL, json={**body, "stream": True}),
    )
    now = timezone.now()

    admitted = [r for r in responses if r.status_code in (200, 201)]
    refused = [r for r in responses if r.status_code == 429]
    assert len(admitted) == 3 and len(refused) == 6, statuses(responses)
    resets_at = period_bounds("month", now)[1]
    for response in refused:
        error = error_of(response)
        assert error["code"] == "budget_exceeded"
        assert error["budget_usd"] == usd_str(budget)
        assert error["spent_usd"] == "0"
        assert error["reserved_usd"] == usd_str(3 * reservation)
        assert error["remaining_usd"] == usd_str(budget - 3 * reservation)
        assert error["required_usd"] == usd_str(reservation)
        assert error["resets_at"] == resets_at.isoformat().replace("+00:00", "Z")
        assert response.headers["Retry-After"] == str(error["retry_after"])
        assert abs(error["retry_after"] - (resets_at - now).total_seconds()) < 10
    assert len(fake_openai.chat_requests()) == 3
    assert await Message.objects.acount() == 3

    # Settled: the ledger holds what was used, never more than the budget.
    assert await Reservation.objects.acount() == 0
    assert await LedgerEntry.objects.acount() == 3
    spent = await ledger_total("alice")
    assert 0 < spent <= budget
    usage = (await alice.get("/api/usage/")).json()
    assert usage["spent_usd"] == usd_str(spent)
    assert usage["remaining_usd"] == usd_str(budget - spent)


async def test_a_request_that_cannot_fit_even_an_empty_budget_is_refused(
    alice, fake_openai, settings, prices
):
    settings.CHAT_USER_BUDGET_USD = Decimal("0.00005")  # 50 micro-dollars
    response = await alice.post(CREATE_URL, json={"prompt_message": "hi", "max_tokens": 100})
    assert response.status_code == 429
    error = error_of(response)
    assert error["code"] == "budget_exceeded"
    assert error["required_usd"] == usd_str(reservation_for("hi", 100))
    assert "whole" in error["message"] and "max_tokens" in error["message"]
    assert fake_openai.chat_requests() == []
    assert await Message.objects.acount() == 0


# --- What is charged ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_usage_matches_what_upstream_reported_exactly(alice, fake_openai, prices, stream):
    response = await alice.post(
        CREATE_URL, json={"prompt_message": "count these five words", "stream": stream}
    )
    assert response.status_code == (200 if stream else 201)
    message = parse_sse(response.text)[-1].data if stream else response.json()
    [sent] = fake_openai.chat_requests()
    reported = sent.usage
    assert reported is not None and reported["completion_tokens"] > 0

    entry = await ledger_of(message["id"])
    assert entry.usage_source == "upstream"
    assert (entry.prompt_tokens, entry.completion_tokens) == (
        reported["prompt_tokens"],
        reported["completion_tokens"],
    )
    assert message["usage"] == reported
    cost = reported["prompt_tokens"] * 1 * MICRO + reported["completion_tokens"] * 2 * MICRO
    assert entry.cost == cost
    assert message["cost_usd"] == usd_str(cost)
    assert entry.outcome == "completed" and entry.model == MODEL


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_a_reply_without_usage_is_charged_by_counting(alice, fake_openai, prices, stream):
    prompt = "no usage here [[nousage]]"
    response = await alice.post(CREATE_URL, json={"prompt_message": prompt, "stream": stream})
    message = parse_sse(response.text)[-1].data if stream else response.json()
    assert message["status"] == "completed"
    assert fake_openai.chat_requests()[0].usage is None

    entry = await ledger_of(message["id"])
    assert entry.usage_source == "counted"
    turns = [{"role": "user", "content": prompt}]
    assert entry.prompt_tokens == tokens.count_turns(turns, model=MODEL)
    assert entry.completion_tokens == tokens.count_text(message["response"], model=MODEL)
    assert entry.cost == entry.prompt_tokens * MICRO + entry.completion_tokens * 2 * MICRO
    assert message["cost_usd"] == usd_str(entry.cost)


async def _wait_for_partial_text(timeout: float = 10) -> Message:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        message = await Message.objects.order_by("-id").afirst()
        if message is not None and message.status == "streaming" and message.response:
            return message
        assert asyncio.get_running_loop().time() < deadline, "no partial text was saved"
        await asyncio.sleep(0.05)


async def test_a_stopped_stream_is_charged_for_what_was_produced(alice, fake_openai, prices):
    prompt = "stop me half way please [[latency:3]] [[chunks:30]]"
    full = f"Echo: {prompt}"
    streaming = asyncio.create_task(
        alice.post(CREATE_URL, json={"prompt_message": prompt, "stream": True})
    )
    partial = await _wait_for_partial_text()
    stopped = await alice.post(f"/api/messages/{partial.pk}/cancel/")
    assert stopped.status_code == 200
    message = stopped.json()
    assert message["status"] == "cancelled"
    assert message["response"] and full.startswith(message["response"])
    assert len(message["response"]) < len(full)
    events = parse_sse((await streaming).text)
    assert events[-1].data["status"] == "cancelled"

    entry = await ledger_of(message["id"])
    assert entry.usage_source == "counted" and entry.outcome == "cancelled"
    turns = [{"role": "user", "content": prompt}]
    assert entry.prompt_tokens == tokens.count_turns(turns, model=MODEL)
    assert entry.completion_tokens == tokens.count_text(message["response"], model=MODEL)
    assert entry.completion_tokens < tokens.count_text(full, model=MODEL)
    assert message["cost_usd"] == usd_str(entry.cost)
    assert fake_openai.chat_requests()[0].usage is None  # upstream never got to report it


async def test_a_cut_stream_is_charged_for_what_was_produced(alice, fake_openai, prices):
    prompt = "this stream breaks off [[fault:cut]] [[chunks:10]]"
    response = await alice.post(CREATE_URL, json={"prompt_message": prompt, "stream": True})
    events = parse_sse(response.text)
    assert events[-1].event == "error"
    assert events[-1].data["error"]["code"] == "upstream_truncated"
    message_id = events[0].data["id"]
    message = (await alice.get(f"/api/messages/{message_id}/")).json()
    assert message["status"] == "truncated" and message["response"]

    entry = await ledger_of(message_id)
    assert entry.usage_source == "counted" and entry.outcome == "truncated"
    assert entry.prompt_tokens == tokens.count_turns(
        [{"role": "user", "content": prompt}], model=MODEL
    )
    assert entry.completion_tokens == tokens.count_text(message["response"], model=MODEL)
    assert message["cost_usd"] == usd_str(entry.cost)


# --- GET /api/usage/ ----------------------------------------------------------------------------


async def test_the_usage_report_matches_the_ledger(alice, bob, fake_openai, settings, prices):
    settings.CHAT_USER_BUDGET_USD = Decimal("1")
    settings.CHAT_USER_BUDGET_PERIOD = "month"
    for body in [
        {"prompt_message": "one"},
        {"prompt_message": "two words", "stream": True},
        {"prompt_message": "three [[nousage]]"},
        {"prompt_message": "four", "model": "gpt-4o-mini"},
    ]:
        assert (await alice.post(CREATE_URL, json=body)).status_code in (200, 201)
    assert (await bob.post(CREATE_URL, json={"prompt_message": "not alice's"})).status_code == 201

    # A reply in flight holds its reservation.
    slow = asyncio.create_task(
        alice.post(CREATE_URL, json={"prompt_message": "slow [[latency:2]]", "max_tokens": 10})
    )
    while not await Reservation.objects.filter(user__username="alice").aexists():
        await asyncio.sleep(0.02)
    report = (await alice.get("/api/usage/")).json()
    held = reservation_for("slow [[latency:2]]", 10)
    spent = await ledger_total("alice")
    budget = to_pico(Decimal("1"))
    assert report["user"] == {"username": "alice", "anonymous": False}
    assert report["budget_usd"] == "1" and report["period"] == "month"
    assert report["spent_usd"] == usd_str(spent)
    assert report["reserved_usd"] == usd_str(held) and report["in_flight"] == 1
    assert report["remaining_usd"] == usd_str(budget - spent - held)
    assert (await slow).status_code == 201

    report = (await alice.get("/api/usage/")).json()
    spent = await ledger_total("alice")
    assert report["spent_usd"] == usd_str(spent)
    assert report["reserved_usd"] == "0" and report["in_flight"] == 0
    assert report["remaining_usd"] == usd_str(budget - spent)
    start, end = period_bounds("month", timezone.now())
    assert report["from"] == start.date().isoformat()
    assert report["to"] == (end - dt.timedelta(days=1)).date().isoformat()

    # By day and model, as the ledger has it.
    entries = [e async for e in LedgerEntry.objects.filter(user__username="alice")]
    expected: dict[tuple[str, str], dict] = {}
    for entry in entries:
        row = expected.setdefault(
            (entry.created_at.date().isoformat(), entry.model),
            {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0},
        )
        row["requests"] += 1
        row["prompt_tokens"] += entry.prompt_tokens
        row["completion_tokens"] += entry.completion_tokens
        row["cost"] += entry.cost
    assert report["days"] == [
        {
            "day": day,
            "model": model,
            "requests": row["requests"],
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "cost_usd": usd_str(row["cost"]),
        }
        for (day, model), row in sorted(expected.items())
    ]
    assert {row["model"] for row in report["days"]} == {MODEL, "gpt-4o-mini"}
    assert sum(row["requests"] for row in report["days"]) == 5

    # A range without usage.
    empty = (await alice.get("/api/usage/?from=2020-01-01&to=2020-01-31")).json()
    assert empty["days"] == [] and (empty["from"], empty["to"]) == ("2020-01-01", "2020-01-31")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("from=yesterday", "from"),
        ("to=2026-13-01", "to"),
        ("from=2026-02-01&to=2026-01-31", "from"),
        ("from=2024-01-01&to=2025-12-31", "to"),  # more than 366 days
    ],
)
async def test_usage_dates_are_validated(alice, query, field):
    response = await alice.get(f"/api/usage/?{query}")
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "invalid"
    assert list(error["fields"]) == [field]
    assert field in error["message"]


async def test_unlimited_by_default(alice):
    report = (await alice.get("/api/usage/")).json()
    assert report["budget_usd"] is None and report["remaining_usd"] is None
    assert report["spent_usd"] == "0" and report["days"] == []


# --- manage.py set_budget, then the API -----------------------------------------------------


async def test_set_budget_then_the_api(alice, fake_openai, settings, prices):
    def set_budget(amount: str) -> str:
        out = io.StringIO()
        call_command("set_budget", "alice", amount, stdout=out)
        return out.getvalue()

    body = {"prompt_message": "hello", "max_tokens": 50}
    assert "$0.0001" in await sync_to_async(set_budget)("0.0001")  # 100 micro-dollars
    refused = await alice.post(CREATE_URL, json=body)
    assert refused.status_code == 429
    error = error_of(refused)
    assert error["code"] == "budget_exceeded" and error["budget_usd"] == "0.0001"
    assert (await alice.get("/api/usage/")).json()["budget_usd"] == "0.0001"

    await sync_to_async(set_budget)("5")
    assert (await alice.post(CREATE_URL, json=body)).status_code == 201
    assert (await alice.get("/api/usage/")).json()["budget_usd"] == "5"

    await sync_to_async(set_budget)("unlimited")
    assert (await alice.get("/api/usage/")).json()["budget_usd"] is None
    assert len(fake_openai.chat_requests()) == 1
