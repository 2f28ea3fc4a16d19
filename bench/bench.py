"""Load benchmark for the chat service: N concurrent clients against a fake OpenAI upstream.

Run with ``make bench BENCH_ARGS="..."`` or ``.venv/bin/python bench/bench.py ...``.

By default it starts its own fake OpenAI server (``tests.fake_openai``) and the service (uvicorn,
exactly as ``make run`` does, with a fresh SQLite database in a temporary directory), then drives
``--concurrency`` closed-loop clients for ``--warmup`` + ``--duration`` seconds.  Each client
sends one request at a time on its own keep-alive connection, reads the whole response and
checks it.  The load generator is this process (asyncio on uvloop, a minimal HTTP/1.1 client
built on ``asyncio.Protocol`` so that it stays light on CPU); both servers are subprocesses.

Clients start spread evenly over ``--ramp`` seconds (default: one upstream latency), so that
their requests are spread over the cycle instead of arriving in synchronised bursts of N; the
warmup is stretched to cover the ramp (``--ramp 0`` starts every client at once).

Statistics cover the measured window ``[warmup, warmup + duration]``:

* latency percentiles over the successful requests that *started* in the window (each is
  followed to its end, even if it ends after the window);
* throughput = successful requests' worth of work done in the window per second: each
  successful request contributes the fraction of its lifetime that lies in the window
  (so a long-latency run is not quantised into whole "batches" of completions); the plain
  count of completions inside the window is printed next to it;
* server CPU (user+sys of the server process tree, from /proc) between the window's edges,
  divided by the throughput above for "CPU ms per request"; peak RSS is VmHWM.

After the clients stop, the number of stored messages (``GET /api/messages/?page_size=1``)
must equal the number of successful responses, warmup included.  Exit status 1 on any
failed request, on a mismatch, or if a server fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
UVICORN = str(VENV_BIN / "uvicorn") if (VENV_BIN / "uvicorn").exists() else "uvicorn"

CREATE_PATH = "/api/messages/create/"
COUNT_PATH = "/api/messages/?page_size=1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KB_PER_MB = 1024.0  # /proc values are in kB

DEFAULTS: dict[str, Any] = {
    "concurrency": 200,
    "latency": 1.0,
    "duration": 20.0,
    "stream": False,
    "chunks": 20,
    "warmup": 2.0,
    "ramp": None,  # None: the upstream latency
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "nonstream-200": {"stream": False, "concurrency": 200, "latency": 1.0},
    "hold-1000": {"stream": False, "concurrency": 1000, "latency": 5.0, "duration": 30.0},
    "stream-500": {"stream": True, "concurrency": 500, "latency": 1.0, "chunks": 20},
}
# As `make run` starts it: one worker process per core unless WORKERS says otherwise.
WORKERS = os.environ.get("WORKERS") or str(os.cpu_count() or 1)
DEFAULT_SERVER_CMD = (
    f"{UVICORN} config.asgi:application --host {{host}} --port {{port}} --workers {WORKERS} "
    "--loop uvloop --http httptools --no-access-log --timeout-graceful-shutdown 10"
)
# Makes every reply at least this long, so that the fake upstream can split it into --chunks.
PROMPT_PAD = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"


class BenchError(Exception):
    """A failure that stops the run (server did not start, ...)."""


# --------------------------------------------------------------------------- HTTP client


class ConnectionClosed(Exception):
    pass


class ProtocolError(Exception):
    pass


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection; one request at a time.

    Parses the response in ``data_received`` (no task wake-up per chunk): status, headers,
    then a Content-Length, chunked, or read-until-close body.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self._reset()

    def _reset(self) -> None:
        self.state = "head"
        self.status = 0
        self.keep_alive = True
        self.length = 0
        self.parts: list[bytes] = []
        self.t_head = 0.0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None or self.waiter.done():
            return  # unsolicited bytes: the next request's parse will choke on them
        try:
            self._parse()
        except Exception as exc:
            self.waiter.set_exception(ProtocolError(f"bad response: {exc!r}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.state == "eof":  # body delimited by the end of the connection
            self.parts.append(bytes(self.buf))
            self._finish()
        else:
            waiter.set_exception(ConnectionClosed(f"connection closed ({self.state})"))

    # -- API
    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def request(self, data: bytes) -> asyncio.Future:
        """Send ``data``; the future gives (status, body, time headers arrived, keep_alive)."""
        self.waiter = asyncio.get_running_loop().create_future()
        self._reset()
        assert self.transport is not None
        self.transport.write(data)
        return self.waiter

    # -- parsing
    def _finish(self) -> None:
        body = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        assert self.waiter is not None
        self.waiter.set_result((self.status, body, self.t_head, self.keep_alive))
        self.state = "done"

    def _parse(self) -> None:
        buf = self.buf
        while True:
            state = self.state
            if state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        raise ProtocolError("response head too large")
                    return
                lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
                del buf[: end + 4]
                self.t_head = time.monotonic()
                self.status = int(lines[0].split(" ", 2)[1])
                chunked = False
                length = -1
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.strip().lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "transfer-encoding":
                        chunked = "chunked" in value.lower()
                    elif name == "connection":
                        self.keep_alive = "close" not in value.lower()
                if chunked:
                    self.state = "size"
                elif length >= 0:
                    self.length = length
                    self.state = "body"
                else:
                    self.keep_alive = False
                    self.state = "eof"
                    return
            elif state == "body":
                if len(buf) < self.length:
                    return
                self.parts.append(bytes(buf[: self.length]))
                del buf[: self.length]
                self._finish()
                return
            elif state == "size":
                nl = buf.find(b"\r\n")
                if nl < 0:
                    return
                size = int(bytes(buf[:nl]).split(b";", 1)[0], 16)
                del buf[: nl + 2]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.length = size
                    self.state = "chunk"
            elif state == "chunk":
                if len(buf) < self.length + 2:
                    return
                self.parts.append(bytes(buf[: self.length]))
                del buf[: self.length + 2]
                self.state = "size"
            elif state == "trailer":
                if len(buf) < 2:
                    return
                if buf[:2] == b"\r\n":
                    del buf[:2]
                else:
                    end = buf.find(b"\r\n\r\n")
                    if end < 0:
                        return
                    del buf[: end + 4]
                self._finish()
                return
            else:  # "eof" or "done"
                return


async def open_connection(host: str, port: int) -> HttpConnection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(HttpConnection, host, port)
    return conn


async def http_get(host: str, port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """One-shot GET on a fresh connection."""
    async with asyncio.timeout(timeout):
        conn = await open_connection(host, port)
        try:
            req = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/json\r\n\r\n"
            status, body, _, _ = await conn.request(req.encode())
        finally:
            conn.close()
    return status, body


async def stored_count(host: str, port: int, base: str) -> int:
    status, body = await http_get(host, port, base + COUNT_PATH)
    if status != 200:
        raise BenchError(f"GET {COUNT_PATH} -> HTTP {status}: {body[:200]!r}")
    return int(json.loads(body)["count"])


# --------------------------------------------------------------------------- response checks


def check_json(status: int, body: bytes, prompt: str, verify_echo: bool) -> str | None:
    """None if the 201 body is a completed message with the expected reply, else an error kind."""
    if status != 201:
        return _http_error(status, body)
    try:
        msg = json.loads(body)
    except ValueError:
        return "bad_json"
    if msg.get("status") != "completed":
        return f"status_{msg.get('status')}"
    response = msg.get("response")
    if not response or (verify_echo and response != "Echo: " + prompt):
        return "wrong_reply"
    return None


def check_sse(status: int, body: bytes, prompt: str, verify_echo: bool) -> str | None:
    """None if the event stream ends in a completed `message` equal to the deltas joined."""
    if status != 200:
        return _http_error(status, body)
    deltas: list[str] = []
    final: dict | None = None
    try:
        for block in body.decode().split("\n\n"):
            if not block:
                continue
            event = "message"
            data: list[str] = []
            for line in block.split("\n"):
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
            if event == "delta":
                deltas.append(json.loads("\n".join(data))["content"])
            elif event == "message":
                final = json.loads("\n".join(data))
            elif event == "error":
                err = json.loads("\n".join(data)).get("error", {})
                return f"error_event_{err.get('code', 'unknown')}"
    except (ValueError, KeyError, AttributeError):
        return "bad_sse"
    if final is None:
        return "stream_incomplete"
    if final.get("status") != "completed":
        return f"status_{final.get('status')}"
    response = final.get("response")
    if response != "".join(deltas):
        return "delta_mismatch"
    if not response or (verify_echo and response != "Echo: " + prompt):
        return "wrong_reply"
    return None


def _http_error(status: int, body: bytes) -> str:
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"http_{status}"
    return f"http_{status}_{code}"


# --------------------------------------------------------------------------- /proc


def proc_cpu(pid: int) -> float | None:
    """user+sys CPU seconds of the process (all its threads)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def proc_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            data = Path(f"/proc/{entry.name}/stat").read_bytes()
        except OSError:
            continue
        ppid = int(data[data.rindex(b")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(parents.get(p, ()))
    return tree


def proc_cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a)


def tree_cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for p in pids:
        cpu = proc_cpu(p)
        if cpu is not None:
            out[p] = cpu
    return out


def cpu_delta(a: dict[int, float], b: dict[int, float]) -> float:
    return sum(b[p] - a[p] for p in a if p in b)


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return (0.0, 0.0)
    total = sum(fields)
    idle = fields[3] + fields[4]  # idle + iowait
    return ((total - idle) / CLK_TCK, total / CLK_TCK)


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:])


