"""The bench's WebSocket client: connections, and watchers that check exactly-once
delivery as they count."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

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


def counter_op(n: int, *, delay_s: float = 0.0, start_delay_s: float = 0.0) -> dict[str, Any]:
    return {
        "op": "start",
        "agent": "counter",
        "input": {"n": n, "delay_s": delay_s, "start_delay_s": start_delay_s},
    }
