"""Statistics of a run, its printed report, and its JSON.

A load run's figures (``summarize_load``) cover the measured window [warmup, warmup + duration]:

* latency percentiles over the successful requests that *started* in the window (each is
  followed to its end, even past the window);
* throughput: successful requests' worth of work done in the window per second; each
  successful request contributes the fraction of its lifetime inside the window, so a
  long-latency run is not quantised into whole batches of completions (the plain count of
  completions inside the window is printed next to it); ideal = N / upstream latency;
  efficiency = throughput / ideal;
* server CPU: user+sys CPU seconds of every server process (all instances' supervisors and
  workers) between the window's edges, divided by the requests' worth of work done in the
  window: "CPU ms per request"; peak RSS: the largest sum of the server processes' resident
  memory seen by the 0.2 s sampler;
* other CPU: the fake upstream's and this load generator's, and what the rest of the machine
  used (busy CPU of all cores minus ours);
* stored == successful: messages the service stored during the run (``count`` of the list)
  equal the successful responses, warmup included.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.config import RunConfig
    from bench.load import LoadOutcome

MB = 1024 * 1024


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (NaN for an empty one)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def distribution_ms(seconds: list[float]) -> dict[str, float]:
    """min, p50, p95, p99, max and mean of durations in seconds, in milliseconds."""
    values = sorted(seconds)
    if not values:
        return dict.fromkeys(("min", "p50", "p95", "p99", "max", "mean"), math.nan)
    return {
        "min": values[0] * 1000,
        "p50": percentile(values, 50) * 1000,
        "p95": percentile(values, 95) * 1000,
        "p99": percentile(values, 99) * 1000,
        "max": values[-1] * 1000,
        "mean": sum(values) / len(values) * 1000,
    }


def summarize_load(config: RunConfig, outcome: LoadOutcome) -> dict[str, Any]:
    plan, clients, sampler = config.load, outcome.clients, outcome.sampler
    warm_at, end_at = clients.warm_at, clients.end_at
    window = end_at - warm_at
    errors_total: Counter[str] = Counter()
    errors_measured: Counter[str] = Counter()
    error_starts: list[float] = []
    latencies: list[float] = []
    heads: list[float] = []
    work = 0.0  # successful requests' worth of work inside the window
    completed_in_window = 0
    measured = 0
    for record in clients.records:
        if record.error is not None:
            errors_total[record.error] += 1
            error_starts.append(record.started - clients.started)
        if record.started >= warm_at:
            measured += 1
            if record.error is None:
                latencies.append(record.ended - record.started)
                heads.append(record.head_at - record.started)
            else:
                errors_measured[record.error] += 1
        if record.error is None:
            lifetime = record.ended - record.started
            overlap = min(record.ended, end_at) - max(record.started, warm_at)
            if overlap > 0:
                work += overlap / lifetime if lifetime > 0 else 1.0
            if warm_at <= record.ended <= end_at:
                completed_in_window += 1
    successful_total = sum(1 for r in clients.records if r.error is None)
    throughput = work / window
    ideal = plan.concurrency / config.upstream.latency if config.upstream.latency else math.nan
    out: dict[str, Any] = {
        "mode": "stream" if plan.stream else "non-stream",
        "concurrency": plan.concurrency,
        "upstream_latency_s": config.upstream.latency,
        "chunks": config.upstream.chunks if plan.stream else None,
        "duration_s": plan.duration,
        "warmup_s": plan.warmup,
        "ramp_s": plan.ramp,
        "requests_total": len(clients.records),
        "successful_total": successful_total,
        "errors_total": errors_total.total(),
        "errors_total_by_kind": dict(errors_total),
        "error_start_range_s": [min(error_starts), max(error_starts)] if error_starts else None,
        "requests_measured": measured,
        "errors_measured_by_kind": dict(errors_measured),
        "successful_measured": len(latencies),
        "window_s": window,
        "run_s": outcome.finished_at - clients.started,
        "throughput_rps": throughput,
        "completions_in_window": completed_in_window,
        "completions_rps": completed_in_window / window,
        "ideal_rps": ideal,
        "efficiency": throughput / ideal if ideal else math.nan,
        "latency_ms": distribution_ms(latencies),
        "ttfb_ms": distribution_ms(heads),
        "max_inflight": clients.max_in_flight,
        "mean_inflight_window": _mean(sampler.in_flight_samples),
        "loop_lag_ms": {
            "mean": _mean(sampler.loop_lags) * 1000,
            "max": max(sampler.loop_lags, default=math.nan) * 1000,
        },
        "clients_not_finished": outcome.unfinished_clients,
        "stored": outcome.stored,
        "stored_ok": outcome.stored == successful_total,
    }
    start, end = sampler.marks["warm"], sampler.marks["end"]
    span = end.at - start.at
    load_generator_cpu = end.load_generator - start.load_generator
    out["loadgen_cpu_pct"] = load_generator_cpu / span * 100
    ours = load_generator_cpu
    if start.server:
        server_cpu = sum(
            end.server[pid] - cpu for pid, cpu in start.server.items() if pid in end.server
        )
        ours += server_cpu
        out["server_cpu_s"] = server_cpu
        out["server_cpu_pct"] = server_cpu / span * 100
        out["server_cpu_ms_per_request"] = (
            server_cpu / (throughput * span) * 1000 if throughput > 0 else math.nan
        )
        out["peak_rss_mb"] = sampler.peak_rss / MB
    if start.upstream is not None and end.upstream is not None:
        ours += end.upstream - start.upstream
        out["fake_cpu_pct"] = (end.upstream - start.upstream) / span * 100
    busy = end.machine_busy - start.machine_busy
    total = end.machine_total - start.machine_total
    if total > 0:
        cores = os.cpu_count() or 1
        out["cores"] = cores
        out["machine_busy_pct"] = busy / total * 100 * cores  # 100 % = one core
        out["other_processes_cpu_pct"] = max(0.0, busy - ours) / span * 100
    out["ok"] = out["stored_ok"] and not errors_total and not outcome.unfinished_clients
    return out


def _mean(values: list[float] | list[int]) -> float:
    return sum(values) / len(values) if values else math.nan


# --------------------------------------------------------------------------- printing


def _errors(errors: dict[str, int]) -> str:
    if not errors:
        return "none"
    return ", ".join(f"{kind}: {n}" for kind, n in Counter(errors).most_common())


def print_result(result: dict[str, Any]) -> None:
    """The whole report of one run: what ran, the scenario's figures, how it ended."""
    print_header(result)
    if "failure" in result:
        print(f"FAILED:             {result['failure']}")
    elif result["kind"] == "load":
        print_load(result)
    elif result["kind"] == "reattach":
        print_reattach(result)
    elif result["kind"] == "deep-history":
        print_deep_history(result)
    print_footer(result)
    sys.stdout.flush()


