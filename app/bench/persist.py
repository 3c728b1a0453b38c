"""The ``persist`` scenario of ``runcast bench``: what the flusher gets onto the disk.

Two parts, each against a server process of its own on its own SQLite file:

- throughput: a counter of ``--persist-events`` events, as fast as the agent can, while
  the file is polled read-only every 5 ms: ``durable_per_s``, the events over the time from
  the first one's ``ts`` to the moment the last one is seen on disk; ``events_per_s``, the
  same to the last one's ``ts`` (the rate the agent emitted at); ``commits_per_s``, the
  commits seen that made more events durable, from the first to the last; the lag from
  emit to durable.
- SIGKILL: a server with a counter at full speed is killed at a random moment, and the
  file is read once the server's own child processes (its store's writer) have ended:
  ``kill_age_*``, the kill time minus the ``ts`` of the newest event on disk (what a crash
  loses is younger than that), median and max over the kills, also in flush intervals.
  ``--persist-kills`` kills; by default one per 200,000 events of ``--persist-events``,
  1 to 10 (10 with its default). Not measured
  against a ``--url`` server (it is not ours to kill).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import orjson

from app.bench import _servers
from app.bench._client import BenchError, Conn, counter_op, pct
from app.bench._servers import FLUSH_INTERVAL_S, Target, runcast_server
from app.bench.report import Report

EVENTS_PER_KILL = 200_000
MAX_KILLS = 10
# How long a run is at full speed before the kill: past its first flushes, whatever the
# machine; then a random part of two intervals, so kills fall anywhere in a flush's cycle.
FULL_SPEED_S = 1.0
POLL_S = 0.005


async def scenario_persist(args: argparse.Namespace, target: Target, report: Report) -> None:
    if target.db is None:
        print("  persist: skipped (no --db for the --url server)")
        return
    await _throughput(args, target, report)
    if args.url:
        return
    kills = args.persist_kills
    if kills is None:
        kills = max(1, min(MAX_KILLS, args.persist_events // EVENTS_PER_KILL))
    ages = await _kill_ages(args, report, kills)
    report.add(
        "persist",
        f"SIGKILL at full speed, {kills} kills",
        kill_age_p50_ms=statistics.median(ages) * 1000,
        kill_age_max_ms=max(ages) * 1000,
        kill_age_p50_intervals=statistics.median(ages) / FLUSH_INTERVAL_S,
        flush_interval_ms=FLUSH_INTERVAL_S * 1000,
    )


async def _throughput(args: argparse.Namespace, target: Target, report: Report) -> None:
    assert target.db is not None
    n = args.persist_events
    conn = await Conn.open(target.ws_url)
    db = sqlite3.connect(f"file:{target.db}?mode=ro", uri=True, check_same_thread=False)
    try:
        version = db.execute("PRAGMA data_version").fetchone()[0]
        result = await conn.request({**counter_op(n), "subscribe": False})
        run_id = result["run"]["run_id"]
        began = time.time()
        polls: list[tuple[float, int]] = []  # (seen at, last index on disk): each commit
        last = n + 2
        durable = 0
        while durable < last:
            await asyncio.sleep(POLL_S)
            now_version = db.execute("PRAGMA data_version").fetchone()[0]
            if now_version == version:
                continue
            version = now_version
            row = db.execute("SELECT max(i) FROM events WHERE run_id = ?", (run_id,)).fetchone()
            if (row[0] or 0) > durable:
                durable = row[0]
                polls.append((time.time(), durable))
            if time.time() - began > 600:
                raise BenchError(f"persist: only {durable} of {last} events durable after 600 s")
        bodies = dict(
            db.execute(
                "SELECT i, body FROM events WHERE run_id = ? AND (i = 1 OR i = ?)", (run_id, last)
            ).fetchall()
        )
        first_ts = orjson.loads(bodies[1])["ts"]
        end_ts = orjson.loads(bodies[last])["ts"]
        # Emit-to-durable lag: at each commit seen, the age of the oldest event not yet on
        # disk just before it (the next index after the previous commit's).
        lags = []
        previous = 0
        for seen_at, index in polls:
            body = db.execute(
                "SELECT body FROM events WHERE run_id = ? AND i = ?", (run_id, previous + 1)
            ).fetchone()[0]
            lags.append(seen_at - orjson.loads(body)["ts"])
            previous = index
        span_s = polls[-1][0] - polls[0][0]
        report.add(
            "persist",
            f"counter of {n:,} events, SQLite",
            durable_per_s=n / max(polls[-1][0] - first_ts, 1e-9),
            events_per_s=n / max(end_ts - first_ts, 1e-9),
            commits=len(polls),
            commits_per_s=(len(polls) - 1) / span_s if span_s > 0 else float("nan"),
            lag_p50_ms=pct([x * 1000 for x in lags], 50),
            lag_max_ms=max(lags) * 1000,
            durable_after_end_ms=(polls[-1][0] - end_ts) * 1000,
        )
    finally:
        db.close()
        await conn.close()


def _source(args: argparse.Namespace, report: Report) -> str | None:
    """The source tree of the server under test (``--compare DIR``), from the label the
    runner gives the report for it; None for this tree's."""
    for source in args.compare:
        if report.label == f" [{Path(source).name}]":
            return str(source)
    return None


