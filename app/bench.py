"""``runcast bench``: drive a runcast server from a separate process and measure it.

The bench starts ``python -m app serve`` as a child process (or targets ``--url``) and
drives it with its own WebSocket clients from this process, so the server's CPU time
(read from ``/proc/PID/stat``) belongs to the server alone. Every watcher checks as it
measures that it receives every index exactly once and in order; a gap, a duplicate or
a reordering raises :class:`BenchError` and the bench fails.

Scenarios (each sized by flags; the defaults finish in under a minute each):

- ``fanout``: one ``counter`` run of N events watched by K connections; with
  ``--reference`` the same clients also read the same frames from a bare ``websockets``
  broadcaster (no runcast code, a separate process), and the ratio is printed;
- ``latency``: R runs emitting every P ms, W watchers each: emit-to-receive percentiles;
- ``start``: start request to first event;
- ``resume``: time to first event when resuming at ``last - 10`` of runs of 1,000 and
  1,000,000 events, from memory and from disk, and exactness over drop/resume cycles;
- ``connections``: C idle subscribed connections, server memory per connection;
- ``persist``: a long run with the flusher: sustained events/s, commits, emit-to-durable.

The client is kept cheap: an ``events`` frame is matched on its prefix, its indexes are
taken with one regular expression and compared, as bytes, to the expected run of
indexes; only the latency scenario parses the events (for their ``ts``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app import chaos

SCENARIOS = ("fanout", "latency", "start", "resume", "connections", "persist")

_EVENTS_HEAD = b'{"type":"events","run_id":"'
_RUN_ID_AT = len(_EVENTS_HEAD)
_INDEX = re.compile(rb'\{"i":(\d+),')
_DIGITS: list[bytes] = [b"0"]


class BenchError(Exception):
    """A scenario saw something wrong (a gap, a duplicate, an error reply) or timed out."""


class ExactlyOnceError(BenchError):
    """A watcher received an index twice, out of order, or missed one."""


FAILURES: list[ExactlyOnceError] = []  # every exactness error seen; any one fails the bench


def _digits(start: int, stop: int) -> list[bytes]:
    """The decimal encodings of ``start .. stop - 1`` (the indexes a frame must carry)."""
    if stop > len(_DIGITS):
        _DIGITS.extend(b"%d" % i for i in range(len(_DIGITS), stop + 1024))
    return _DIGITS[start:stop]


# -- the server process ----------------------------------------------------------------


def _raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid``."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for pid {pid}")


@dataclass
class Target:
    """A server the bench drives: its URL, and its pid and database when known."""

    ws_url: str
    pid: int | None = None
    db: Path | None = None
    linger_s: float | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def cpu(self) -> float | None:
        return None if self.pid is None else cpu_s(self.pid)


def _spawn(
    argv: list[str], env: dict[str, str], nofile: int, cwd: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``argv``, wait for its first stdout line (which names its port)."""
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        env=env,
        cwd=cwd,
        preexec_fn=lambda: _raise_nofile(nofile),
    )
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line:
        process.wait(10)
        raise BenchError(f"{argv[2:]} exited with {process.returncode} before listening")
    return process, line


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@contextlib.contextmanager
def runcast_server(
    args: argparse.Namespace, workdir: Path, source: str | None = None
) -> Iterator[Target]:
    """The server under test: ``--url``, or ``python -m app serve`` in a child process
    (from the source tree ``source`` when given: ``--compare``)."""
    if args.url:
        yield Target(args.url, db=Path(args.db) if args.db else None, linger_s=args.linger)
        return
    db = workdir / "bench.db"
    db.unlink(missing_ok=True)
    env = dict(os.environ)
    env["RUNCAST_LINGER_S"] = str(args.linger)
    env["RUNCAST_LOG_LEVEL"] = "warning"
    if source is not None:
        env["PYTHONPATH"] = str(Path(source).resolve())
    argv = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", "0"]
    process, line = _spawn([*argv, "--db", str(db)], env, args.nofile, source)
    try:
        match = re.search(r"http://([^\s]+)", line)
        if match is None:
            raise BenchError(f"unexpected first line from the server: {line!r}")
        yield Target(f"ws://{match.group(1)}/ws", process.pid, db, args.linger, process)
    finally:
        _stop(process)


