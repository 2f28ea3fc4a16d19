"""The command line: ``python -m bench [options]`` (``make bench BENCH_ARGS="..."``).

Each run starts its own fake OpenAI upstream, database and service (unless ``--url`` names
running instances), runs one scenario, prints its report and stops everything; the exit status
is 1 if any run failed. ``python -m bench context [options]`` is the context-building benchmark
(``make bench-context``), ``python -m bench admission [options]`` the admission path's cost
(``make bench-admission``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shlex
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import BenchError, deep_history, load, reattach, report
from bench.config import (
    DEFAULTS,
    LOAD_SCENARIOS,
    SCENARIOS,
    Kind,
    RunConfig,
    parse_env_pairs,
    resolve,
)
from bench.http_client import ConnectionClosed, ProtocolError
from bench.servers import DEFAULT_SERVER_CMD, PYTHON, ROOT, Stack, Workspace

RUNNERS: dict[Kind, Callable[[RunConfig, Stack], Awaitable[dict[str, Any]]]] = {
    "load": load.run,
    "reattach": reattach.run,
    "deep-history": deep_history.run,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the chat service against a fake OpenAI upstream. "
        "`python -m bench context --help`: the context-building benchmark.",
    )
    scenario = parser.add_argument_group("scenario")
    scenario.add_argument(
        "--scenario",
        choices=list(SCENARIOS),
        help="preset: nonstream-200 (N=200, latency 1 s), hold-1000 (N=1000, latency 5 s, "
        "duration 30 s), stream-500 (--stream, N=500, latency 1 s, 20 chunks), reattach "
        "(re-attach latency: 20 pairs, 20 chunks over 2 s, 10 s, 2 instances), deep-history "
        "(list latency over --rows seeded messages); explicit options override the preset",
    )
    scenario.add_argument(
        "--all", action="store_true", help=f"run {', '.join(LOAD_SCENARIOS)} in turn"
    )

    workload = parser.add_argument_group("load (and reattach)")
    workload.add_argument(
        "-c",
        "--concurrency",
        type=int,
        help=f"concurrent clients; for reattach, concurrent pairs ({DEFAULTS['concurrency']})",
    )
    workload.add_argument(
        "--latency", type=float, help=f"upstream latency in seconds ({DEFAULTS['latency']:g})"
    )
    workload.add_argument(
        "--chunks", type=int, help=f"content chunks per streamed reply ({DEFAULTS['chunks']})"
    )
    workload.add_argument(
        "--stream", action="store_true", default=None, help="streaming (SSE) requests"
    )
    workload.add_argument(
        "--duration", type=float, help=f"measured seconds of load ({DEFAULTS['duration']:g})"
    )
    workload.add_argument(
        "--warmup", type=float, help=f"seconds of load before measuring ({DEFAULTS['warmup']:g})"
    )
    workload.add_argument(
        "--ramp",
        type=float,
        help="start the clients evenly over this many seconds (default: the upstream latency; "
        "the warmup is at least this long)",
    )

    deep = parser.add_argument_group("deep-history")
    deep.add_argument(
        "--rows", type=int, help=f"messages in the seeded history ({DEFAULTS['rows']})"
    )
    deep.add_argument(
        "--conversation-size",
        type=int,
        help=f"messages per seeded conversation ({DEFAULTS['conversation_size']})",
    )
    deep.add_argument(
        "--requests", type=int, help=f"timed requests per query ({DEFAULTS['requests']})"
    )
    deep.add_argument(
        "--reseed",
        action="store_true",
        help="empty and seed the database even if it already holds --rows messages",
    )

    service = parser.add_argument_group("service")
    service.add_argument(
        "--instances",
        type=int,
        help="independent service process groups, each on its own port, as on N hosts; "
        "clients are spread over them round-robin (1; reattach: 2)",
    )
    service.add_argument(
        "--workers",
        type=int,
        help=f"worker processes per instance (the WORKERS env or the core count: "
        f"{DEFAULTS['workers']})",
    )
    service.add_argument(
        "--database-url",
        help="the service's DATABASE_URL (e.g. postgres://postgres@127.0.0.1:5432/bench_wt); "
        "migrated and emptied before a run (deep-history keeps it if it holds --rows messages). "
        "Default: a fresh SQLite file in the run's temp dir",
    )
    service.add_argument(
        "--keep-db",
        type=Path,
        metavar="PATH",
        help="SQLite database file to use and keep (reused by deep-history)",
    )
    service.add_argument(
        "--redis-url", help="the service's REDIS_URL (e.g. redis://127.0.0.1:6379/3)"
    )
    service.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the service (repeatable), e.g. CHAT_STREAM_SAVE_INTERVAL=0.2",
    )
    service.add_argument(
        "--token",
        default=os.environ.get("BENCH_TOKEN") or None,
        help="send `Authorization: Token TOKEN` with every request (default: $BENCH_TOKEN)",
    )
    service.add_argument(
        "--user",
        help="create user USER (and a token) in the service's database and send its token: "
        "with --env CHAT_ALLOW_ANONYMOUS=false, CHAT_THROTTLE_USER, CHAT_USER_BUDGET_USD... "
        "the whole admission path runs",
    )
    service.add_argument(
        "--server-cmd",
        default=DEFAULT_SERVER_CMD,
        help="command that starts one instance; {host}, {port} and {workers} are filled in "
        "(default: as `make run`)",
    )
    service.add_argument(
        "--url",
        action="append",
        help="bench this running service instead of starting one (repeatable: instances); "
        "nothing is started, seeded or emptied",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--json", type=Path, help="write the results to this JSON file")
    output.add_argument(
        "--keep", action="store_true", help="keep the temp dir (database, logs) on success"
    )
    return parser


def raise_open_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a project dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def run_scenario(config: RunConfig, command: str) -> dict[str, Any]:
    """One scenario with servers of its own, stopped at the end whatever happens."""
    workspace = Workspace()
    stack = Stack(config.deployment, workspace)
    result: dict[str, Any] = {
        "scenario": config.scenario,
        "kind": config.kind,
        "command": command,
        "ok": False,
    }
    try:
        result.update(await RUNNERS[config.kind](config, stack))
    except BenchError as exc:
        result["failure"] = str(exc)
    except (OSError, TimeoutError, ConnectionClosed, ProtocolError, ValueError, KeyError) as exc:
        result["failure"] = f"{type(exc).__name__}: {exc}"
    finally:
        result.update(await asyncio.to_thread(stack.stop))
        if not result.get("services_exited_cleanly", True):
            result["ok"] = False
        if not result["ok"] or result.get("service_log_problems"):
            result["log_tails"] = stack.log_tails()
        if result["ok"] and not config.deployment.keep_workspace:
            workspace.remove()
        else:
            result["workspace"] = str(workspace.path)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["admission"]:
        from bench import admission

        return admission.main(argv[1:])
    if argv[:1] == ["context"]:
        from bench import context

        return context.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.database_url and args.keep_db:
        parser.error("--database-url and --keep-db are exclusive")
    if args.url and (args.database_url or args.keep_db or args.instances):
        parser.error("--url uses running instances: no --database-url, --keep-db, --instances")
    options = vars(args)
    options["env"] = parse_env_pairs(args.env)
    command = shlex.join([os.path.relpath(PYTHON, ROOT), "-m", "bench", *argv])
    open_files = raise_open_file_limit()
    results = []
    for scenario in LOAD_SCENARIOS if args.all else [args.scenario]:
        config = resolve(options, scenario, args.server_cmd)
        needed = config.load.concurrency * 3 + 100  # clients, the service's both sides, upstream
        if config.kind == "load" and open_files < needed:
            print(f"warning: open-file limit {open_files} < ~{needed} needed", file=sys.stderr)
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            result = runner.run(run_scenario(config, command))
        report.print_result(result)
        print()
        results.append(result)
    if args.all:
        report.print_summary_table(results)
    if args.json:
        report.write_json(args.json, results if args.all else results[0])
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