async def _kill_ages(args: argparse.Namespace, report: Report, kills: int) -> list[float]:
    """For each kill: a new server (of the same source tree) on a new file, a counter at
    full speed, SIGKILL; the kill time minus the ``ts`` of the newest event on disk."""
    rng = random.Random(7)
    source = _source(args, report)
    ages = []
    with tempfile.TemporaryDirectory(prefix="runcast-kill-") as tmp:
        for kill in range(kills):
            workdir = Path(tmp) / str(kill)
            workdir.mkdir()
            with runcast_server(args, workdir, source) as server:
                assert server.db is not None and server.process is not None
                run_id, killed_at = await _run_and_kill(server, rng)
            ages.append(killed_at - _newest_ts(server.db, run_id))
    return ages


async def _run_and_kill(server: Target, rng: random.Random) -> tuple[str, float]:
    """Start a counter that outlasts the kill, wait until it is durable and at full speed,
    SIGKILL the server; returns the run's id and the time of the kill."""
    assert server.db is not None and server.process is not None
    conn = await Conn.open(server.ws_url)
    db = sqlite3.connect(f"file:{server.db}?mode=ro", uri=True)
    try:
        result = await conn.request({**counter_op(100_000_000), "subscribe": False})
        run_id = result["run"]["run_id"]
        began = time.time()
        while not db.execute("SELECT 1 FROM events WHERE run_id = ?", (run_id,)).fetchone():
            if time.time() - began > 60:
                raise BenchError("persist: no event of the run on disk after 60 s")
            await asyncio.sleep(POLL_S)
        await asyncio.sleep(FULL_SPEED_S + rng.uniform(0, 2 * FLUSH_INTERVAL_S))
        children = _servers.children(server.process.pid)
        killed_at = time.time()
        server.process.kill()
        await asyncio.to_thread(server.process.wait, 10)
        # A writer process finishes the transaction it has, and ends with its stdin.
        began = time.time()
        while any(_alive(pid) for pid in children):
            if time.time() - began > 30:
                raise BenchError(f"persist: the server's children {children} outlived it")
            await asyncio.sleep(POLL_S)
    finally:
        db.close()
        conn.abort()
        await asyncio.wait({conn.reader}, timeout=5)
    return run_id, killed_at


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, ended but not reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] != b"Z"


def _newest_ts(path: Path, run_id: str) -> float:
    """The ``ts`` of the newest event of ``run_id`` in the file (its server is gone)."""
    db = sqlite3.connect(path)
    try:
        row = db.execute(
            "SELECT body FROM events WHERE run_id = ? ORDER BY i DESC LIMIT 1", (run_id,)
        ).fetchone()
    finally:
        db.close()
    if row is None:
        raise BenchError(f"persist: no event of run {run_id} on disk after the kill")
    ts: float = orjson.loads(row[0])["ts"]
    return ts
