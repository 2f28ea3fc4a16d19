"""The service as users run it: uvicorn in its own process(es), on a fresh SQLite database,
talking to the fake OpenAI server. `live_service` takes an indirect parameter: a number of
worker processes, or {"workers": N, "env": {...}}."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TEST_API_KEY
from tests.fake_openai import FakeOpenAI

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveService:
    port: int
    process: subprocess.Popen
    db_path: Path
    log_path: Path

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        payload = json.dumps(body) if body is not None else None
        conn.request(method, path, payload, {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = json.loads(response.read() or b"null")
        conn.close()
        return response.status, data

    def open_stream(
        self, body: dict
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(
            "POST",
            "/api/messages/create/",
            json.dumps({**body, "stream": True}),
            {"Content-Type": "application/json"},
        )
        return conn, conn.getresponse()

    def stored(self, message_id: int) -> dict:
        with sqlite3.connect(self.db_path) as db:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM chat_message WHERE id = ?", (message_id,)).fetchone()
            return dict(row)


def read_event(response: http.client.HTTPResponse) -> tuple[str, dict]:
    name, data = "", ""
    while True:
        line = response.fp.readline().decode()
        if not line:
            raise EOFError
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data = line.split(":", 1)[1].strip()
        elif line == "\n" and data:
            return name, json.loads(data)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def live_service(request, tmp_path, fake) -> Iterator[LiveService]:
    param = getattr(request, "param", 1)
    workers = param if isinstance(param, int) else param.get("workers", 1)
    extra_env = {} if isinstance(param, int) else param.get("env", {})
    port = free_port()
    db_path = tmp_path / "db.sqlite3"
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{db_path}",
        "OPENAI_API_KEY": TEST_API_KEY,
        "OPENAI_BASE_URL": fake.url,
        "OPENAI_MAX_RETRIES": "0",
        "CHAT_STREAM_SAVE_INTERVAL": "0.1",
        "CHAT_THROTTLE_ANON": "",
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "METRICS_DIR": str(tmp_path / "metrics"),
        "LOG_FORMAT": "json",
        **extra_env,
    }
    subprocess.run([BIN / "python", "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    subprocess.run(
        [BIN / "python", "manage.py", "collectstatic", "--noinput", "-v0"],
        cwd=ROOT,
        env=env,
        check=True,
    )
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                BIN / "uvicorn",
                "config.asgi:application",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--timeout-graceful-shutdown",
                "1",
                "--workers",
                str(workers),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    service = LiveService(port, process, db_path, log_path)
    deadline = time.monotonic() + 20
    while True:
        try:
            if service.request("GET", "/api/messages/")[0] == 200:
                break
        except OSError:
            pass
        assert process.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.1)
    yield service
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=15)
