"""Observability: /metrics (Prometheus, multiprocess), request ids, JSON request logs, secrets
kept out of logs and errors, /readyz with Redis. Through the shipped ASGI application."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal

import httpx
import pytest
from django.conf import settings as django_settings
from prometheus_client.parser import text_string_to_metric_families
from pythonjsonlogger.json import JsonFormatter

from chat import request_context
from tests.conftest import JSON, authenticated, error_of, parse_sse
from tests.fake_openai import FAULTS

pytestmark = pytest.mark.django_db(transaction=True)

CREATE_URL = "/api/messages/create/"
# Distinctive, and not shaped like an OpenAI key (no file may hold one).
SECRET_API_KEY = "obs-test-upstream-key-7Hq2Lx9Vb4"


# --- helpers ----------------------------------------------------------------------------------


class Scrape:
    """A parsed /metrics answer."""

    def __init__(self, text: str) -> None:
        self.samples = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`."""
        return sum(
            sample.value
            for sample in self.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )


async def scrape(client: httpx.AsyncClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.text)


async def post_json(
    client: httpx.AsyncClient, body: dict, headers: dict | None = None
) -> httpx.Response:
    return await client.post(
        CREATE_URL, content=json.dumps(body), headers={**JSON, **(headers or {})}
    )


def client_from(api: httpx.AsyncClient, address: str) -> httpx.AsyncClient:
    """A client of the same application connecting from `address`."""
    from config.asgi import application

    transport = httpx.ASGITransport(app=application, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url=api.base_url)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What the service's log handler writes, in the JSON format of config/settings.py LOGGING
    (whatever LOG_FORMAT says), through the handler's own filters."""
    root = logging.getLogger()
    [console] = [h for h in root.handlers if h.get_name() == "console"]
    options = {k: v for k, v in django_settings.LOGGING["formatters"]["json"].items() if k != "()"}
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter(**options))
    for log_filter in console.filters:
        handler.addFilter(log_filter)
    root.addHandler(handler)
    yield buffer
    root.removeHandler(handler)


def log_lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


def request_lines(buffer: io.StringIO) -> list[dict]:
    return [line for line in log_lines(buffer) if line["logger"] == "chat.request"]


# --- /metrics ---------------------------------------------------------------------------------


async def test_metrics_are_prometheus_text_and_a_chat_moves_them(api, fake_openai, settings):
    before = await scrape(api)
    response = await post_json(api, {"prompt_message": "count me"})
    assert response.status_code == 201
    body = response.json()
    after = await scrape(api)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    created = {"route": "message-create", "method": "POST", "status": "201"}
    assert moved("chat_http_requests_total", **created) == 1
    assert moved("chat_http_request_duration_seconds_count", route="message-create") == 1
    assert moved("chat_http_request_duration_seconds_sum", route="message-create") > 0
    # The scrape before this one was counted too, under its route name (never a raw path).
    assert after.value("chat_http_requests_total", route="metrics", status="200") >= 1
    assert not any("/api/" in str(s.labels) for s in after.samples)

    upstream = {"model": "gpt-3.5-turbo", "outcome": "ok"}
    assert moved("chat_upstream_request_duration_seconds_count", **upstream) == 1
    assert moved("chat_upstream_request_duration_seconds_sum", **upstream) > 0
    assert moved("chat_upstream_request_duration_seconds_bucket", le="+Inf", **upstream) == 1

    usage = body["usage"]
    model = {"model": "gpt-3.5-turbo"}
    assert moved("chat_tokens_total", kind="prompt", **model) == usage["prompt_tokens"]
    assert moved("chat_tokens_total", kind="completion", **model) == usage["completion_tokens"]
    price = settings.CHAT_MODEL_PRICES["gpt-3.5-turbo"]
    expected_cost = (
        usage["prompt_tokens"] * price.input + usage["completion_tokens"] * price.output
    ) / Decimal(10**6)
    assert moved("chat_cost_usd_total", **model) == pytest.approx(float(expected_cost))
    assert moved("chat_generation_outcomes_total", status="completed") == 1
    assert after.value("chat_generations_in_flight") == 0


