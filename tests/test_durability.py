"""Durability and bounded memory (issue 3), end to end on an in-process server.

- eviction: every read of a run that has left memory equals what a live reader got;
- a reader far behind on a long live run pages from SQLite and joins the in-memory tail
  exactly once, raced many times against the appending run and the trimming flusher;
- the snapshot at an old index is folded from the nearest keyframe and equals the fold
  of events 1..n;
- the database locked by another connection mid-run: writes fail and are retried, health
  says ``degraded`` then ``ok``, and no event is lost;
- backpressure: with the database locked, a fast run's unflushed backlog stays bounded;
- a run emitting flat out is flushed as it goes (the flusher is not starved).

Waits are on frames, HTTP answers, the run's own wake-up (``LiveRun.wait_after``) or
the flusher's end of an attempt, each bounded by ``asyncio.timeout``; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.agents import context as agent_context
from app.core import snapshot
from app.core.events import Event, decode
from app.engine.flusher import Flusher
from app.engine.run import LiveRun
from tests.conftest import Server
from tests.transport.helpers import (
    Conn,
    Frame,
    connect,
    fold,
    indexes,
    is_terminal,
    read_sse,
)

pytestmark = pytest.mark.timeout(60)


# -- helpers ----------------------------------------------------------------------------


class EvictionWatch(dict[str, LiveRun]):
    """Stands in for ``RunManager.runs`` (it is that dict, copied): removing a run from
    it (eviction) wakes whoever awaits ``evicted(run_id)``, so a test waits for eviction
    itself instead of polling for it."""

    def __init__(self, runs: dict[str, LiveRun]) -> None:
        super().__init__(runs)
        self._waiters: dict[str, asyncio.Event] = {}

    def _removed(self, run_id: str) -> None:
        waiter = self._waiters.pop(run_id, None)
        if waiter is not None:
            waiter.set()

    def __delitem__(self, run_id: str) -> None:
        super().__delitem__(run_id)
        self._removed(run_id)

    def pop(self, run_id: str, *default: Any) -> Any:  # type: ignore[override]
        had = run_id in self
        value = super().pop(run_id, *default)
        if had:
            self._removed(run_id)
        return value

    async def evicted(self, run_id: str, timeout_s: float = 5.0) -> None:
        """Return once ``run_id`` is out of memory (at once if it is already)."""
        if run_id not in self:
            return
        waiter = self._waiters.setdefault(run_id, asyncio.Event())
        async with asyncio.timeout(timeout_s):
            await waiter.wait()
        assert run_id not in self


def watch_evictions(server: Server) -> EvictionWatch:
    manager = server.runtime.manager
    watch = EvictionWatch(manager.runs)
    manager.runs = watch
    return watch


async def all_events(http: httpx.AsyncClient, run_id: str, limit: int = 10_000) -> list[Frame]:
    """Every event of the run through the paged HTTP endpoint, ``limit`` a page."""
    events: list[Frame] = []
    while True:
        response = await http.get(
            f"/api/runs/{run_id}/events",
            params={"after": events[-1]["i"] if events else 0, "limit": limit},
        )
        assert response.status_code == 200, response.text
        page = response.json()
        events.extend(page["events"])
        if not page["events"] or events[-1]["i"] >= page["last_index"]:
            assert indexes(events) == list(range(1, page["last_index"] + 1))
            return events


async def http_snapshot(http: httpx.AsyncClient, run_id: str, at: int | None = None) -> Frame:
    params = {} if at is None else {"at": at}
    response = await http.get(f"/api/runs/{run_id}/snapshot", params=params)
    assert response.status_code == 200, response.text
    frame: Frame = response.json()
    return frame


async def subscribe_and_read(
    conn: Conn, run_id: str, *, after: int | str, snapshot: bool = False
) -> tuple[Frame, Frame | None, list[Frame]]:
    """Subscribe to an ended run; returns the reply's RunInfo, the snapshot frame (if
    asked for) and the events up to the terminal one; then nothing else may come."""
    run: Frame = (await conn.ok("subscribe", run_id=run_id, after=after, snapshot=snapshot))["run"]
    snap = await conn.next_frame(lambda f: f["type"] == "snapshot") if snapshot else None
    at_end = after == "latest" or after == run["last_index"]
    events = [] if at_end else await conn.events_until_end(run_id)
    await conn.assert_quiet(run_id)
    await conn.ok("unsubscribe", run_id=run_id)
    return run, snap, events


def to_events(events: list[Frame]) -> list[Event]:
    return [Event(e["i"], e["type"], e["data"], e["ts"]) for e in events]


async def next_flush_attempt(flusher: Flusher) -> None:
    """Return when the flusher's current (or next) write attempt has ended, in success
    or failure. White box: ``_flushed`` is the event the flusher sets after every
    attempt; awaiting it is what ``Flusher.commit`` does."""
    await flusher._flushed.wait()


@contextlib.asynccontextmanager
async def locked(db: Path) -> AsyncIterator[None]:
    """Another connection holds the database's write lock (``BEGIN EXCLUSIVE``; in WAL
    mode readers go on, writers get "database is locked" once their busy timeout runs
    out), and rolls back on exit. As root, chmod would not stop writes; a lock does.

    The lock is taken on a worker thread: if the server is mid-transaction, its COMMIT
    needs this event loop to run while the lock waits."""
    conn = sqlite3.connect(db, timeout=10, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(conn.execute, "BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


def stored_events(db: Path, run_id: str) -> list[Frame]:
    """The run's events as the file holds them, read directly (every row, in order)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT i, body FROM events WHERE run_id = ? ORDER BY i", (run_id,)
        ).fetchall()
    events = [Event.from_json(body).to_dict() for _, body in rows]
    assert [i for i, _ in rows] == [e["i"] for e in events]
    return events


