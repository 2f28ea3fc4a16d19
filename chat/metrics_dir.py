"""Where the metrics of this server run are kept, for prometheus-client's multiprocess mode.

In multiprocess mode every process writes its metrics to files of its own (`counter_<pid>.db`,
...) in one directory, and `/metrics` adds up the files of that directory. The directory must be
empty when a server starts, or the counters of an earlier run would be added in.

uvicorn's supervisor (`--workers N`) imports nothing of the application, so it cannot empty the
directory itself. Instead each *run* has a directory of its own, `METRICS_DIR/<pid>-<start>`,
named after the process that owns the run: the supervisor for the workers it spawned
(`multiprocessing.parent_process()`), else the process itself (a single `uvicorn` process, a
test run, a management command). Every process removes the directories of runs whose owner is
gone. So a new run starts from an empty directory, without any step before it, however it is
started (`make run`, plain `uvicorn`, tests).

This module imports neither Django nor prometheus_client: config/settings.py calls `run_dir()`
and puts the result into the environment *before* prometheus_client is first imported.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
from pathlib import Path

_RUN_NAME = re.compile(r"(\d+)-(\d+)")
# Files of the live gauge modes, which must disappear with their process.
_LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db")


def _start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot, Linux), to tell it from a later process that
    got the same pid; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces and parentheses); starttime is the
    # 22nd field of the line, the 20th after the name.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def is_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether process `pid` runs (and, with `start_time`, is the one that started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        pass
    if start_time is None:
        return True
    actual = _start_time(pid)
    return actual is None or actual == start_time


def run_owner() -> int:
    """The pid of the process whose run this process belongs to."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        return parent.pid
    return os.getpid()


def run_dir(base: Path) -> Path:
    """This run's directory under `base` (not created here)."""
    owner = run_owner()
    return base / f"{owner}-{_start_time(owner) or 0}"


def remove_dead_runs(base: Path, *, keep: Path) -> list[Path]:
    """Remove the run directories under `base` whose owner process is gone; returns them."""
    removed: list[Path] = []
    try:
        entries = list(base.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _RUN_NAME.fullmatch(entry.name)
        if entry == keep or match is None or not entry.is_dir():
            continue
        pid, started = int(match[1]), int(match[2])
        if not is_alive(pid, started or None):
            shutil.rmtree(entry, ignore_errors=True)  # another process may be removing it too
            removed.append(entry)
    return removed


def dead_live_gauge_pids(directory: Path) -> set[int]:
    """Pids of processes gone without their live-gauge files removed (a killed worker)."""
    pids: set[int] = set()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return pids
    for name in names:
        match = _LIVE_GAUGE_FILE.fullmatch(name)
        if match and not is_alive(int(match[1])):
            pids.add(int(match[1]))
    return pids