@contextlib.contextmanager
def reference_server(nofile: int) -> Iterator[Target]:
    """The bare ``websockets`` broadcaster of this module, in a child process."""
    argv = [sys.executable, "-m", "app.bench", "reference-server"]
    process, line = _spawn(argv, dict(os.environ), nofile)
    try:
        yield Target(f"ws://127.0.0.1:{int(line)}/", process.pid, process=process)
    finally:
        _stop(process)


# -- the client --------------------------------------------------------------------------


class Watch:
    """One watcher of one run: a cursor, checked against every frame it receives."""

    __slots__ = (
        "cursor",
        "done",
        "error",
        "events",
        "first_at",
        "first_frame",
        "frames",
        "last",
        "last_at",
        "last_wall",
        "latencies",
        "sizes",
        "start_ts",
        "timed_from",
    )

    def __init__(self, cursor: int = 0, last: int | None = None) -> None:
        self.cursor = cursor
        self.last = last
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: BaseException | None = None
        self.events = 0
        self.frames = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.sizes: list[int] = []
        self.latencies: list[float] | None = None
        self.first_frame: asyncio.Future[None] | None = None
        # Throughput is timed from the server's ts of event ``timed_from`` + 1 (the first
        # tick: a run's "running" status comes before its start delay) to the wall clock
        # at the last frame.
        self.timed_from: int | None = None
        self.start_ts = 0.0
        self.last_wall = 0.0

    def feed(self, frame: bytes) -> None:
        now = time.perf_counter()
        found = _INDEX.findall(frame)
        count = len(found)
        cursor = self.cursor
        if found != _digits(cursor + 1, cursor + 1 + count):
            got = [int(i) for i in found[:5]]
            raise ExactlyOnceError(f"after index {cursor} expected {cursor + 1}.. but got {got}..")
        if not self.frames:
            self.first_at = now
            if self.first_frame is not None and not self.first_frame.done():
                self.first_frame.set_result(None)
        self.last_at = now
        self.frames += 1
        self.events += count
        self.sizes.append(count)
        self.cursor = cursor = cursor + count
        timed_from = self.timed_from
        if timed_from is not None:
            self.last_wall = time.time()
            if not self.start_ts and cursor > timed_from:
                for event in orjson.loads(frame)["events"]:
                    if event["i"] == timed_from + 1:
                        self.start_ts = event["ts"]
        if self.latencies is not None:
            wall = time.time()
            for event in orjson.loads(frame)["events"]:
                if event["type"] == "tick":
                    self.latencies.append(wall - event["ts"])
        if self.last is not None and cursor >= self.last:
            if cursor > self.last:
                raise ExactlyOnceError(f"index {cursor} past the last index {self.last}")
            self.finish()

    def expect(self, last: int) -> None:
        self.last = last
        if self.cursor >= last:
            self.finish()

    def finish(self, error: BaseException | None = None) -> None:
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.error = error
                self.done.set_exception(error)
                self.done.exception()  # awaited or not: FAILURES keeps exactness errors
                if isinstance(error, ExactlyOnceError):
                    FAILURES.append(error)


