"""The ``resume`` scenario of ``runcast bench``: a subscribe with a cursor near the end of
an ended run, to its first events frame, from memory (``memory_*``: 20 resumes back to
back), from disk (``disk_*``: after the run was evicted, ``--linger`` + 0.5 s idle) and
from memory after a pause (``idle_memory_p50_ms``: the cost of waking
idle processes, which ``disk_*`` pays too); and drop/resume cycles on a live run."""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from app.bench._client import BenchError, Conn, ExactlyOnceError, counter_op, pct, wait_all
from app.bench._servers import Target
from app.bench.report import Report
from app.client import ClientError, http_url_of, request_json

# The pause before a timed resume after the bench asked the server something.
IDLE_S = 0.5


async def _run_to_end(conn: Conn, n: int, timeout_s: float = 600) -> str:
    """Start a counter of ``n`` events and follow it (checked) to its end."""
    result = await conn.request(counter_op(n))
    run_id = str(result["run"]["run_id"])
    watch = conn.watches.get(run_id.encode()) or conn.watch(run_id)
    watch.expect(n + 2)
    await wait_all([watch], timeout_s)
    return run_id


async def _time_resume(conn: Conn, run_id: str, after: int, last: int) -> float:
    """Seconds from a subscribe at ``after`` to the first events frame; checks the rest."""
    watch = conn.watch(run_id, after)
    watch.expect(last)
    began = time.perf_counter()
    await conn.request({"op": "subscribe", "run_id": run_id, "after": after}, timeout_s=120)
    await wait_all([watch], 120)
    return watch.first_at - began


async def _expect_in_memory(target: Target, held: bool) -> None:
    """Check the server's count of runs in memory (/api/health): one run or none.

    Raises:
        BenchError: the run is (or is not) in memory, not as the scenario meant.
    """
    url = f"{http_url_of(target.ws_url)}/api/health"
    try:
        health = await asyncio.to_thread(request_json, url, None, 10)
    except ClientError:
        return  # a --url server that does not answer it: not checked
    if (health.get("runs_in_memory", 0) > 0) != held:
        where = "still in memory" if not held else "not in memory"
        raise BenchError(f"resume: the run is {where} (runs_in_memory {health})")


async def _resume_cycles(args: argparse.Namespace, target: Target) -> tuple[int, int]:
    """Drop and resume a watcher of a live run at random moments; returns (cycles, events)."""
    n = args.resume_live_events
    rng = random.Random(args.seed)
    starter = await Conn.open(target.ws_url)
    try:
        result = await starter.request({**counter_op(n, delay_s=0.0005), "subscribe": False})
        run_id = result["run"]["run_id"]
        cursor = 0
        cycles = 0
        while cursor < n + 2:
            conn = await Conn.open(target.ws_url)
            watch = conn.watch(run_id, cursor)
            await conn.request({"op": "subscribe", "run_id": run_id, "after": cursor})
            # Stay for a random while, then drop without a goodbye.
            await asyncio.sleep(rng.uniform(0, 0.02))
            if rng.random() < 0.5:
                conn.abort()
            else:
                await conn.ws.close()
            await asyncio.wait({conn.reader})
            if isinstance(watch.error, ExactlyOnceError):
                raise watch.error
            if watch.cursor < cursor:
                raise BenchError("cursor went backwards")
            cursor = watch.cursor
            cycles += 1
            if cycles > 100_000:
                raise BenchError(f"no progress after {cycles} cycles at cursor {cursor}")
        return cycles, cursor
    finally:
        await starter.close()


async def scenario_resume(args: argparse.Namespace, target: Target, report: Report) -> None:
    conn = await Conn.open(target.ws_url)
    try:
        for n in args.resume_sizes:
            run_id = await _run_to_end(conn, n)
            last = n + 2
            after = max(0, last - 10)
            memory = [await _time_resume(conn, run_id, after, last) for _ in range(20)]
            disk: list[float] = []
            idle: list[float] = []
            if target.linger_s is not None:
                # Each check of the server's memory is followed by a pause of its own, so
                # that the resume timed after it finds both processes idle again.
                for _ in range(args.resume_disk_samples):
                    await asyncio.sleep(target.linger_s + 0.5)  # evicted by then
                    await _expect_in_memory(target, False)
                    await asyncio.sleep(IDLE_S)
                    disk.append(await _time_resume(conn, run_id, after, last))
                    # The same resume from memory after a pause (the run lingers): what
                    # waking two idle processes costs, apart from reading the disk.
                    await asyncio.sleep(target.linger_s / 4)
                    await _expect_in_memory(target, True)
                    await asyncio.sleep(min(IDLE_S, target.linger_s / 4))
                    idle.append(await _time_resume(conn, run_id, after, last))
            report.add(
                "resume",
                f"run of {n:,} events, after=last-10",
                memory_p50_ms=pct([x * 1000 for x in memory], 50),
                memory_max_ms=max(memory) * 1000,
                disk_p50_ms=pct([x * 1000 for x in disk], 50),
                disk_max_ms=max(disk) * 1000 if disk else float("nan"),
                idle_memory_p50_ms=pct([x * 1000 for x in idle], 50),
            )
        cycles, events = await _resume_cycles(args, target)
        report.add(
            "resume", "drop/resume cycles, live run", cycles=cycles, events=events, exact="100%"
        )
    finally:
        await conn.close()
