"""The ``latency`` scenario of ``runcast bench``."""

from __future__ import annotations

import argparse
import asyncio

from app.bench._client import Watch, close_conns, counter_op, open_conns, pct, wait_all
from app.bench._servers import Target
from app.bench.report import Report


async def scenario_latency(args: argparse.Namespace, target: Target, report: Report) -> None:
    for runs, watchers, period_ms in args.latency_cases:
        n = max(1, round(args.latency_s * 1000 / period_ms))
        conns = await open_conns(target.ws_url, runs * watchers)
        try:
            start_delay_s = 0.5 + runs * watchers * 0.004
            watches: list[Watch] = []
            run_ids = []
            for r in range(runs):
                result = await conns[r * watchers].request(
                    counter_op(n, delay_s=period_ms / 1000, start_delay_s=start_delay_s)
                )
                run_ids.append(result["run"]["run_id"])
            for r, run_id in enumerate(run_ids):
                group = conns[r * watchers : (r + 1) * watchers]
                for c in group:
                    watch = c.watches.get(run_id.encode()) or c.watch(run_id)
                    watch.latencies = []
                    watches.append(watch)
                await asyncio.gather(
                    *(c.request({"op": "subscribe", "run_id": run_id}) for c in group[1:])
                )
            for watch in watches:
                watch.expect(n + 2)
            await wait_all(watches, args.latency_s * 4 + 60)
            lat_ms = [x * 1000 for w in watches for x in w.latencies or ()]
            report.add(
                "latency",
                f"{runs} runs x {watchers} watchers @{period_ms:g}ms",
                p50_ms=pct(lat_ms, 50),
                p99_ms=pct(lat_ms, 99),
                max_ms=max(lat_ms),
                samples=len(lat_ms),
            )
        finally:
            await close_conns(conns)