async def assert_db_check_clean(db: Path) -> None:
    """``runcast db check --db FILE`` (a subprocess, as an operator runs it) finds nothing."""
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "app", "db", "check", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{db}: ok", result.stdout


@contextlib.asynccontextmanager
async def http_client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=30) as http:
        yield http


# -- eviction ---------------------------------------------------------------------------


async def test_every_read_of_an_evicted_run_equals_what_a_live_reader_got(
    server_factory: Any,
) -> None:
    # A tail of 100 events and a keyframe every 10: the read-back run holds only its tail,
    # so reads from 0 page from disk, and snapshots fold from stored keyframes.
    server = await server_factory(linger_s=0.1, tail_events=100, keyframe_every=10)
    evictions = watch_evictions(server)
    async with (
        asyncio.timeout(30),
        http_client(server) as http,
        connect(server.ws_url) as live,
        connect(server.ws_url) as peer,
        connect(server.ws_url) as peer2,
    ):
        run_id = (await live.start("demo", {"tokens": 1_000, "speed": 2_000}))["run_id"]
        seen = await live.events_until(run_id, lambda e: e["i"] >= 250)
        # While the run is live: a snapshot in the middle (older than the tail), and one
        # at "latest"; each followed by every later event.
        mid = 137
        live_mid = await peer.ok("subscribe", run_id=run_id, after=mid, snapshot=True)
        live_latest = await peer2.ok("subscribe", run_id=run_id, after="latest", snapshot=True)
        assert live_mid["run"]["status"] == live_latest["run"]["status"] == "running"
        at_latest = live_latest["run"]["last_index"]
        snap_mid = await peer.next_frame(lambda f: f["type"] == "snapshot")
        snap_latest = await peer2.next_frame(lambda f: f["type"] == "snapshot")
        rest_mid = await peer.events_until_end(run_id)
        rest_latest = await peer2.events_until_end(run_id)
        events = seen + await live.events_until_end(run_id)
        last = len(events)
        assert indexes(events) == list(range(1, last + 1))
        assert last > 1_000 and is_terminal(events[-1])
        assert rest_mid == events[mid:]
        assert (snap_mid["index"], snap_mid["state"]) == (mid, fold(events[:mid]))
        assert rest_latest == events[at_latest:]
        assert (snap_latest["index"], snap_latest["state"]) == (at_latest, fold(events[:at_latest]))
        final = await http_snapshot(http, run_id)
        assert (final["index"], final["state"]) == (last, fold(events))
        assert final["state"]["status"] == "completed"
        info = (await http.get(f"/api/runs/{run_id}")).json()

        # Each read below starts with the run out of memory (a read loads it back with
        # only its tail, so wait for the next eviction before the next read).
        async def evicted() -> None:
            await evictions.evicted(run_id)

        # WebSocket from 0.
        await evicted()
        reply, _, got = await subscribe_and_read(live, run_id, after=0)
        assert {k: v for k, v in reply.items() if k != "watchers"} == {
            k: v for k, v in info.items() if k != "watchers"
        }
        assert got == events

        # WebSocket from the middle with a snapshot.
        await evicted()
        _, snap, got = await subscribe_and_read(live, run_id, after=mid, snapshot=True)
        assert snap == snap_mid
        assert got == events[mid:]

        # WebSocket from "latest", with a snapshot: the final state and nothing more.
        await evicted()
        reply, snap, got = await subscribe_and_read(live, run_id, after="latest", snapshot=True)
        assert (reply["status"], reply["last_index"]) == ("completed", last)
        assert snap == {"type": "snapshot", **final} and got == []

        # WebSocket from "latest" without a snapshot: the reply only.
        await evicted()
        reply, _, got = await subscribe_and_read(live, run_id, after="latest")
        assert reply["last_index"] == last and got == []

        # SSE with Last-Event-ID.
        await evicted()
        sse = await read_sse(http, run_id, headers={"Last-Event-ID": str(mid)})
        assert [e["data"] for e in sse] == events[mid:]
        assert [(e["id"], e["event"]) for e in sse] == [
            (str(e["i"]), e["type"]) for e in events[mid:]
        ]

        # HTTP pages of 37.
        await evicted()
        assert await all_events(http, run_id, limit=37) == events

        # Snapshots at many indexes (each one from a cold start), and RunInfo.
        for at in (0, 1, 9, 10, 11, mid, at_latest, last - 1, last):
            await evicted()
            frame = await http_snapshot(http, run_id, at)
            assert (frame["index"], frame["state"]) == (at, fold(events[:at])), at
            assert frame["epoch"] == info["epoch"]
        await evicted()
        assert (await http.get(f"/api/runs/{run_id}")).json() == info


