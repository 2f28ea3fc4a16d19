"""Who is asking: API tokens (`Token` and `Bearer`), sessions with CSRF, anonymous use, the
create_token command, tokens made in the admin, and the production default (anonymous off)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.core.cache import caches
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import URLPattern, reverse
from rest_framework.authtoken.models import Token

from chat.api import urls as api_urls
from chat.api.authentication import TOKEN_CACHE
from chat.models import Conversation, Message
from chat.services import users
from tests.conftest import JSON, authenticated, error_of
from tests.factories import amake_token

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parents[2]
CREATE_URL = "/api/messages/create/"
# Every method a client may send; each must be refused without credentials when anonymous use
# is off, whether the endpoint implements it (401 before anything runs) or not.
METHODS = ["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"]


def with_header(api: httpx.AsyncClient, authorization: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=api._transport,
        base_url=api.base_url,
        headers={"Authorization": authorization},
    )


def api_routes() -> list[tuple[str, str, bool]]:
    """(name, path, takes an id) of every route of chat/api/urls.py, ids filled with 1."""
    routes = []
    for pattern in api_urls.urlpatterns:
        assert isinstance(pattern, URLPattern), pattern
        converters = pattern.pattern.converters
        kwargs = dict.fromkeys(converters, 1)
        routes.append((pattern.name, reverse(pattern.name, kwargs=kwargs), bool(converters)))
    return routes


async def whoami(client: httpx.AsyncClient) -> dict:
    response = await client.get("/api/usage/")
    assert response.status_code == 200, response.text
    return response.json()["user"]


# --- API tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("keyword", ["Token", "Bearer", "token", "bearer", "BEARER"])
async def test_a_token_authenticates_with_either_keyword(api, fake_openai, settings, keyword):
    settings.CHAT_ALLOW_ANONYMOUS = False
    token = await amake_token("alice")
    async with with_header(api, f"{keyword} {token}") as alice:
        assert await whoami(alice) == {"username": "alice", "anonymous": False}
        created = await alice.post(CREATE_URL, json={"prompt_message": "hi"})
        assert created.status_code == 201, created.text
        listed = (await alice.get("/api/messages/")).json()
    assert [m["id"] for m in listed["results"]] == [created.json()["id"]]
    stored = await Message.objects.select_related("owner").aget(pk=created.json()["id"])
    assert stored.owner.username == "alice"


@pytest.mark.parametrize("anonymous_allowed", [True, False], ids=["anonymous-on", "anonymous-off"])
@pytest.mark.parametrize(
    "authorization",
    [
        "Token 0123456789abcdef0123456789abcdef01234567",  # well-formed, unknown
        "Bearer 0123456789abcdef0123456789abcdef01234567",
        "Token",  # no key
        "Bearer ",
        "Token two parts",
        "Bearer a b c",
    ],
    ids=["unknown-token", "unknown-bearer", "no-key", "empty-bearer", "three-parts", "four-parts"],
)
async def test_a_wrong_or_malformed_token_is_a_401_never_anonymous(
    api, fake_openai, settings, authorization, anonymous_allowed
):
    """Wrong credentials are refused even while anonymous use is on: a typo in a token must
    not silently act as the shared anonymous user."""
    settings.CHAT_ALLOW_ANONYMOUS = anonymous_allowed
    await amake_token("alice")
    async with with_header(api, authorization) as client:
        for method, path, body in [
            ("GET", "/api/messages/", None),
            ("POST", CREATE_URL, {"prompt_message": "hi"}),
            ("GET", "/api/usage/", None),
        ]:
            response = await client.request(method, path, json=body)
            assert response.status_code == 401, (authorization, path, response.text)
            error = error_of(response)
            assert error["code"] == "authentication_failed"
            assert "Token" in response.headers["WWW-Authenticate"]
            assert "Bearer" in response.headers["WWW-Authenticate"]
    assert await Message.objects.acount() == 0
    assert fake_openai.chat_requests() == []


async def test_a_token_of_an_inactive_user_is_refused(api, settings):
    token = await amake_token("alice")
    await get_user_model().objects.filter(username="alice").aupdate(is_active=False)
    async with authenticated(api, token) as client:
        response = await client.get("/api/messages/")
    assert response.status_code == 401
    assert error_of(response)["code"] == "authentication_failed"


async def test_a_token_user_is_remembered_briefly_and_changes_made_here_at_once(api, settings):
    settings.CHAT_ALLOW_ANONYMOUS = False
    settings.CHAT_TOKEN_CACHE_SECONDS = 0.5
    token = await amake_token("alice")
    async with authenticated(api, token) as alice:
        assert (await alice.get("/api/messages/")).status_code == 200
        # Deactivated by another process (an UPDATE: no signal reaches this one): the cached
        # user is still let in, for at most CHAT_TOKEN_CACHE_SECONDS.
        users = get_user_model().objects.filter(username="alice")
        await users.aupdate(is_active=False)
        assert (await alice.get("/api/messages/")).status_code == 200
        await asyncio.sleep(0.6)
        assert (await alice.get("/api/messages/")).status_code == 401
        await users.aupdate(is_active=True)
        assert (await alice.get("/api/messages/")).status_code == 200
        # Changed in this process (a save, a delete): forgotten at once.
        user = await users.aget()
        user.is_active = False
        await user.asave()
        assert (await alice.get("/api/messages/")).status_code == 401
        user.is_active = True
        await user.asave()
        assert (await alice.get("/api/messages/")).status_code == 200
        await Token.objects.filter(key=token).adelete()
        assert (await alice.get("/api/messages/")).status_code == 401
    # The cache is keyed by a digest: no token is a key of it.
    assert all(token not in key for key in caches[TOKEN_CACHE]._cache)  # type: ignore[attr-defined]

    # Without the cache (0) every request reads its token: the UPDATE is seen at once.
    settings.CHAT_TOKEN_CACHE_SECONDS = 0
    bob = await amake_token("bob")
    statuses = []
    async with authenticated(api, bob) as client:
        for active in (True, False):
            await get_user_model().objects.filter(username="bob").aupdate(is_active=active)
            statuses.append((await client.get("/api/messages/")).status_code)
    assert statuses == [200, 401]


async def test_a_key_that_is_not_ascii_is_a_401(api):
    response = await api.get(
        "/api/messages/", headers={"Authorization": "Token caf\u00e9".encode("latin-1")}
    )
    assert response.status_code == 401
    assert error_of(response)["code"] == "authentication_failed"


# --- Anonymous use off: credentials required ------------------------------------------------


def test_the_walk_covers_every_route():
    names = [name for name, _, _ in api_routes()]
    assert len(names) == len(set(names)) == len(api_urls.urlpatterns)
    assert {"message-create", "message-list", "usage", "model-list"} <= set(names)


@pytest.mark.parametrize(
    ("name", "path", "takes_id"), api_routes(), ids=[name for name, _, _ in api_routes()]
)
async def test_without_anonymous_use_every_api_endpoint_needs_credentials(
    api, fake_openai, settings, name, path, takes_id
):
    settings.CHAT_ALLOW_ANONYMOUS = False
    for method in METHODS:
        body = json.dumps({"prompt_message": "hi", "title": "t"}) if method != "GET" else None
        response = await api.request(method, path, content=body, headers=JSON)
        assert response.status_code == 401, (method, path, response.status_code, response.text)
        assert "Token" in response.headers["WWW-Authenticate"], (method, path)
        if method != "HEAD":
            error = error_of(response)
            assert error["code"] == "not_authenticated", (method, path)
    assert await Message.objects.acount() == 0
    assert await Conversation.objects.acount() == 0
    assert fake_openai.chat_requests() == []


async def test_without_anonymous_use_the_probes_stay_open(api, settings):
    settings.CHAT_ALLOW_ANONYMOUS = False
    healthz = await api.get("/healthz")
    assert healthz.status_code == 200 and healthz.json() == {"status": "ok"}
    readyz = await api.get("/readyz")
    assert readyz.status_code == 200 and readyz.json()["status"] == "ready"


async def test_without_anonymous_use_a_token_still_works(api, fake_openai, settings):
    settings.CHAT_ALLOW_ANONYMOUS = False
    async with authenticated(api, await amake_token("alice")) as alice:
        for name, path, takes_id in api_routes():
            if takes_id:  # test_isolation.py walks those with real ids
                continue
            if name == "message-create":
                response = await alice.post(path, json={"prompt_message": "hi"})
                assert response.status_code == 201, response.text
            else:
                response = await alice.get(path)
                assert response.status_code == 200, (path, response.text)


# --- Anonymous use on: one shared user --------------------------------------------------------


async def test_with_anonymous_use_no_credentials_act_as_the_shared_user(api, fake_openai, settings):
    settings.CHAT_ALLOW_ANONYMOUS = True
    assert await whoami(api) == {"username": settings.CHAT_ANONYMOUS_USERNAME, "anonymous": True}
    created = await api.post(CREATE_URL, json={"prompt_message": "from anyone"})
    assert created.status_code == 201
    stored = await Message.objects.select_related("owner").aget(pk=created.json()["id"])
    assert stored.owner.username == settings.CHAT_ANONYMOUS_USERNAME
    owner = await sync_to_async(users.anonymous_user)()
    assert not owner.has_usable_password()

    # Another client without credentials, from another address, is the same shared user.
    other = httpx.ASGITransport(app=api._transport.app, client=("10.0.0.2", 1))
    async with httpx.AsyncClient(transport=other, base_url=api.base_url) as elsewhere:
        seen = (await elsewhere.get("/api/messages/")).json()
    assert [m["id"] for m in seen["results"]] == [created.json()["id"]]

    # A user with a token does not see the anonymous user's messages.
    async with authenticated(api, await amake_token("alice")) as alice:
        assert (await alice.get("/api/messages/")).json()["count"] == 0


# --- Sessions: the admin's and the chat page's login; CSRF on writes --------------------------


async def _session_client(api: httpx.AsyncClient, username: str) -> httpx.AsyncClient:
    """A client of the application carrying the session cookie of a logged-in `username`."""

    def login() -> str:
        user = get_user_model().objects.create_user(username=username, password="pw-for-tests")
        client = Client()
        client.force_login(user)
        return client.cookies["sessionid"].value

    session = await sync_to_async(login)()
    return httpx.AsyncClient(
        transport=api._transport, base_url=api.base_url, cookies={"sessionid": session}
    )


async def test_a_session_reads_and_writes_only_with_the_csrf_token(api, fake_openai, settings):
    settings.CHAT_ALLOW_ANONYMOUS = False
    async with await _session_client(api, "carol") as carol:
        assert await whoami(carol) == {"username": "carol", "anonymous": False}
        assert (await carol.get("/api/conversations/")).status_code == 200

        refused = await carol.post("/api/conversations/", json={"title": "no csrf"})
        assert refused.status_code == 403
        error = error_of(refused)
        assert error["code"] == "permission_denied"
        assert "CSRF" in error["message"]
        assert await Conversation.objects.acount() == 0

        # The login page sets the csrftoken cookie, as a browser would get it.
        page = await carol.get("/admin/login/")
        assert page.status_code in (200, 302)
        csrf = carol.cookies.get("csrftoken")
        assert csrf

        wrong = await carol.post(
            "/api/conversations/", json={"title": "wrong csrf"}, headers={"X-CSRFToken": "x" * 32}
        )
        assert wrong.status_code == 403

        accepted = await carol.post(
            "/api/conversations/", json={"title": "with csrf"}, headers={"X-CSRFToken": csrf}
        )
        assert accepted.status_code == 201, accepted.text
        sent = await carol.post(
            CREATE_URL, json={"prompt_message": "by session"}, headers={"X-CSRFToken": csrf}
        )
        assert sent.status_code == 201, sent.text
    conversation = await Conversation.objects.select_related("owner").aget(title="with csrf")
    assert conversation.owner.username == "carol"
    assert len(fake_openai.chat_requests()) == 1


async def test_a_token_needs_no_csrf_even_next_to_a_session(api, fake_openai, settings):
    """API clients authenticate per request: no CSRF token (the token comes first)."""
    settings.CHAT_ALLOW_ANONYMOUS = False
    token = await amake_token("alice")
    async with await _session_client(api, "carol") as client:
        client.headers["Authorization"] = f"Token {token}"
        response = await client.post("/api/conversations/", json={"title": "by token"})
        assert response.status_code == 201
        assert await whoami(client) == {"username": "alice", "anonymous": False}


# --- manage.py create_token -------------------------------------------------------------------


def _create_token(*args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    call_command("create_token", *args, stdout=out, stderr=err)
    return out.getvalue()


async def test_create_token_prints_only_the_key_and_the_key_works(api, fake_openai, settings):
    settings.CHAT_ALLOW_ANONYMOUS = False
    printed = await sync_to_async(_create_token)("dave")
    key = printed.strip()
    assert printed == key + "\n"  # one line, nothing else
    assert len(key) == 40 and key.isalnum()
    user = await get_user_model().objects.aget(username="dave")
    assert not user.has_usable_password()  # an API-only user
    assert await sync_to_async(lambda: Token.objects.get(user=user).key)() == key

    # Again: the same token. --rotate: a new one, and the old one stops working.
    assert (await sync_to_async(_create_token)("dave")).strip() == key
    rotated = (await sync_to_async(_create_token)("dave", "--rotate")).strip()
    assert rotated != key and len(rotated) == 40

    async with authenticated(api, rotated) as dave:
        response = await dave.post(CREATE_URL, json={"prompt_message": "with my token"})
        assert response.status_code == 201
        assert await whoami(dave) == {"username": "dave", "anonymous": False}
    async with authenticated(api, key) as stale:
        assert (await stale.get("/api/messages/")).status_code == 401


async def test_create_token_for_an_existing_user_keeps_their_password(api):
    def make() -> None:
        get_user_model().objects.create_user(username="erin", password="pw-for-tests")

    await sync_to_async(make)()
    key = (await sync_to_async(_create_token)("erin")).strip()
    user = await get_user_model().objects.aget(username="erin")
    assert user.check_password("pw-for-tests")
    async with authenticated(api, key) as erin:
        assert await whoami(erin) == {"username": "erin", "anonymous": False}


@pytest.mark.parametrize(
    ("username", "message"),
    [("anonymous", "shared user"), ("bad name!", "Invalid username"), ("", "Invalid username")],
)
def test_create_token_refuses_bad_usernames(settings, username, message):
    with pytest.raises(CommandError, match=message):
        _create_token(username)
    assert not Token.objects.exists()


# --- Tokens made in the admin -----------------------------------------------------------------


async def test_an_admin_creates_a_token_in_the_admin(api, admin_client, settings):
    settings.CHAT_ALLOW_ANONYMOUS = False

    def add_token() -> tuple[int, int, str]:
        user = get_user_model().objects.create_user(username="frank")
        page = admin_client.get("/admin/authtoken/tokenproxy/add/")
        posted = admin_client.post("/admin/authtoken/tokenproxy/add/", {"user": user.pk})
        listing = admin_client.get("/admin/authtoken/tokenproxy/")
        assert listing.status_code == 200 and b"frank" in listing.content
        return page.status_code, posted.status_code, Token.objects.get(user=user).key

    page_status, post_status, key = await sync_to_async(add_token)()
    assert page_status == 200
    assert post_status == 302
    async with authenticated(api, key) as frank:
        assert await whoami(frank) == {"username": "frank", "anonymous": False}


# --- Production settings: anonymous use off unless set -------------------------------------


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    """manage.py in its own process, with the settings' own defaults for anonymous use."""
    inherited = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CHAT_ALLOW_ANONYMOUS", "DJANGO_HTTPS", "DJANGO_SECRET_KEY", "DJANGO_DEBUG")
    }
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**inherited, "DJANGO_SETTINGS_MODULE": "config.settings", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


