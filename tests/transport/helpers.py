"""Small helpers for the end-to-end transport tests: a WebSocket client wrapper, an SSE
reader, and the client-side fold of PROTOCOL.md §1 (app/core's reducer: its own table and
property tests, tests/core/test_snapshot.py, hold it to the protocol)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.core import snapshot

Frame = dict[str, Any]

TERMINAL = frozenset({"completed", "failed", "stopped", "interrupted"})
RECV_TIMEOUT_S = 5.0


def is_terminal(event: Frame) -> bool:
    return event["type"] == "status" and event["data"]["status"] in TERMINAL


class Conn:
    """One WebSocket connection to the server.

    Frames that arrive while waiting for something else are kept in ``pending``, in
    arrival order, so a test can tell what came before a reply and what after.
    """

    def __init__(self, ws: ClientConnection, welcome: Frame) -> None:
        self.ws = ws
        self.welcome = welcome
        self.pending: list[Frame] = []
        self._next_ref = 0

    @property
    def connection_id(self) -> str:
        connection_id: str = self.welcome["connection_id"]
        return connection_id

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    async def recv(self, timeout_s: float = RECV_TIMEOUT_S) -> Frame:
        """The next frame off the socket (ignoring ``pending``)."""
        async with asyncio.timeout(timeout_s):
            raw = await self.ws.recv()
        frame: Frame = json.loads(raw)
        return frame

    async def next_frame(
        self, match: Callable[[Frame], bool], timeout_s: float = RECV_TIMEOUT_S
    ) -> Frame:
        """The first frame (pending ones first) for which ``match`` is true; others wait
        in ``pending``."""
        for position, frame in enumerate(self.pending):
            if match(frame):
                del self.pending[position]
                return frame
        async with asyncio.timeout(timeout_s):
            while True:
                frame = await self.recv(timeout_s)
                if match(frame):
                    return frame
                self.pending.append(frame)

    async def reply(self, timeout_s: float = RECV_TIMEOUT_S) -> Frame:
        """The next reply frame; frames before it go to ``pending``.

        Replies come one per client frame, in order, so this is the reply to the oldest
        frame not yet answered.
        """
        return await self.next_frame(lambda f: f["type"] == "reply", timeout_s)

    async def op(self, op: str, **fields: Any) -> Frame:
        """Send ``{"op": op, "ref": <fresh>, **fields}`` and return its reply."""
        self._next_ref += 1
        ref = f"r{self._next_ref}"
        await self.send_raw(json.dumps({"op": op, "ref": ref, **fields}))
        reply = await self.reply()
        assert reply["ref"] == ref, reply
        return reply

    async def ok(self, op: str, **fields: Any) -> Frame:
        """``op`` that must succeed; returns its result."""
        reply = await self.op(op, **fields)
        assert reply["ok"] is True, reply
        result: Frame = reply["result"]
        return result

    async def error(self, op: str, **fields: Any) -> Frame:
        """``op`` that must fail; returns its error object."""
        reply = await self.op(op, **fields)
        assert reply["ok"] is False, reply
        error: Frame = reply["error"]
        return error

    async def start(self, agent: str, input: Frame, **fields: Any) -> Frame:
        """Start a run; returns its RunInfo."""
        run: Frame = (await self.ok("start", agent=agent, input=input, **fields))["run"]
        return run

    async def events_until(self, run_id: str, stop: Callable[[Frame], bool]) -> list[Frame]:
        """Events of ``run_id`` from ``events`` frames, up to the first one for which
        ``stop`` is true (the rest of that frame is returned too)."""
        events: list[Frame] = []
        while not any(stop(e) for e in events):
            frame = await self.next_frame(lambda f: f["type"] == "events" and f["run_id"] == run_id)
            assert frame["events"], frame
            events.extend(frame["events"])
        return events

    async def events_until_end(self, run_id: str) -> list[Frame]:
        """Every event of ``run_id`` up to and including its terminal status event,
        which must be the last one received."""
        events = await self.events_until(run_id, is_terminal)
        assert is_terminal(events[-1]), events[-5:]
        return events

    async def assert_quiet(self, run_id: str | None = None) -> None:
        """A ping round trip brings no events (of ``run_id``, or of any run)."""
        await self.ok("ping")
        stray = [
            f
            for f in self.pending
            if f["type"] in ("events", "snapshot", "reset")
            and (run_id is None or f["run_id"] == run_id)
        ]
        assert not stray, stray

    def take(self, type: str, run_id: str | None = None) -> list[Frame]:
        """Remove and return the pending frames of ``type`` (and ``run_id``)."""
        taken = [
            f
            for f in self.pending
            if f["type"] == type and (run_id is None or f.get("run_id") == run_id)
        ]
        self.pending = [f for f in self.pending if not any(f is t for t in taken)]
        return taken


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[Conn]:
    """A connection that has received its welcome frame."""
    async with asyncio.timeout(RECV_TIMEOUT_S):
        ws = await websockets.connect(url, max_size=None)
    try:
        async with asyncio.timeout(RECV_TIMEOUT_S):
            welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        yield Conn(ws, welcome)
    finally:
        await ws.close()


def indexes(events: list[Frame]) -> list[int]:
    return [e["i"] for e in events]


# -- HTTP and SSE ---------------------------------------------------------------------


async def wait_status(
    http: httpx.AsyncClient, run_id: str, statuses: set[str], timeout_s: float = 5.0
) -> list[Frame]:
    """Read the run's SSE stream until an event sets one of ``statuses``; returns the
    events read. Awaits the server, never polls."""
    events: list[Frame] = []
    async with asyncio.timeout(timeout_s), aclosing(sse_events(http, run_id)) as stream:
        async for event in stream:
            events.append(event["data"])
            if event["event"] == "status" and event["data"]["data"]["status"] in statuses:
                return events
    raise AssertionError(f"run {run_id} ended without reaching {statuses}: {events[-3:]}")


async def sse_events(
    http: httpx.AsyncClient,
    run_id: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str | int] | None = None,
) -> AsyncIterator[Frame]:
    """Parse the SSE stream of a run: yields ``{"id", "event", "data"}`` per event,
    ``data`` decoded from JSON. Returns when the server ends the stream."""
    async with http.stream(
        "GET",
        f"/api/runs/{run_id}/events",
        headers={"Accept": "text/event-stream", **(headers or {})},
        params=params,
    ) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if line == "":
                if "data" in fields:
                    yield {
                        "id": fields.get("id"),
                        "event": fields.get("event"),
                        "data": json.loads(fields["data"]),
                    }
                fields = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data" and "data" in fields:
                fields["data"] += "\n" + value
            else:
                fields[name] = value


async def read_sse(
    http: httpx.AsyncClient,
    run_id: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str | int] | None = None,
) -> list[Frame]:
    """The whole SSE stream of a run, to its end."""
    return [event async for event in sse_events(http, run_id, headers, params)]


# -- the snapshot of PROTOCOL.md §1, folded client-side ----------------------------------


def fold(events: list[Frame]) -> Frame:
    """The snapshot state after ``events`` (wire dicts), by app/core's reducer, whose own
    table tests (tests/core/test_snapshot.py) check it against PROTOCOL.md §1."""
    state = snapshot.initial_state()
    for event in events:
        snapshot.apply(state, event["type"], event["data"])
    return state


async def refused_handshake(url: str, **kw: Any) -> int:
    """Connect and expect no welcome: the HTTP status of a refused handshake, or the close
    code (1008) of one accepted and closed at once."""
    async with asyncio.timeout(5):
        try:
            ws = await websockets.connect(url, **kw)
        except InvalidStatus as exc:
            return exc.response.status_code
        try:
            frame = await ws.recv()
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, exc
            return exc.rcvd.code
        finally:
            await ws.close()
    raise AssertionError(f"admitted, with {frame!r}")


async def open_conn(url: str, **kw: Any) -> Conn:
    """A connection admitted with its welcome (``kw`` to ``websockets.connect``)."""
    async with asyncio.timeout(5):
        ws = await websockets.connect(url, max_size=None, **kw)
        welcome = json.loads(await ws.recv())
    assert welcome["type"] == "welcome", welcome
    return Conn(ws, welcome)