def stop_process(proc: subprocess.Popen | None, grace: float) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Servers:
    """The fake upstream and the service, each a subprocess, with logs in a temp dir."""

    def __init__(self, cfg: argparse.Namespace) -> None:
        self.cfg = cfg
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-"))
        self.fake: subprocess.Popen | None = None
        self.service: subprocess.Popen | None = None
        self.fake_log = self.tmp / "fake-openai.log"
        self.service_log = self.tmp / "service.log"
        self.fake_url = ""
        self.fake_cmd: list[str] = []
        self.service_cmd: list[str] = []
        self.env_overrides: dict[str, str] = {}
        self.host = "127.0.0.1"
        self.port = 0

    def start_fake(self) -> None:
        cfg = self.cfg
        self.fake_cmd = [
            PYTHON,
            "-m",
            "tests.fake_openai",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--latency",
            str(cfg.latency),
            "--chunks",
            str(cfg.chunks),
        ]
        with self.fake_log.open("wb") as log:
            self.fake = subprocess.Popen(
                self.fake_cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log
            )
        assert self.fake.stdout is not None
        deadline = time.monotonic() + 30
        line = b""
        while time.monotonic() < deadline and self.fake.poll() is None:
            ready, _, _ = select.select([self.fake.stdout], [], [], 0.2)
            if ready:
                line = self.fake.stdout.readline()
                break
        text = line.decode().strip()
        if "listening on" not in text:
            raise BenchError(
                f"fake OpenAI server did not start ({text!r}); log:\n{tail(self.fake_log)}"
            )
        self.fake_url = text.rsplit(" ", 1)[1]

    def start_service(self) -> None:
        cfg = self.cfg
        self.port = free_port()
        db = self.tmp / "db.sqlite3"
        self.env_overrides = {
            "OPENAI_API_KEY": "bench-key",
            "OPENAI_BASE_URL": self.fake_url,
            "OPENAI_MAX_RETRIES": "0",
            "OPENAI_TIMEOUT": f"{cfg.latency * 2 + 20:g}",
            "DATABASE_URL": f"sqlite:///{db}",
            "LOG_LEVEL": "WARNING",
        }
        env = dict(os.environ)
        env.update(self.env_overrides)
        env.setdefault("DJANGO_DEBUG", "false")  # DEBUG would keep every SQL query in memory
        env.setdefault("PYTHONUNBUFFERED", "1")
        migrate_log = self.tmp / "migrate.log"
        with migrate_log.open("wb") as log:
            rc = subprocess.run(
                [PYTHON, "manage.py", "migrate", "--noinput"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=300,
                check=False,
            ).returncode
        if rc != 0:
            raise BenchError(f"migrate failed (exit {rc}):\n{tail(migrate_log)}")
        template = self.cfg.server_cmd or DEFAULT_SERVER_CMD
        self.service_cmd = shlex.split(template.format(host=self.host, port=self.port))
        with self.service_log.open("wb") as log:
            self.service = subprocess.Popen(
                self.service_cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.service is not None
            if self.service.poll() is not None:
                raise BenchError(
                    f"service exited with {self.service.returncode} during startup; "
                    f"log tail:\n{tail(self.service_log)}"
                )
            try:
                status, body = await http_get(self.host, self.port, COUNT_PATH, timeout=5)
                if status == 200:
                    return
                last = f"HTTP {status}: {body[:200]!r}"
            except (OSError, TimeoutError, ConnectionClosed, ProtocolError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.2)
        raise BenchError(f"service not ready after {timeout}s ({last}):\n{tail(self.service_log)}")

    def stop(self) -> dict[str, int | None]:
        return {
            "service_exit": stop_process(self.service, 20),
            "fake_exit": stop_process(self.fake, 10),
        }


def service_log_problems(path: Path) -> tuple[int, list[tuple[int, str]]]:
    """Number of warning/error lines in the log, and the distinct ones (timestamps cut) by count."""
    keys = ("Traceback", "ERROR", "Error:", "WARNING", "Warning:", "CRITICAL", "Exception")
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return 0, []
    counts: dict[str, int] = {}
    total = 0
    for line in lines:
        if any(k in line for k in keys):
            total += 1
            key = re.sub(r"^\d{4}-\d\d-\d\d[ T][\d:,.]+\s*", "", line.strip())
            counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return total, [(n, line) for line, n in ranked]


# --------------------------------------------------------------------------- load


class Load:
    """Shared state of the clients."""

    def __init__(self, cfg: argparse.Namespace, host: str, port: int, base: str) -> None:
        self.cfg = cfg
        self.host = host
        self.port = port
        self.base = base
        self.timeout = cfg.latency * 3 + 30
        self.verify_echo = cfg.url is None
        self.inflight = 0
        self.max_inflight = 0
        # (start, end, error kind or None, time headers arrived)
        self.records: list[tuple[float, float, str | None, float]] = []
        self.t_start = self.t_warm = self.t_end = 0.0
        accept = "text/event-stream" if cfg.stream else "application/json"
        self.head = (
            f"POST {base}{CREATE_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nAccept: {accept}\r\n"
        )
        self.check = check_sse if cfg.stream else check_json

    async def client(self, idx: int) -> None:
        conn: HttpConnection | None = None
        seq = 0
        stream = self.cfg.stream
        await asyncio.sleep(
            max(0.0, self.t_start + self.cfg.ramp * idx / self.cfg.concurrency - time.monotonic())
        )
        try:
            while time.monotonic() < self.t_end:
                seq += 1
                prompt = f"bench client {idx} request {seq}: {PROMPT_PAD}"
                payload: dict[str, Any] = {"prompt_message": prompt}
                if stream:
                    payload["stream"] = True
                body = json.dumps(payload).encode()
                data = (self.head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
                kind: str | None = None
                t_head = 0.0
                keep = False
                t0 = time.monotonic()
                self.inflight += 1
                if self.inflight > self.max_inflight:
                    self.max_inflight = self.inflight
                try:
                    async with asyncio.timeout(self.timeout):
                        if conn is None or conn.closed:
                            conn = await open_connection(self.host, self.port)
                        status, resp, t_head, keep = await conn.request(data)
                    kind = self.check(status, resp, prompt, self.verify_echo)
                except TimeoutError:
                    if conn is None:
                        kind = "client_timeout_connecting"
                    elif conn.state == "head":
                        kind = "client_timeout_before_headers"
                    else:
                        kind = "client_timeout_reading_body"
                except ConnectionClosed:
                    kind = "connection_closed"
                except ProtocolError:
                    kind = "protocol_error"
                except OSError as exc:
                    kind = f"os_error_{type(exc).__name__}"
                finally:
                    self.inflight -= 1
                t1 = time.monotonic()
                self.records.append((t0, t1, kind, t_head))
                if kind is not None or not keep:
                    if conn is not None:
                        conn.close()
                    conn = None
                if kind is not None:
                    await asyncio.sleep(0.05)  # do not spin on a failing server
        finally:
            if conn is not None:
                conn.close()


class Sampler:
    """Polls the server's memory, the in-flight count and this loop's lag every 0.2 s."""

    INTERVAL = 0.2

    def __init__(self, load: Load, server_pids: list[int], fake_pid: int | None) -> None:
        self.load = load
        self.server_pids = server_pids
        self.fake_pid = fake_pid
        self.peak_rss_kb = 0
        self.inflight_samples: list[int] = []
        self.lags: list[float] = []
        self.marks: dict[str, dict[str, Any]] = {}

    def snapshot(self) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "server": tree_cpu(self.server_pids),
            "fake": proc_cpu(self.fake_pid) if self.fake_pid else None,
            "self": self_cpu(),
            "machine": machine_cpu(),
        }

    async def mark(self, name: str, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        self.marks[name] = self.snapshot()

    async def run(self, stop: asyncio.Event) -> None:
        load = self.load
        expected = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            self.lags.append(max(0.0, now - expected))
            if load.t_warm <= now <= load.t_end:
                self.inflight_samples.append(load.inflight)
            rss = 0
            for pid in self.server_pids:
                rss += proc_status(pid).get("VmRSS", 0)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            expected = now + self.INTERVAL
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.INTERVAL)


# --------------------------------------------------------------------------- one run


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def bench_command() -> str:
    argv = sys.argv[1:]
    return shlex.join([os.path.relpath(PYTHON, ROOT), "bench/bench.py", *argv])


async def run_one(cfg: argparse.Namespace, name: str) -> dict[str, Any]:
    servers: Servers | None = None
    result: dict[str, Any] = {
        "scenario": name,
        "command": bench_command(),
        "mode": "stream" if cfg.stream else "non-stream",
        "concurrency": cfg.concurrency,
        "upstream_latency_s": cfg.latency,
        "chunks": cfg.chunks if cfg.stream else None,
        "duration_s": cfg.duration,
        "warmup_s": max(cfg.warmup, cfg.ramp),
        "ramp_s": cfg.ramp,
        "ok": False,
    }
    try:
        if cfg.url:
            parts = urlsplit(cfg.url)
            if parts.scheme != "http":
                raise BenchError("--url must be http://")
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            base = parts.path.rstrip("/")
            server_pids: list[int] = []
            fake_pid = None
        else:
            servers = Servers(cfg)
            result["tmp_dir"] = str(servers.tmp)
            servers.start_fake()
            result["fake_command"] = shlex.join(servers.fake_cmd)
            result["fake_url"] = servers.fake_url
            servers.start_service()
            result["service_command"] = shlex.join(servers.service_cmd)
            result["env"] = servers.env_overrides
            await servers.wait_ready()
            host, port, base = servers.host, servers.port, ""
            assert servers.service is not None and servers.fake is not None
            server_pids = proc_tree(servers.service.pid)
            fake_pid = servers.fake.pid
            result["server_processes"] = [
                {
                    "pid": p,
                    "cmdline": proc_cmdline(p),
                    "threads": proc_status(p).get("Threads"),
                }
                for p in server_pids
            ]
            result["rss_idle_mb"] = (
                sum(proc_status(p).get("VmRSS", 0) for p in server_pids) / KB_PER_MB
            )
        result["url"] = f"http://{host}:{port}{base}"
        baseline = await stored_count(host, port, base)

        load = Load(cfg, host, port, base)
        sampler = Sampler(load, server_pids, fake_pid)
        load.t_start = time.monotonic()
        load.t_warm = load.t_start + max(cfg.warmup, cfg.ramp)
        load.t_end = load.t_warm + cfg.duration
        stop = asyncio.Event()
        sampler_task = asyncio.create_task(sampler.run(stop))
        marks = [
            asyncio.create_task(sampler.mark("warm", load.t_warm)),
            asyncio.create_task(sampler.mark("end", load.t_end)),
        ]
        clients = [asyncio.create_task(load.client(i)) for i in range(cfg.concurrency)]
        bound = max(cfg.warmup, cfg.ramp) + cfg.duration + load.timeout + 30
        done, pending = await asyncio.wait(clients, timeout=bound)
        for task in pending:  # cannot happen (every request is bounded); be safe anyway
            task.cancel()
        for task in done:
            if task.exception() is not None:
                raise BenchError(f"client crashed: {task.exception()!r}")
        await asyncio.gather(*marks)
        t_done = time.monotonic()
        if server_pids:
            result["server_threads_end"] = proc_status(server_pids[0]).get("Threads")
            result["peak_rss_mb"] = (
                sum(proc_status(p).get("VmHWM", 0) for p in server_pids) / KB_PER_MB
            )
        stop.set()
        await sampler_task

        await asyncio.sleep(1.0)  # let the last writes settle
        stored = await stored_count(host, port, base) - baseline
        result.update(summarize(cfg, load, sampler, pending_clients=len(pending), t_done=t_done))
        result["stored"] = stored
        result["stored_ok"] = stored == result["successful_total"]
        result["ok"] = result["stored_ok"] and result["errors_total"] == 0 and not pending
    except BenchError as exc:
        result["failure"] = str(exc)
    except (OSError, TimeoutError, ConnectionClosed, ProtocolError, ValueError, KeyError) as exc:
        result["failure"] = f"{type(exc).__name__}: {exc}"
    finally:
        if servers is not None:
            exits = await asyncio.to_thread(servers.stop)
            result.update(exits)
            n_problems, problems = service_log_problems(servers.service_log)
            result["service_log_problem_lines"] = n_problems
            result["service_log_problems"] = problems[:15]
            # uvicorn re-raises the SIGTERM it handled, so -15 is a clean shutdown too.
            if exits["service_exit"] not in (0, -signal.SIGTERM, None):
                result["ok"] = False
            if not result["ok"] or problems:
                result["service_log_tail"] = tail(servers.service_log, 40)
                result["fake_log_tail"] = tail(servers.fake_log, 20)
            if result["ok"] and not cfg.keep:
                shutil.rmtree(servers.tmp, ignore_errors=True)
                result.pop("tmp_dir", None)
    return result


def summarize(
    cfg: argparse.Namespace, load: Load, sampler: Sampler, pending_clients: int, t_done: float
) -> dict[str, Any]:
    t_warm, t_end = load.t_warm, load.t_end
    window = t_end - t_warm
    records = load.records
    errors_total: dict[str, int] = {}
    error_starts: list[float] = []
    errors_measured: dict[str, int] = {}
    latencies: list[float] = []
    ttfbs: list[float] = []
    work = 0.0  # successful requests' worth of work inside the window
    completed_in_window = 0
    measured = 0
    for t0, t1, kind, t_head in records:
        if kind is not None:
            errors_total[kind] = errors_total.get(kind, 0) + 1
            error_starts.append(t0 - load.t_start)
        if t0 >= t_warm:
            measured += 1
            if kind is None:
                latencies.append(t1 - t0)
                ttfbs.append(t_head - t0)
            else:
                errors_measured[kind] = errors_measured.get(kind, 0) + 1
        if kind is None:
            overlap = min(t1, t_end) - max(t0, t_warm)
            if overlap > 0:
                work += overlap / (t1 - t0) if t1 > t0 else 1.0
            if t_warm <= t1 <= t_end:
                completed_in_window += 1
    latencies.sort()
    ttfbs.sort()
    successful_total = sum(1 for r in records if r[2] is None)
    throughput = work / window
    ideal = cfg.concurrency / cfg.latency if cfg.latency > 0 else math.nan
    out: dict[str, Any] = {
        "requests_total": len(records),
        "successful_total": successful_total,
        "errors_total": sum(errors_total.values()),
        "errors_total_by_kind": errors_total,
        "error_start_range_s": [min(error_starts), max(error_starts)] if error_starts else None,
        "requests_measured": measured,
        "errors_measured_by_kind": errors_measured,
        "successful_measured": len(latencies),
        "window_s": window,
        "run_s": t_done - load.t_start,
        "throughput_rps": throughput,
        "completions_in_window": completed_in_window,
        "completions_rps": completed_in_window / window,
        "ideal_rps": ideal,
        "efficiency": throughput / ideal if ideal else math.nan,
        "latency_ms": {
            "min": latencies[0] * 1000 if latencies else math.nan,
            "p50": percentile(latencies, 50) * 1000,
            "p95": percentile(latencies, 95) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": latencies[-1] * 1000 if latencies else math.nan,
            "mean": sum(latencies) / len(latencies) * 1000 if latencies else math.nan,
        },
        "ttfb_ms": {
            "p50": percentile(ttfbs, 50) * 1000,
            "p99": percentile(ttfbs, 99) * 1000,
            "max": ttfbs[-1] * 1000 if ttfbs else math.nan,
        },
        "max_inflight": load.max_inflight,
        "mean_inflight_window": (
            sum(sampler.inflight_samples) / len(sampler.inflight_samples)
            if sampler.inflight_samples
            else math.nan
        ),
        "loop_lag_ms": {
            "mean": sum(sampler.lags) / len(sampler.lags) * 1000 if sampler.lags else math.nan,
            "max": max(sampler.lags) * 1000 if sampler.lags else math.nan,
        },
        "clients_not_finished": pending_clients,
    }
    a, b = sampler.marks["warm"], sampler.marks["end"]
    span = b["t"] - a["t"]
    out["loadgen_cpu_pct"] = (b["self"] - a["self"]) / span * 100
    if load.cfg.url is None and a["server"]:
        server_cpu = cpu_delta(a["server"], b["server"])
        out["server_cpu_s"] = server_cpu
        out["server_cpu_pct"] = server_cpu / span * 100
        out["server_cpu_ms_per_request"] = (
            server_cpu / (throughput * span) * 1000 if throughput > 0 else math.nan
        )
        out["peak_rss_sampled_mb"] = sampler.peak_rss_kb / KB_PER_MB
        if a["fake"] is not None and b["fake"] is not None:
            out["fake_cpu_pct"] = (b["fake"] - a["fake"]) / span * 100
    busy = b["machine"][0] - a["machine"][0]
    total = b["machine"][1] - a["machine"][1]
    if total > 0:
        cores = os.cpu_count() or 1
        out["cores"] = cores
        out["machine_busy_pct"] = busy / total * 100 * cores  # 100 % = one core
        ours = out.get("server_cpu_s", 0.0) + (b["self"] - a["self"])
        if a["fake"] is not None and b["fake"] is not None:
            ours += b["fake"] - a["fake"]
        out["other_processes_cpu_pct"] = max(0.0, busy - ours) / span * 100
    return out


# --------------------------------------------------------------------------- output


def fmt_errors(errors: dict[str, int]) -> str:
    if not errors:
        return "none"
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1]))


