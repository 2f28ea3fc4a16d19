"""The pieces of observability that need no database: request ids and client addresses, the
per-run metrics directory, prometheus-client's multiprocess mode."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import RequestFactory
from rest_framework.throttling import BaseThrottle

from chat import metrics_dir, request_context


@pytest.mark.parametrize("proxies", [0, 1, 2, None])
@pytest.mark.parametrize(
    "forwarded", [None, "203.0.113.1", "203.0.113.1, 10.0.0.2", " 1.1.1.1 ,2.2.2.2, 3.3.3.3"]
)
def test_the_client_address_is_drfs_ident(settings, proxies, forwarded):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": proxies}
    headers = {"HTTP_X_FORWARDED_FOR": forwarded} if forwarded is not None else {}
    request = RequestFactory().get("/", REMOTE_ADDR="127.0.0.9", **headers)
    assert request_context.client_ip(request.META) == BaseThrottle().get_ident(request)


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("abc-123", True),
        ("edge:42.a_B-9", True),
        ("x" * request_context.MAX_LENGTH, True),
        ("x" * (request_context.MAX_LENGTH + 1), False),
        ("has space", False),
        ("semi;colon", False),
        ("", False),
        (None, False),
    ],
)
def test_incoming_request_ids_are_kept_only_when_short_and_safe(incoming, kept):
    result = request_context.accept_or_new(incoming)
    assert (result == incoming) is kept
    if not kept:
        assert len(result) == 32 and int(result, 16) >= 0


def test_each_server_run_has_its_own_directory_and_dead_runs_are_removed(tmp_path: Path):
    mine = metrics_dir.run_dir(tmp_path)
    assert mine.name.startswith(f"{os.getpid()}-")
    assert metrics_dir.run_dir(tmp_path) == mine

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(gone.stdout)
    dead = tmp_path / f"{dead_pid}-12345"
    reused = tmp_path / f"{os.getpid()}-1"  # our pid, but another start time: an old run
    for directory in (mine, dead, reused, tmp_path / "not-a-run"):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"")
    removed = metrics_dir.remove_dead_runs(tmp_path, keep=mine)
    # Telling a reused pid by its start time needs /proc (Linux).
    old_runs = [dead, reused] if Path("/proc/self/stat").exists() else [dead]
    assert sorted(removed) == sorted(old_runs)
    assert mine.exists() and (tmp_path / "not-a-run").exists()

    (mine / f"gauge_livesum_{dead_pid}.db").write_bytes(b"")
    (mine / f"gauge_livesum_{os.getpid()}.db").write_bytes(b"")
    (mine / f"counter_{dead_pid}.db").write_bytes(b"")
    assert metrics_dir.dead_live_gauge_pids(mine) == {dead_pid}


def test_workers_spawned_by_a_supervisor_share_its_run_directory(tmp_path: Path):
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        child_dir = pool.apply(metrics_dir.run_dir, (tmp_path,))
    assert child_dir == metrics_dir.run_dir(tmp_path)


def test_the_settings_put_prometheus_in_multiprocess_mode(settings):
    import prometheus_client.values

    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(settings.METRICS_RUN_DIR)
    assert settings.METRICS_RUN_DIR.parent == settings.METRICS_DIR
    assert prometheus_client.values.ValueClass._multiprocess