def _print_stack(info: dict[str, Any]) -> None:
    if "fake_command" in info:
        print(f"fake upstream:      {info['fake_command']}  ({info['fake_url']})")
    if "service_commands" in info:
        for number, command in enumerate(info["service_commands"], 1):
            print(f"service {number}:          {command}")
        print(f"service env:        {' '.join(f'{k}={v}' for k, v in info['env'].items())}")
        processes = info["server_processes"]
        print(f"server processes:   {len(processes)}")
        for process in processes:
            print(f"  pid {process['pid']} threads {process['threads']}: {process['cmdline']}")
    elif info.get("urls"):
        print(f"service:            {', '.join(info['urls'])} (already running)")
    if "auth" in info:
        print(f"client auth:        {info['auth']}")


def print_header(result: dict[str, Any]) -> None:
    print(f"== {result['scenario']} ==")
    print(f"command:            {result['command']}")
    _print_stack(result)


def print_load(r: dict[str, Any]) -> None:
    latency, heads = r["latency_ms"], r["ttfb_ms"]
    chunks = f", {r['chunks']} chunks" if r["mode"] == "stream" else ""
    print(f"mode:               {r['mode']}")
    print(f"concurrency (N):    {r['concurrency']}")
    print(f"upstream latency:   {r['upstream_latency_s']:g} s{chunks}")
    print(
        f"duration:           {r['duration_s']:g} s measured after {r['warmup_s']:g} s warmup "
        f"(clients started over {r['ramp_s']:g} s; whole run {r['run_s']:.1f} s)"
    )
    print(
        f"requests:           {r['requests_total']} total, {r['successful_total']} ok; "
        f"measured (started after warmup): {r['requests_measured']}, "
        f"{r['successful_measured']} ok"
    )
    when = ""
    if r["error_start_range_s"]:
        first, last = r["error_start_range_s"]
        when = f"  (requests started {first:.1f}-{last:.1f} s after the first client)"
    print(f"errors (all):       {_errors(r['errors_total_by_kind'])}{when}")
    print(f"errors (measured):  {_errors(r['errors_measured_by_kind'])}")
    print(
        f"throughput:         {r['throughput_rps']:.1f} req/s (completions inside the window: "
        f"{r['completions_in_window']} = {r['completions_rps']:.1f} req/s)"
    )
    print(f"ideal throughput:   {r['ideal_rps']:.1f} req/s (N / upstream latency)")
    print(f"efficiency:         {r['efficiency'] * 100:.1f} %")
    print(
        f"latency ms:         p50 {latency['p50']:.1f}  p95 {latency['p95']:.1f}  "
        f"p99 {latency['p99']:.1f}  max {latency['max']:.1f}  "
        f"(min {latency['min']:.1f}, mean {latency['mean']:.1f})"
    )
    if r["mode"] == "stream":
        print(
            f"time to 1st byte ms: p50 {heads['p50']:.1f}  p99 {heads['p99']:.1f}  "
            f"max {heads['max']:.1f}"
        )
    print(
        f"in flight:          max {r['max_inflight']} of {r['concurrency']}, "
        f"mean {r['mean_inflight_window']:.1f} during the window"
    )
    if "server_cpu_s" in r:
        cores = r.get("cores", 1)
        print(
            f"server CPU:         {r['server_cpu_ms_per_request']:.2f} ms/request, "
            f"{r['server_cpu_pct']:.1f} % of one core ({r['server_cpu_s']:.2f} s CPU in the "
            f"window; {cores} cores = {cores * 100} %)"
        )
        print(
            f"server memory:      peak RSS {r['peak_rss_mb']:.1f} MB (all server processes, "
            f"sampled every 0.2 s; {r['rss_idle_mb']:.1f} MB idle before the load)"
        )
    fake = f"fake upstream {r['fake_cpu_pct']:.1f} %, " if "fake_cpu_pct" in r else ""
    print(
        f"other CPU:          {fake}load generator {r['loadgen_cpu_pct']:.1f} % "
        f"(loop lag mean {r['loop_lag_ms']['mean']:.1f} ms, max {r['loop_lag_ms']['max']:.1f} ms)"
    )
    if "machine_busy_pct" in r:
        others = "unrelated processes" if "server_cpu_s" in r else "all but this process"
        print(
            f"machine CPU:        {r['machine_busy_pct']:.1f} % busy of {r['cores'] * 100} %; "
            f"{others} {r['other_processes_cpu_pct']:.1f} %"
        )
    if r["stored_ok"]:
        print(
            f"stored == successful: OK ({r['stored']} stored, {r['successful_total']} successful)"
        )
    else:
        note = (
            f"; {r['errors_total']} requests failed, and the service may store a failed or "
            "abandoned request too"
            if r["errors_total"]
            else ""
        )
        print(
            f"stored == successful: MISMATCH ({r['stored']} stored, "
            f"{r['successful_total']} successful{note})"
        )


