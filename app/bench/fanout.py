"""The ``fanout`` scenario of ``runcast bench``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from app.bench._client import BenchError, Conn, Watch, close_conns, counter_op, open_conns, wait_all
from app.bench._servers import Target, reference_server
from app.bench.report import Report


@dataclass
class FanoutResult:
    events_per_s: float
    per_watcher: float
    server_us: float
    client_us: float
    batch: int


async def _measure_fanout(
    target: Target, conns: list[Conn], watches: list[Watch], total: int, go: Callable[[], Any]
) -> FanoutResult:
    cpu0 = target.cpu()
    client0 = time.process_time()
    await go()
    await wait_all(watches, 120)
    cpu1 = target.cpu()
    client1 = time.process_time()
    starts = [w.start_ts for w in watches if w.start_ts]
    if not starts:
        raise BenchError("no watcher saw the first timed event")
    start = min(starts)
    end = max(w.last_wall for w in watches)
    delivered = sum(w.events for w in watches)
    if delivered != total * len(watches):
        raise BenchError(f"delivered {delivered}, expected {total * len(watches)}")
    elapsed = max(end - start, 1e-9)
    sizes = [s for w in watches for s in w.sizes]
    server_us = float("nan") if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / delivered * 1e6
    return FanoutResult(
        events_per_s=delivered / elapsed,
        per_watcher=delivered / elapsed / len(watches),
        server_us=server_us,
        client_us=(client1 - client0) / delivered * 1e6,
        batch=round(statistics.median(sizes)),
    )


async def watch_counter(conns: list[Conn], n: int, start_delay_s: float) -> list[Watch]:
    """Start a counter of ``n`` events on the first connection (which watches it) and
    subscribe every other one from 0 while the run waits ``start_delay_s`` to begin: one
    watch per connection, each timed from the first event and expecting all of them."""
    result = await conns[0].request(counter_op(n, start_delay_s=start_delay_s))
    run_id = result["run"]["run_id"]
    begun = time.perf_counter()
    watches = [conns[0].watches.get(run_id.encode()) or conns[0].watch(run_id)]
    for conn in conns[1:]:
        watches.append(conn.watch(run_id))
    await asyncio.gather(
        *(c.request({"op": "subscribe", "run_id": run_id, "after": 0}) for c in conns[1:])
    )
    if time.perf_counter() - begun > start_delay_s:
        print(f"  (warning: {len(conns)} subscriptions took longer than the start delay)")
    for watch in watches:
        watch.timed_from = 1
        watch.expect(n + 2)
    return watches


async def _started() -> None:
    """The counter starts on its own (after its start delay)."""


async def fanout_runcast(target: Target, n: int, k: int) -> FanoutResult:
    conns = await open_conns(target.ws_url, k)
    try:
        watches = await watch_counter(conns, n, start_delay_s=0.3 + k * 0.004)
        return await _measure_fanout(target, conns, watches, n + 2, _started)
    finally:
        await close_conns(conns)


async def fanout_reference(target: Target, n: int, k: int, batch: int) -> FanoutResult:
    conns = await open_conns(target.ws_url, k)
    try:
        watches = [conn.watch("ref") for conn in conns]
        for watch in watches:
            watch.timed_from = 0
            watch.expect(n)

        async def go() -> None:
            hello = orjson.dumps({"n": n, "k": k, "batch": batch})
            await asyncio.gather(*(c.ws.send(hello, text=True) for c in conns))

        return await _measure_fanout(target, conns, watches, n, go)
    finally:
        await close_conns(conns)


def _ratio(mine: float, reference: float) -> float:
    """mine / reference; NaN when the reference measured zero."""
    return mine / reference if reference else float("nan")


async def scenario_fanout(args: argparse.Namespace, target: Target, report: Report) -> None:
    n = args.events
    with contextlib.ExitStack() as stack:
        ref = stack.enter_context(reference_server(args.nofile)) if args.reference else None
        for k in args.watchers:
            mine = await fanout_runcast(target, n, k)
            figures: dict[str, float | int | str] = {
                "events/s": mine.events_per_s,
                "per watcher/s": mine.per_watcher,
                "server µs/ev": mine.server_us,
                "client µs/ev": mine.client_us,
                "batch": mine.batch,
            }
            if ref is not None:
                bare = await fanout_reference(ref, n, k, mine.batch)
                figures.update(
                    {
                        "ref events/s": bare.events_per_s,
                        "ref server µs/ev": bare.server_us,
                        "ref client µs/ev": bare.client_us,
                        "rate/ref": _ratio(mine.events_per_s, bare.events_per_s),
                        "cpu/ref": _ratio(mine.server_us, bare.server_us),
                    }
                )
            report.add("fanout", f"{k} watchers x {n:,} events", **figures)
