"""Closed-loop load against the service, the checks of every reply, and what is sampled meanwhile.

`concurrency` clients each send one request at a time on a keep-alive connection of their own
(spread round-robin over the service's instances), read the whole response and check it, and
send the next one, until the end of `warmup` + `duration`. Clients start spread evenly over
`ramp` seconds, so that their requests are spread over the upstream's latency instead of
arriving in synchronised bursts.

Meanwhile a sampler polls, every 0.2 s, the server processes' memory (psutil), the requests in
flight and this event loop's lag, and at the edges of the measured window takes the CPU times
(user+sys) of the server process trees, of the fake upstream, of this process and of the whole
machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

import psutil

from bench import BenchError, report
from bench.config import LoadPlan, RunConfig
from bench.http_client import (
    EVENT_STREAM,
    JSON,
    ConnectionClosed,
    Endpoint,
    HttpConnection,
    ProtocolError,
    Response,
    parse_sse,
)
from bench.servers import Stack

CREATE_PATH = "/api/messages/create/"
COUNT_PATH = "/api/messages/?page_size=1"
# Makes every reply long enough for the fake upstream to split it into many chunks.
PROMPT_PAD = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"
SAMPLE_INTERVAL = 0.2
SETTLE_SECONDS = 1.0  # after the load, before counting what was stored


@dataclass(slots=True)
class RequestRecord:
    started: float
    ended: float
    error: str | None  # None for a successful, checked reply
    head_at: float  # when the response's headers arrived (0 if they did not)


# --------------------------------------------------------------------------- reply checks


def error_kind(response: Response) -> str:
    """``http_<status>`` and the service's error code when the body has one."""
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status}"
    return f"http_{response.status}_{code}"


def check_reply(message: dict[str, Any], prompt: str, verify_echo: bool) -> str | None:
    if message.get("status") != "completed":
        return f"status_{message.get('status')}"
    reply = message.get("response")
    if not reply or (verify_echo and reply != "Echo: " + prompt):
        return "wrong_reply"
    return None


def check_json(response: Response, prompt: str, verify_echo: bool) -> str | None:
    """None if the 201 body is a completed message with the expected reply, else an error kind."""
    if response.status != 201:
        return error_kind(response)
    try:
        message = response.json()
    except ValueError:
        return "bad_json"
    return check_reply(message, prompt, verify_echo)


def check_sse(response: Response, prompt: str, verify_echo: bool) -> str | None:
    """None if the stream ends in a completed `message` equal to its deltas joined."""
    if response.status != 200:
        return error_kind(response)
    deltas: list[str] = []
    try:
        for event in parse_sse(response.body):
            if event.name == "delta":
                deltas.append(event.json()["content"])
            elif event.name == "error":
                return f"error_event_{event.json().get('error', {}).get('code', 'unknown')}"
            elif event.name == "message":
                final = event.json()
                if final.get("response") != "".join(deltas):
                    return "delta_mismatch"
                return check_reply(final, prompt, verify_echo)
    except (ValueError, KeyError, AttributeError):
        return "bad_sse"
    return "stream_incomplete"


async def stored_count(endpoint: Endpoint) -> int:
    response = await endpoint.get(COUNT_PATH)
    if response.status != 200:
        raise BenchError(f"GET {COUNT_PATH} -> HTTP {response.status}: {response.body[:200]!r}")
    return int(response.json()["count"])


# --------------------------------------------------------------------------- clients


class ClosedLoopClients:
    def __init__(
        self, plan: LoadPlan, endpoints: list[Endpoint], *, timeout: float, verify_echo: bool
    ) -> None:
        self.plan = plan
        self.endpoints = endpoints
        self.timeout = timeout
        self.verify_echo = verify_echo
        self.records: list[RequestRecord] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.started = time.monotonic()
        self.warm_at = self.started + plan.warmup
        self.end_at = self.warm_at + plan.duration

    async def client(self, index: int) -> None:
        plan = self.plan
        endpoint = self.endpoints[index % len(self.endpoints)]
        accept = EVENT_STREAM if plan.stream else JSON
        check = check_sse if plan.stream else check_json
        await asyncio.sleep(
            max(0.0, self.started + plan.ramp * index / plan.concurrency - time.monotonic())
        )
        connection: HttpConnection | None = None
        sequence = 0
        try:
            while time.monotonic() < self.end_at:
                sequence += 1
                prompt = f"bench client {index} request {sequence}: {PROMPT_PAD}"
                payload: dict[str, Any] = {"prompt_message": prompt}
                if plan.stream:
                    payload["stream"] = True
                data = endpoint.request(
                    "POST", CREATE_PATH, body=json.dumps(payload).encode(), accept=accept
                )
                error: str | None = None
                head_at = 0.0
                keep_alive = False
                started = time.monotonic()
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                try:
                    async with asyncio.timeout(self.timeout):
                        if connection is None or connection.closed:
                            connection = await endpoint.connect()
                        response = await connection.request(data)
                    head_at, keep_alive = response.head_at, response.keep_alive
                    error = check(response, prompt, self.verify_echo)
                except TimeoutError:
                    if connection is None:
                        error = "client_timeout_connecting"
                    elif connection.awaiting_head:
                        error = "client_timeout_before_headers"
                    else:
                        error = "client_timeout_reading_body"
                except ConnectionClosed:
                    error = "connection_closed"
                except ProtocolError:
                    error = "protocol_error"
                except OSError as exc:
                    error = f"os_error_{type(exc).__name__}"
                finally:
                    self.in_flight -= 1
                self.records.append(RequestRecord(started, time.monotonic(), error, head_at))
                if error is not None or not keep_alive:
                    if connection is not None:
                        connection.close()
                    connection = None
                if error is not None:
                    await asyncio.sleep(0.05)  # do not spin on a failing server
        finally:
            if connection is not None:
                connection.close()


