"""What a benchmark runs against: the fake OpenAI upstream, the database, the service.

Every server is a subprocess with its log in the run's workspace (a temporary directory, kept
when a run fails or with ``--keep``). The service is started as ``make run`` does (uvicorn,
uvloop + httptools), as ``--instances`` independent process groups on ports of their own, the
way several hosts would run it; they share the database (and Redis, when given).
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from bench import BenchError
from bench.config import Deployment, Upstream
from bench.http_client import ConnectionClosed, Endpoint, ProtocolError

ROOT = Path(__file__).resolve().parent.parent
_VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(_VENV_BIN / "python") if (_VENV_BIN / "python").exists() else sys.executable
UVICORN = str(_VENV_BIN / "uvicorn") if (_VENV_BIN / "uvicorn").exists() else "uvicorn"

#: How `make run` starts the service; {host}, {port} and {workers} are filled in.
DEFAULT_SERVER_CMD = (
    f"{UVICORN} config.asgi:application --host {{host}} --port {{port}} --workers {{workers}} "
    "--loop uvloop --http httptools --no-access-log --timeout-graceful-shutdown 10"
)
HOST = "127.0.0.1"
READY_PATH = "/api/messages/?page_size=1"
LOG_PROBLEM_MARKERS = (
    "Traceback",
    "ERROR",
    "Error:",
    "WARNING",
    "Warning:",
    "CRITICAL",
    "Exception",
)


class Workspace:
    """The run's temporary directory: logs, and the SQLite database unless one is given."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="bench-"))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(process: subprocess.Popen[bytes] | None, grace: float) -> int | None:
    """SIGTERM, then SIGKILL after `grace` seconds; the exit code."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def clean_exit(code: int | None) -> bool:
    # uvicorn re-raises the SIGTERM it handled, so -15 is a clean shutdown too.
    return code in (0, -signal.SIGTERM, None)


def log_problems(path: Path) -> Counter[str]:
    """The log's warning and error lines (timestamps cut), by number of occurrences."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return Counter()
    return Counter(
        re.sub(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+\s*", "", line.strip())
        for line in lines
        if any(marker in line for marker in LOG_PROBLEM_MARKERS)
    )


class FakeUpstream:
    """The project's fake OpenAI server (``tests.fake_openai``): replies ``Echo: <prompt>``
    after the upstream latency, streamed in its number of chunks."""

    def __init__(self, workspace: Workspace, upstream: Upstream) -> None:
        self.latency = upstream.latency
        self.log = workspace.path / "fake-openai.log"
        self.command = [
            PYTHON,
            *("-m", "tests.fake_openai", "--host", HOST, "--port", "0"),
            *("--latency", f"{upstream.latency:g}", "--chunks", str(upstream.chunks)),
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log
            )
        assert self.process.stdout is not None
        line = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.2)
            if ready:
                line = self.process.stdout.readline()
                break
        text = line.decode().strip()
        if "listening on" not in text:
            raise BenchError(f"fake OpenAI server did not start ({text!r}):\n{tail(self.log)}")
        self.url = text.rsplit(" ", 1)[1]

    def stop(self) -> int | None:
        return stop_process(self.process, 10)


@dataclass
class Database:
    """The database the service uses: given by URL, or a SQLite file (kept at `--keep-db`, or
    a fresh one in the workspace)."""

    url: str
    fresh: bool  # created empty for this run: nothing to flush

    @classmethod
    def choose(cls, workspace: Workspace, *, url: str | None, keep_db: Path | None) -> Database:
        if url:
            return cls(url, fresh=False)
        if keep_db is not None:
            return cls(f"sqlite:///{keep_db.resolve()}", fresh=not keep_db.exists())
        return cls(f"sqlite:///{workspace.path / 'db.sqlite3'}", fresh=True)

    @property
    def vendor(self) -> str:
        return "sqlite" if self.url.startswith("sqlite") else self.url.split(":", 1)[0]