class Conn:
    """A WebSocket client connection: requests with replies, and watches by run."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.watches: dict[bytes, Watch] = {}
        self.replies: dict[int, asyncio.Future[Any]] = {}
        self.frames: list[Any] = []  # other frames (presence, snapshot), kept when asked
        self.keep_frames = False
        self._ref = 0
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str) -> Conn:
        ws = await connect(url, max_size=None, open_timeout=120, ping_interval=None)
        return cls(ws)

    def watch(self, run_id: str, cursor: int = 0) -> Watch:
        watch = self.watches[run_id.encode()] = Watch(cursor)
        return watch

    async def request(self, op: dict[str, Any], timeout_s: float = 60.0) -> Any:
        """Send ``op``, return its reply's result. Raises BenchError on an error reply."""
        self._ref += 1
        ref = self._ref
        future = self.replies[ref] = asyncio.get_running_loop().create_future()
        await self.ws.send(orjson.dumps({**op, "ref": ref}), text=True)
        async with asyncio.timeout(timeout_s):
            reply = await future
        if not reply["ok"]:
            raise BenchError(f"{op['op']} failed: {reply['error']}")
        return reply["result"]

    async def _read(self) -> None:
        ws = self.ws
        watches = self.watches
        try:
            while True:
                frame = await ws.recv(decode=False)
                assert isinstance(frame, bytes)
                if frame.startswith(_EVENTS_HEAD):
                    run_id = frame[_RUN_ID_AT : frame.index(b'"', _RUN_ID_AT)]
                    watch = watches.get(run_id)
                    if watch is None:  # the frame came before the reply was handled
                        watch = watches[run_id] = Watch()
                    try:
                        watch.feed(frame)
                    except BenchError as exc:
                        watch.finish(exc)
                        return  # the scenario fails on this watcher's error
                    continue
                obj = orjson.loads(frame)
                if obj.get("type") == "reply":
                    future = self.replies.pop(obj["ref"], None)
                    if future is not None and not future.done():
                        future.set_result(obj)
                elif self.keep_frames:
                    self.frames.append(obj)
        except ConnectionClosed:
            pass
        finally:
            gone = BenchError("connection closed")
            for watch in watches.values():
                watch.finish(gone)
            for future in self.replies.values():
                if not future.done():
                    future.set_exception(gone)

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.wait({self.reader})

    def abort(self) -> None:
        """Drop the connection without a closing handshake (a lost network)."""
        self.ws.transport.abort()


async def open_conns(url: str, count: int, parallel: int = 64) -> list[Conn]:
    limit = asyncio.Semaphore(parallel)

    async def one() -> Conn:
        async with limit:
            return await Conn.open(url)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def close_conns(conns: list[Conn]) -> None:
    limit = asyncio.Semaphore(256)

    async def one(conn: Conn) -> None:
        async with limit:
            await conn.close()

    await asyncio.gather(*(one(c) for c in conns), return_exceptions=True)


async def wait_all(watches: list[Watch], timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            for watch in watches:
                await watch.done
    except TimeoutError:
        stuck = [w.cursor for w in watches if not w.done.done()][:5]
        raise BenchError(f"timed out; watchers stuck at cursors {stuck}") from None


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- results -----------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    case: str
    figures: dict[str, float | int | str]


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    label: str = ""

    def add(self, scenario: str, case: str, **figures: float | int | str) -> None:
        case += self.label
        row = Row(scenario, case, figures)
        self.rows.append(row)
        print(f"  {scenario:<11} {case:<28} {_figures(figures)}", flush=True)

    def table(self) -> str:
        lines = ["| scenario | case | figures |", "|---|---|---|"]
        lines += [f"| {r.scenario} | {r.case} | {_figures(r.figures)} |" for r in self.rows]
        return "\n".join(lines)


def _figures(figures: dict[str, float | int | str]) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in figures.items())


def _fmt(value: float | int | str) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) else value


# -- scenarios ---------------------------------------------------------------------------


def _counter(n: int, *, delay_s: float = 0.0, start_delay_s: float = 0.0) -> dict[str, Any]:
    return {
        "op": "start",
        "agent": "counter",
        "input": {"n": n, "delay_s": delay_s, "start_delay_s": start_delay_s},
    }


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


async def fanout_runcast(target: Target, n: int, k: int) -> FanoutResult:
    conns = await open_conns(target.ws_url, k)
    try:
        start_delay_s = 0.3 + k * 0.004
        result = await conns[0].request(_counter(n, start_delay_s=start_delay_s))
        run_id = result["run"]["run_id"]
        begun = time.perf_counter()
        watches = [conns[0].watches.get(run_id.encode()) or conns[0].watch(run_id)]
        for conn in conns[1:]:
            watches.append(conn.watch(run_id))
        await asyncio.gather(
            *(c.request({"op": "subscribe", "run_id": run_id, "after": 0}) for c in conns[1:])
        )
        if time.perf_counter() - begun > start_delay_s:
            print(f"  (warning: {k} subscriptions took longer than the start delay)")
        for watch in watches:
            watch.timed_from = 1
            watch.expect(n + 2)

        async def go() -> None:
            pass

        return await _measure_fanout(target, conns, watches, n + 2, go)
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
    """mine / reference; NaN when the reference measured zero (CPU time is counted in
    10 ms ticks, so a tiny run can show none)."""
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
                    _counter(n, delay_s=period_ms / 1000, start_delay_s=start_delay_s)
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