# --------------------------------------------------------------------------- sampling


def cpu_seconds(process: psutil.Process) -> float | None:
    """user+sys CPU seconds of the process (all its threads); None once it is gone."""
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return float(times.user + times.system)


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    # guest time is already counted in user time
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return total - idle, total


def rss_bytes(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            total += process.memory_info().rss
    return total


@dataclass
class CpuMark:
    """CPU times at one moment: per server process, the fake upstream, this process, machine."""

    at: float
    server: dict[int, float]
    upstream: float | None
    load_generator: float
    machine_busy: float
    machine_total: float


class Sampler:
    def __init__(
        self,
        clients: ClosedLoopClients,
        server: list[psutil.Process],
        upstream: psutil.Process | None,
    ) -> None:
        self.clients = clients
        self.server = server
        self.upstream = upstream
        self.me = psutil.Process()
        self.peak_rss = 0
        self.in_flight_samples: list[int] = []
        self.loop_lags: list[float] = []
        self.marks: dict[str, CpuMark] = {}

    def cpu_mark(self) -> CpuMark:
        server = {p.pid: cpu for p in self.server if (cpu := cpu_seconds(p)) is not None}
        busy, total = machine_cpu_seconds()
        return CpuMark(
            at=time.monotonic(),
            server=server,
            upstream=cpu_seconds(self.upstream) if self.upstream is not None else None,
            load_generator=cpu_seconds(self.me) or 0.0,
            machine_busy=busy,
            machine_total=total,
        )

    async def mark_at(self, name: str, at: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        self.marks[name] = self.cpu_mark()

    async def poll(self, stop: asyncio.Event) -> None:
        clients = self.clients
        expected = time.monotonic()
        while not stop.is_set():
            now = time.monotonic()
            self.loop_lags.append(max(0.0, now - expected))
            if clients.warm_at <= now <= clients.end_at:
                self.in_flight_samples.append(clients.in_flight)
            self.peak_rss = max(self.peak_rss, rss_bytes(self.server))
            expected = now + SAMPLE_INTERVAL
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL)


# --------------------------------------------------------------------------- the scenario


@dataclass
class LoadOutcome:
    clients: ClosedLoopClients
    sampler: Sampler
    unfinished_clients: int
    finished_at: float
    stored: int = 0


async def run(config: RunConfig, stack: Stack) -> dict[str, Any]:
    """Start what the load needs, drive it, and summarise (``report.summarize_load``)."""
    plan = config.load
    deployment = config.deployment
    if not deployment.external:
        stack.start_upstream(config.upstream)
        stack.prepare_database()
        await stack.start_service()
    server = stack.server_processes()
    upstream = stack.upstream_process()
    idle_rss = rss_bytes(server)
    result = stack.describe()
    baseline = await stored_count(stack.endpoints[0])

    clients = ClosedLoopClients(
        plan,
        stack.endpoints,
        timeout=config.upstream.latency * 3 + 30,
        # Against a service of our own, the fake upstream's replies are known.
        verify_echo=not deployment.external,
    )
    sampler = Sampler(clients, server, upstream)
    stop = asyncio.Event()
    polling = asyncio.create_task(sampler.poll(stop))
    marks = [
        asyncio.create_task(sampler.mark_at("warm", clients.warm_at)),
        asyncio.create_task(sampler.mark_at("end", clients.end_at)),
    ]
    tasks = [asyncio.create_task(clients.client(i)) for i in range(plan.concurrency)]
    bound = plan.warmup + plan.duration + clients.timeout + 30
    done, pending = await asyncio.wait(tasks, timeout=bound)
    for task in pending:  # cannot happen (every request is bounded); be safe anyway
        task.cancel()
    for task in done:
        if task.exception() is not None:
            raise BenchError(f"client crashed: {task.exception()!r}")
    await asyncio.gather(*marks)
    outcome = LoadOutcome(clients, sampler, len(pending), time.monotonic())
    stop.set()
    await polling

    await asyncio.sleep(SETTLE_SECONDS)  # let the last writes settle
    outcome.stored = await stored_count(stack.endpoints[0]) - baseline
    result.update(report.summarize_load(config, outcome))
    if server:
        result["rss_idle_mb"] = idle_rss / report.MB
    return result