# -- the disk-to-memory hand-over, raced --------------------------------------------------


async def test_readers_far_behind_a_live_run_join_its_tail_exactly_once(
    server_factory: Any,
) -> None:
    """Round after round while a long run keeps appending, 20 readers subscribe at
    once: ten 500 to 5,000 events behind (paged from disk), ten right at the edge of the
    in-memory tail (trimmed to 200 events after every flush). Each reads from disk into
    the tail and on past what existed when it subscribed, and must get every event after
    its cursor exactly once, in order. One more reader subscribes from 0 mid-run and
    reads to the end.

    The counter runs as fast as it can: a tiny ``delay_s`` would cost a whole event-loop
    timer tick (about 1 ms) per event, far too slow for a long run."""
    # max_unflushed 1,000: the agent waits for a flush every thousand events, so the tail
    # moves (is trimmed) all the time, and the run paces itself to what the loop can do.
    server = await server_factory(tail_events=200, keyframe_every=5_000, max_unflushed=1_000)
    manager = server.runtime.manager
    rng = random.Random(20_000)
    n = 60_000
    got: list[tuple[int, list[Frame]]] = []
    rounds_live = 0
    async with (
        asyncio.timeout(50),
        http_client(server) as http,
        contextlib.AsyncExitStack() as stack,
    ):
        starter = await stack.enter_async_context(connect(server.ws_url))
        whole_reader = await stack.enter_async_context(connect(server.ws_url))
        readers = [await stack.enter_async_context(connect(server.ws_url)) for _ in range(20)]
        run_id = (await starter.start("counter", {"n": n}, subscribe=False))["run_id"]
        run = manager.runs[run_id]

        async def read(conn: Conn, cursor: int, target: int) -> None:
            reply = await conn.ok("subscribe", run_id=run_id, after=cursor)
            assert reply["run"]["last_index"] >= cursor
            events = await conn.events_until(run_id, lambda e: e["i"] >= target or is_terminal(e))
            await conn.ok("unsubscribe", run_id=run_id)
            # Anything the pump sent before it stopped came before the reply.
            events.extend(e for f in conn.take("events", run_id) for e in f["events"])
            assert indexes(events) == list(range(cursor + 1, cursor + 1 + len(events)))
            got.append((cursor, events))

        async with asyncio.TaskGroup() as group:
            # Wait until the head of the log is on disk only.
            while run.log.first_index < 10_000 and not run.ended:
                await run.wait_after(run.last_index)
            assert not run.ended
            await whole_reader.ok("subscribe", run_id=run_id, after=0)
            whole = group.create_task(whole_reader.events_until_end(run_id))
            while not run.ended and rounds_live < 6:
                rounds_live += 1
                last, edge = run.last_index, run.log.first_index - 1
                cursors = [max(0, last - rng.randint(500, 5_000)) for _ in range(10)]
                cursors += [max(0, edge + rng.randint(-3, 3)) for _ in range(10)]
                async with asyncio.TaskGroup() as round_:
                    for conn, cursor in zip(readers, cursors, strict=True):
                        round_.create_task(read(conn, cursor, last + 1_000))
        events = whole.result()
        assert await all_events(http, run_id) == events
    assert len(events) == n + 2
    assert events[-1]["data"] == {"status": "completed"}
    assert [e["data"] for e in events[1:-1]] == [{"n": k} for k in range(1, n + 1)]
    # Enough rounds ran while the run was appending to race the hand-over many times.
    assert rounds_live >= 3, rounds_live
    for cursor, seen in got:
        assert seen == events[cursor : cursor + len(seen)]
    print(f"{rounds_live} rounds of 20 readers while the run appended")


