"""The service as users run it: uvicorn in its own process(es), on a fresh SQLite database,
talking to the fake OpenAI server. `live_service` takes an indirect parameter: a number of
worker processes, or {"workers": N, "env": {...}}."""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import TEST_API_KEY
from tests.fake_openai import FakeOpenAI
from tests.live import BIN, ROOT, free_port, manage, start_uvicorn, stop, wait_until_serving

__all__ = ["BIN", "ROOT", "LiveService", "free_port", "read_event"]


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
    manage(env, "migrate", "-v0")
    manage(env, "collectstatic", "--noinput", "-v0")
    log_path = tmp_path / "service.log"
    process = start_uvicorn(port, env, log_path, workers=workers)
    wait_until_serving(process, log_path, port, workers=workers)
    service = LiveService(port, process, db_path, log_path)
    yield service
    stop(process)