async def test_a_stream_records_time_to_first_token_and_upstream_failures_their_code(
    api, fake_openai
):
    before = await scrape(api)
    streamed = await post_json(api, {"prompt_message": "stream me", "stream": True})
    assert parse_sse(streamed.text)[-1].event == "message"
    failed = await post_json(api, {"prompt_message": "[[fault:500]]"})
    assert error_of(failed)["code"] == "upstream_unavailable"
    after = await scrape(api)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("chat_time_to_first_token_seconds_count", model="gpt-3.5-turbo") == 1
    assert moved("chat_time_to_first_token_seconds_sum", model="gpt-3.5-turbo") > 0
    assert (
        moved(
            "chat_upstream_request_duration_seconds_count",
            model="gpt-3.5-turbo",
            outcome="upstream_unavailable",
        )
        == 1
    )
    assert moved("chat_generation_outcomes_total", status="failed") == 1
    # The stream's request is counted when its stream has ended.
    assert moved("chat_http_requests_total", route="message-create", status="200") == 1


async def test_rejections_are_counted_by_reason(api, fake_openai, settings):
    before = await scrape(api)

    settings.CHAT_THROTTLE_ANON = "1/min"
    assert (await post_json(api, {"prompt_message": "one"})).status_code == 201
    refused = await post_json(api, {"prompt_message": "two"})
    assert error_of(refused)["code"] == "rate_limited"
    settings.CHAT_THROTTLE_ANON = ""

    settings.CHAT_USER_BUDGET_USD = Decimal("0.000001")  # nothing fits
    refused = await post_json(api, {"prompt_message": "three"})
    assert error_of(refused)["code"] == "budget_exceeded"
    settings.CHAT_USER_BUDGET_USD = None

    settings.CHAT_MAX_CONCURRENT_PER_USER = 1
    fake_openai.latency = 1.0
    first = asyncio.create_task(post_json(api, {"prompt_message": "slow", "stream": True}))
    for _ in range(100):
        during = await scrape(api)
        if during.value("chat_generations_in_flight") == 1:
            break
        await asyncio.sleep(0.02)
    assert during.value("chat_generations_in_flight") == 1
    refused = await post_json(api, {"prompt_message": "four"})
    assert error_of(refused)["code"] == "too_many_concurrent"
    assert (await first).status_code == 200

    after = await scrape(api)
    for reason in ("rate_limited", "budget_exceeded", "too_many_concurrent"):
        moved = after.value("chat_rejections_total", reason=reason) - before.value(
            "chat_rejections_total", reason=reason
        )
        assert moved == 1, reason
    assert after.value("chat_generations_in_flight") == 0


async def test_metrics_need_no_user_but_only_answer_allowed_addresses(api, settings):
    settings.CHAT_ALLOW_ANONYMOUS = False
    assert (await api.get("/api/messages/")).status_code == 401
    assert (await api.get("/metrics")).status_code == 200  # loopback, no credentials

    async with client_from(api, "10.1.2.3") as outsider:
        refused = await outsider.get("/metrics")
        assert refused.status_code == 403
        assert error_of(refused)["code"] == "permission_denied"
        settings.METRICS_ALLOWED_IPS = [
            *settings.METRICS_ALLOWED_IPS,
            ipaddress.ip_network("10.0.0.0/8"),
        ]
        assert (await outsider.get("/metrics")).status_code == 200

    # Forwarded by a proxy that is not trusted (CHAT_TRUSTED_PROXIES=0): the proxy's loopback
    # address says nothing about the client.
    forwarded = await api.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
    assert error_of(forwarded)["code"] == "permission_denied"
    wrong_method = await api.post("/metrics")
    assert error_of(wrong_method)["code"] == "method_not_allowed"


async def test_a_metrics_token_is_required_from_anywhere_when_set(api, settings):
    settings.METRICS_TOKEN = "scrape-token-for-tests-0123"
    missing = await api.get("/metrics")
    assert missing.status_code == 401
    assert error_of(missing)["code"] == "not_authenticated"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = await api.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    async with client_from(api, "198.51.100.7") as anywhere:
        right = await anywhere.get(
            "/metrics", headers={"Authorization": "Bearer scrape-token-for-tests-0123"}
        )
    assert right.status_code == 200
    assert "chat_generations_in_flight" in right.text


async def test_openmetrics_is_served_on_request(api):
    response = await api.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


# --- request ids ------------------------------------------------------------------------------


async def test_a_request_id_is_generated_returned_and_sent_upstream(api, fake_openai):
    response = await post_json(api, {"prompt_message": "who am I"})
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    [sent] = fake_openai.chat_requests()
    assert sent.headers["x-request-id"] == request_id

    other = await api.get("/healthz")
    assert other.headers["x-request-id"] not in ("", request_id)


