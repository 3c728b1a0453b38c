"""SIGKILL of a process writing big batches through SqliteStore.write, at random moments
(often mid-transaction): the file keeps every batch the process was told was written, at
most the one batch it was writing on top (written whole, or not at all), and nothing
else: each run's events contiguous up to its row's last index, its keyframes with them,
both runs of a batch at the same index (one transaction), the file clean."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.core.events import Event
from app.store.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
PER_BATCH = 5_000  # events of each run in each batch
RUNS = ("run_a", "run_b")

# The writer: batch after batch of both runs' next events (a keyframe every 1,000), one
# line on stdout once each write has returned.
WRITER = f"""
import asyncio, sys
from app.core.events import Event
from app.store.base import RunRecord, RunWrite, ThreadRecord
from app.store.sqlite import SqliteStore

async def main():
    store = SqliteStore(sys.argv[1])
    await store.open()
    await store.create_thread(ThreadRecord("thr", {{}}, 1.0, 1.0))
    last = dict.fromkeys({RUNS!r}, 0)
    print("ready", flush=True)
    while True:
        batch = []
        for run_id in last:
            first = last[run_id] + 1
            last[run_id] = end = first + {PER_BATCH} - 1
            events = [Event(i, "tick", {{"n": i, "of": run_id}}, 1.0 + i)
                      for i in range(first, end + 1)]
            keyframes = [(i, '{{"at": %d}}' % i) for i in range(first, end + 1) if i % 1000 == 0]
            record = RunRecord(run_id, "thr", "counter", {{}}, "running", "e1", end,
                               {{"status": "running"}}, 1.0, float(end))
            batch.append(RunWrite(record, events, keyframes))
        await store.write(batch)
        print(end, flush=True)

asyncio.run(main())
"""


def expected_body(run_id: str, index: int) -> str:
    return Event(index, "tick", {"n": index, "of": run_id}, 1.0 + index).json


def kill_the_writer(db: Path, acks: int, delay_s: float) -> int:
    """Run the writer until it has acknowledged ``acks`` batches, then ``delay_s`` more,
    and SIGKILL it; returns the last index it acknowledged."""
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout is not None
        try:
            assert process.stdout.readline().strip() == "ready"
            acked = 0
            for _ in range(acks):
                acked = int(process.stdout.readline())
            time.sleep(delay_s)
            process.send_signal(signal.SIGKILL)
            # What it acknowledged before it died counts too.
            for line in process.stdout:
                acked = int(line)
        finally:
            process.kill()
            process.wait(10)
    assert process.returncode == -signal.SIGKILL
    return acked


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_killed_writer_loses_only_what_it_had_not_committed(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    db = tmp_path / "killed.db"
    acked = kill_the_writer(db, acks=rng.randint(1, 4), delay_s=rng.uniform(0, 0.15))

    with sqlite3.connect(db) as connection:
        rows = dict(connection.execute("SELECT run_id, last_index FROM runs").fetchall())
        assert set(rows) == set(RUNS)
        [last] = set(rows.values())  # both runs of a batch: one transaction
        assert acked <= last <= acked + PER_BATCH  # at most the batch it was writing
        assert last % PER_BATCH == 0  # a batch is written whole or not at all
        for run_id in RUNS:
            count, low, high = connection.execute(
                "SELECT count(*), min(i), max(i) FROM events WHERE run_id = ?", (run_id,)
            ).fetchone()
            assert (count, low, high) == (last, 1, last)
            for index in (1, last):
                body = connection.execute(
                    "SELECT body FROM events WHERE run_id = ? AND i = ?", (run_id, index)
                ).fetchone()[0]
                assert body == expected_body(run_id, index)
            keyframes = [
                row[0]
                for row in connection.execute(
                    "SELECT i FROM keyframes WHERE run_id = ? ORDER BY i", (run_id,)
                )
            ]
            assert keyframes == list(range(1000, last + 1, 1000))

    async def check() -> list[str]:
        store = SqliteStore(db)
        await store.open()
        try:
            return await store.check()
        finally:
            await store.close()

    assert asyncio.run(check()) == []
