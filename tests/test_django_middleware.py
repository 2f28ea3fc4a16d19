"""The async-native variants of Django's middleware (config/django_middleware.py) behave as
Django's own: security headers and redirects, slash redirects, CSRF, the lazy user, framing."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpResponse
from django.test import Client, RequestFactory

from config import django_middleware

pytestmark = pytest.mark.django_db(transaction=True)


async def test_security_and_framing_headers_are_set(api):
    response = await api.get("/healthz")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "same-origin"
    assert response.headers["X-Frame-Options"] == "DENY"


async def test_https_redirect_when_configured(settings):
    settings.SECURE_SSL_REDIRECT = True  # read when the middleware is built

    async def view(request):
        return HttpResponse("reached")

    middleware = django_middleware.SecurityMiddleware(view)
    response = await middleware(RequestFactory().get("/api/messages/"))
    assert response.status_code == 301
    assert response["Location"] == "https://testserver/api/messages/"


async def test_a_missing_slash_is_redirected(api):
    response = await api.get("/api/messages")
    assert response.status_code == 301 and response.headers["Location"] == "/api/messages/"


async def test_a_form_post_without_its_csrf_token_is_refused_and_with_it_accepted(api):
    await get_user_model().objects.acreate_user(username="ann", password="pw-for-tests")
    refused = await api.post("/login/", data={"username": "ann", "password": "pw-for-tests"})
    assert refused.status_code == 403
    page = await api.get("/login/")
    token = api.cookies["csrftoken"]
    assert token and page.status_code == 200
    accepted = await api.post(
        "/login/",
        data={"username": "ann", "password": "pw-for-tests", "csrfmiddlewaretoken": token},
        headers={"Referer": "http://127.0.0.1/login/"},
    )
    assert accepted.status_code == 302 and "sessionid" in api.cookies


async def test_the_logged_in_user_reaches_the_admin(api):
    await get_user_model().objects.acreate_superuser(username="root", password="pw-for-tests")
    client = Client()
    await client.aforce_login(await get_user_model().objects.aget(username="root"))
    api.cookies["sessionid"] = client.cookies["sessionid"].value
    response = await api.get("/admin/")
    assert response.status_code == 200 and "Site administration" in response.text


def test_tokens_kept_in_the_session_are_refused_at_startup(settings):
    settings.CSRF_USE_SESSIONS = True
    with pytest.raises(ImproperlyConfigured):
        django_middleware.CsrfViewMiddleware(lambda request: None)


def test_the_deploy_checks_see_through_the_subclasses(settings):
    from chat.checks import django_security_checks

    settings.SECURE_HSTS_SECONDS = 0
    assert "security.W004" in {m.id for m in django_security_checks()}  # HSTS not set
    settings.SECURE_HSTS_SECONDS = 3600
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if "Csrf" not in m]
    assert "security.W003" in {m.id for m in django_security_checks()}  # no CSRF middleware


def test_an_insecure_session_cookie_is_still_reported(settings):
    from django.core.checks.security.sessions import check_session_cookie_secure

    settings.SESSION_COOKIE_SECURE = False
    assert {m.id for m in check_session_cookie_secure(None)} == {"security.W010"}


def _session_and_messages(view):
    """The two middleware as Django chains them (messages inside the session)."""
    return django_middleware.SessionMiddleware(django_middleware.MessageMiddleware(view))


async def test_a_modified_session_is_saved_and_its_cookie_set():
    async def remember(request):
        await request.session.aset("colour", "green")
        return HttpResponse("ok")

    response = await _session_and_messages(remember)(RequestFactory().get("/"))
    key = response.cookies["sessionid"].value
    assert key and "Cookie" in response["Vary"]

    async def recall(request):
        return HttpResponse(await request.session.aget("colour"))

    request = RequestFactory().get("/", HTTP_COOKIE=f"sessionid={key}")
    response = await _session_and_messages(recall)(request)
    assert response.content == b"green"
    assert "sessionid" not in response.cookies  # read, not modified: not saved again
    assert "Cookie" in response["Vary"]


async def test_an_untouched_session_sets_no_cookie_and_an_emptied_one_is_deleted():
    async def untouched(request):
        return HttpResponse("ok")

    response = await _session_and_messages(untouched)(RequestFactory().get("/"))
    assert not response.cookies and not response.has_header("Vary")

    async def emptied(request):
        await request.session.aflush()
        return HttpResponse("ok")

    request = RequestFactory().get("/", HTTP_COOKIE="sessionid=" + "x" * 32)
    response = await _session_and_messages(emptied)(request)
    assert response.cookies["sessionid"].value == ""  # deleted


async def test_a_message_added_in_one_request_is_shown_in_the_next():
    from django.contrib import messages

    async def add(request):
        messages.success(request, "Saved.")
        return HttpResponse("ok")

    response = await _session_and_messages(add)(RequestFactory().get("/"))
    cookie = response.cookies["messages"].value
    assert cookie

    async def show(request):
        return HttpResponse(" ".join(str(m) for m in messages.get_messages(request)))

    request = RequestFactory().get("/", HTTP_COOKIE=f"messages={cookie}")
    response = await _session_and_messages(show)(request)
    assert response.content == b"Saved."
    assert response.cookies["messages"].value == ""  # read: removed