async def scenario_start(args: argparse.Namespace, target: Target, report: Report) -> None:
    conn = await Conn.open(target.ws_url)
    try:
        times_ms = []
        for _ in range(args.starts):
            began = time.perf_counter()
            result = await conn.request(_counter(1))
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


async def _run_to_end(conn: Conn, n: int, timeout_s: float = 600) -> str:
    """Start a counter of ``n`` events and follow it (checked) to its end."""
    result = await conn.request(_counter(n))
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


async def _resume_cycles(args: argparse.Namespace, target: Target) -> tuple[int, int]:
    """Drop and resume a watcher of a live run at random moments; returns (cycles, events)."""
    n = args.resume_live_events
    rng = random.Random(args.seed)
    starter = await Conn.open(target.ws_url)
    try:
        result = await starter.request({**_counter(n, delay_s=0.0005), "subscribe": False})
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
            if target.linger_s is not None:
                for _ in range(args.resume_disk_samples):
                    await asyncio.sleep(target.linger_s + 0.5)  # evicted by then
                    disk.append(await _time_resume(conn, run_id, after, last))
            report.add(
                "resume",
                f"run of {n:,} events, after=last-10",
                memory_p50_ms=pct([x * 1000 for x in memory], 50),
                memory_max_ms=max(memory) * 1000,
                disk_p50_ms=pct([x * 1000 for x in disk], 50),
                disk_max_ms=max(disk) * 1000 if disk else float("nan"),
            )
        cycles, events = await _resume_cycles(args, target)
        report.add(
            "resume", "drop/resume cycles, live run", cycles=cycles, events=events, exact="100%"
        )
    finally:
        await conn.close()


async def scenario_connections(args: argparse.Namespace, target: Target, report: Report) -> None:
    count = args.connections
    have = _raise_nofile(count + 512)
    if have < count + 64:
        raise BenchError(f"open-file limit {have} is too low for {count} connections")
    starter = await Conn.open(target.ws_url)
    result = await starter.request({**_counter(1, start_delay_s=3600), "subscribe": False})
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


async def scenario_persist(args: argparse.Namespace, target: Target, report: Report) -> None:
    if target.db is None:
        print("  persist: skipped (no --db for the --url server)")
        return
    n = args.persist_events
    conn = await Conn.open(target.ws_url)
    db = sqlite3.connect(f"file:{target.db}?mode=ro", uri=True, check_same_thread=False)
    try:
        version = db.execute("PRAGMA data_version").fetchone()[0]
        result = await conn.request({**_counter(n), "subscribe": False})
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


_RUNNERS = {
    "fanout": scenario_fanout,
    "latency": scenario_latency,
    "start": scenario_start,
    "resume": scenario_resume,
    "connections": scenario_connections,
    "persist": scenario_persist,
}