async def test_a_valid_incoming_request_id_is_kept_for_streams_too(api, fake_openai):
    response = await post_json(
        api,
        {"prompt_message": "follow my id", "stream": True},
        headers={"X-Request-ID": "edge-proxy:42.abc_DEF-9"},
    )
    assert response.headers["x-request-id"] == "edge-proxy:42.abc_DEF-9"
    assert parse_sse(response.text)[-1].event == "message"
    # The generation ran in its own task, started inside the request: the id went with it.
    assert fake_openai.chat_requests()[0].headers["x-request-id"] == "edge-proxy:42.abc_DEF-9"


@pytest.mark.parametrize(
    "incoming", ["x" * (request_context.MAX_LENGTH + 1), "has space", "back\\slash", "a/b", ""]
)
async def test_an_invalid_incoming_request_id_is_replaced(api, incoming):
    response = await api.get("/healthz", headers={"X-Request-ID": incoming})
    request_id = response.headers["x-request-id"]
    assert request_id != incoming and len(request_id) == 32


def test_the_request_id_does_not_outlive_its_request(client):
    # Django's test client runs the async middleware through async_to_sync, which copies the
    # context back into this thread: the id must be gone by then.
    assert client.get("/healthz").headers["X-Request-ID"]
    assert request_context.get_request_id() is None


async def test_no_request_id_is_sent_outside_a_request(fake_openai):
    from chat import llm

    await llm.complete(
        messages=[{"role": "user", "content": "hi"}],
        options=llm.GenerationOptions(model="gpt-3.5-turbo"),
    )
    assert "x-request-id" not in fake_openai.chat_requests()[0].headers


# --- logs -------------------------------------------------------------------------------------


async def test_one_json_line_per_request_with_its_fields(api, fake_openai, json_log):
    response = await post_json(api, {"prompt_message": "log me"}, headers={"X-A": "b"})
    await api.get("/api/messages/?page=1&search=log")
    await api.get("/api/messages/999/")

    [create, listing, missing] = request_lines(json_log)
    assert create == {
        "time": create["time"],
        "level": "INFO",
        "logger": "chat.request",
        "message": f"POST {CREATE_URL} 201 {create['duration_ms']}ms",
        "request_id": response.headers["x-request-id"],
        "method": "POST",
        "route": "message-create",
        "path": CREATE_URL,
        "status": 201,
        "duration_ms": create["duration_ms"],
        "user_id": None,
        "client_ip": "127.0.0.1",
    }
    assert create["time"].endswith("+00:00") and create["duration_ms"] > 0
    assert listing["route"] == "message-list" and listing["path"] == "/api/messages/"
    assert missing["route"] == "message-detail" and missing["status"] == 404
    assert len({create["request_id"], listing["request_id"], missing["request_id"]}) == 3
    # Other records logged while serving a request carry its id too.
    logging.getLogger("chat.test").warning("inside")
    assert log_lines(json_log)[-1]["request_id"] == "-"


async def test_the_line_of_a_stream_is_written_when_it_ends(api, fake_openai, json_log):
    fake_openai.latency = 0.3
    response = await post_json(api, {"prompt_message": "slow stream", "stream": True})
    [line] = request_lines(json_log)
    assert line["status"] == 200 and line["route"] == "message-create"
    assert line["duration_ms"] >= 250
    assert line["request_id"] == response.headers["x-request-id"]


async def test_the_line_names_an_authenticated_user(api, django_user_model, json_log):
    from rest_framework.authtoken.models import Token

    user = await django_user_model.objects.acreate(username="logged")
    token = await Token.objects.acreate(user=user)
    async with authenticated(api, token.key) as client:
        assert (await client.get("/api/messages/")).status_code == 200
    [line] = request_lines(json_log)
    assert line["user_id"] == user.pk


def test_the_plain_format_has_the_request_id_too(settings):
    plain = settings.LOGGING["formatters"]["plain"]["format"]
    record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "x"})
    token = request_context.set_request_id("rid-1")
    try:
        from chat.logs import RequestIdFilter

        RequestIdFilter().filter(record)
    finally:
        request_context.reset_request_id(token)
    assert "[rid-1] hello" in logging.Formatter(plain).format(record)


