"""The service as users run it, for the browser tests and the screenshot script: uvicorn in its
own process on a free port (Django's WSGI live server would buffer the event streams), a fresh
SQLite file, the fake OpenAI server behind OPENAI_BASE_URL; and headless Chromium (Debian's
package, driven by Playwright without any browser download)."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import TEST_API_KEY
from tests.live import BIN, ROOT, free_port, start_uvicorn, stop, wait_until_serving

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_chromium() -> None:
    """Skip the calling test module when Chromium is missing; under CI=true, fail instead."""
    if CHROMIUM.exists():
        return
    message = f"Chromium not installed ({CHROMIUM}): apt-get install chromium"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: the browser tests must run)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


@dataclass
class Service:
    port: int
    process: subprocess.Popen
    env: dict[str, str]
    log_path: Path
    cookies: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        payload = json.dumps(body) if body is not None else None
        conn.request(method, path, payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        conn.close()
        try:
            return response.status, json.loads(raw or b"null")
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def stop(self) -> None:
        stop(self.process)


def _base_env(database: Path, openai_url: str, settings: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": f"sqlite:///{database}",
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": openai_url,
        "OPENAI_MAX_RETRIES": "0",
        "OPENAI_TIMEOUT": "5",
        "CHAT_STREAM_SAVE_INTERVAL": "0.1",
        "LOG_LEVEL": "WARNING",
        # The suite sends more than the default 30 prompts a minute from one address; the
        # page's handling of rate limits is tested with the API's answers routed in the browser.
        "CHAT_THROTTLE_ANON": "",
        "CHAT_THROTTLE_USER": "",
        **settings,
    }


_SETUP = """
from django.contrib.auth import get_user_model
from django.core.management import call_command

call_command("migrate", verbosity=0)
if {collectstatic!r}:
    call_command("collectstatic", interactive=False, verbosity=0)
for name, password in {users!r}.items():
    user, _ = get_user_model().objects.get_or_create(username=name)
    user.set_password(password)
    user.save()
"""


def prepare_database(
    path: Path, *, users: dict[str, str] | None = None, collectstatic: bool = True
) -> Path:
    """A migrated SQLite database with these users (username: password), in one Django
    process (each start of one costs seconds); also collects the static files `make run`
    serves. Services copy it (start_service(database=...))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if collectstatic:
        (ROOT / "var" / "static").mkdir(parents=True, exist_ok=True)
    code = _SETUP.format(collectstatic=collectstatic, users=dict(users or {}))
    subprocess.run(
        [BIN / "python", "manage.py", "shell", "--verbosity", "0", "-c", code],
        cwd=ROOT,
        env=_base_env(path, "http://127.0.0.1:9/v1", {}),
        check=True,
    )
    return path


def start_service(
    directory: Path, openai_url: str, *, database: Path | None = None, **settings: str
) -> Service:
    """Serves the project under uvicorn with a copy of `database` (default: a fresh one,
    migrated); `settings` are extra environment variables (e.g. CHAT_ALLOW_ANONYMOUS="false")."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "db.sqlite3"
    if database is None:
        prepare_database(path)
    else:
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{database}{suffix}")
            if source.exists():
                shutil.copyfile(source, f"{path}{suffix}")
    env = _base_env(path, openai_url, settings)
    port = free_port()
    log_path = directory / "service.log"
    process = start_uvicorn(port, env, log_path)
    service = Service(port, process, env, log_path)
    try:
        wait_until_serving(process, log_path, port, timeout=30)
    except RuntimeError:
        service.stop()
        raise
    return service
