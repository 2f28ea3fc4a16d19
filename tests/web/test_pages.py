"""The web page's server side, without a browser: what `/`, `/login/` and `/logout/` answer, their
Content-Security-Policy, the CHAT_WEB_UI switch, and the vendored libraries."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from web.views import CONTENT_SECURITY_POLICY

STATIC = Path(__file__).resolve().parents[2] / "web" / "static"
pytestmark = pytest.mark.django_db


def _scripts(html: str) -> list[str]:
    return re.findall(r"<script\b[^>]*>", html)


def test_the_page_is_served_at_the_root_with_a_strict_csp(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    assert response["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    for directive in ("script-src 'self'", "style-src 'self'", "object-src 'none'"):
        assert directive in CONTENT_SECURITY_POLICY
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert "no-cache" in response["Cache-Control"]
    html = response.content.decode()
    # No inline code or style: scripts are files, data is a JSON block.
    for tag in _scripts(html):
        assert " src=" in tag or 'type="application/json"' in tag, tag
    assert " style=" not in html and "<style" not in html
    assert not re.search(r"\son[a-z]+\s*=", html)


def test_the_page_passes_its_settings_as_data(client, settings):
    settings.OPENAI_ALLOWED_MODELS = ["gpt-4o", "gpt-4o-mini"]
    settings.OPENAI_MODEL = "gpt-4o-mini"
    html = client.get("/").content.decode()
    block = re.search(
        r'<script id="chat-config" type="application/json">(.*?)</script>', html, re.S
    )
    config = json.loads(block.group(1))
    assert config["models"] == ["gpt-4o", "gpt-4o-mini"]
    assert config["defaultModel"] == "gpt-4o-mini"
    assert config["apiRoot"] == "/api/"
    assert config["loginUrl"] == "/login/"
    assert config["user"] == {"username": "", "authenticated": False}
    token = re.search(r'<meta name="csrf-token" content="([^"]+)">', html).group(1)
    assert len(token) >= 32
    assert "csrftoken" in client.cookies


def test_the_static_files_the_page_names_exist(client):
    html = client.get("/").content.decode()
    assets = re.findall(r'(?:src|href)="/static/([^"]+)"', html)
    assert {"web/app.js", "web/app.css", "web/vendor/markdown-it/markdown-it.min.js"} <= set(assets)
    for asset in assets:
        assert (STATIC / asset).is_file(), asset
    # app.js's own imports
    for module in re.findall(r'from "\./([\w.]+)"', (STATIC / "web" / "app.js").read_text()):
        assert (STATIC / "web" / module).is_file(), module


def test_the_vendored_libraries_carry_their_versions_and_licences():
    vendor = STATIC / "web" / "vendor"
    readme = (vendor / "README.md").read_text()
    assert "markdown-it" in readme and "15.0.3" in readme and "MIT" in readme
    assert "DOMPurify" in readme and "3.5.0" in readme and "Apache-2.0" in readme
    assert (vendor / "markdown-it" / "LICENSE").is_file()
    assert (vendor / "dompurify" / "LICENSE").is_file()
    assert (vendor / "dompurify" / "LICENSE-MPL").is_file()
    assert "DOMPurify 3.5.0" in (vendor / "dompurify" / "purify.min.js").read_text()[:200]
    # The files are the packages' own, byte for byte: the checksums the README lists.
    checksums = re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M)
    listed = {name: digest for digest, name in checksums}
    assert set(listed) == {"markdown-it/markdown-it.min.js", "dompurify/purify.min.js"}
    for name, digest in listed.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.django_db(transaction=True)  # the API's ORM runs on its own threads
def test_the_setting_turns_the_page_off(client, settings):
    settings.CHAT_WEB_UI = False
    for path in ("/", "/login/", "/logout/"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert client.get("/api/messages/").status_code == 200  # the API is untouched


@pytest.mark.django_db(transaction=True)  # the API's ORM runs on its own threads
def test_the_other_routes_are_kept(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/api/conversations/").status_code == 200
    assert client.get("/api/docs/").status_code == 200
    assert client.get("/nowhere/").json()["error"]["code"] == "not_found"


def test_the_login_page(client):
    response = client.get("/login/?next=/%3Fc%3D3")
    assert response.status_code == 200
    assert response["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    html = response.content.decode()
    assert '<label for="id_username">Username</label>' in html
    assert '<label for="id_password">Password</label>' in html
    assert 'name="csrfmiddlewaretoken"' in html
    assert 'name="next" value="/?c=3"' in html
    assert not _scripts(html)


def test_logging_in_and_out(client, settings):
    get_user_model().objects.create_user("dora", password="dora-pass-4411")
    response = client.post("/login/", {"username": "dora", "password": "wrong", "next": "/"})
    assert response.status_code == 200
    assert "correct username and password" in response.content.decode()

    response = client.post("/login/", {"username": "dora", "password": "dora-pass-4411"})
    assert response.status_code == 302 and response["Location"] == "/"
    html = client.get("/").content.decode()
    assert "dora" in html and "Log out" in html
    assert client.get("/login/")["Location"] == "/"  # already logged in

    assert client.get("/logout/").status_code == 405  # POST only (a CSRF-protected form)
    response = client.post("/logout/")
    assert response.status_code == 302 and response["Location"] == "/login/"
    assert "Log in" in client.get("/").content.decode()


def test_login_is_required_when_anonymous_use_is_off(client, settings):
    settings.CHAT_ALLOW_ANONYMOUS = False
    response = client.get("/?c=4")
    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/%3Fc%3D4"
    assert "Continue without an account" not in client.get("/login/").content.decode()

    get_user_model().objects.create_user("erin", password="erin-pass-9090")
    client.login(username="erin", password="erin-pass-9090")
    response = client.get("/")
    assert response.status_code == 200
    assert "erin" in response.content.decode()


def test_logout_needs_the_csrf_token():
    from django.test import Client

    csrf_client = Client(enforce_csrf_checks=True)
    assert csrf_client.post("/logout/").status_code == 403
