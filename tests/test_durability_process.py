"""Durability of a real ``runcast serve`` process (issue 3): SIGTERM with many live runs
and watchers, and SIGKILL again and again during a busy run.

Each test runs the server as its own process (the ``spawn`` fixture), talks to it with
real ``websockets`` clients and httpx, signals it, checks the file with
``runcast db check`` (a subprocess) and reads it directly, read-only, with ``sqlite3``.
Nothing sleeps to wait: waits are for frames, HTTP answers, process exits, each bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from tests.conftest import Spawned

pytestmark = pytest.mark.timeout(60)

TERMINAL = {"completed", "failed", "stopped", "interrupted"}
Frame = dict[str, Any]


class Client:
    """A WebSocket client that reads every frame in the background, keeping each run's
    events, until the server closes the connection."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: dict[str, list[Frame]] = {}
        self.watchers: dict[str, int] = {}  # the last presence count of each run
        self.close_code: int | None = None
        self._replies: dict[int, asyncio.Future[Frame]] = {}
        self._ref = 0
        self._progress = asyncio.Event()

    async def read_until_closed(self) -> int:
        """Read (and keep) every frame until the server closes; returns the close code
        (1006 when the connection died without a close frame)."""
        try:
            async for raw in self.ws:
                frame: Frame = json.loads(raw)
                if frame["type"] == "events":
                    self.events.setdefault(frame["run_id"], []).extend(frame["events"])
                elif frame["type"] == "reply":
                    self._replies.pop(frame["ref"]).set_result(frame)
                elif frame["type"] == "presence":
                    self.watchers[frame["run_id"]] = frame["watchers"]
                self._progress.set()
            self.close_code = self.ws.close_code
        except websockets.ConnectionClosed as closed:
            self.close_code = closed.rcvd.code if closed.rcvd is not None else 1006
        self._progress.set()
        assert self.close_code is not None
        return self.close_code

    async def call(self, op: str, **fields: Any) -> Frame:
        """Send one op and return its (ok) result; needs ``read_until_closed`` running."""
        self._ref += 1
        reply = self._replies[self._ref] = asyncio.get_running_loop().create_future()
        await self.ws.send(json.dumps({"op": op, "ref": self._ref, **fields}))
        frame = await reply
        assert frame["ok"], frame
        result: Frame = frame["result"]
        return result

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait (on arriving frames) until ``condition()`` holds."""
        while not condition():
            self._progress.clear()
            assert self.close_code is None, "connection closed"
            await self._progress.wait()

    def last_index(self, run_id: str) -> int:
        events = self.events.get(run_id)
        return events[-1]["i"] if events else 0


@contextlib.asynccontextmanager
async def connect(server: Spawned) -> AsyncIterator[tuple[Client, asyncio.Task[int]]]:
    async with websockets.connect(
        server.ws_url, open_timeout=10, close_timeout=2, max_queue=None, max_size=None
    ) as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        client = Client(ws)
        reader = asyncio.create_task(client.read_until_closed())
        try:
            yield client, reader
        finally:
            if not reader.done():
                reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


def is_terminal(event: Frame) -> bool:
    return event["type"] == "status" and event["data"]["status"] in TERMINAL


def db_check(db: Path) -> subprocess.CompletedProcess[str]:
    """``runcast db check --db FILE``, as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "app", "db", "check", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_db_clean(db: Path) -> None:
    result = db_check(db)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": ok"), result.stdout