# -- keyframes --------------------------------------------------------------------------


async def test_snapshot_at_an_old_index_is_the_fold_from_the_nearest_keyframe(
    server_factory: Any,
) -> None:
    keyframe_every = 10
    server = await server_factory(tail_events=100, keyframe_every=keyframe_every)
    store = server.runtime.store
    reads: list[int] = []
    read_events = store.read_events

    async def counting_read_events(run_id: str, after: int, limit: int | None) -> list[Event]:
        events = await read_events(run_id, after, limit)
        reads.append(len(events))
        return events

    store.read_events = counting_read_events  # type: ignore[method-assign]
    rng = random.Random(50)
    async with asyncio.timeout(40), http_client(server) as http, connect(server.ws_url) as conn:
        # demo: thinking, a tool call and its result, usage, then text token by token.
        run_id = (await conn.start("demo", {"tokens": 1_500, "speed": 100_000}))["run_id"]
        # While the run is live, and then once it has ended: the in-memory log holds only
        # a tail, so an old index folds from a stored keyframe and events paged from disk.
        head = await conn.events_until(run_id, lambda e: e["i"] >= 1_000)
        live_snaps = []
        for at in (1, 3, 9, 10, 11, 99, 100, 101, 377, 500, 777):
            live_snaps.append(await http_snapshot(http, run_id, at))
        events = head + await conn.events_until_end(run_id)
        assert await all_events(http, run_id) == events
        typed = to_events(events)
        last = len(events)
        assert last > 1_500

        def expected(at: int) -> Any:
            return snapshot.fold(typed[:at])

        for frame in live_snaps:
            assert frame["state"] == expected(frame["index"]), frame["index"]
        boundaries = {k * keyframe_every + d for k in range(1, 10) for d in (-1, 0, 1)}
        sample = set(rng.sample(range(1, last), 100))
        ats = sorted({0, 1, 2, last - 1, last} | boundaries | sample)
        run = server.runtime.manager.runs[run_id]
        assert run.log.first_index > last - 200  # only the tail is in memory
        for at in ats:
            reads.clear()
            frame = await http_snapshot(http, run_id, at)
            assert (frame["index"], frame["state"]) == (at, expected(at)), at
            # O(keyframe_every), not O(at): at most K events were read from disk.
            assert sum(reads) <= keyframe_every, (at, reads)
        # The same through subscribe with a snapshot, at a few old cursors.
        for at in (100, 567, 1_234):
            await conn.ok("subscribe", run_id=run_id, after=at, snapshot=True)
            frame = await conn.next_frame(lambda f: f["type"] == "snapshot")
            assert (frame["index"], frame["state"]) == (at, expected(at))
            assert await conn.events_until_end(run_id) == events[at:]
            await conn.ok("unsubscribe", run_id=run_id)
    # Keyframes are on disk, one every K events of the run.
    with contextlib.closing(sqlite3.connect(f"file:{server.settings.db}?mode=ro", uri=True)) as db:
        stored = db.execute(
            "SELECT i, state FROM keyframes WHERE run_id = ? ORDER BY i", (run_id,)
        ).fetchall()
    assert [i for i, _ in stored] == list(range(keyframe_every, last, keyframe_every))
    for i, state in stored[::10]:
        assert decode(state) == snapshot.fold(typed[:i]), i