@dataclass
class Instance:
    """One service process group (uvicorn and its workers) on a port of its own."""

    port: int
    command: list[str]
    log: Path
    process: subprocess.Popen[bytes]

    def processes(self) -> list[psutil.Process]:
        """The supervisor and its descendants (workers, multiprocessing's helpers)."""
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]


def endpoint_from_url(url: str, token: str | None) -> Endpoint:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise BenchError(f"--url must be http://host[:port][/base], not {url!r}")
    return Endpoint(parts.hostname, parts.port or 80, parts.path.rstrip("/"), token)


class Stack:
    """What one run starts, in order: the fake upstream (if the scenario calls the model), the
    database, the service's instances. With `--url` it starts nothing and uses those."""

    def __init__(self, deployment: Deployment, workspace: Workspace) -> None:
        self.deployment = deployment
        self.workspace = workspace
        self.upstream: FakeUpstream | None = None
        self.database: Database | None = None
        self.instances: list[Instance] = []  # running now
        self.stopped: list[tuple[Instance, int | None]] = []  # and their exit codes
        self.token = deployment.token
        self.endpoints = [endpoint_from_url(url, deployment.token) for url in deployment.urls]

    @property
    def environment(self) -> dict[str, str]:
        """What the service (and its manage.py commands) get on top of this environment."""
        env: dict[str, str] = {}
        if self.upstream is not None:
            env["OPENAI_API_KEY"] = "bench-key"
            env["OPENAI_BASE_URL"] = self.upstream.url
            env["OPENAI_MAX_RETRIES"] = "0"
            env["OPENAI_TIMEOUT"] = f"{self.upstream.latency * 2 + 20:g}"
        if self.database is not None:
            env["DATABASE_URL"] = self.database.url
        if self.deployment.redis_url:
            env["REDIS_URL"] = self.deployment.redis_url
        env["LOG_LEVEL"] = "WARNING"
        # The load is N anonymous clients from one address: the anonymous rate limit and the
        # per-user concurrency cap would refuse nearly all of it (--env sets them back).
        env["CHAT_THROTTLE_ANON"] = ""
        env["CHAT_MAX_CONCURRENT_PER_USER"] = "0"
        env.update(self.deployment.extra_env)
        return env

    def _process_environment(self) -> dict[str, str]:
        # DEBUG would keep every SQL query in memory.
        env = {"DJANGO_DEBUG": "false", "PYTHONUNBUFFERED": "1", **os.environ}
        env.update(self.environment)
        return env

    def start_upstream(self, upstream: Upstream) -> None:
        self.upstream = FakeUpstream(self.workspace, upstream)
        self.upstream.start()

    def prepare_database(self, *, flush: bool = True) -> Database:
        """Choose the database and migrate it; empty it too, unless it is new or `flush` is
        off (the deep-history scenario keeps a seeded one)."""
        self.database = Database.choose(
            self.workspace, url=self.deployment.database_url, keep_db=self.deployment.keep_db
        )
        self.manage(["migrate", "--noinput"])
        if flush and not self.database.fresh:
            self.manage(["flush", "--noinput"])
        if self.deployment.user:
            # The user's token, made for this run: its limits and budget apply.
            self.token = self.manage(["create_token", self.deployment.user, "--rotate"]).split()[-1]
        return self.database

    def manage(self, args: list[str], timeout: float = 3600) -> str:
        """Run ``manage.py`` with the service's environment; its standard output."""
        log = self.workspace.path / "manage.log"
        completed = subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=ROOT,
            env=self._process_environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        with log.open("a") as file:
            file.write(f"$ manage.py {shlex.join(args)}\n{completed.stdout}{completed.stderr}")
        if completed.returncode != 0:
            raise BenchError(
                f"manage.py {args[0]} failed (exit {completed.returncode}):\n"
                f"{completed.stdout}{completed.stderr}"
            )
        return completed.stdout

    async def start_service(
        self, *, instances: int | None = None, workers: int | None = None
    ) -> None:
        """Start the deployment's instances (or as many as given, with as many workers) and wait
        until each answers."""
        env = self._process_environment()
        deployment = self.deployment
        for _ in range(instances or deployment.instances):
            port = free_port()
            command = shlex.split(
                deployment.server_cmd.format(
                    host=HOST, port=port, workers=workers or deployment.workers
                )
            )
            number = len(self.stopped) + len(self.instances) + 1
            log = self.workspace.path / f"service-{number}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            self.instances.append(Instance(port, command, log, process))
        self.endpoints = [Endpoint(HOST, i.port, token=self.token) for i in self.instances]
        for instance, endpoint in zip(self.instances, self.endpoints, strict=True):
            await _wait_ready(instance, endpoint)

    def stop_service(self) -> None:
        """Stop the running instances (all at once, then wait for each)."""
        for instance in self.instances:
            if instance.process.poll() is None:
                instance.process.send_signal(signal.SIGTERM)
        self.stopped += [(i, stop_process(i.process, 20)) for i in self.instances]
        self.instances = []
        self.endpoints = []

    def server_processes(self) -> list[psutil.Process]:
        """Every process of every instance."""
        return [process for instance in self.instances for process in instance.processes()]

    def upstream_process(self) -> psutil.Process | None:
        if self.upstream is None or self.upstream.process is None:
            return None
        return psutil.Process(self.upstream.process.pid)

    def describe(self) -> dict[str, Any]:
        """The header of a report: what runs, with which environment."""
        info: dict[str, Any] = {"urls": [endpoint.url for endpoint in self.endpoints]}
        if self.upstream is not None:
            info["fake_command"] = shlex.join(self.upstream.command)
            info["fake_url"] = self.upstream.url
        if self.instances:
            info["service_commands"] = [shlex.join(i.command) for i in self.instances]
            info["env"] = self.environment
            info["server_processes"] = [
                {"pid": p.pid, "threads": p.num_threads(), "cmdline": " ".join(p.cmdline())}
                for p in self.server_processes()
            ]
        if self.deployment.user:
            info["auth"] = f"Authorization: Token <the token of user {self.deployment.user!r}>"
        elif self.deployment.token:
            info["auth"] = "Authorization: Token <--token>"
        return info

    def stop(self) -> dict[str, Any]:
        """Stop everything; the exit codes, and the service logs' warnings and errors."""
        self.stop_service()
        info: dict[str, Any] = {}
        if self.upstream is not None:
            info["fake_exit"] = self.upstream.stop()
        if self.stopped:
            problems: Counter[str] = Counter()
            for instance, _ in self.stopped:
                problems += log_problems(instance.log)
            exits = [code for _, code in self.stopped]
            info["service_exit"] = exits
            info["services_exited_cleanly"] = all(clean_exit(code) for code in exits)
            info["service_log_problem_lines"] = problems.total()
            info["service_log_problems"] = problems.most_common(15)
        return info

    def log_tails(self) -> dict[str, str]:
        tails = {instance.log.name: tail(instance.log) for instance, _ in self.stopped}
        if self.upstream is not None:
            tails[self.upstream.log.name] = tail(self.upstream.log, 20)
        return tails


async def _wait_ready(instance: Instance, endpoint: Endpoint, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if instance.process.poll() is not None:
            raise BenchError(
                f"service exited with {instance.process.returncode} during startup:\n"
                f"{tail(instance.log)}"
            )
        try:
            response = await endpoint.get(READY_PATH, timeout=5)
            if response.status == 200:
                return
            last = f"HTTP {response.status}: {response.body[:200]!r}"
        except (OSError, TimeoutError, ConnectionClosed, ProtocolError) as exc:
            last = repr(exc)
        await asyncio.sleep(0.2)
    raise BenchError(f"service not ready after {timeout:g} s ({last}):\n{tail(instance.log)}")
