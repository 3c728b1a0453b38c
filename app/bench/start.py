"""The ``start`` scenario of ``runcast bench``."""

from __future__ import annotations

import argparse
import asyncio
import time

from app.bench._client import Conn, counter_op, pct, wait_all
from app.bench._servers import Target
from app.bench.report import Report


async def scenario_start(args: argparse.Namespace, target: Target, report: Report) -> None:
    conn = await Conn.open(target.ws_url)
    try:
        times_ms = []
        for _ in range(args.starts):
            began = time.perf_counter()
            result = await conn.request(counter_op(1))
            run_id = result["run"]["run_id"]
            watch = conn.watches.get(run_id.encode()) or conn.watch(run_id)
            if not watch.frames:
                watch.first_frame = asyncio.get_running_loop().create_future()
                async with asyncio.timeout(30):
                    await watch.first_frame
            watch.expect(3)
            times_ms.append((watch.first_at - began) * 1000)
            await wait_all([watch], 30)
            del conn.watches[run_id.encode()]
        report.add(
            "start",
            f"{args.starts} runs, start -> first event",
            p50_ms=pct(times_ms, 50),
            p99_ms=pct(times_ms, 99),
            max_ms=max(times_ms),
        )
    finally:
        await conn.close()