def read_db(db: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        return conn.execute(sql, params).fetchall()


def stored_events(db: Path, run_id: str) -> list[Frame]:
    rows = read_db(db, "SELECT i, body FROM events WHERE run_id = ? ORDER BY i", run_id)
    events = [json.loads(body) for _, body in rows]
    assert [i for i, _ in rows] == [e["i"] for e in events]
    return events


async def wait_exit(server: Spawned, timeout_s: float) -> int:
    return await asyncio.to_thread(server.wait, timeout_s)


# -- SIGTERM ----------------------------------------------------------------------------


async def test_sigterm_with_100_runs_and_200_watchers(spawn: Any, tmp_path: Path) -> None:
    """100 live runs, each watched twice, by 20 connections of 10 subscriptions each.
    SIGTERM: every watcher gets its runs' `interrupted` (shutdown) event last, then a
    1001 close; the process exits 0 within the shutdown grace (5 s); the file holds
    exactly what the watchers got, and ``runcast db check`` finds nothing wrong."""
    db = tmp_path / "runcast.db"
    server = spawn("--flush-interval", "0.05", db=db)
    n_runs, n_conns = 100, 20
    async with asyncio.timeout(45), contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=server.http_url))
        conns = [await stack.enter_async_context(connect(server)) for _ in range(n_conns)]
        clients = [client for client, _ in conns]
        runs = []
        for _ in range(n_runs):
            response = await http.post(
                "/api/runs", json={"agent": "counter", "input": {"n": 10**6, "delay_s": 0.01}}
            )
            assert response.status_code == 201, response.text
            runs.append(response.json())
        # Run k is watched by connections k % 20 and (k + 1) % 20: 200 watchers in all.
        watched: dict[int, list[str]] = {c: [] for c in range(n_conns)}
        for k, run in enumerate(runs):
            for c in (k % n_conns, (k + 1) % n_conns):
                watched[c].append(run["run_id"])
        await asyncio.gather(
            *(
                clients[c].call("subscribe", run_id=run_id, after=0)
                for c, run_ids in watched.items()
                for run_id in run_ids
            )
        )
        # Every watcher has seen its runs stream a few events.
        await asyncio.gather(
            *(
                clients[c].until(lambda c=c: all(clients[c].last_index(r) >= 3 for r in watched[c]))
                for c in watched
            )
        )

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(reader for _, reader in conns))
        code = await wait_exit(server, 10)
        elapsed_s = time.monotonic() - started
    assert code == 0, server.text
    assert codes == [1001] * n_conns
    assert elapsed_s < 5.0, elapsed_s  # the default shutdown grace
    print(f"SIGTERM with {n_runs} runs and {2 * n_runs} watchers: exit in {elapsed_s:.2f} s")

    assert_db_clean(db)
    for run in runs:
        run_id = run["run_id"]
        on_disk = stored_events(db, run_id)
        assert [e["i"] for e in on_disk] == list(range(1, len(on_disk) + 1))
        assert on_disk[-1]["data"] == {"status": "interrupted", "reason": "shutdown"}
        assert read_db(
            db, "SELECT status, epoch, last_index FROM runs WHERE run_id = ?", run_id
        ) == [("interrupted", run["epoch"], len(on_disk))]
        for c, run_ids in watched.items():
            if run_id in run_ids:
                got = clients[c].events[run_id]
                assert got == on_disk  # every event, the terminal one last, exactly once
                assert sum(1 for e in got if is_terminal(e)) == 1


async def test_sigterm_exits_although_a_client_stopped_reading(spawn: Any) -> None:
    """A client subscribes to a run that streams flat out, then never reads again: the
    server's sends to it stall once the socket buffers fill. SIGTERM still ends the process
    within the shutdown grace plus the close timeout: its pump is cancelled and the close
    frame it will never read is given up on."""
    server = spawn("--flush-interval", "0.05")
    async with asyncio.timeout(40), contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(httpx.AsyncClient(base_url=server.http_url))
        reading, _ = await stack.enter_async_context(connect(server))
        # A raw socket: the handshake, one subscribe frame, then nothing is read.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await reader.readuntil(b"\r\n\r\n")
        response = await http.post("/api/runs", json={"agent": "counter", "input": {"n": 10**8}})
        run_id = response.json()["run_id"]
        await reading.call("subscribe", run_id=run_id, after="latest", presence=True)
        writer.write(_masked_text(json.dumps({"op": "subscribe", "run_id": run_id})))
        await writer.drain()
        # The raw socket is subscribed (a reader sees two watchers), and the run streams
        # far more than any socket buffer holds, to a client that reads none of it.
        await reading.until(lambda: reading.watchers.get(run_id) == 2)
        await reading.until(lambda: reading.last_index(run_id) > 300_000)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = await wait_exit(server, 20)
        elapsed_s = time.monotonic() - started
        writer.close()
    assert code == 0, server.text
    assert elapsed_s < 5.0 + 2.0 + 1.5, elapsed_s  # grace + close timeout + slack
    assert "Traceback" not in server.text, server.text


def _masked_text(text: str) -> bytes:
    """One masked client text frame (RFC 6455 §5.2), payload under 126 bytes."""
    payload = text.encode()
    assert len(payload) < 126
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


# -- SIGKILL ----------------------------------------------------------------------------

FLUSH_INTERVAL_S = 0.2  # the default
# Two kinds of busy run. Paced (one event a millisecond, far above any token stream): a
# flush writes little, so whatever the client saw more than two flush intervals before the
# kill must be on disk. Flat out (100,000+ events a second, here on two cores shared with
# the client): a flush of an interval's events itself takes a while, so the bound is
# looser (measured over 10 kills: the newest event on disk 0.2 to 0.75 s old).
KINDS = {
    "paced": ({"n": 10**7, "delay_s": 0.001}, (300, 800), 2 * FLUSH_INTERVAL_S),
    "flat out": ({"n": 10**8}, (100_000, 160_000), 1.5),
}


async def test_repeated_sigkill_during_a_busy_run_loses_at_most_a_flush_interval(
    spawn: Any, tmp_path: Path
) -> None:
    """Five times: a counter runs (paced, then flat out, in turn), a client watches it,
    the server is SIGKILLed at a random moment and restarted on the same file. Each time
    the file is clean (``runcast db check``), every log is contiguous, what is on disk is
    what the client saw, and every event the client saw that was older than the bound at
    the kill is on disk."""
    db = tmp_path / "runcast.db"
    rng = random.Random(5)
    killed: list[tuple[str, int]] = []  # run_id, its last index on disk
    for kill, kind in enumerate(["paced", "flat out", "paced", "flat out", "paced"]):
        counter, (low, high), bound_s = KINDS[kind]
        server = spawn(db=db)
        async with asyncio.timeout(20), connect(server) as (client, reader):
            if killed:
                # The run the last kill cut off was ended at restart: interrupted (crash)
                # right after its last persisted event.
                async with httpx.AsyncClient(base_url=server.http_url) as http:
                    run_id, persisted = killed[-1]
                    info = (await http.get(f"/api/runs/{run_id}")).json()
                    assert (info["status"], info["last_index"]) == ("interrupted", persisted + 1)
            run_id = (await client.call("start", agent="counter", input=counter))["run"]["run_id"]
            target = rng.randint(low, high)
            await client.until(lambda r=run_id, t=target: client.last_index(r) >= t)
            killed_at = time.time()
            server.process.kill()
            assert await reader == 1006
        assert await wait_exit(server, 10) == -signal.SIGKILL

        seen = client.events[run_id]
        assert [e["i"] for e in seen] == list(range(1, len(seen) + 1))
        assert_db_clean(db)
        [(status, persisted)] = read_db(
            db, "SELECT status, last_index FROM runs WHERE run_id = ?", run_id
        )
        assert status in ("queued", "running")  # queued: not one flush since it started
        on_disk = stored_events(db, run_id)
        assert len(on_disk) == persisted
        common = min(len(seen), persisted)
        assert on_disk[:common] == seen[:common]
        # The bound: what the client saw that was older than it at the kill is on disk.
        old = max((e["i"] for e in seen if e["ts"] <= killed_at - bound_s), default=0)
        assert persisted >= old, (kind, persisted, len(seen), old)
        age_s = killed_at - on_disk[-1]["ts"] if on_disk else float("nan")
        print(
            f"kill {kill + 1} ({kind}): the client saw {len(seen)}, the disk had {persisted}"
            f" ({len(seen) - persisted} lost); the newest event on disk was {age_s:.3f} s old"
        )
        killed.append((run_id, persisted))

    # A last restart ends the last killed run; a clean stop; the file is clean.
    server = spawn(db=db)
    server.process.send_signal(signal.SIGTERM)
    assert await wait_exit(server, 10) == 0, server.text
    assert_db_clean(db)
    for run_id, persisted in killed:
        events = stored_events(db, run_id)
        assert [e["i"] for e in events] == list(range(1, persisted + 2))
        assert events[-1]["data"] == {"status": "interrupted", "reason": "crash"}