def print_result(r: dict[str, Any]) -> None:
    p = print
    p(f"== {r['scenario']} ==")
    p(f"command:            {r['command']}")
    if "fake_command" in r:
        p(f"fake upstream:      {r['fake_command']}  ({r['fake_url']})")
    if "service_command" in r:
        p(f"service:            {r['service_command']}")
        p(f"service env:        {' '.join(f'{k}={v}' for k, v in r['env'].items())}")
    if "server_processes" in r:
        procs = r["server_processes"]
        desc = "; ".join(f"pid {x['pid']} threads {x['threads']}: {x['cmdline']}" for x in procs)
        p(f"server processes:   {len(procs)} ({desc})")
    if "url" in r and "service_command" not in r:
        p(f"service:            {r['url']} (already running)")
    if "failure" in r:
        p(f"FAILED:             {r['failure']}")
    if "requests_total" in r:
        lat, ttfb = r["latency_ms"], r["ttfb_ms"]
        chunks = f", {r['chunks']} chunks" if r["mode"] == "stream" else ""
        p(f"mode:               {r['mode']}")
        p(f"concurrency (N):    {r['concurrency']}")
        p(f"upstream latency:   {r['upstream_latency_s']:g} s{chunks}")
        p(
            f"duration:           {r['duration_s']:g} s measured after {r['warmup_s']:g} s "
            f"warmup (clients started over {r['ramp_s']:g} s; whole run {r['run_s']:.1f} s)"
        )
        p(
            f"requests:           {r['requests_total']} total, {r['successful_total']} ok; "
            f"measured (started after warmup): {r['requests_measured']}, "
            f"{r['successful_measured']} ok"
        )
        when = ""
        if r["error_start_range_s"]:
            first, last = r["error_start_range_s"]
            when = f"  (requests started {first:.1f}-{last:.1f} s after the first client)"
        p(f"errors (all):       {fmt_errors(r['errors_total_by_kind'])}{when}")
        p(f"errors (measured):  {fmt_errors(r['errors_measured_by_kind'])}")
        p(
            f"throughput:         {r['throughput_rps']:.1f} req/s "
            f"(completions inside the window: {r['completions_in_window']} = "
            f"{r['completions_rps']:.1f} req/s)"
        )
        p(f"ideal throughput:   {r['ideal_rps']:.1f} req/s (N / upstream latency)")
        p(f"efficiency:         {r['efficiency'] * 100:.1f} %")
        p(
            f"latency ms:         p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  "
            f"p99 {lat['p99']:.1f}  max {lat['max']:.1f}  (min {lat['min']:.1f}, "
            f"mean {lat['mean']:.1f})"
        )
        if r["mode"] == "stream":
            p(
                f"time to 1st byte ms: p50 {ttfb['p50']:.1f}  p99 {ttfb['p99']:.1f}  "
                f"max {ttfb['max']:.1f}"
            )
        p(
            f"in flight:          max {r['max_inflight']} of {r['concurrency']}, "
            f"mean {r['mean_inflight_window']:.1f} during the window"
        )
        if "server_cpu_s" in r:
            p(
                f"server CPU:         {r['server_cpu_ms_per_request']:.2f} ms/request, "
                f"{r['server_cpu_pct']:.1f} % of one core "
                f"({r['server_cpu_s']:.2f} s CPU in the window; "
                f"{r.get('cores', 1)} cores = {r.get('cores', 1) * 100} %)"
            )
            p(
                f"server memory:      peak RSS {r['peak_rss_mb']:.1f} MB (VmHWM; sampled peak "
                f"{r['peak_rss_sampled_mb']:.1f} MB, idle before load {r['rss_idle_mb']:.1f} MB), "
                f"threads at end {r.get('server_threads_end')}"
            )
        fake = f"fake upstream {r['fake_cpu_pct']:.1f} %, " if "fake_cpu_pct" in r else ""
        p(
            f"other CPU:          {fake}load generator {r['loadgen_cpu_pct']:.1f} % "
            f"(loop lag mean {r['loop_lag_ms']['mean']:.1f} ms, "
            f"max {r['loop_lag_ms']['max']:.1f} ms)"
        )
        if "machine_busy_pct" in r:
            others = "unrelated processes" if "server_cpu_s" in r else "all but this process"
            p(
                f"machine CPU:        {r['machine_busy_pct']:.1f} % busy of "
                f"{r['cores'] * 100} %; {others} {r['other_processes_cpu_pct']:.1f} %"
            )
    if "stored" in r:
        if r["stored_ok"]:
            p(
                f"stored == successful: OK ({r['stored']} stored, "
                f"{r['successful_total']} successful)"
            )
        else:
            failed = r.get("errors_total", 0)
            note = (
                f"; {failed} requests failed, and the service may store a failed or "
                "abandoned request too"
                if failed
                else ""
            )
            p(
                f"stored == successful: MISMATCH ({r['stored']} stored, "
                f"{r['successful_total']} successful{note})"
            )
    if "service_exit" in r:
        p(
            f"service exit code:  {r['service_exit']}; service log: "
            f"{r['service_log_problem_lines']} warning/error lines"
        )
    for count, line in r.get("service_log_problems", []):
        p(f"  | {count:>6} x {line[:200]}")
    if "service_log_tail" in r:
        p("service log tail:")
        for line in r["service_log_tail"].splitlines():
            p(f"  | {line}")
        p("fake upstream log tail:")
        for line in r["fake_log_tail"].splitlines():
            p(f"  | {line}")
    if "tmp_dir" in r:
        p(f"logs and database kept in {r['tmp_dir']}")
    p(f"result:             {'PASS' if r['ok'] else 'FAIL'}")
    sys.stdout.flush()