def _lag_line(lag: dict[str, float]) -> str:
    return f"p50 {lag['p50']:.1f}  p95 {lag['p95']:.1f}  p99 {lag['p99']:.1f}  max {lag['max']:.1f}"


def print_reattach(r: dict[str, Any]) -> None:
    print(
        f"pairs:              {r['pairs']} concurrent, for {r['duration_s']:g} s; replies of "
        f"{r['chunks']} chunks over {r['upstream_latency_s']:g} s"
    )
    for phase in r["phases"]:
        print(f"-- {phase['name']}: {phase['description']}")
        if "failure" in phase:
            print(f"   FAILED: {phase['failure']}")
            continue
        print(
            f"   streams:          {phase['pairs_completed']} pairs ok of {phase['pairs_total']}; "
            f"errors: {_errors(phase['errors_by_kind'])}"
        )
        print(
            f"   live deltas:      {phase['live_deltas']} timed on both streams "
            f"({phase['replayed_deltas']} more reached A before B began: replayed, not timed)"
        )
        print(f"   extra latency ms: {_lag_line(phase['extra_latency_ms'])}  (B after A)")
        print(f"   end latency ms:   {_lag_line(phase['end_latency_ms'])}  (B's message after A's)")
        print(f"   re-attach ms:     {_lag_line(phase['attach_ms'])}  (GET to B's start event)")


