"""The service's Prometheus metrics (prometheus-client, multiprocess mode), in one place.

Every server process writes its samples to files of its own in this run's directory
(settings.METRICS_RUN_DIR, see chat.metrics_dir); `render()` adds up the files of all the
processes, so `/metrics` answers the same totals whichever worker serves the scrape. Recording is
a dictionary lookup and a write to a memory-mapped file: no I/O, no lock held across an await.

Label values are kept few: routes are URL pattern names (never raw paths), models are the
allowed models, outcomes and reasons are error codes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import prometheus_client
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder

from chat import metrics_dir

if not getattr(prometheus_client.values.ValueClass, "_multiprocess", False):
    raise ImproperlyConfigured(
        "prometheus_client was imported before config/settings.py set PROMETHEUS_MULTIPROC_DIR; "
        "import the settings first."
    )

# Created at first use by the first process of the run; the runs of processes that are gone are
# removed, and so are the live-gauge files of this run's killed workers.
os.makedirs(settings.METRICS_RUN_DIR, exist_ok=True)
metrics_dir.remove_dead_runs(settings.METRICS_DIR, keep=settings.METRICS_RUN_DIR)
for _pid in metrics_dir.dead_live_gauge_pids(settings.METRICS_RUN_DIR):
    multiprocess.mark_process_dead(_pid, str(settings.METRICS_RUN_DIR))

# Seconds. Requests include whole event streams, so the buckets reach minutes.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
UPSTREAM_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60)

http_requests = Counter(
    "chat_http_requests",
    "HTTP requests answered, by URL pattern name, method and status.",
    ["route", "method", "status"],
)
http_request_duration = Histogram(
    "chat_http_request_duration_seconds",
    "Time from a request's arrival to its response's end (for event streams: the stream's end).",
    ["route", "method"],
    buckets=HTTP_BUCKETS,
)
upstream_request_duration = Histogram(
    "chat_upstream_request_duration_seconds",
    "Model API calls, retries included (streams: until the last chunk), by requested model and "
    "outcome (ok, or the error code).",
    ["model", "outcome"],
    buckets=UPSTREAM_BUCKETS,
)
time_to_first_token = Histogram(
    "chat_time_to_first_token_seconds",
    "Streamed model calls: time from the call to the first piece of text.",
    ["model"],
    buckets=FIRST_TOKEN_BUCKETS,
)
tokens = Counter(
    "chat_tokens",
    "Tokens charged, by model and kind (prompt or completion).",
    ["model", "kind"],
)
cost_usd = Counter("chat_cost_usd", "Cost charged, in USD, by model.", ["model"])
generations_in_flight = Gauge(
    "chat_generations_in_flight",
    "Replies being generated now, all processes together.",
    multiprocess_mode="livesum",
)
rejections = Counter(
    "chat_rejections",
    "Requests refused before reaching the model: rate_limited, too_many_concurrent, "
    "budget_exceeded.",
    ["reason"],
)
generation_outcomes = Counter(
    "chat_generation_outcomes",
    "Generations ended, by the message's final status.",
    ["status"],
)

REJECTION_REASONS = frozenset({"rate_limited", "too_many_concurrent", "budget_exceeded"})
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


M = TypeVar("M", Counter, Histogram)


def _children(metric: M) -> Callable[..., M]:
    """`metric.labels(*values)`, memoized: the label checks run once per label set."""
    children: dict[tuple[str, ...], M] = {}

    def child(*values: str) -> M:
        found = children.get(values)
        if found is None:
            found = children[values] = metric.labels(*values)
        return found

    return child


_http_count = _children(http_requests)
_http_duration = _children(http_request_duration)
_upstream_duration = _children(upstream_request_duration)
_first_token = _children(time_to_first_token)
_tokens = _children(tokens)
_cost = _children(cost_usd)
_rejections = _children(rejections)
_outcomes = _children(generation_outcomes)


def observe_http_request(*, route: str, method: str, status: int, seconds: float) -> None:
    method = method if method in _HTTP_METHODS else "other"
    _http_count(route, method, str(status)).inc()
    _http_duration(route, method).observe(seconds)


def observe_upstream_call(*, model: str, outcome: str, seconds: float) -> None:
    _upstream_duration(model, outcome).observe(seconds)


def observe_first_token(*, model: str, seconds: float) -> None:
    _first_token(model).observe(seconds)


def record_usage(*, model: str, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
    """A settled model call: its tokens and its cost in USD."""
    if prompt_tokens:
        _tokens(model, "prompt").inc(prompt_tokens)
    if completion_tokens:
        _tokens(model, "completion").inc(completion_tokens)
    if cost:
        _cost(model).inc(cost)


def record_rejection(reason: str) -> None:
    """A request refused before the model was called (`reason` one of REJECTION_REASONS)."""
    if reason in REJECTION_REASONS:
        _rejections(reason).inc()


def record_generation_outcome(status: str) -> None:
    _outcomes(status).inc()


_registry: CollectorRegistry | None = None


def render(accept: str | None) -> tuple[bytes, str]:
    """(body, content type) of a scrape: every process's samples added up, in the text format
    the scraper asked for (Prometheus text by default, OpenMetrics on request)."""
    global _registry
    if _registry is None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(settings.METRICS_RUN_DIR))
        _registry = registry
    encoder, content_type = choose_encoder(accept or "")
    return encoder(_registry), content_type


def process_exit() -> None:
    """At a worker's shutdown: its live gauges (generations in flight) stop counting."""
    multiprocess.mark_process_dead(os.getpid(), str(settings.METRICS_RUN_DIR))
