"""``runcast bench``: every scenario at tiny sizes, so the command cannot rot.

The figures live in the bench itself (README, Performance); this only checks that each
scenario runs against a real server process, checks exactly-once delivery, and writes
its JSON.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from app import bench

pytestmark = pytest.mark.timeout(240)

TINY = [
    "--events", "300", "--watchers", "1,3", "--reference",
    "--latency-cases", "1x2@10,2x2@20", "--latency-s", "0.2",
    "--starts", "5",
    "--resume-sizes", "50,400", "--resume-disk-samples", "1", "--resume-live-events", "60",
    "--linger", "0.3",
    "--connections", "20",
    "--persist-events", "3000",
]  # fmt: skip


def test_every_scenario_runs_at_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "app", "bench", *TINY, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {row["scenario"] for row in rows} == set(bench.SCENARIOS)
    fanout = [row for row in rows if row["scenario"] == "fanout"]
    assert len(fanout) == 2 and all(row["rate/ref"] > 0 for row in fanout)
    assert "| fanout |" in done.stdout
    resumes = [row for row in rows if "disk_p50_ms" in row]
    assert len(resumes) == 2 and all(row["idle_memory_p50_ms"] > 0 for row in resumes)
    kills = [row for row in rows if "kill_age_p50_ms" in row]
    assert len(kills) == 1 and kills[0]["kill_age_p50_ms"] > 0


def test_a_gap_fails_the_watcher() -> None:
    async def feed() -> None:
        watch = bench.Watch(cursor=0, last=3)
        watch.feed(b'{"type":"events","run_id":"r","epoch":"e","events":[{"i":1,"x":0}]}')
        with pytest.raises(bench.ExactlyOnceError):
            watch.feed(b'{"type":"events","run_id":"r","epoch":"e","events":[{"i":3,"x":0}]}')

    asyncio.run(feed())


def test_an_unknown_scenario_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "bench", "nope"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "unknown scenario" in done.stderr