# -- a failing store --------------------------------------------------------------------


async def test_locked_database_mid_run_degrades_then_recovers_losing_nothing(
    server_factory: Any,
) -> None:
    server = await server_factory(flush_interval_s=0.05)
    flusher = server.runtime.manager.flusher
    db = server.settings.db
    # The store's connection waits SQLite's busy timeout (sqlite3.connect's default, 5 s)
    # for the lock before a write fails: a lock held past that is a failing store.
    n = 2_000
    async with asyncio.timeout(40), http_client(server) as http:
        async with connect(server.ws_url) as conn:
            run_id = (await conn.start("counter", {"n": n, "delay_s": 0.001}))["run_id"]
            events = await conn.events_until(run_id, lambda e: e["i"] >= 300)
            assert (await http.get("/api/health")).json()["store"] == "ok"
            async with locked(db):
                # Wait for a write to fail (white box: the end of each flush attempt).
                while (answer := await http.get("/api/health")).json()["store"] == "ok":
                    await next_flush_attempt(flusher)
                health = answer.json()
                # Degraded, said without the database's own words (no error text, no path).
                assert answer.status_code == 503, health
                assert health["ok"] is False
                assert "locked" not in answer.text and str(db) not in answer.text, health
                # Readers are not held up: every event comes from memory meanwhile, up to
                # the last tick; but not the end, which is published once it is on disk.
                events += await conn.events_until(run_id, lambda e: e["i"] == n + 1)
                await conn.assert_quiet(run_id)
                info = (await http.get(f"/api/runs/{run_id}")).json()
                assert (info["status"], info["last_index"]) == ("running", n + 1)
                on_disk = stored_events(db, run_id)
                assert on_disk == events[: len(on_disk)]
                assert len(on_disk) < n + 1
            events += await conn.events_until_end(run_id)
            while (health := (await http.get("/api/health")).json())["store"] != "ok":
                await next_flush_attempt(flusher)
            assert "store_error" not in health
        assert indexes(events) == list(range(1, n + 3))
        assert events[-1]["data"] == {"status": "completed"}
        assert await all_events(http, run_id) == events
    await server_factory.stop(server)
    assert stored_events(db, run_id) == events
    await assert_db_check_clean(db)


