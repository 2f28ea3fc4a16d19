"""The service as users run it, for the browser tests and the screenshot script: uvicorn in its
own process on a free port (Django's WSGI live server would buffer the event streams), a fresh
SQLite file, the fake OpenAI server behind OPENAI_BASE_URL; and headless Chromium (Debian's
package, driven by Playwright without any browser download)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import TEST_API_KEY

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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

    def manage(self, *args: str) -> str:
        """Runs a manage.py command against this service's database."""
        result = subprocess.run(
            [BIN / "python", "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    def create_user(self, username: str, password: str) -> None:
        self.manage(
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model; "
            f"get_user_model().objects.create_user({username!r}, password={password!r})",
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_service(
    directory: Path, openai_url: str, *, collectstatic: bool = True, **settings: str
) -> Service:
    """Migrates a fresh SQLite database in `directory` and serves the project under uvicorn;
    `settings` are extra environment variables (e.g. CHAT_ALLOW_ANONYMOUS="false")."""
    directory.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": f"sqlite:///{directory / 'db.sqlite3'}",
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": openai_url,
        "OPENAI_MAX_RETRIES": "0",
        "OPENAI_TIMEOUT": "5",
        "CHAT_STREAM_SAVE_INTERVAL": "0.1",
        "LOG_LEVEL": "WARNING",
        **settings,
    }
    subprocess.run([BIN / "python", "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    if collectstatic:
        (ROOT / "var" / "static").mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [BIN / "python", "manage.py", "collectstatic", "--noinput", "-v0"],
            cwd=ROOT,
            env=env,
            check=True,
        )
    port = free_port()
    log_path = directory / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                BIN / "uvicorn",
                "config.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--timeout-graceful-shutdown",
                "1",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    service = Service(port, process, env, log_path)
    deadline = time.monotonic() + 30
    while True:
        try:
            if service.request("GET", "/healthz")[0] == 200:
                return service
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            service.stop()
            raise RuntimeError(f"the service did not start:\n{log_path.read_text()}")
        time.sleep(0.1)
