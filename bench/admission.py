"""What the admission path costs: a chat's database work with and without a user's limits.

Drives the shipped ASGI application in process (httpx's ASGI transport) against the fake OpenAI
server without latency, one chat after another, and times every unit of database work
(`chat.db.run`) with `time.thread_time()` on its thread, counting its queries, and each step of
the admission path (token lookup, rate limit, concurrency cap and budget check) where it runs.
Two modes, each in a fresh process and database: `anonymous` (no credentials, no limits) and
`user` (a token, CHAT_THROTTLE_USER, CHAT_MAX_CONCURRENT_PER_USER and CHAT_USER_BUDGET_USD set:
authentication, rate limit, concurrency cap and budget reservation all run).

    make bench-admission        # or: .venv/bin/python -m bench admission --chats 300
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import io
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.config import Upstream
from bench.servers import FakeUpstream, Workspace

ROOT = Path(__file__).resolve().parent.parent
MODES = ("anonymous", "user")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench admission", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--chats", type=int, default=300, help="timed chats per mode")
    parser.add_argument("--warmup", type=int, default=30, help="chats before timing")
    parser.add_argument("--mode", choices=MODES, help="run one mode in this process")
    parser.add_argument("--redis-url", default="", help="REDIS_URL for the service (limits)")
    args = parser.parse_args(argv)
    if args.mode:
        return _measure(args)
    for mode in MODES:  # each mode in a process of its own: settings are read at startup
        command = [sys.executable, "-m", "bench", "admission", "--mode", mode]
        command += ["--chats", str(args.chats), "--warmup", str(args.warmup)]
        command += ["--redis-url", args.redis_url]
        completed = subprocess.run(command, cwd=ROOT, check=False)
        if completed.returncode:
            return completed.returncode
    return 0


def _measure(args: argparse.Namespace) -> int:
    # The fake server in a process of its own, so that its CPU is not counted as the service's.
    workspace = Workspace()
    fake = FakeUpstream(workspace, Upstream(latency=0, chunks=1))
    fake.start()
    try:
        os.environ.update(
            DJANGO_SETTINGS_MODULE="config.settings",
            DATABASE_URL=os.environ.get("DATABASE_URL", f"sqlite:///{workspace.path}/db.sqlite3"),
            REDIS_URL=args.redis_url,
            OPENAI_BASE_URL=fake.url,
            OPENAI_API_KEY="bench-key",
            LOG_LEVEL="WARNING",
            CHAT_THROTTLE_ANON="",
            CHAT_MAX_CONCURRENT_PER_USER="0",
        )
        if args.mode == "user":
            os.environ.update(
                CHAT_ALLOW_ANONYMOUS="false",
                CHAT_THROTTLE_USER="100000/min",
                CHAT_MAX_CONCURRENT_PER_USER="1000",
                CHAT_USER_BUDGET_USD="1000000",
            )
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        headers = {}
        if args.mode == "user":
            out = io.StringIO()
            call_command("create_token", "bench", "--rotate", stdout=out)
            headers["Authorization"] = f"Token {out.getvalue().split()[-1]}"
        return asyncio.run(_drive(args, headers))
    finally:
        fake.stop()
        workspace.remove()


async def _drive(args: argparse.Namespace, headers: dict[str, str]) -> int:
    import httpx
    from django.db import connection

    from chat import db
    from config.asgi import application

    stats: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])
    steps: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    timed = False
    run = db._run

    def measured(fn: Any, *a: Any, **k: Any) -> Any:
        if not timed:
            return run(fn, *a, **k)
        queries = 0

        def count(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
            nonlocal queries
            queries += 1
            return execute(sql, params, many, context)

        # Counted by an execute wrapper, not CaptureQueriesContext: its debug cursor (timing
        # and logging every query) would add to the CPU measured.
        with connection.execute_wrapper(count):
            started = time.thread_time()
            result = run(fn, *a, **k)
            cpu = time.thread_time() - started
        entry = stats[getattr(fn, "__qualname__", repr(fn))]
        entry[0] += 1
        entry[1] += cpu
        entry[2] += queries
        return result

    db._run = measured

    def add_step(name: str, started: float) -> None:
        if timed:
            steps[name][0] += 1
            steps[name][1] += time.thread_time() - started

    def step(name: str, fn: Any) -> Any:
        """`fn` with its CPU (on the thread that runs it) added to the admission step `name`."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def timed_coroutine(*a: Any, **k: Any) -> Any:
                started = time.thread_time()
                try:
                    return await fn(*a, **k)
                finally:
                    add_step(name, started)

            return timed_coroutine

        @functools.wraps(fn)
        def timed_function(*a: Any, **k: Any) -> Any:
            started = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                add_step(name, started)

        return timed_function

    # The admission path's own steps, timed where they run (the loop or a database thread).
    # Patched where present, so that the same script measures older code too.
    from billing import limits, services
    from chat.api import authentication

    token_auth = authentication.TokenAuthentication
    for owner, attribute, name in (
        (token_auth, "authenticate_credentials", "authentication: token read"),
        (token_auth, "credentials_from_cache", "authentication: token cached"),
        (limits, "throttle", "rate limit: throttle (loop)"),
        (limits, "_hit_db", "rate limit: hit (own transaction)"),
        (limits, "_hit_in_transaction", "rate limit: hit (database)"),
        (services, "_has_budget", "budget: anything to check?"),
        (services, "_check_admission", "cap and budget check"),
    ):
        original = inspect.getattr_static(owner, attribute, None)
        if original is None:
            continue
        if isinstance(original, (staticmethod, classmethod)):
            wrapped = step(name, getattr(owner, attribute))
            setattr(owner, attribute, staticmethod(wrapped))
        else:
            setattr(owner, attribute, step(name, original))
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://127.0.0.1", headers=headers
    ) as client:

        async def chat() -> None:
            response = await client.post("/api/messages/create/", json={"prompt_message": "hi"})
            if response.status_code != 201:
                raise SystemExit(f"bench admission: {response.status_code} {response.text}")

        for _ in range(args.warmup):
            await chat()
        timed = True
        started = time.process_time()
        for _ in range(args.chats):
            await chat()
        process_cpu = (time.process_time() - started) / args.chats
    db.close_connections()

    print(f"== {args.mode} ({connection.vendor}, {args.chats} chats) ==")
    print(f"process CPU per chat (client and SDK included): {process_cpu * 1000:.2f} ms")
    total = 0.0
    for name, (calls, cpu, queries) in stats.items():
        total += cpu
        print(
            f"  {name:<32} {calls / args.chats:.2f} per chat, "
            f"{cpu / args.chats * 1000:.3f} ms CPU, {queries / max(calls, 1):.1f} queries each"
        )
    print(f"  {'database threads in all':<32} {total / args.chats * 1000:.3f} ms CPU per chat")
    print("admission steps (CPU where each runs, per chat):")
    admission = 0.0
    for name, (calls, cpu) in sorted(steps.items()):
        admission += cpu
        print(f"  {name:<40} {calls / args.chats:.2f} per chat, {cpu / args.chats * 1000:.3f} ms")
    print(f"  {'admission path in all':<40} {admission / args.chats * 1000:.3f} ms CPU per chat")
    return 0
