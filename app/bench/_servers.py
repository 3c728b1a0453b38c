"""The processes the bench drives: a runcast server, and the bare reference broadcaster."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from app.bench._client import BenchError
from app.config import Settings

# The flush interval the bench's servers run with (the default, set explicitly).
FLUSH_INTERVAL_S: float = Settings.model_fields["flush_interval_s"].default

# -- the server process ----------------------------------------------------------------


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_s(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` and the processes it started (a SQLite
    store's writer), to the nanosecond: the scheduler's run time of each of their threads
    (``/proc/PID/task/TID/schedstat``). ``/proc/PID/stat`` counts 10 ms ticks, too coarse
    for a scenario that costs a server 50 ms. A thread that ends takes its time with it;
    the threads of the bench's servers live as long as they do."""
    total = 0
    if not os.path.isdir(f"/proc/{pid}/task"):
        raise BenchError(f"no /proc/{pid}/task: process {pid} has ended")
    for process in (pid, *children(pid)):
        with contextlib.suppress(OSError):  # a child that ended meanwhile
            for task in os.scandir(f"/proc/{process}/task"):
                with contextlib.suppress(OSError), open(f"{task.path}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
    return total / 1e9


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rindex(b")") + 2 :].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


@dataclass
class Target:
    """A server the bench drives: its URL, and its pid and database when known."""

    ws_url: str
    pid: int | None = None
    db: Path | None = None
    linger_s: float | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def cpu(self) -> float | None:
        return None if self.pid is None else cpu_s(self.pid)


def _spawn(
    argv: list[str], env: dict[str, str], nofile: int, cwd: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``argv``, wait for its first stdout line (which names its port)."""
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        env=env,
        cwd=cwd,
        preexec_fn=lambda: raise_nofile(nofile),
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line:
        process.wait(10)
        raise BenchError(f"{argv[2:]} exited with {process.returncode} before listening")
    return process, line


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def runcast_server(
    args: argparse.Namespace, workdir: Path, source: str | None = None
) -> Iterator[Target]:
    """The server under test: ``--url``, or ``python -m app serve`` in a child process
    (from the source tree ``source`` when given: ``--compare``)."""
    if args.url:
        yield Target(args.url, db=Path(args.db) if args.db else None, linger_s=args.linger)
        return
    db = workdir / "bench.db"
    db.unlink(missing_ok=True)
    env = dict(os.environ)
    env["RUNCAST_LINGER_S"] = str(args.linger)
    # The interval the persist scenario counts in (not one this environment may set).
    env["RUNCAST_FLUSH_INTERVAL"] = str(FLUSH_INTERVAL_S)
    env["RUNCAST_LOG_LEVEL"] = "warning"
    if source is not None:
        env["PYTHONPATH"] = str(Path(source).resolve())
    argv = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", "0"]
    process, line = _spawn([*argv, "--db", str(db)], env, args.nofile, source)
    try:
        match = re.search(r"http://([^\s]+)", line)
        if match is None:
            raise BenchError(f"unexpected first line from the server: {line!r}")
        yield Target(f"ws://{match.group(1)}/ws", process.pid, db, args.linger, process)
    finally:
        _stop(process)


@contextlib.contextmanager
def reference_server(nofile: int) -> Iterator[Target]:
    """The bare ``websockets`` broadcaster of this module, in a child process."""
    argv = [sys.executable, "-m", "app.bench.reference"]
    process, line = _spawn(argv, dict(os.environ), nofile)
    try:
        yield Target(f"ws://127.0.0.1:{int(line)}/", process.pid, process=process)
    finally:
        _stop(process)
