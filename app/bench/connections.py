"""The ``connections`` scenario of ``runcast bench``."""

from __future__ import annotations

import argparse
import asyncio
import time

from app.bench._client import BenchError, Conn, close_conns, counter_op, wait_all
from app.bench._servers import Target, raise_nofile, rss_bytes
from app.bench.report import Report


async def scenario_connections(args: argparse.Namespace, target: Target, report: Report) -> None:
    count = args.connections
    have = raise_nofile(count + 512)
    if have < count + 64:
        raise BenchError(f"open-file limit {have} is too low for {count} connections")
    starter = await Conn.open(target.ws_url)
    result = await starter.request({**counter_op(1, start_delay_s=3600), "subscribe": False})
    run_id = result["run"]["run_id"]
    pid = target.pid
    await asyncio.sleep(0.2)
    rss0 = rss_bytes(pid) if pid else 0
    began = time.perf_counter()
    conns: list[Conn] = []
    try:
        limit = asyncio.Semaphore(64)

        async def one() -> None:
            async with limit:
                conn = await Conn.open(target.ws_url)
                conns.append(conn)
                conn.watch(run_id)
                await conn.request(
                    {"op": "subscribe", "run_id": run_id, "presence": args.presence}, 120
                )

        await asyncio.gather(*(one() for _ in range(count)))
        setup_s = time.perf_counter() - began
        await asyncio.sleep(1.0)
        rss1 = rss_bytes(pid) if pid else 0
        info = await starter.request({"op": "subscribe", "run_id": run_id, "presence": False})
        if info["run"]["watchers"] != count + 1:
            raise BenchError(f"server counts {info['run']['watchers']} watchers, not {count + 1}")
        await starter.request({"op": "stop", "run_id": run_id})
        watches = [c.watches[run_id.encode()] for c in conns]
        for watch in watches:
            watch.expect(2)  # running, then stopped: every idle watcher gets the end
        await wait_all(watches, 120)
        report.add(
            "connections",
            f"{count:,} idle subscribers",
            held=count,
            kb_per_conn=(rss1 - rss0) / count / 1024 if pid else float("nan"),
            server_rss_mb=rss1 / 2**20 if pid else float("nan"),
            setup_s=setup_s,
        )
    finally:
        await close_conns(conns)
        await starter.close()
