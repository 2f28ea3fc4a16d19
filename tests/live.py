"""Running the service as users run it, for the tests that need real processes and sockets
(tests/e2e, tests/web, tests/cluster): uvicorn started like `make run` starts it."""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_uvicorn(
    port: int, env: dict[str, str], log_path: Path, *, workers: int = 1
) -> subprocess.Popen:
    """uvicorn serving config.asgi:application on 127.0.0.1:`port`, its output in `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [
                BIN / "uvicorn",
                "config.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--loop",
                "uvloop",
                "--http",
                "httptools",
                "--no-access-log",
                "--timeout-graceful-shutdown",
                "1",
                "--workers",
                str(workers),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_until_serving(
    process: subprocess.Popen,
    log_path: Path,
    port: int,
    *,
    workers: int = 1,
    timeout: float = 90,
) -> None:
    """The service answers /healthz, and with several workers each has completed its startup
    (as its log says: keep LOG_LEVEL at INFO for those). Slow on a busy machine: each worker
    loads Django."""
    deadline = time.monotonic() + timeout
    while True:
        started = log_path.read_text(errors="replace").count("Application startup complete")
        if (workers == 1 or started >= workers) and _answers(port):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the service did not start:\n{log_path.read_text()}")
        time.sleep(0.1)


def _answers(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def stop(process: subprocess.Popen, *, timeout: float = 15) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """`python manage.py ARGS` in the service's environment (checked, output captured)."""
    return subprocess.run(
        [BIN / "python", "manage.py", *args],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
