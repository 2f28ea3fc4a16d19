"""The OpenAPI schema, the docs page, and the repository's hygiene."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# OpenAI secret keys: "sk-" (optionally "sk-proj-" etc.) then a long run of key characters.
KEY_SHAPED = re.compile(r"sk-(?:[A-Za-z0-9]+-)?[A-Za-z0-9_\-]{20,}")


@pytest.mark.django_db
def test_schema_documents_the_contract(client):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    schema = response.json()
    paths = schema["paths"]
    assert "post" in paths["/api/messages/create/"]
    assert "get" in paths["/api/messages/"]
    assert "/api/messages/{message_id}/" in paths
    message = schema["components"]["schemas"]["Message"]["properties"]
    assert {"id", "prompt_message", "response", "created_at"} <= set(message)
    text = response.content.decode()
    assert "Привет!" in text  # the contract's example
    assert "created_at" in schema["info"]["description"]


@pytest.mark.django_db
def test_swagger_ui_is_served(client):
    response = client.get("/api/docs/")
    assert response.status_code == 200
    assert b"swagger" in response.content.lower()


def test_no_tracked_file_contains_an_openai_key():
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert files, "git ls-files returned nothing"
    offenders = []
    for name in files:
        path = ROOT / name
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        if KEY_SHAPED.search(text):
            offenders.append(name)
    assert offenders == []


def test_the_key_detector_detects_keys():
    fake = "sk-" + "proj-" + "A1b2" * 10
    assert KEY_SHAPED.search(fake)
    assert not KEY_SHAPED.search("test-key sk-short")


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    import os
    import sys

    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", **env},
        capture_output=True,
        text=True,
    )


def test_https_production_settings_pass_the_deploy_check():
    secret = "x9" * 30 + "-a-long-random-looking-secret-for-this-test-only"
    result = _manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_HTTPS="true",
        DJANGO_SECRET_KEY=secret,
        DJANGO_DEBUG="false",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_https_without_a_secret_key_refuses_to_start():
    result = _manage("check", DJANGO_HTTPS="true", DJANGO_SECRET_KEY="")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr
