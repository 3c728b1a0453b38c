"""Crash recovery and clean shutdown of a real ``runcast serve`` process (PROTOCOL.md §4).

Each test runs the server as its own process (the ``spawn`` fixture), talks to it with
real ``websockets`` clients and httpx, then SIGKILLs, SIGTERMs or SIGINTs it and starts a
new process on the same SQLite file. The file is also read directly, read-only, with the
stdlib ``sqlite3`` module, to see what was persisted at the moment of the kill.

Nothing here sleeps to wait: every wait is for a frame on a socket, an HTTP answer or a
process exit, each bounded by ``asyncio.timeout`` or a subprocess timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import Spawned

FLUSH_INTERVAL = "0.05"
TERMINAL = {"completed", "failed", "stopped", "interrupted"}
SLOW_COUNTER = {"n": 100_000, "delay_s": 0.002}


class Client:
    """A WebSocket client that keeps every frame it reads, and each run's events."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.close_code: int | None = None
        self._ref = 0

    async def next_frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await self.ws.recv())
        self.frames.append(frame)
        if frame["type"] == "events":
            self.events.setdefault(frame["run_id"], []).extend(frame["events"])
        return frame

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one op and return its (ok) reply; frames read meanwhile are kept."""
        self._ref += 1
        ref = self._ref
        await self.ws.send(json.dumps({"op": op, "ref": ref, **fields}))
        while True:
            frame = await self.next_frame()
            if frame["type"] == "reply" and frame["ref"] == ref:
                assert frame["ok"], frame
                result: dict[str, Any] = frame["result"]
                return result

    def last_index(self, run_id: str) -> int:
        events = self.events.get(run_id)
        return events[-1]["i"] if events else 0

    def ended(self, run_id: str) -> bool:
        events = self.events.get(run_id)
        return bool(events) and _is_terminal(events[-1])

    async def until_index(self, run_id: str, index: int) -> None:
        while self.last_index(run_id) < index:
            await self.next_frame()

    async def until_ended(self, run_id: str) -> None:
        while not self.ended(run_id):
            await self.next_frame()

    async def until_closed(self) -> int:
        """Read every frame the server sent until it closes; returns the close code."""
        try:
            while True:
                await self.next_frame()
        except websockets.ConnectionClosed as closed:
            # No close frame at all (the process died) is 1006, as on the wire.
            self.close_code = closed.rcvd.code if closed.rcvd is not None else 1006
        return self.close_code


@contextlib.asynccontextmanager
async def connect(server: Spawned) -> AsyncIterator[Client]:
    # max_queue=None: these clients stop reading between frames (to look at the file)
    # while a run streams on; with a bounded queue the client stops reading the socket
    # and its closing handshake stalls (python-websockets/websockets#1555).
    async with websockets.connect(
        server.ws_url, open_timeout=10, close_timeout=2, max_queue=None
    ) as ws:
        client = Client(ws)
        welcome = await client.next_frame()
        assert welcome["type"] == "welcome", welcome
        yield client


def _is_terminal(event: dict[str, Any]) -> bool:
    return event["type"] == "status" and event["data"]["status"] in TERMINAL


def read_db(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Query the server's SQLite file read-only, as any other process could."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        return conn.execute(sql, params).fetchall()


def persisted_index(db: Path, run_id: str) -> int:
    """The run's last index on disk (0 before its first flush)."""
    rows = read_db(db, "SELECT last_index FROM runs WHERE run_id = ?", run_id)
    return rows[0][0] if rows else 0


async def all_events(http: httpx.AsyncClient, run_id: str) -> tuple[list[dict[str, Any]], Any]:
    """Every event of the run through the paged HTTP endpoint, and the last page."""
    events: list[dict[str, Any]] = []
    while True:
        response = await http.get(
            f"/api/runs/{run_id}/events",
            params={"after": events[-1]["i"] if events else 0, "limit": 10_000},
        )
        assert response.status_code == 200, response.text
        page = response.json()
        events.extend(page["events"])
        if not page["events"] or events[-1]["i"] >= page["last_index"]:
            return events, page


async def wait_exit(server: Spawned, timeout_s: float) -> int:
    return await asyncio.to_thread(server.wait, timeout_s)


# -- SIGKILL: crash recovery ------------------------------------------------------------


async def test_sigkill_mid_run_ends_it_interrupted_with_a_new_epoch(
    spawn: Any, tmp_path: Path
) -> None:
    db = tmp_path / "runcast.db"
    # A slower throttle than the other tests', so that the kill lands well between two
    # flushes and the client holds events the disk does not.
    first = spawn("--flush-interval", "0.5", db=db)
    async with asyncio.timeout(15), connect(first) as client:
        # An ended run (must survive untouched), a run that never got past `running`,
        # and the live run that the kill cuts off mid-stream.
        done = (await client.call("start", agent="counter", input={"n": 5}))["run"]
        await client.until_ended(done["run_id"])
        parked = (
            await client.call("start", agent="counter", input={"n": 1, "start_delay_s": 600})
        )["run"]
        live = (await client.call("start", agent="counter", input=SLOW_COUNTER))["run"]
        run_id, old_epoch = live["run_id"], live["epoch"]
        await client.until_index(run_id, 200)
        # Let the flusher catch up, using arriving events as the clock; then take 50 more
        # events (~0.1 s, well inside the 0.5 s throttle) and kill.
        while persisted_index(db, run_id) < 200 or persisted_index(db, parked["run_id"]) < 1:
            await client.next_frame()
        await client.until_index(run_id, persisted_index(db, run_id) + 50)
        first.process.kill()
        await client.until_closed()  # every frame the server sent before it died
    assert await wait_exit(first, 10) == -signal.SIGKILL

    received = client.events[run_id]
    seen = received[-1]["i"]
    assert [e["i"] for e in received] == list(range(1, seen + 1))
    assert {f["epoch"] for f in client.frames if f.get("run_id") == run_id and "epoch" in f} == {
        old_epoch
    }
    # What the crash left on disk: a live run, in its old epoch, events 1..persisted.
    [(status, epoch, persisted)] = read_db(
        db, "SELECT status, epoch, last_index FROM runs WHERE run_id = ?", run_id
    )
    assert (status, epoch) == ("running", old_epoch)
    assert read_db(db, "SELECT count(*), max(i) FROM events WHERE run_id = ?", run_id) == [
        (persisted, persisted)
    ]
    assert persisted >= 200
    assert seen > persisted + 1  # the client's cursor is past the log the disk kept
    print(f"client had seen {seen}, disk had {persisted}: {seen - persisted} events lost")

    second = spawn("--flush-interval", FLUSH_INTERVAL, db=db)
    async with asyncio.timeout(15), httpx.AsyncClient(base_url=second.http_url) as http:
        info = (await http.get(f"/api/runs/{run_id}")).json()
        assert info["status"] == "interrupted"
        assert info["epoch"] != old_epoch
        assert info["last_index"] == persisted + 1
        new_epoch = info["epoch"]

        stored, page = await all_events(http, run_id)
        assert (page["status"], page["epoch"], page["last_index"]) == (
            "interrupted",
            new_epoch,
            persisted + 1,
        )
        assert [e["i"] for e in stored] == list(range(1, persisted + 2))
        crash = stored[-1]
        assert crash["type"] == "status"
        assert crash["data"] == {"status": "interrupted", "reason": "crash"}
        assert sum(1 for e in stored if _is_terminal(e)) == 1
        # Every event the client saw that the disk kept is the same event, byte for byte.
        assert received[:persisted] == stored[:persisted]

        snapshot = (await http.get(f"/api/runs/{run_id}/snapshot")).json()
        assert snapshot["index"] == persisted + 1 and snapshot["epoch"] == new_epoch
        assert snapshot["state"]["status"] == "interrupted"

        # A run that had only its `running` event: interrupted right after it.
        parked_info = (await http.get(f"/api/runs/{parked['run_id']}")).json()
        assert parked_info["status"] == "interrupted"
        assert parked_info["epoch"] != parked["epoch"]
        parked_events, _ = await all_events(http, parked["run_id"])
        assert [(e["i"], e["data"]) for e in parked_events] == [
            (1, {"status": "running"}),
            (2, {"status": "interrupted", "reason": "crash"}),
        ]

        # A run that had ended before the crash is left exactly as it was.
        done_info = (await http.get(f"/api/runs/{done['run_id']}")).json()
        assert done_info["status"] == "completed"
        assert done_info["epoch"] == done["epoch"]
        assert (await all_events(http, done["run_id"]))[0] == client.events[done["run_id"]]

    async with asyncio.timeout(15):
        # The old client comes back with its old epoch and old cursor (past the new last
        # index): reset, snapshot at the last index, and nothing else.
        async with connect(second) as stale:
            # Without its epoch, the old cursor is simply out of range.
            await stale.ws.send(json.dumps({"op": "subscribe", "run_id": run_id, "after": seen}))
            refused = await stale.next_frame()
            assert refused["ok"] is False
            assert refused["error"]["code"] == "cursor_out_of_range"
            assert refused["error"]["last_index"] == persisted + 1

            result = await stale.call("subscribe", run_id=run_id, after=seen, epoch=old_epoch)
            assert result["run"]["epoch"] == new_epoch
            assert result["run"]["status"] == "interrupted"
            reset = await stale.next_frame()
            assert reset == {"type": "reset", "run_id": run_id, "epoch": new_epoch}
            frame = await stale.next_frame()
            assert frame["type"] == "snapshot"
            assert (frame["run_id"], frame["index"], frame["epoch"]) == (
                run_id,
                persisted + 1,
                new_epoch,
            )
            assert frame["state"] == snapshot["state"]
            # unsubscribe is answered only once the subscription's pump has finished, so
            # every frame it would send comes before this reply.
            mark = len(stale.frames)
            await stale.call("unsubscribe", run_id=run_id)
            extra = [f for f in stale.frames[mark:-1] if f["type"] != "presence"]
            assert extra == []
            assert run_id not in stale.events

        # A client in the new epoch from the start gets every event exactly once.
        async with connect(second) as fresh:
            await fresh.call("subscribe", run_id=run_id, after=0, epoch=new_epoch)
            await fresh.until_ended(run_id)
            assert fresh.events[run_id] == stored
            assert not any(f["type"] in ("reset", "snapshot") for f in fresh.frames)
            assert {f["epoch"] for f in fresh.frames if f["type"] == "events"} == {new_epoch}


# -- SIGTERM / SIGINT: clean shutdown ---------------------------------------------------


async def test_sigterm_interrupts_live_runs_delivers_then_closes_1001(
    spawn: Any, tmp_path: Path
) -> None:
    db = tmp_path / "runcast.db"
    server = spawn("--flush-interval", FLUSH_INTERVAL, db=db)
    async with (
        asyncio.timeout(15),
        connect(server) as starter_a,
        connect(server) as starter_b,
        connect(server) as watcher,
    ):
        run_a = (await starter_a.call("start", agent="counter", input=SLOW_COUNTER))["run"]
        run_b = (
            await starter_b.call("start", agent="demo", input={"tokens": 100_000, "speed": 200})
        )["run"]
        runs = {run_a["run_id"]: run_a, run_b["run_id"]: run_b}
        for run_id in runs:
            await watcher.call("subscribe", run_id=run_id, after=0)
        await starter_a.until_index(run_a["run_id"], 20)
        await starter_b.until_index(run_b["run_id"], 3)
        await watcher.until_index(run_b["run_id"], 3)

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(
            starter_a.until_closed(), starter_b.until_closed(), watcher.until_closed()
        )
        assert codes == [1001, 1001, 1001]
        code = await wait_exit(server, 10)
        elapsed_s = time.monotonic() - started
    assert code == 0, server.text
    assert elapsed_s < 10
    print(f"SIGTERM to exit: {elapsed_s:.2f} s")

    terminal: dict[str, dict[str, Any]] = {}
    for client, run_id in [
        (starter_a, run_a["run_id"]),
        (starter_b, run_b["run_id"]),
        (watcher, run_a["run_id"]),
        (watcher, run_b["run_id"]),
    ]:
        events = client.events[run_id]
        assert [e["i"] for e in events] == list(range(1, len(events) + 1))
        last = events[-1]
        assert last["type"] == "status"
        assert last["data"] == {"status": "interrupted", "reason": "shutdown"}
        assert sum(1 for e in events if _is_terminal(e)) == 1
        assert terminal.setdefault(run_id, last) == last  # every watcher got the same end

    # Nothing is lost and nothing is recovered: the runs are on disk as delivered, and
    # their epochs did not change.
    restarted = spawn("--flush-interval", FLUSH_INTERVAL, db=db)
    async with asyncio.timeout(15), httpx.AsyncClient(base_url=restarted.http_url) as http:
        for run_id, run in runs.items():
            info = (await http.get(f"/api/runs/{run_id}")).json()
            assert info["status"] == "interrupted"
            assert info["epoch"] == run["epoch"]
            assert info["last_index"] == terminal[run_id]["i"]
            stored, _ = await all_events(http, run_id)
            assert stored[-1] == terminal[run_id]
            assert stored == watcher.events[run_id]


async def test_sigint_shuts_down_cleanly(spawn: Any, tmp_path: Path) -> None:
    db = tmp_path / "runcast.db"
    server = spawn("--flush-interval", FLUSH_INTERVAL, db=db)
    async with asyncio.timeout(15), connect(server) as client:
        run = (await client.call("start", agent="counter", input=SLOW_COUNTER))["run"]
        await client.until_index(run["run_id"], 10)
        server.process.send_signal(signal.SIGINT)
        assert await client.until_closed() == 1001
        assert await wait_exit(server, 10) == 0, server.text
    last = client.events[run["run_id"]][-1]
    assert last["data"] == {"status": "interrupted", "reason": "shutdown"}
    assert read_db(
        db, "SELECT status, epoch, last_index FROM runs WHERE run_id = ?", run["run_id"]
    ) == [("interrupted", run["epoch"], last["i"])]
    assert read_db(db, "SELECT max(i) FROM events WHERE run_id = ?", run["run_id"]) == [
        (last["i"],)
    ]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_shutdown_with_nothing_running_exits_0(spawn: Any, sig: signal.Signals) -> None:
    server = spawn("--flush-interval", FLUSH_INTERVAL)
    async with asyncio.timeout(20), connect(server) as client:
        server.process.send_signal(sig)
        assert await client.until_closed() == 1001
        assert await wait_exit(server, 10) == 0, server.text
