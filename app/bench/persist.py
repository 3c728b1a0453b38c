"""The ``persist`` scenario of ``runcast bench``."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import time

import orjson

from app.bench._client import BenchError, Conn, counter_op, pct
from app.bench._servers import Target
from app.bench.report import Report


async def scenario_persist(args: argparse.Namespace, target: Target, report: Report) -> None:
    if target.db is None:
        print("  persist: skipped (no --db for the --url server)")
        return
    n = args.persist_events
    conn = await Conn.open(target.ws_url)
    db = sqlite3.connect(f"file:{target.db}?mode=ro", uri=True, check_same_thread=False)
    try:
        version = db.execute("PRAGMA data_version").fetchone()[0]
        result = await conn.request({**counter_op(n), "subscribe": False})
        run_id = result["run"]["run_id"]
        began = time.time()
        commits = 0
        polls: list[tuple[float, int]] = []
        last = n + 2
        durable = 0
        while durable < last:
            await asyncio.sleep(0.005)
            now_version = db.execute("PRAGMA data_version").fetchone()[0]
            if now_version == version:
                continue
            version = now_version
            commits += 1
            row = db.execute("SELECT max(i) FROM events WHERE run_id = ?", (run_id,)).fetchone()
            durable = row[0] or 0
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
            if index > previous:
                body = db.execute(
                    "SELECT body FROM events WHERE run_id = ? AND i = ?", (run_id, previous + 1)
                ).fetchone()[0]
                lags.append(seen_at - orjson.loads(body)["ts"])
                previous = index
        report.add(
            "persist",
            f"counter of {n:,} events, SQLite",
            events_per_s=n / max(end_ts - first_ts, 1e-9),
            commits=commits,
            commits_per_s=commits / max(polls[-1][0] - began, 1e-9),
            lag_p50_ms=pct([x * 1000 for x in lags], 50),
            lag_max_ms=max(lags) * 1000,
            durable_after_end_ms=(polls[-1][0] - end_ts) * 1000,
        )
    finally:
        db.close()
        await conn.close()