PRODUCTION = {
    "DJANGO_HTTPS": "true",
    "DJANGO_SECRET_KEY": "q7" * 25 + "-Zk3-a-long-random-looking-secret-for-tests-only",
    "DJANGO_DEBUG": "false",
}
SHOW_SETTING = (
    "shell",
    "--no-imports",
    "-c",
    "from django.conf import settings; print(settings.CHAT_ALLOW_ANONYMOUS)",
)


def test_production_is_deploy_clean_and_anonymous_use_is_off_by_default():
    check = _manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)
    assert check.returncode == 0, check.stdout + check.stderr
    shown = _manage(*SHOW_SETTING, **PRODUCTION)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "False"


def test_production_may_turn_anonymous_use_on_explicitly():
    shown = _manage(*SHOW_SETTING, CHAT_ALLOW_ANONYMOUS="true", **PRODUCTION)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "True"
    check = _manage("check", "--deploy", CHAT_ALLOW_ANONYMOUS="true", **PRODUCTION)
    assert check.returncode == 0, check.stdout + check.stderr


def test_local_development_allows_anonymous_use_by_default():
    shown = _manage(*SHOW_SETTING)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == "True"


def test_the_schema_documents_both_token_forms(client):
    schema = client.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    scheme = schema["components"]["securitySchemes"]["tokenAuth"]
    assert scheme["in"] == "header" and scheme["name"] == "Authorization"
    assert "Token <key>" in scheme["description"] and "Bearer <key>" in scheme["description"]
    assert {"tokenAuth": []} in schema["paths"]["/api/usage/"]["get"]["security"]
