"""CPU per model call through the SDK, for each HTTP transport it can be given.

Run with ``make bench-transport`` (or ``.venv/bin/python bench/transport_bench.py``). Starts the
project's fake OpenAI server with no latency, then for each OPENAI_HTTP_BACKEND makes
``--calls`` non-streaming calls through ``chat.llm.complete`` (the SDK, the way the service
calls it) from ``--concurrency`` tasks on one uvloop event loop, and prints this process's CPU
time per call. The fake server runs in its own process, so its CPU is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("LOG_LEVEL", "WARNING")

BACKENDS = ("httptools", "aiohttp", "httpx")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def measure(backend: str, calls: int, concurrency: int) -> float:
    from django.conf import settings

    from chat import llm

    settings.OPENAI_HTTP_BACKEND = backend
    options = llm.GenerationOptions(model=settings.OPENAI_MODEL)

    async def caller(count: int) -> None:
        for i in range(count):
            turns = [{"role": "user", "content": f"hello {i}"}]
            await llm.complete(messages=turns, options=options)

    await asyncio.gather(*(caller(20) for _ in range(concurrency)))  # warm up: connections
    started = time.process_time()
    await asyncio.gather(*(caller(calls // concurrency) for _ in range(concurrency)))
    cpu_ms = (time.process_time() - started) / (calls // concurrency * concurrency) * 1000
    await llm.close_client()
    return cpu_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per backend (best kept)")
    args = parser.parse_args()

    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openai", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.environ["OPENAI_API_KEY"] = "bench-key"
    os.environ["OPENAI_BASE_URL"] = f"http://127.0.0.1:{port}/v1"
    os.environ["OPENAI_MAX_RETRIES"] = "0"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

        import django
        import uvloop

        django.setup()
        print(f"{args.calls} calls, {args.concurrency} concurrent, best of {args.rounds} rounds")
        for backend in BACKENDS:
            results = [
                uvloop.run(measure(backend, args.calls, args.concurrency))
                for _ in range(args.rounds)
            ]
            rounds = ", ".join(f"{r:.3f}" for r in results)
            print(f"{backend:10s} CPU ms per call: {min(results):.3f}  (rounds: {rounds})")
    finally:
        fake.terminate()
        fake.wait()


if __name__ == "__main__":
    main()