def print_table(results: list[dict[str, Any]]) -> None:
    header = (
        f"{'scenario':<14} {'mode':<10} {'N':>5} {'lat s':>5} {'req/s':>7} {'ideal':>6} "
        f"{'eff %':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>6} "
        f"{'cpu ms/r':>8} {'cpu %':>6} {'RSS MB':>7} {'inflt':>5} {'stored':>6}"
    )
    print()
    print("== summary ==")
    print(header)
    print("-" * len(header))
    for r in results:
        if "requests_total" not in r:
            print(f"{r['scenario']:<14} FAILED: {r.get('failure', '?').splitlines()[0]}")
            continue
        lat = r["latency_ms"]
        print(
            f"{r['scenario']:<14} {r['mode']:<10} {r['concurrency']:>5} "
            f"{r['upstream_latency_s']:>5g} {r['throughput_rps']:>7.1f} {r['ideal_rps']:>6.0f} "
            f"{r['efficiency'] * 100:>6.1f} {lat['p50']:>8.1f} {lat['p99']:>8.1f} "
            f"{lat['max']:>8.1f} {r['errors_total']:>6} "
            f"{r.get('server_cpu_ms_per_request', math.nan):>8.2f} "
            f"{r.get('server_cpu_pct', math.nan):>6.1f} {r.get('peak_rss_mb', math.nan):>7.1f} "
            f"{r['max_inflight']:>5} {'OK' if r.get('stored_ok') else 'BAD':>6}"
        )


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/bench.py",
        description="Load benchmark of the chat service against a fake OpenAI upstream.",
    )
    parser.add_argument("--concurrency", "-c", type=int, help="concurrent clients (200)")
    parser.add_argument("--latency", type=float, help="upstream latency in seconds (1.0)")
    parser.add_argument("--duration", type=float, help="measured seconds of load (20)")
    parser.add_argument("--warmup", type=float, help="seconds of load before measuring (2)")
    parser.add_argument(
        "--ramp",
        type=float,
        help="start the clients evenly over this many seconds (default: the upstream latency; "
        "the warmup is at least this long)",
    )
    parser.add_argument(
        "--stream", action="store_true", default=None, help="streaming (SSE) requests"
    )
    parser.add_argument("--chunks", type=int, help="content chunks per streamed reply (20)")
    parser.add_argument("--url", help="bench this running service instead of starting one")
    parser.add_argument(
        "--server-cmd",
        help="command that starts the service; {host} and {port} are substituted "
        f"(default: {DEFAULT_SERVER_CMD!r})",
    )
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument(
        "--scenario",
        choices=list(SCENARIOS),
        help="preset: nonstream-200 (N=200, latency 1), hold-1000 (N=1000, latency 5, "
        "duration 30), stream-500 (--stream, N=500, latency 1, 20 chunks); explicit "
        "arguments override it",
    )
    parser.add_argument("--all", action="store_true", help="run every preset in sequence")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir (database, logs) on success"
    )
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace, scenario: str | None) -> argparse.Namespace:
    """Explicit arguments win over the scenario preset, which wins over the defaults."""
    cfg = argparse.Namespace(**vars(args))
    preset = SCENARIOS.get(scenario or "", {})
    for key, default in DEFAULTS.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, preset.get(key, default))
    if cfg.ramp is None:
        cfg.ramp = cfg.latency
    if min(cfg.latency, cfg.warmup, cfg.ramp) < 0 or cfg.concurrency < 1 or cfg.duration <= 0:
        raise SystemExit("bench: bad --concurrency/--latency/--duration/--warmup/--ramp")
    return cfg


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _no_nan(value: Any) -> Any:
    """NaN is not JSON: null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fd_limit = raise_fd_limit()
    names = list(SCENARIOS) if args.all else [args.scenario or "custom"]
    results = []
    for name in names:
        cfg = resolve(args, name if name in SCENARIOS else None)
        need = cfg.concurrency * 3 + 100  # clients + service (both sides) + upstream
        if fd_limit < need:
            print(f"warning: open-file limit {fd_limit} < ~{need} needed", file=sys.stderr)
        with asyncio.Runner(loop_factory=new_loop) as runner:
            result = runner.run(run_one(cfg, name))
        print_result(result)
        print()
        results.append(result)
    if args.all:
        print_table(results)
    if args.json:
        data: Any = results if args.all else results[0]
        Path(args.json).write_text(json.dumps(_no_nan(data), indent=2, default=str) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