def test_the_log_filter_redacts_secret_shaped_text_and_the_configured_key(settings, json_log):
    settings.OPENAI_API_KEY = SECRET_API_KEY
    key_shaped = "sk-" + "proj-" + "Zx9y" * 10  # built here: no file holds a key-shaped string
    logger = logging.getLogger("chat.test")
    logger.warning("key %s and %s", key_shaped, SECRET_API_KEY)
    logger.warning("header Authorization: Bearer abcdefghijkl0123", extra={"note": key_shaped})
    try:
        raise ValueError(f"failed with {SECRET_API_KEY}")
    except ValueError:
        logger.exception("boom")
    output = json_log.getvalue()
    assert key_shaped not in output and SECRET_API_KEY not in output
    assert "abcdefghijkl0123" not in output
    [first, second, third] = log_lines(json_log)
    assert first["message"] == "key [redacted] and [redacted]"
    assert second["note"] == "[redacted]"
    assert "ValueError: failed with [redacted]" in third["exc_info"]


async def test_no_key_or_token_appears_in_logs_or_errors_whatever_fails(
    api, fake_openai, settings, caplog, json_log, django_user_model
):
    """Every fault the fake server offers, streamed and not, and requests with credentials: the
    API key and the tokens appear in no log record, no log line and no response."""
    from rest_framework.authtoken.models import Token

    caplog.set_level(logging.DEBUG)
    settings.OPENAI_API_KEY = SECRET_API_KEY
    settings.OPENAI_TIMEOUT = 0.5
    user = await django_user_model.objects.acreate(username="secretive")
    token = (await Token.objects.acreate(user=user)).key
    unknown_token = "unknownTokenValue0123456789abcdef"
    seen: list[str] = []

    def keep(response: httpx.Response) -> None:
        seen.append(response.text)
        seen.append(json.dumps(dict(response.headers)))

    for fault in sorted(FAULTS):
        marker = "[[fault:timeout:2]]" if fault == "timeout" else f"[[fault:{fault}]]"
        for stream in (False, True):
            response = await post_json(api, {"prompt_message": marker, "stream": stream})
            keep(response)
            if not stream:
                assert response.status_code >= 500, (fault, response.text)
    for scheme in ("Token", "Bearer"):
        for credential in (token, unknown_token):
            headers = {"Authorization": f"{scheme} {credential}"}
            keep(await api.get("/api/messages/", headers=headers))
            keep(await post_json(api, {"prompt_message": "hi"}, headers=headers))
            keep(await post_json(api, {"prompt_message": "[[fault:401]]"}, headers=headers))
    logging.getLogger("chat.test").warning("Authorization: Bearer %s", token)

    assert len(fake_openai.chat_requests()) > len(FAULTS)
    sent_keys = {r.headers.get("authorization") for r in fake_openai.chat_requests()}
    assert sent_keys == {f"Bearer {SECRET_API_KEY}"}  # the key was really in use
    everything = {
        "caplog": caplog.text + "".join(repr(r.__dict__) for r in caplog.records),
        "json log": json_log.getvalue(),
        "responses": "\n".join(seen),
    }
    for where, text in everything.items():
        assert text, where
        for secret in (SECRET_API_KEY, token, unknown_token):
            assert secret not in text, (where, secret)
    assert any(line["status"] == 401 for line in request_lines(json_log))


def test_the_admin_never_shows_the_key(admin_client, settings):
    settings.OPENAI_API_KEY = SECRET_API_KEY
    for path in ("/admin/", "/admin/chat/message/", "/admin/chat/conversation/"):
        response = admin_client.get(path)
        assert response.status_code == 200, path
        assert SECRET_API_KEY not in response.content.decode()


# --- /readyz and Redis ------------------------------------------------------------------------


@pytest.fixture
async def closing_redis() -> AsyncIterator[None]:
    from chat.redis_client import close_redis

    yield
    await close_redis()


async def test_readyz_is_503_when_redis_does_not_answer(api, settings, closing_redis):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/4"
    response = await api.get("/readyz")
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "redis_unavailable"


async def test_readyz_checks_redis_when_configured(api, settings, closing_redis):
    import redis

    url = "redis://127.0.0.1:6379/4"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is not reachable at {url} ({exc})")
        pytest.skip(f"Redis is not reachable at {url}")
    settings.REDIS_URL = url
    response = await api.get("/readyz")
    assert response.status_code == 200
    assert response.json()["redis"] == "ok"
