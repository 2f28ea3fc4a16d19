"""A run's settings: the scenario presets, and what the command line resolves to."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["load", "reattach", "deep-history"]

#: Presets; explicit options win over them, and they win over DEFAULTS.
SCENARIOS: dict[str, dict[str, Any]] = {
    "nonstream-200": {"kind": "load", "stream": False, "concurrency": 200, "latency": 1.0},
    "hold-1000": {
        "kind": "load",
        "stream": False,
        "concurrency": 1000,
        "latency": 5.0,
        "duration": 30.0,
    },
    "stream-500": {
        "kind": "load",
        "stream": True,
        "concurrency": 500,
        "latency": 1.0,
        "chunks": 20,
    },
    # 20 chunks over 2 s: a delta every 100 ms, each timed on both streams.
    "reattach": {
        "kind": "reattach",
        "concurrency": 20,
        "latency": 2.0,
        "chunks": 20,
        "duration": 10.0,
        "instances": 2,
    },
    "deep-history": {"kind": "deep-history", "rows": 10_000},
}
#: What --all runs.
LOAD_SCENARIOS = ("nonstream-200", "hold-1000", "stream-500")

DEFAULTS: dict[str, Any] = {
    "kind": "load",
    "concurrency": 200,
    "latency": 1.0,
    "duration": 20.0,
    "stream": False,
    "chunks": 20,
    "warmup": 2.0,
    "ramp": None,  # the upstream latency
    "instances": 1,
    # As `make run`: one worker process per core unless WORKERS says otherwise.
    "workers": int(os.environ.get("WORKERS") or os.cpu_count() or 1),
    "rows": 10_000,
    "conversation_size": 50,
    "requests": 50,
}


@dataclass(frozen=True)
class Deployment:
    """How the service runs: started here (instances x workers) or already running (urls)."""

    server_cmd: str
    instances: int
    workers: int
    database_url: str | None
    keep_db: Path | None
    redis_url: str | None
    extra_env: dict[str, str]
    token: str | None
    urls: tuple[str, ...] = ()
    user: str | None = None
    keep_workspace: bool = False

    @property
    def external(self) -> bool:
        return bool(self.urls)


@dataclass(frozen=True)
class Upstream:
    """The fake OpenAI server: every reply takes `latency` seconds, streamed in `chunks`."""

    latency: float
    chunks: int


@dataclass(frozen=True)
class LoadPlan:
    """Closed-loop load: `concurrency` clients, each sending its next request as soon as the
    previous one ends, for `warmup` + `duration` seconds; clients start over `ramp` seconds."""

    concurrency: int
    duration: float
    warmup: float
    ramp: float
    stream: bool


@dataclass(frozen=True)
class DeepHistoryPlan:
    rows: int
    conversation_size: int
    requests: int
    reseed: bool


@dataclass(frozen=True)
class RunConfig:
    scenario: str
    kind: Kind
    deployment: Deployment
    upstream: Upstream
    load: LoadPlan
    deep_history: DeepHistoryPlan


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench: --env wants KEY=VALUE, not {pair!r}")
        env[key] = value
    return env


def resolve(options: dict[str, Any], scenario: str | None, server_cmd: str) -> RunConfig:
    """Explicit options (None when not given) over the scenario's preset over DEFAULTS."""
    preset = SCENARIOS.get(scenario or "", {})

    def pick(name: str) -> Any:
        value = options.get(name)
        if value is not None:
            return value
        return preset.get(name, DEFAULTS.get(name))

    latency = pick("latency")
    ramp = pick("ramp")
    load = LoadPlan(
        concurrency=pick("concurrency"),
        duration=pick("duration"),
        warmup=max(pick("warmup"), latency if ramp is None else ramp),
        ramp=latency if ramp is None else ramp,
        stream=bool(pick("stream")),
    )
    if load.concurrency < 1 or load.duration <= 0 or min(latency, load.ramp, load.warmup) < 0:
        raise SystemExit("bench: bad --concurrency/--latency/--duration/--warmup/--ramp")
    deployment = Deployment(
        server_cmd=server_cmd,
        instances=pick("instances"),
        workers=pick("workers"),
        database_url=options.get("database_url"),
        keep_db=options.get("keep_db"),
        redis_url=options.get("redis_url"),
        extra_env=options.get("env") or {},
        token=options.get("token"),
        user=options.get("user"),
        urls=tuple(options.get("url") or ()),
        keep_workspace=bool(options.get("keep")),
    )
    if deployment.instances < 1 or deployment.workers < 1:
        raise SystemExit("bench: --instances and --workers must be at least 1")
    return RunConfig(
        scenario=scenario or "custom",
        kind=pick("kind"),
        deployment=deployment,
        upstream=Upstream(latency=latency, chunks=pick("chunks")),
        load=load,
        deep_history=DeepHistoryPlan(
            rows=pick("rows"),
            conversation_size=pick("conversation_size"),
            requests=pick("requests"),
            reseed=bool(options.get("reseed")),
        ),
    )