# -- command line ------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _latency_cases(text: str) -> list[tuple[int, int, float]]:
    """``RxW@Pms`` items, comma-separated: R runs, W watchers each, one event per P ms."""
    cases = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)@([\d.]+)(?:ms)?", item.strip())
        if match is None:
            raise argparse.ArgumentTypeError(f"not RxW@Pms: {item!r}")
        cases.append((int(match[1]), int(match[2]), float(match[3])))
    return cases


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``runcast bench`` (called by app.cli)."""
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: all); or chaos, alone (app/chaos.py)",
    )
    parser.add_argument(
        "--url", help="drive this server (ws://host:port/ws) instead of one of ours"
    )
    parser.add_argument("--db", help="with --url: its SQLite file (for persist)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="fanout: also measure a bare websockets broadcaster",
    )
    parser.add_argument("--events", type=int, default=20_000, help="fanout: events per run")
    parser.add_argument(
        "--watchers",
        type=_ints,
        default=[1, 10, 50, 100],
        help="fanout: watcher counts, comma-separated",
    )
    parser.add_argument(
        "--latency-cases",
        type=_latency_cases,
        default=_latency_cases("1x10@10,100x5@50"),
        help="latency: RUNSxWATCHERS@PERIODms, comma-separated",
    )
    parser.add_argument("--latency-s", type=float, default=3.0, help="latency: seconds per case")
    parser.add_argument("--starts", type=int, default=200, help="start: runs started")
    parser.add_argument(
        "--resume-sizes",
        type=_ints,
        default=[1000, 1_000_000],
        help="resume: run sizes, comma-separated",
    )
    parser.add_argument(
        "--resume-disk-samples",
        type=int,
        default=3,
        help="resume: resumes after eviction (each waits for the linger)",
    )
    parser.add_argument(
        "--resume-live-events",
        type=int,
        default=3000,
        help="resume: events of the live run the drop/resume cycles follow",
    )
    parser.add_argument("--seed", type=int, default=6, help="resume: random seed")
    parser.add_argument(
        "--connections", type=int, default=10_000, help="connections: idle subscribed connections"
    )
    parser.add_argument(
        "--presence",
        action="store_true",
        help="connections: subscribe with presence (default: without)",
    )
    parser.add_argument(
        "--persist-events", type=int, default=2_000_000, help="persist: events of the long run"
    )
    parser.add_argument(
        "--linger",
        type=float,
        default=1.0,
        help="seconds an ended run stays in memory (our server; resume from disk)",
    )
    parser.add_argument("--nofile", type=int, default=20_000, help="open-file limit to ask for")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="DIR",
        help="also run each scenario against a server from the source tree DIR",
    )
    chaos.add_arguments(parser)


async def run_bench(args: argparse.Namespace) -> Report:
    report = Report()
    scenarios = args.scenarios or list(SCENARIOS)
    _raise_nofile(args.nofile)
    sources: list[str | None] = [None, *args.compare]
    with tempfile.TemporaryDirectory(prefix="runcast-bench-") as tmp:
        for name in scenarios:
            for source in sources:
                # One server per scenario (per source): scenarios do not see each other's runs.
                with runcast_server(args, Path(tmp), source) as target:
                    report.label = "" if source is None else f" [{Path(source).name}]"
                    await _RUNNERS[name](args, target, report)
                if FAILURES:
                    raise FAILURES[0]
    return report


def main(args: argparse.Namespace) -> int:
    """Run the scenarios; print the table; 1 when a check failed."""
    began = time.strftime("%Y-%m-%d %H:%M")
    if args.scenarios == ["chaos"]:
        return chaos.main(args)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        print(
            f"runcast bench: unknown scenario {unknown[0]!r}; expected any of "
            f"{', '.join(SCENARIOS)}",
            file=sys.stderr,
        )
        return 2
    try:
        report = asyncio.run(run_bench(args))
    except BenchError as exc:
        print(f"runcast bench: FAILED: {exc}", file=sys.stderr)
        return 1
    print()
    print(f"runcast bench, {began}, {' '.join(sys.argv[1:])}")
    print(report.table())
    if args.json:
        rows = [{"scenario": r.scenario, "case": r.case, **r.figures} for r in report.rows]
        Path(args.json).write_text(json.dumps({"date": began, "rows": rows}, indent=2) + "\n")
    return 0


# -- the reference server ----------------------------------------------------------------


async def _reference_serve() -> None:
    """A bare broadcaster on the ``websockets`` library: each client sends a hello
    ``{"n", "k", "batch"}``; once ``k`` clients have, every one of them is sent the same
    pre-encoded ``events`` frames of ``batch`` events each, ``n`` events in all."""
    from websockets.asyncio.server import ServerConnection, serve

    waiting: list[asyncio.Future[list[bytes]]] = []
    loop = asyncio.get_running_loop()

    def frames(n: int, batch: int) -> list[bytes]:
        events = [
            orjson.dumps({"i": i, "type": "tick", "data": {"n": i}, "ts": round(time.time(), 6)})
            for i in range(1, n + 1)
        ]
        head = b'{"type":"events","run_id":"ref","epoch":"ref","events":['
        return [
            head + b",".join(events[start : start + batch]) + b"]}" for start in range(0, n, batch)
        ]

    async def handler(ws: ServerConnection) -> None:
        hello = orjson.loads(await ws.recv(decode=False))
        future: asyncio.Future[list[bytes]] = loop.create_future()
        waiting.append(future)
        if len(waiting) == hello["k"]:
            built = frames(hello["n"], hello["batch"])
            for each in waiting:
                each.set_result(built)
            waiting.clear()
        for frame in await future:
            await ws.send(frame, text=True)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    if sys.argv[1:] == ["reference-server"]:
        asyncio.run(_reference_serve())