async def test_backpressure_bounds_the_backlog_while_the_database_is_locked(
    server_factory: Any,
) -> None:
    max_unflushed = 1_000
    server = await server_factory(max_unflushed=max_unflushed, flush_interval_s=0.05)
    manager = server.runtime.manager
    db = server.settings.db
    # A short busy timeout on the server's own connection, so that the locked writes fail
    # (and are retried, with backoff) several times in a short test.
    await server.runtime.store.db.execute("PRAGMA busy_timeout = 100")
    # A counter emits a hundred thousand events a second or more: unthrottled, it would be
    # done well inside the lock. RunContext checks the backlog every _YIELD_EVERY events,
    # and the `running` status event comes on top.
    n = 30_000
    slack = agent_context._YIELD_EVERY + 1
    async with asyncio.timeout(40), http_client(server) as http:
        async with connect(server.ws_url) as conn:
            run_id = (await conn.start("counter", {"n": n, "start_delay_s": 0.3}))["run_id"]
            run = manager.runs[run_id]
            async with locked(db):
                on_disk = len(stored_events(db, run_id))
                assert run.last_index <= 1  # the agent has not begun: the lock came first
                highest = failures = 0
                while failures < 4:
                    await next_flush_attempt(manager.flusher)
                    highest = max(highest, run.backlog)
                    assert run.backlog <= max_unflushed + slack, run.backlog
                    if manager.flusher.last_error is not None:
                        failures += 1
                assert (await http.get("/api/health")).json()["store"] == "degraded"
                # Memory did not grow past the bound: the agent waits (still `running`).
                assert highest > max_unflushed
                assert run.last_index <= on_disk + max_unflushed + slack
                assert len(stored_events(db, run_id)) == on_disk
                assert run.status.value == "running" and not run.ended
            events = await conn.events_until_end(run_id)
        assert indexes(events) == list(range(1, n + 3))
        assert events[-1]["data"] == {"status": "completed"}
        assert (await http.get("/api/health")).json()["store"] == "ok"
    await server_factory.stop(server)
    assert stored_events(db, run_id) == events
    await assert_db_check_clean(db)
    print(f"highest backlog while locked: {highest} (bound {max_unflushed} + {slack})")


async def test_a_run_emitting_flat_out_is_flushed_as_it_goes(server_factory: Any) -> None:
    """An agent emitting as fast as it can, watched by a client, does not starve the
    flusher: its events reach the disk flush after flush while it runs, so that the
    oldest event not on disk (what a crash would lose) stays about a flush interval old,
    not seconds old until backpressure stops the agent at ``max_unflushed``."""
    interval_s = 0.2
    server = await server_factory(flush_interval_s=interval_s)
    n = 120_000
    flushes: set[int] = set()  # flushed_index values seen while the agent appended
    oldest_s = 0.0  # the age of the oldest event not on disk, at its worst
    async with asyncio.timeout(30), connect(server.ws_url) as conn:
        run_id = (await conn.start("counter", {"n": n}))["run_id"]
        run = server.runtime.manager.runs[run_id]

        async def sample() -> None:
            # On the run's own wake-up: once per burst of appends.
            nonlocal oldest_s
            while run.last_index < n + 1 and not run.ended:
                await run.wait_after(run.last_index)
                flushes.add(run.flushed_index)
                if run.backlog:
                    oldest_s = max(oldest_s, time.time() - run.log[run.flushed_index + 1].ts)

        async with asyncio.TaskGroup() as group:
            group.create_task(sample())
            events = await conn.events_until_end(run_id)
    assert indexes(events) == list(range(1, n + 3))
    print(
        f"{len(flushes - {0})} flushes while appending {n} events;"
        f" the oldest event not on disk was at most {oldest_s:.2f} s old"
    )
    assert len(flushes - {0}) >= 4, sorted(flushes)
    # A bound in time holds only when nothing traces the process: under coverage every
    # line costs many times its speed (measured: 3-4 s here, 0.7 s without).
    if sys.gettrace() is None:
        assert oldest_s < 6 * interval_s, oldest_s
