"""The terminal client (app/terminal.py), run as a user runs it: ``python -m app runs``,
``start``, ``stop``, ``watch``, against a real ``runcast serve`` process."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import pytest

from tests.conftest import Spawned

pytestmark = pytest.mark.timeout(60)

TOKEN = "admin-secret-0123456789"


def runcast(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_start_runs_and_stop(spawn: Any) -> None:
    server: Spawned = spawn()
    url = ["--url", server.http_url]
    started = runcast("start", "counter", "--input", '{"n": 1000000, "delay_s": 0.01}', *url)
    assert started.returncode == 0, started.stderr
    run = json.loads(started.stdout)
    listed = runcast("runs", "--status", "running", *url)
    assert listed.returncode == 0, listed.stderr
    assert run["run_id"] in listed.stdout and "running" in listed.stdout
    stopped = runcast("stop", run["run_id"], *url)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"{run['run_id']}: stopping True, running"
    again = runcast("stop", run["run_id"], *url)
    assert again.returncode == 0 and "stopping False" in again.stdout, again.stdout


def test_start_and_watch_a_demo_run(spawn: Any) -> None:
    server: Spawned = spawn()
    done = runcast(
        "start",
        "demo",
        "--input",
        '{"tokens": 30, "speed": 1000}',
        "--watch",
        "--url",
        server.http_url,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "[running]"
    assert any(line.startswith("  -> ") for line in lines), lines  # its tool call
    assert lines[-1] == "[completed]"
    text = "".join(line for line in lines if not line.startswith(("[", "  ")))
    assert len(text.split()) >= 20, text


def test_token_from_the_environment_and_clear_refusals(spawn: Any, tmp_path: Path) -> None:
    server: Spawned = spawn(env={"RUNCAST_TOKENS": f"admin:{TOKEN}"})
    refused = runcast("runs", "--url", server.http_url)
    assert refused.returncode == 1
    assert refused.stderr.startswith("runcast: unauthorized: "), refused.stderr
    assert "Traceback" not in refused.stderr
    listed = runcast("runs", "--json", "--url", server.http_url, env={"RUNCAST_TOKEN": TOKEN})
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
    bad = runcast("start", "demo", "--input", "{nope", "--url", server.http_url)
    assert (bad.returncode, bad.stderr.splitlines()[0][:30]) == (
        1,
        "runcast: --input is not JSON: ",
    )
    nobody = runcast("runs", "--url", "http://127.0.0.1:9")
    assert nobody.returncode == 1 and nobody.stderr.startswith("runcast: cannot reach ")


def _lines(stream: IO[str], into: queue.SimpleQueue[str | None]) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def test_watch_follows_a_run_through_a_crash_and_restart(spawn: Any, tmp_path: Path) -> None:
    db = tmp_path / "runcast.db"
    server: Spawned = spawn("--flush-interval", "0.05", db=db)
    started = runcast(
        "start", "demo", "--input", '{"tokens": 400, "speed": 40}', "--url", server.http_url
    )
    run_id = json.loads(started.stdout)["run_id"]
    watcher = subprocess.Popen(
        [sys.executable, "-m", "app", "watch", run_id, "--url", server.http_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    arrived: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    assert watcher.stdout is not None
    reader = threading.Thread(target=_lines, args=(watcher.stdout, arrived), daemon=True)
    reader.start()
    try:
        # Text is streaming: the run is mid-way.
        seen = [arrived.get(timeout=20) for _ in range(3)]
        assert seen[0] == "[running]\n", seen
        server.process.send_signal(signal.SIGKILL)
        server.wait(10)
        # The same file and port: the run was live at the crash, and is ended.
        spawn("--port", str(server.port), db=db)
        rest = []
        while (line := arrived.get(timeout=40)) is not None:
            rest.append(line)
        watcher.wait(timeout=10)
        assert watcher.stderr is not None
        err = watcher.stderr.read()
        watcher.stderr.close()
        watcher.stdout.close()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    lines = "".join(str(line) for line in [*seen, *rest]).splitlines()
    # The end arrives as an event, or folded into the snapshot after the reset.
    assert lines[-1] in ("[interrupted: crash]", "[interrupted]"), (lines[-5:], err)
    assert watcher.returncode == 3, err
    assert "the server restarted after a crash" in err, err
