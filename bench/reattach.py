"""Re-attach latency: how much later a client following a streamed reply from another process
sees each piece of it than the client that started it.

For each of `concurrency` pairs, again and again for `duration` seconds: client A opens a
streaming create (``POST /api/messages/create/`` with ``"stream": true``) on one instance; as
soon as A's ``start`` event gives the message's id, client B opens
``GET /api/messages/{id}/stream/`` on the next instance. Both streams are timed event by event
on this process's clock. B's first delta replays the text so far in one piece, then B follows
live; pieces are matched by cumulative text length: A's delta that brought the text to length L
is seen by B when B's text first reaches length L. Only pieces that reached A after B's stream
had begun (its ``start`` event) count as live; B's extra latency for each is B's time minus
A's. Also reported: the same for the final ``message`` event, and how long B's re-attach took
(request sent to ``start`` received).

Two phases, each with servers of its own: across instances (A on instance i, B on instance
i + 1; `--instances` 2 by default for this scenario, as two hosts would run the service), then
the in-process baseline: one instance with one worker, both streams in the same process.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import report
from bench.config import RunConfig
from bench.http_client import (
    EVENT_STREAM,
    ConnectionClosed,
    Endpoint,
    ProtocolError,
    SseEvent,
    SseParser,
)
from bench.load import CREATE_PATH, PROMPT_PAD
from bench.servers import Stack


@dataclass
class StreamTrace:
    """One event stream as this client saw it."""

    requested_at: float
    started_at: float | None = None  # the `start` event
    message_id: int | None = None
    text: str = ""  # the deltas joined
    deltas: list[tuple[int, float]] = field(default_factory=list)  # (text length, arrival)
    finished_at: float | None = None  # the `message` event
    final: dict[str, Any] | None = None
    error: str | None = None

    def receive(self, event: SseEvent, on_start: Callable[[int], None] | None) -> None:
        if event.name == "start":
            self.started_at = event.at
            self.message_id = int(event.json()["id"])
            if on_start is not None:
                on_start(self.message_id)
        elif event.name == "delta":
            self.text += event.json()["content"]
            self.deltas.append((len(self.text), event.at))
        elif event.name == "message":
            self.final = event.json()
            self.finished_at = event.at
        elif event.name == "error":
            self.error = f"error_event_{event.json().get('error', {}).get('code', 'unknown')}"


async def read_stream(
    endpoint: Endpoint,
    request: bytes,
    *,
    timeout: float,
    on_start: Callable[[int], None] | None = None,
) -> StreamTrace:
    """Send `request`, time its event stream; `on_start` gets the message id on `start`."""
    trace = StreamTrace(requested_at=time.monotonic())
    parser = SseParser()

    def sink(data: bytes, at: float) -> None:
        for event in parser.feed(data, at):
            trace.receive(event, on_start)

    connection = None
    try:
        async with asyncio.timeout(timeout):
            connection = await endpoint.connect()
            response = await connection.request(request, sink=sink)
        if response.status != 200:
            trace.error = f"http_{response.status}"
    except TimeoutError:
        trace.error = "client_timeout"
    except (ConnectionClosed, ProtocolError, OSError) as exc:
        trace.error = type(exc).__name__
    finally:
        if connection is not None:
            connection.close()
    return trace


@dataclass
class PairTiming:
    error: str | None = None
    extra_latencies: list[float] = field(default_factory=list)  # seconds, one per live piece
    replayed: int = 0  # pieces A had before B's stream began
    end_latency: float | None = None
    attach: float | None = None


def compare(a: StreamTrace, b: StreamTrace | None) -> PairTiming:
    """B's delay behind A for each piece A received after B's stream began."""
    if a.error:
        return PairTiming(error=f"A_{a.error}")
    if b is None:
        return PairTiming(error="A_no_start_event")
    if b.error:
        return PairTiming(error=f"B_{b.error}")
    if a.final is None or b.final is None or b.started_at is None:
        return PairTiming(error="stream_incomplete")
    if a.final.get("status") != "completed" or b.final.get("status") != "completed":
        return PairTiming(error=f"status_{a.final.get('status')}_{b.final.get('status')}")
    reply = a.final.get("response")
    if a.text != reply or b.text != reply:
        return PairTiming(error="text_mismatch")
    assert a.finished_at is not None and b.finished_at is not None
    timing = PairTiming(
        end_latency=b.finished_at - a.finished_at, attach=b.started_at - b.requested_at
    )
    b_deltas = iter(b.deltas)
    b_length, b_at = 0, 0.0
    for length, a_at in a.deltas:
        while b_length < length:
            b_length, b_at = next(b_deltas)  # B's text ends equal to A's: never exhausted
        if a_at <= b.started_at:
            timing.replayed += 1
        else:
            timing.extra_latencies.append(b_at - a_at)
    return timing


async def follow_pair(a: Endpoint, b: Endpoint, prompt: str, timeout: float) -> PairTiming:
    body = json.dumps({"prompt_message": prompt, "stream": True}).encode()
    follower: asyncio.Task[StreamTrace] | None = None

    def attach(message_id: int) -> None:
        nonlocal follower
        request = b.request("GET", f"/api/messages/{message_id}/stream/", accept=EVENT_STREAM)
        follower = asyncio.create_task(read_stream(b, request, timeout=timeout))

    leader = await read_stream(
        a,
        a.request("POST", CREATE_PATH, body=body, accept=EVENT_STREAM),
        timeout=timeout,
        on_start=attach,
    )
    return compare(leader, await follower if follower is not None else None)


async def measure(
    config: RunConfig, endpoints: list[Endpoint], name: str, description: str
) -> dict[str, Any]:
    """Pairs in closed loops for the duration; B on the instance after A's."""
    pairs, duration = config.load.concurrency, config.load.duration
    timeout = config.upstream.latency * 3 + 30
    started = time.monotonic()
    deadline = started + duration
    timings: list[PairTiming] = []

    async def pair_loop(index: int) -> None:
        a = endpoints[index % len(endpoints)]
        b = endpoints[(index + 1) % len(endpoints)]
        await asyncio.sleep(config.load.ramp * index / pairs)
        round_ = 0
        while time.monotonic() < deadline:
            round_ += 1
            prompt = f"reattach pair {index} round {round_}: {PROMPT_PAD}"
            timings.append(await follow_pair(a, b, prompt, timeout))

    await asyncio.gather(*(pair_loop(index) for index in range(pairs)))
    errors = Counter(t.error for t in timings if t.error is not None)
    ok = [t for t in timings if t.error is None]
    return {
        "name": name,
        "description": description,
        "pairs_total": len(timings),
        "pairs_completed": len(ok),
        "errors_by_kind": dict(errors),
        "live_deltas": sum(len(t.extra_latencies) for t in ok),
        "replayed_deltas": sum(t.replayed for t in ok),
        "extra_latency_ms": report.distribution_ms([x for t in ok for x in t.extra_latencies]),
        "end_latency_ms": report.distribution_ms(
            [t.end_latency for t in ok if t.end_latency is not None]
        ),
        "attach_ms": report.distribution_ms([t.attach for t in ok if t.attach is not None]),
        "run_s": time.monotonic() - started,
        "ok": not errors and bool(ok),
    }


async def run(config: RunConfig, stack: Stack) -> dict[str, Any]:
    deployment = config.deployment
    if not deployment.external:
        stack.start_upstream(config.upstream)
        stack.prepare_database()
        await stack.start_service()
    result = stack.describe()
    result.update(
        pairs=config.load.concurrency,
        duration_s=config.load.duration,
        chunks=config.upstream.chunks,
        upstream_latency_s=config.upstream.latency,
    )
    count = len(stack.endpoints)
    if count > 1:
        across = f"A and B on different instances ({count} instances"
        across += ")" if deployment.external else f" x {deployment.workers} workers)"
    else:
        across = "A and B on the same instance (same or different worker process)"
    phases = [await measure(config, stack.endpoints, "across instances", across)]
    if not deployment.external:
        stack.stop_service()
        await stack.start_service(instances=1, workers=1)
        phases.append(
            await measure(
                config,
                stack.endpoints,
                "in-process baseline",
                "A and B on one instance with one worker process",
            )
        )
    result["phases"] = phases
    result["ok"] = all(phase["ok"] for phase in phases)
    return result