def print_deep_history(r: dict[str, Any]) -> None:
    seeding = r["seeding"]
    if seeding.get("seeded"):
        print(
            f"seeded:             {seeding['output']} "
            f"({seeding['seconds_with_startup']:.1f} s with manage.py's start-up)"
        )
    else:
        print(f"seeded:             no: {seeding['reason']}")
    print(f"database:           {r['database']}, {r['messages']} messages")
    print(
        f"requests:           {r['requests']} per query, sequential on one keep-alive "
        f"connection, after {r['warmup_requests']} warm-up requests each"
    )
    print(f"{'query':<22} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'bytes':>7}  path")
    for query in r["queries"]:
        if "skipped" in query:
            print(f"{query['name']:<22} skipped: {query['skipped']}")
            continue
        latency = query["latency_ms"]
        errors = f"  ERRORS: {_errors(query['errors'])}" if query["errors"] else ""
        print(
            f"{query['name']:<22} {latency['p50']:>8.2f} {latency['p95']:>8.2f} "
            f"{latency['max']:>8.2f} {query['bytes']:>7}  {query['path']}{errors}"
        )
    for query in r["queries"]:
        if "cursor_found" in query:
            print(f"({query['name']}: the cursor was {query['cursor_found']})")


def print_footer(r: dict[str, Any]) -> None:
    if "service_exit" in r:
        print(
            f"service exit codes: {r['service_exit']}; service logs: "
            f"{r['service_log_problem_lines']} warning/error lines"
        )
    for line, count in r.get("service_log_problems", []):
        print(f"  | {count:>6} x {line[:200]}")
    for name, text in r.get("log_tails", {}).items():
        print(f"{name} (tail):")
        for line in text.splitlines():
            print(f"  | {line}")
    if "workspace" in r:
        print(f"logs and database kept in {r['workspace']}")
    print(f"result:             {'PASS' if r['ok'] else 'FAIL'}")


def print_summary_table(results: list[dict[str, Any]]) -> None:
    """One line per load run (after --all)."""
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
        latency = r["latency_ms"]
        print(
            f"{r['scenario']:<14} {r['mode']:<10} {r['concurrency']:>5} "
            f"{r['upstream_latency_s']:>5g} {r['throughput_rps']:>7.1f} {r['ideal_rps']:>6.0f} "
            f"{r['efficiency'] * 100:>6.1f} {latency['p50']:>8.1f} {latency['p99']:>8.1f} "
            f"{latency['max']:>8.1f} {r['errors_total']:>6} "
            f"{r.get('server_cpu_ms_per_request', math.nan):>8.2f} "
            f"{r.get('server_cpu_pct', math.nan):>6.1f} {r.get('peak_rss_mb', math.nan):>7.1f} "
            f"{r['max_inflight']:>5} {'OK' if r['stored_ok'] else 'BAD':>6}"
        )


# --------------------------------------------------------------------------- JSON


def _without_nan(value: Any) -> Any:
    """NaN is not JSON: null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_without_nan(data), indent=2, default=str) + "\n")
