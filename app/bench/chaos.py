"""``runcast bench chaos``: many clients and every fault at once against a server process,
with every delivery invariant of PROTOCOL.md checked as frames arrive.

The command starts ``python -m app serve`` on a temporary SQLite file and drives it with
N clients for T seconds. Each client is one connection at a time (a browser tab) that
starts runs (``counter``, ``demo``, ``ask``), joins other clients' runs from a random
cursor, drops its socket mid-stream and resumes by cursor, unsubscribes and resubscribes,
stops runs, answers ``ask`` runs (with the right request id and with stale ones), sends
bursts of hundreds of pings and bad frames. Half-way, the server is SIGKILLed once and
restarted on the same file; every client reconnects and resumes with its old epoch.

What is checked (a broken invariant makes the exit status 1):

- per client per run: indexes are contiguous (``i`` = previous + 1) across drops and
  resumes, no index twice, nothing after the terminal status event;
- every frame a client sends gets exactly one reply, in order, echoing its ``ref``; no
  reply is ``internal``; a bad frame never closes the connection;
- after the restart: every run that was live ends ``interrupted`` (``reason: crash``)
  with a new epoch, a run a client saw end keeps its log and epoch, and a resume with
  the old epoch gets ``reset`` then a snapshot; every event a client saw is in the log,
  except those appended after the last flush (the crash window, reported);
- at the end, every event a client received equals the run's log at that index.

Limits (PROTOCOL.md §8) are valid outcomes: ``rate_limited`` (retried after
``retry_after``), ``too_many_subscriptions``, ``payload_too_large``, ``overloaded``.

:class:`Tab` (a checked client connection) is also what tests/transport/test_stateful.py
drives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

Frame = dict[str, Any]
Ref = str | int | float | None

TERMINAL = frozenset({"completed", "failed", "stopped", "interrupted"})
# Codes a well-formed op may get because of load or limits (PROTOCOL.md §7, §8): valid
# outcomes, never a broken invariant.
LIMIT_CODES = frozenset(
    {"rate_limited", "too_many_subscriptions", "payload_too_large", "overloaded"}
)
REPLY_TIMEOUT_S = 10.0
MAX_EVENTS_PER_FRAME = 1000
MAX_VIOLATIONS_KEPT = 50


class ConnectionLostError(Exception):
    """The tab's connection closed before the reply came (a drop, a kill)."""


class ChaosError(Exception):
    """The chaos run could not go on (the server did not start, a client was stuck)."""


# -- what every client counts --------------------------------------------------------------


@dataclass
class Stats:
    """Counters shared by every tab of one chaos run (or one test)."""

    frames_sent: int = 0
    replies: int = 0
    events: int = 0
    starts: int = 0
    drops: int = 0
    stops: int = 0
    kills: int = 0
    responds: int = 0
    stale_responds: int = 0
    bursts: int = 0
    burst_pings: int = 0
    rate_limited: int = 0
    limited: int = 0  # replies with any code of LIMIT_CODES
    bad_inputs: int = 0
    resumes: int = 0
    resets: int = 0
    duplicates: int = 0
    gaps: int = 0
    after_terminal: int = 0
    violation_count: int = 0
    violations: list[str] = field(default_factory=list)

    def violate(self, text: str) -> None:
        """Record a broken invariant (the first MAX_VIOLATIONS_KEPT are kept verbatim)."""
        self.violation_count += 1
        if len(self.violations) < MAX_VIOLATIONS_KEPT:
            self.violations.append(text)


def is_terminal(event: Frame) -> bool:
    return event.get("type") == "status" and event.get("data", {}).get("status") in TERMINAL


def encode(obj: Any) -> str:
    """JSON text of ``obj``; integers past 64 bits too (a client may send them)."""
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        return json.dumps(obj, ensure_ascii=False)


def readable_ref(data: str | bytes) -> Ref:
    """The ``ref`` a server can echo for ``data`` (PROTOCOL.md §2): a string or a number
    of a frame that is a JSON object, else None."""
    try:
        obj = orjson.loads(data)
    except ValueError:
        return None
    if isinstance(obj, dict):
        ref = obj.get("ref")
        if isinstance(ref, str | int | float) and not isinstance(ref, bool):
            return ref
    return None


def expected_refs(data: str | bytes) -> tuple[Ref, ...]:
    """Every ref a reply to ``data`` may carry: the readable one; also None for a frame
    big enough to be refused unread (``payload_too_large``, the least limit is 1 KiB)."""
    ref = readable_ref(data)
    return (ref,) if len(data) <= 1024 or ref is None else (ref, None)


# -- one checked connection ------------------------------------------------------------------


@dataclass(eq=False)
class Stream:
    """What one tab holds of one run: the events it received, in order, from ``start``
    (the cursor it subscribed after; None until known, for ``after: "latest"``)."""

    run_id: str
    epoch: str | None
    start: int | None
    cursor: int | None
    events: list[Frame] = field(default_factory=list)
    ended: bool = False
    live: bool = False  # subscribed on the current connection
    parked: bool = False  # unsubscribed on purpose; resumed later by cursor
    awaiting_reset: bool = False
    awaiting_snapshot: bool = False
    after_reset: bool = False
    first_max: int | None = None  # after "latest": the first index is at most this
    request_id: str | None = None  # an input_required not yet answered
    resets: int = 0

    @property
    def resumable(self) -> bool:
        return not self.ended and not self.parked


@dataclass(eq=False)
class _Pending:
    refs: tuple[Ref, ...]
    future: asyncio.Future[Frame]
    on_reply: Callable[[Frame], None] | None
    what: str


class Tab:
    """One client connection to ``/ws`` whose every frame is checked.

    A reader task takes the frames in order: a reply is matched to the oldest frame not
    yet answered (and must echo its ref); an ``events`` frame must continue the stream
    of its run with no gap, no duplicate and nothing after the terminal event. Streams
    outlive connections: after a drop, :meth:`resume_all` subscribes after each cursor.
    Broken invariants go to ``stats.violate``; nothing here raises on them.

    ``generation`` tells whether a close was expected: a close while the generation
    differs from the one at connect time (the server was killed) is not a violation;
    neither is one that :meth:`drop` or :meth:`close` asked for. ``lenient``: frames of
    runs it did not subscribe to through :meth:`subscribe` or :meth:`start` (a fuzzer's
    raw frames may subscribe) are not checked.
    """

    def __init__(
        self,
        name: str,
        stats: Stats,
        *,
        generation: Callable[[], int] = lambda: 0,
        lenient: bool = False,
    ) -> None:
        self.name = name
        self.stats = stats
        self.lenient = lenient
        self.streams: dict[str, Stream] = {}
        self.ws: ClientConnection | None = None
        self.connection_id: str | None = None
        self.close_code: int | None = None
        self.connections = 0
        self._generation = generation
        self._connected_generation = 0
        self._expect_close = False
        self._pending: deque[_Pending] = deque()
        self._send_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        self._refs = itertools.count(1)

    def __repr__(self) -> str:
        return f"<Tab {self.name}>"

    # -- the connection ----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.ws is not None and self._reader is not None and not self._reader.done()

    async def connect(self, url: str, timeout_s: float = 10.0) -> None:
        """Open a connection and take its ``welcome``; the reader starts.

        Raises: OSError, InvalidHandshake, TimeoutError (the caller may retry).
        """
        await self._stop_reader()
        self._connected_generation = self._generation()
        async with asyncio.timeout(timeout_s):
            ws = await connect(
                url, max_size=None, max_queue=None, open_timeout=None, close_timeout=2
            )
            try:
                welcome = orjson.loads(await ws.recv())
            except BaseException:
                ws.transport.abort()
                raise
        if welcome.get("type") != "welcome":
            self.stats.violate(f"{self.name}: first frame is not welcome: {welcome!r:.200}")
        self.connection_id = welcome.get("connection_id")
        self.ws = ws
        self.close_code = None
        self._expect_close = False
        self.connections += 1
        self._reader = asyncio.create_task(self._read(ws), name=f"tab {self.name}")

    async def drop(self) -> None:
        """Cut the connection at once (no close handshake), mid-stream."""
        if self.ws is None:
            return
        self._expect_close = True
        self.stats.drops += 1
        self.ws.transport.abort()
        await self._stop_reader()

    async def close(self) -> None:
        """Close the connection cleanly; the reader ends."""
        ws = self.ws
        if ws is not None:
            self._expect_close = True
            with contextlib.suppress(OSError, ConnectionClosed, TimeoutError):
                async with asyncio.timeout(5):
                    await ws.close()
            ws.transport.abort()
        await self._stop_reader()

    async def _stop_reader(self) -> None:
        reader = self._reader
        if reader is None:
            return
        if not reader.done() and self.ws is not None:
            self._expect_close = True
            self.ws.transport.abort()
        await asyncio.wait({reader})
        self._reader = None

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                self._on_frame(orjson.loads(raw))
                self._progress.set()
            self.close_code = ws.close_code
        except ConnectionClosed as closed:
            self.close_code = closed.rcvd.code if closed.rcvd is not None else 1006
        except orjson.JSONDecodeError as exc:
            self.stats.violate(f"{self.name}: the server sent a frame that is not JSON: {exc}")
            ws.transport.abort()
        finally:
            self.ws = None
            self._lost()
        expected = self._expect_close or self._generation() != self._connected_generation
        if not expected:
            self.stats.violate(
                f"{self.name}: the server closed the connection (code {self.close_code})"
            )

    def _lost(self) -> None:
        while self._pending:
            pending = self._pending.popleft()
            if not pending.future.done():
                pending.future.set_exception(ConnectionLostError(pending.what))
        for stream in self.streams.values():
            stream.live = False
            stream.awaiting_reset = stream.awaiting_snapshot = False
        self._progress.set()

    # -- frames in -----------------------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "reply":
            self._on_reply(frame)
        elif kind == "events":
            self._on_events(frame)
        elif kind == "reset":
            self._on_reset(frame)
        elif kind == "snapshot":
            self._on_snapshot(frame)
        elif kind == "deleted":
            stream = self.streams.get(frame.get("run_id", ""))
            if stream is not None:
                stream.ended, stream.live = True, False
        elif kind not in ("presence", "thread"):
            self.stats.violate(f"{self.name}: unexpected frame {frame!r:.200}")

    def _on_reply(self, frame: Frame) -> None:
        self.stats.replies += 1
        if not self._pending:
            self.stats.violate(f"{self.name}: a reply to no frame: {frame!r:.200}")
            return
        pending = self._pending.popleft()
        if frame.get("ref") not in pending.refs or "ref" not in frame:
            self.stats.violate(
                f"{self.name}: reply to {pending.what} has ref {frame.get('ref')!r:.60}, "
                f"expected one of {pending.refs!r:.120}"
            )
        if frame.get("ok") is not True:
            error = frame.get("error") or {}
            code = error.get("code")
            if code == "internal" or not error.get("message"):
                self.stats.violate(f"{self.name}: {pending.what} got {error!r:.300}")
            if code == "rate_limited":
                self.stats.rate_limited += 1
                if not isinstance(error.get("retry_after"), int | float):
                    self.stats.violate(f"{self.name}: rate_limited without retry_after")
            if code in LIMIT_CODES:
                self.stats.limited += 1
        if pending.on_reply is not None:
            pending.on_reply(frame)
        if not pending.future.done():
            pending.future.set_result(frame)

    def _on_events(self, frame: Frame) -> None:
        run_id = frame.get("run_id", "")
        stream = self.streams.get(run_id)
        events = frame.get("events") or []
        if not events or len(events) > MAX_EVENTS_PER_FRAME:
            self.stats.violate(f"{self.name}: events frame of {len(events)} events")
        if stream is None and self.lenient:
            self.stats.events += len(events)
            return
        if stream is None or not stream.live:
            self.stats.violate(f"{self.name}: events of {run_id}, which it is not subscribed to")
            return
        if stream.awaiting_reset or stream.awaiting_snapshot:
            what = "reset" if stream.awaiting_reset else "snapshot"
            self.stats.violate(f"{self.name}: events of {run_id} before the {what}")
            stream.awaiting_reset = stream.awaiting_snapshot = False
        if frame.get("epoch") != stream.epoch:
            self.stats.violate(
                f"{self.name}: events of {run_id} in epoch {frame.get('epoch')}, "
                f"it holds epoch {stream.epoch} (no reset)"
            )
            stream.epoch = frame.get("epoch")
        for event in events:
            self.stats.events += 1
            index = event["i"]
            if stream.ended:
                self.stats.after_terminal += 1
                self.stats.violate(f"{self.name}: {run_id} event {index} after the terminal one")
                continue
            if stream.cursor is None:
                if stream.first_max is not None and index > stream.first_max:
                    self.stats.gaps += 1
                    self.stats.violate(
                        f"{self.name}: {run_id} first event {index} after 'latest' "
                        f"at most {stream.first_max}"
                    )
                stream.start = index - 1
            elif index <= stream.cursor:
                self.stats.duplicates += 1
                self.stats.violate(
                    f"{self.name}: {run_id} event {index} again (cursor {stream.cursor})"
                )
                continue
            elif index != stream.cursor + 1:
                self.stats.gaps += 1
                self.stats.violate(
                    f"{self.name}: {run_id} gap: event {index} after {stream.cursor}"
                )
            stream.cursor = index
            stream.events.append(event)
            kind = event.get("type")
            if kind == "input_required":
                stream.request_id = event["data"].get("request_id")
            elif kind == "input_received":
                stream.request_id = None
            elif is_terminal(event):
                stream.ended, stream.live, stream.request_id = True, False, None

    def _on_reset(self, frame: Frame) -> None:
        run_id = frame.get("run_id", "")
        stream = self.streams.get(run_id)
        if stream is None and self.lenient:
            return
        if stream is None or not stream.live or not stream.awaiting_reset:
            self.stats.violate(f"{self.name}: a reset of {run_id} it did not expect")
            return
        self.stats.resets += 1
        stream.resets += 1
        stream.epoch = frame.get("epoch")
        stream.awaiting_reset = False
        stream.awaiting_snapshot = stream.after_reset = True

    def _on_snapshot(self, frame: Frame) -> None:
        run_id = frame.get("run_id", "")
        stream = self.streams.get(run_id)
        if stream is None and self.lenient:
            return
        if stream is None or not stream.live or not stream.awaiting_snapshot:
            self.stats.violate(f"{self.name}: a snapshot of {run_id} it did not ask for")
            return
        stream.awaiting_snapshot = False
        index = frame.get("index")
        state = frame.get("state") or {}
        if frame.get("epoch") != stream.epoch:
            self.stats.violate(f"{self.name}: snapshot of {run_id} in another epoch")
        if not isinstance(index, int):
            self.stats.violate(f"{self.name}: snapshot of {run_id} without an index")
            return
        if stream.after_reset:
            # The log it held may have been rewritten: it starts over at the snapshot.
            stream.after_reset = False
            stream.events = []
            stream.start = stream.cursor = index
            pending = state.get("pending_input")
            stream.request_id = pending.get("request_id") if isinstance(pending, dict) else None
            if state.get("status") in TERMINAL:
                stream.ended, stream.live, stream.request_id = True, False, None
        elif stream.cursor is None:
            stream.start = stream.cursor = index
        elif index != stream.cursor:
            self.stats.violate(
                f"{self.name}: snapshot of {run_id} at {index}, subscribed after {stream.cursor}"
            )
        if stream.ended:
            stream.live = False

    # -- frames out ----------------------------------------------------------------------

    def new_ref(self) -> str:
        return f"{self.name}.{next(self._refs)}"

    async def send(
        self,
        data: str | bytes,
        *,
        refs: tuple[Ref, ...],
        what: str,
        on_reply: Callable[[Frame], None] | None = None,
        text: bool | None = None,
    ) -> asyncio.Future[Frame]:
        """Send one frame; returns the future of its reply (ConnectionLostError when the
        connection closes first). ``text=True`` sends bytes as a text frame."""
        async with self._send_lock:
            ws = self.ws
            if ws is None or not self.connected:
                raise ConnectionLostError(what)
            future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
            pending = _Pending(refs, future, on_reply, what)
            self._pending.append(pending)
            self.stats.frames_sent += 1
            try:
                await ws.send(data, text=text)
            except ConnectionClosed as exc:
                # Never sent: no reply is owed (the reader fails the others).
                with contextlib.suppress(ValueError):
                    self._pending.remove(pending)
                future.cancel()
                raise ConnectionLostError(what) from exc
        return future

    async def reply_to(self, future: asyncio.Future[Frame], what: str) -> Frame:
        """Await a reply; a reply that never comes is a violation (and an error)."""
        try:
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                return await future
        except TimeoutError:
            self.stats.violate(f"{self.name}: no reply to {what} within {REPLY_TIMEOUT_S} s")
            raise ChaosError(f"{self.name}: no reply to {what}") from None

    async def call(
        self, op: str, *, on_reply: Callable[[Frame], None] | None = None, **fields: Any
    ) -> Frame:
        """Send ``{"op": op, "ref": <fresh>, **fields}``; returns its reply (one try)."""
        ref = self.new_ref()
        data = encode({"op": op, "ref": ref, **fields})
        future = await self.send(data, refs=(ref,), what=op, on_reply=on_reply)
        return await self.reply_to(future, op)

    async def request(
        self,
        op: str,
        *,
        on_reply: Callable[[Frame], None] | None = None,
        tries: int = 20,
        **fields: Any,
    ) -> Frame:
        """``call``, again after ``retry_after`` while the reply is ``rate_limited``."""
        for _ in range(tries - 1):
            reply = await self.call(op, on_reply=on_reply, **fields)
            error = reply.get("error") or {}
            if reply.get("ok") or error.get("code") != "rate_limited":
                return reply
            # A backoff the server asked for, not a wait for a condition.
            await asyncio.sleep(min(float(error.get("retry_after", 0.1)), 2.0))
        return await self.call(op, on_reply=on_reply, **fields)

    async def send_raw(self, data: str | bytes, *, text: bool | None = None) -> Frame:
        """Send a frame as it is (a bad one, usually); returns its reply."""
        what = f"raw frame {data[:60]!r}"
        future = await self.send(data, refs=expected_refs(data), what=what, text=text)
        return await self.reply_to(future, what)

    async def ping(self) -> Frame:
        return await self.request("ping")

    async def burst(self, n: int) -> list[Frame]:
        """``n`` pings sent at once, then their ``n`` replies."""
        futures = []
        for _ in range(n):
            ref = self.new_ref()
            data = orjson.dumps({"op": "ping", "ref": ref}).decode()
            futures.append(await self.send(data, refs=(ref,), what="burst ping"))
        self.stats.bursts += 1
        self.stats.burst_pings += n
        replies = await asyncio.gather(
            *(self.reply_to(future, "burst ping") for future in futures), return_exceptions=True
        )
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return [reply for reply in replies if not isinstance(reply, BaseException)]

    # -- subscriptions -----------------------------------------------------------------

    async def start(self, agent: str, input: Frame, **fields: Any) -> Frame:
        """``start`` (subscribed, unless ``subscribe=False``); returns the reply."""
        subscribed = fields.get("subscribe", True)

        def on_reply(reply: Frame) -> None:
            if reply.get("ok") and subscribed:
                run = reply["result"]["run"]
                self.streams[run["run_id"]] = Stream(
                    run["run_id"], run["epoch"], start=0, cursor=0, live=True
                )

        reply = await self.request("start", on_reply=on_reply, agent=agent, input=input, **fields)
        if reply.get("ok"):
            self.stats.starts += 1
        return reply

    async def subscribe(
        self,
        run_id: str,
        after: int | str = 0,
        *,
        epoch: str | None = None,
        snapshot: bool = False,
        presence: bool = True,
        resume: Stream | None = None,
    ) -> Frame:
        """``subscribe``; the stream is set up when the reply is read, before any later
        frame. ``resume``: continue that stream (its cursor and events) instead of a new
        one.

        A resume on the connection that still holds the stream's subscription replaces
        it (PROTOCOL.md §2): until the reply the old one may go on sending (even the
        terminal event), and after it the new one sends every event after ``after``
        again. So at the reply the stream is rewound to ``after`` (for ``"latest"``, to
        what it held when the frame was sent)."""
        held = 0 if resume is None else len(resume.events)

        def on_reply(reply: Frame) -> None:
            if not reply.get("ok"):
                return
            run = reply["result"]["run"]
            last = run["last_index"]
            cursor = after if isinstance(after, int) else None
            if resume is not None:
                stream = resume
                stream.parked = False
                if cursor is not None:
                    _rewind(stream, sum(1 for e in stream.events if e["i"] <= cursor))
                else:
                    _rewind(stream, held)
            else:
                stream = Stream(run_id, epoch or run["epoch"], start=cursor, cursor=cursor)
            stream.live = True
            stream.first_max = last + 1 if cursor is None else None
            if epoch is not None and run["epoch"] != epoch:
                stream.awaiting_reset = True
            else:
                stream.epoch = run["epoch"]
                if cursor is not None and cursor > last:
                    self.stats.violate(
                        f"{self.name}: subscribe {run_id} after {cursor} > last {last} was ok"
                    )
                ended = run["status"] in TERMINAL
                if ended and cursor is None:
                    cursor = stream.cursor = stream.start = last
                if ended and cursor == last:
                    if resume is not None and not stream.ended and stream.events:
                        self.stats.violate(
                            f"{self.name}: {run_id} ended at {last}, which it holds, "
                            "but it never got the terminal event"
                        )
                    # Nothing follows the reply but the snapshot asked for.
                    stream.ended, stream.live = True, snapshot
                stream.awaiting_snapshot = snapshot
            self.streams[run_id] = stream

        if resume is not None:
            self.stats.resumes += 1
        fields: dict[str, Any] = {"run_id": run_id, "after": after}
        if epoch is not None:
            fields["epoch"] = epoch
        if snapshot:
            fields["snapshot"] = True
        if not presence:
            fields["presence"] = False
        return await self.request("subscribe", on_reply=on_reply, **fields)

    async def unsubscribe(self, run_id: str) -> Frame:
        def on_reply(reply: Frame) -> None:
            stream = self.streams.get(run_id)
            if reply.get("ok") and stream is not None:
                stream.live = False
                stream.parked = not stream.ended

        return await self.request("unsubscribe", on_reply=on_reply, run_id=run_id)

    async def resume(self, stream: Stream) -> Frame:
        """Subscribe after the last index it holds, in the epoch it holds."""
        after: int | str = "latest" if stream.cursor is None else stream.cursor
        return await self.subscribe(stream.run_id, after, epoch=stream.epoch, resume=stream)

    async def resume_all(self) -> None:
        """After a reconnect: resume every stream that has not ended (and is not parked)."""
        for stream in list(self.streams.values()):
            if stream.resumable and not stream.live:
                await self.resume(stream)

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (on arriving frames) until ``condition()``; False if the time ran out or
        the connection closed first."""
        try:
            async with asyncio.timeout(timeout_s):
                while not condition():
                    if not self.connected:
                        return condition()
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            return condition()
        return True

    def live_streams(self) -> list[Stream]:
        return [s for s in self.streams.values() if s.live and not s.ended]


def _rewind(stream: Stream, keep: int) -> None:
    """Forget what ``stream`` received after its first ``keep`` events: a replacing
    subscription sends them again. Its ``request_id`` is left as it is (the events
    sent again set it as they come)."""
    if keep >= len(stream.events):
        return
    del stream.events[keep:]
    stream.cursor = stream.events[-1]["i"] if stream.events else stream.start
    stream.ended = False  # a terminal event, always the last one, was among those


# -- the server process --------------------------------------------------------------------


_LISTENING = re.compile(rb"listening on http://(\S+)")


class ServerProcess:
    """``python -m app serve`` on ``db``; its output goes to ``log``."""

    def __init__(self, db: Path, log: Path, args: Iterable[str] = ()) -> None:
        self.db = db
        self.log = log
        self.args = list(args)
        self.process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self, timeout_s: float = 30.0) -> str:
        """Start it and return its ``ws://`` URL once it listens (runs recovered)."""
        env = {**os.environ, "RUNCAST_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", "0"]
        with self._open_log() as log:
            self.process = await asyncio.create_subprocess_exec(
                *argv,
                "--db",
                str(self.db),
                *self.args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env=env,
            )
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    line = await self.process.stdout.readline()
                    if not line:
                        raise ChaosError(f"the server exited before listening:\n{self.tail()}")
                    self._append(line)
                    match = _LISTENING.search(line)
                    if match:
                        break
        except BaseException:
            await self.kill()
            raise
        self._drain = asyncio.create_task(self._drain_stdout(self.process.stdout))
        self.url = f"ws://{match.group(1).decode()}/ws"
        return self.url

    def _open_log(self) -> BinaryIO:
        return open(self.log, "ab")

    def _append(self, line: bytes) -> None:
        with open(self.log, "ab") as log:
            log.write(line)

    async def _drain_stdout(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            self._append(line)

    async def kill(self) -> int:
        """SIGKILL; returns once it is gone."""
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
        return await self.wait(10)

    async def terminate(self, timeout_s: float = 15.0) -> int:
        """SIGTERM (a clean shutdown); SIGKILL if it takes longer than ``timeout_s``."""
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
        try:
            return await self.wait(timeout_s)
        except TimeoutError:
            return await self.kill()

    async def wait(self, timeout_s: float) -> int:
        assert self.process is not None
        async with asyncio.timeout(timeout_s):
            code = await self.process.wait()
            if self._drain is not None:
                await self._drain
        return code

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# -- the chaos run ---------------------------------------------------------------------------


# Bad frames (text unless bytes): each must get one error reply and leave the socket open.
BAD_FRAMES: list[str | bytes] = [
    "{not json",
    "",
    "null",
    "[1, 2]",
    '"ping"',
    "{}",
    '{"op": 5, "ref": 1}',
    '{"op": "frobnicate", "ref": "x"}',
    '{"op": "subscribe", "ref": 3}',
    '{"op": "subscribe", "run_id": 5, "ref": 4}',
    '{"op": "subscribe", "run_id": "r", "after": -1, "ref": 5}',
    '{"op": "subscribe", "run_id": "r", "after": 1e999, "ref": 6}',
    '{"op": "subscribe", "run_id": "r", "after": 1' + "0" * 400 + ', "ref": 7}',
    '{"op": "start", "agent": "counter", "input": [], "ref": 8}',
    '{"op": "start", "agent": "counter", "input": {"n": "many"}, "ref": 9}',
    '{"op": "respond", "run_id": "\\ud800", "request_id": "q", "ref": 10}',
    '{"op": "stop", "run_id": "\\u0000\\u202e", "ref": 11}',
    '{"op": "ping", "ref": {"a": 1}}',
    '{"op": "ping", "extra": true, "ref": 12}',
    "[" * 100_000,
    '{"op": "send", "thread_id": null, "content": 1, "ref": 13}',
    b"\xff\xfe\x00binary",
    bytes(range(256)),
]


@dataclass(eq=False)
class RunNote:
    """What the clients know of a run: who started it, its epoch, the last index seen."""

    run_id: str
    agent: str
    epoch: str
    last_seen: int = 0
    ended: bool = False


@dataclass
class World:
    """What every client of one chaos run shares."""

    stats: Stats
    url: str
    deadline: float
    burst: int
    up: asyncio.Event = field(default_factory=asyncio.Event)
    generation: int = 0
    runs: dict[str, RunNote] = field(default_factory=dict)

    def note(self, tab: Tab) -> None:
        """Fold what ``tab`` holds into the shared notes (epochs, last indexes seen)."""
        for stream in tab.streams.values():
            note = self.runs.get(stream.run_id)
            if note is None or stream.epoch is None or stream.cursor is None:
                continue
            # Only a stream subscribed now (or ended) holds the run's current epoch: one
            # cut off by the kill still holds the old one.
            if not (stream.live or stream.ended) or stream.awaiting_reset or stream.after_reset:
                continue
            if stream.epoch != note.epoch:
                note.epoch, note.last_seen = stream.epoch, stream.cursor
            note.last_seen = max(note.last_seen, stream.cursor)
            note.ended = note.ended or stream.ended


class Client:
    """One chaos client: a tab and a loop of random actions until the deadline."""

    def __init__(self, world: World, name: str, rng: random.Random) -> None:
        self.world = world
        self.rng = rng
        self.tab = Tab(name, world.stats, generation=lambda: world.generation)
        self.own: set[str] = set()
        self.threads: list[str] = []
        self.finished_at = 0.0

    async def run(self) -> None:
        await self.reconnect()
        while time.monotonic() < self.world.deadline:
            try:
                if not self.tab.connected:
                    await self.reconnect()
                await self.step()
            except ConnectionLostError:
                continue
            self.world.note(self.tab)
            # Think time: a client is a person's tab, not a load generator.
            await asyncio.sleep(self.rng.uniform(0.01, 0.06))
        self.finished_at = time.monotonic()

    async def reconnect(self) -> None:
        """Connect (to the server of now, after a restart), then resume every stream."""
        for attempt in range(200):
            await self.world.up.wait()
            try:
                await self.tab.connect(self.world.url)
                await self.tab.resume_all()
                return
            except (OSError, InvalidHandshake, TimeoutError, ConnectionLostError):
                await asyncio.sleep(min(0.05 * (attempt + 1), 0.5))  # backoff
        raise ChaosError(f"{self.tab.name}: could not reconnect")

    async def step(self) -> None:
        tab, rng = self.tab, self.rng
        live_own = [s for s in tab.live_streams() if s.run_id in self.own]
        waiting = [s for s in tab.live_streams() if s.request_id is not None]
        others = [
            note
            for note in self.world.runs.values()
            if note.run_id not in tab.streams and not note.ended
        ]
        parked = [s for s in tab.streams.values() if s.parked and not s.ended]
        actions: list[tuple[float, Callable[[], Any]]] = [
            (3.0 if len(live_own) < 3 else 0.0, self.start),
            (2.0 if others else 0.0, lambda: self.join(rng.choice(others))),
            (1.0 if tab.live_streams() else 0.1, self.drop),
            (1.2 if self.world.runs else 0.0, self.stop),
            (4.0 if waiting else 0.0, lambda: self.respond(rng.choice(waiting))),
            (0.4 if waiting else 0.0, lambda: self.respond(rng.choice(waiting), stale=True)),
            (0.15, self.burst),
            (0.8, self.bad),
            (0.4 if self.world.runs else 0.0, self.huge_cursor),
            (0.5 if tab.live_streams() else 0.0, self.unsubscribe),
            (1.0 if parked else 0.0, lambda: tab.resume(rng.choice(parked))),
            (0.5 if self.threads else 0.0, self.thread_send),
        ]
        weights = [w for w, _ in actions]
        _, action = rng.choices(actions, weights=weights)[0]
        await action()

    async def start(self) -> None:
        kind = self.rng.choice(["counter", "counter", "demo", "ask", "ask"])
        if kind == "counter":
            input: Frame = {
                "n": self.rng.randint(20, 250),
                "delay_s": self.rng.uniform(0.005, 0.02),
            }
        elif kind == "demo":
            input = {"tokens": self.rng.randint(5, 40), "speed": self.rng.uniform(200, 1000)}
        else:
            input = {"prompt": "chaos?"}
        reply = await self.tab.start(kind, input)
        if reply.get("ok"):
            run = reply["result"]["run"]
            self.own.add(run["run_id"])
            self.threads.append(run["thread_id"])
            self.world.runs[run["run_id"]] = RunNote(run["run_id"], kind, run["epoch"])

    async def join(self, note: RunNote) -> None:
        choices: list[int | str] = [0, self.rng.randint(0, note.last_seen), "latest"]
        after = self.rng.choice(choices)
        await self.tab.subscribe(
            note.run_id, after, epoch=note.epoch, snapshot=self.rng.random() < 0.3
        )

    async def drop(self) -> None:
        await self.tab.drop()
        await self.reconnect()

    async def stop(self) -> None:
        live = [n for n in self.world.runs.values() if not n.ended]
        note = self.rng.choice(live or list(self.world.runs.values()))
        reply = await self.tab.request("stop", run_id=note.run_id)
        if reply.get("ok"):
            self.world.stats.stops += reply["result"].get("stopping") is True
        elif reply["error"]["code"] not in LIMIT_CODES:
            self.tab.stats.violate(f"{self.tab.name}: stop {note.run_id}: {reply['error']}")

    async def respond(self, stream: Stream, *, stale: bool = False) -> None:
        request_id = f"req_stale_{self.rng.randrange(10**9)}" if stale else stream.request_id
        reply = await self.tab.request(
            "respond", run_id=stream.run_id, request_id=request_id, value={"chaos": True}
        )
        if stale:
            self.world.stats.stale_responds += 1
            if reply.get("ok") or reply["error"]["code"] not in {"not_waiting", *LIMIT_CODES}:
                self.tab.stats.violate(f"{self.tab.name}: respond with a stale id: {reply!r:.200}")
        elif reply.get("ok"):
            self.world.stats.responds += 1
        elif reply["error"]["code"] not in {"not_waiting", *LIMIT_CODES}:
            # not_waiting: another client answered or stopped it first.
            self.tab.stats.violate(f"{self.tab.name}: respond: {reply['error']}")

    async def burst(self) -> None:
        # Hundreds of pings at once; the largest outrun the default bucket (1,000).
        replies = await self.tab.burst(self.rng.randint(100, self.world.burst))
        for reply in replies:
            if not reply.get("ok") and reply["error"]["code"] != "rate_limited":
                self.tab.stats.violate(f"{self.tab.name}: burst ping got {reply['error']}")

    async def bad(self) -> None:
        data = self.rng.choice(BAD_FRAMES)
        self.world.stats.bad_inputs += 1
        reply = await self.tab.send_raw(data)
        allowed = {"bad_request", "not_found", *LIMIT_CODES}
        if reply.get("ok") or reply["error"]["code"] not in allowed:
            self.tab.stats.violate(f"{self.tab.name}: bad frame {data[:80]!r} got {reply!r:.200}")
        await self.tab.ping()  # the connection is still usable

    async def huge_cursor(self) -> None:
        note = self.rng.choice(list(self.world.runs.values()))
        self.world.stats.bad_inputs += 1
        reply = await self.tab.request("subscribe", run_id=note.run_id, after=10**15)
        if reply.get("ok") or reply["error"]["code"] not in {"cursor_out_of_range", *LIMIT_CODES}:
            self.tab.stats.violate(f"{self.tab.name}: subscribe after 10**15 got {reply!r:.200}")

    async def unsubscribe(self) -> None:
        stream = self.rng.choice(self.tab.live_streams())
        await self.tab.unsubscribe(stream.run_id)

    async def thread_send(self) -> None:
        thread_id = self.rng.choice(self.threads)
        reply = await self.tab.request(
            "send", thread_id=thread_id, content="chaos \u202e\u0000 \U0001f600", agent="echo"
        )
        if reply.get("ok"):
            run = reply["result"]["run"]
            if run is not None:
                self.world.runs[run["run_id"]] = RunNote(run["run_id"], "echo", run["epoch"])
        elif reply["error"]["code"] not in {"run_in_progress", "conflict", *LIMIT_CODES}:
            self.tab.stats.violate(f"{self.tab.name}: send: {reply['error']}")

    async def wind_down(self, timeout_s: float) -> None:
        """Resume what it parked, stop every run it watches, and wait for their ends."""
        tab = self.tab
        for _ in range(3):
            try:
                if not tab.connected:
                    await self.reconnect()
                for stream in [s for s in tab.streams.values() if s.parked and not s.ended]:
                    await tab.resume(stream)
                for stream in tab.live_streams():
                    await tab.request("stop", run_id=stream.run_id)
                break
            except ConnectionLostError:
                continue
        if not await tab.wait_for(lambda: not tab.live_streams(), timeout_s):
            left = [s.run_id for s in tab.live_streams()]
            tab.stats.violate(f"{tab.name}: runs still streaming {timeout_s} s after stop: {left}")


async def fetch_log(tab: Tab, run_id: str, timeout_s: float = 15.0) -> tuple[Frame, list[Frame]]:
    """A run's RunInfo and whole log, read by subscribing from 0 on ``tab`` (which checks
    the delivery like any other). The run must end within ``timeout_s``."""
    tab.streams.pop(run_id, None)
    reply = await tab.subscribe(run_id, 0, presence=False)
    if not reply.get("ok"):
        raise ChaosError(f"subscribe {run_id} to read its log: {reply.get('error')}")
    stream = tab.streams[run_id]
    if not await tab.wait_for(lambda: stream.ended, timeout_s):
        raise ChaosError(f"{run_id} did not end within {timeout_s} s")
    info: Frame = reply["result"]["run"]
    return info, stream.events


@dataclass
class CrashReport:
    crashed: int = 0  # runs live at the kill: interrupted (crash), new epoch
    kept: int = 0  # runs ended before the kill: same log, same epoch
    lost_in_window: int = 0
    lost_beyond_window: int = 0
    oldest_lost_s: float = 0.0  # how long before the kill the oldest lost event was appended


async def check_crash(
    stats: Stats,
    verifiers: list[Tab],
    held: dict[str, dict[str, tuple[str | None, list[Frame]]]],
    killed_at: float,
    window_s: float,
) -> CrashReport:
    """Compare what each client held at the kill with each run's log after the restart."""
    report = CrashReport()
    run_ids = sorted({run_id for runs in held.values() for run_id in runs})
    logs: dict[str, tuple[Frame, list[Frame]]] = {}
    await _read_logs(verifiers, run_ids, logs)
    lost: dict[tuple[str, int], float] = {}
    for run_id in run_ids:
        info, log = logs[run_id]
        last = log[-1] if log else {}
        crashed = last.get("data") == {"status": "interrupted", "reason": "crash"}
        report.crashed += crashed
        report.kept += not crashed
        persisted = len(log) - 1 if crashed else len(log)
        for name, runs in held.items():
            if run_id not in runs:
                continue
            epoch, events = runs[run_id]
            if crashed and info["epoch"] == epoch:
                stats.violate(f"{run_id}: interrupted by the crash but its epoch is unchanged")
            if not crashed and epoch is not None and info["epoch"] != epoch:
                stats.violate(f"{run_id}: ended before the kill, but its epoch changed")
            if crashed and events and is_terminal(events[-1]):
                stats.violate(f"{name}: {run_id} was seen ending, then the crash took it back")
            for event in events:
                index = event["i"]
                if index <= persisted:
                    if log[index - 1] != event:
                        stats.violate(f"{name}: {run_id} event {index} differs from the log")
                else:
                    lost[(run_id, index)] = killed_at - event["ts"]
    report.oldest_lost_s = max(lost.values(), default=0.0)
    for age_s in lost.values():
        if age_s > window_s:
            report.lost_beyond_window += 1
        else:
            report.lost_in_window += 1
    if report.lost_beyond_window:
        oldest = max(lost.values())
        stats.violate(
            f"{report.lost_beyond_window} events lost beyond the crash window of "
            f"{window_s:.2f} s (the oldest appended {oldest:.2f} s before the kill)"
        )
    return report


async def check_final(stats: Stats, verifiers: list[Tab], tabs: list[Tab]) -> int:
    """Every event each tab holds equals the run's log at its index; returns the number
    of runs read."""
    run_ids = sorted({run_id for tab in tabs for run_id in tab.streams})
    logs: dict[str, tuple[Frame, list[Frame]]] = {}
    await _read_logs(verifiers, run_ids, logs, stop=True)
    for tab in tabs:
        for run_id, stream in tab.streams.items():
            info, log = logs[run_id]
            if stream.epoch != info["epoch"]:
                continue  # it never resumed after the crash (it checked at the kill)
            for event in stream.events:
                index = event["i"]
                if index > len(log) or log[index - 1] != event:
                    stats.violate(f"{tab.name}: {run_id} event {index} is not the log's")
            if stream.ended and stream.events and stream.events[-1] != log[-1]:
                stats.violate(f"{tab.name}: {run_id} ended on another event than the log")
    return len(run_ids)


async def _read_logs(
    verifiers: list[Tab],
    run_ids: list[str],
    logs: dict[str, tuple[Frame, list[Frame]]],
    *,
    stop: bool = False,
) -> None:
    """Read the logs of ``run_ids`` into ``logs``; ``stop``: stop each first (a run no
    client watches any more, an unanswered ``ask``, must still end)."""
    queue = deque(run_ids)

    async def work(tab: Tab) -> None:
        while queue:
            run_id = queue.popleft()
            if stop:
                await tab.request("stop", run_id=run_id)
            logs[run_id] = await fetch_log(tab, run_id)
            tab.streams.pop(run_id, None)

    async with asyncio.TaskGroup() as group:
        for tab in verifiers:
            group.create_task(work(tab))


@dataclass
class Outcome:
    """The figures of one chaos run, for the report."""

    clients: int
    seconds: float
    events_during: int = 0
    restart_s: float = 0.0
    crash: CrashReport = field(default_factory=CrashReport)
    runs_checked: int = 0
    window_s: float = 0.0
    shutdown_code: int | None = None


async def run_chaos(args: argparse.Namespace, workdir: Path) -> tuple[Stats, Outcome]:
    stats = Stats()
    outcome = Outcome(args.clients, args.seconds)
    rng = random.Random(args.seed)
    flush_s: float = args.flush_interval
    outcome.window_s = args.crash_window if args.crash_window is not None else 2 * flush_s
    server = ServerProcess(
        workdir / "chaos.db", workdir / "server.log", ["--flush-interval", str(flush_s)]
    )
    url = await server.start()
    began = time.monotonic()
    world = World(stats, url, began + args.seconds, args.burst)
    world.up.set()
    clients = [
        Client(world, f"c{k}", random.Random(rng.randrange(2**32))) for k in range(args.clients)
    ]
    # The verifiers count apart: what they read is not load the clients held.
    vstats = Stats()
    verifiers = [Tab(f"v{k}", vstats, generation=lambda: world.generation) for k in range(4)]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(client.run()) for client in clients]
            # The fault the clients cannot make themselves: one SIGKILL, half-way.
            await asyncio.sleep(args.seconds * 0.5)
            world.up.clear()
            world.generation += 1
            killed_at = time.time()
            await server.kill()
            stats.kills += 1
            # What each client held at the kill (copied before any reader runs again).
            held = {
                c.tab.name: {
                    run_id: (s.epoch, list(s.events)) for run_id, s in c.tab.streams.items()
                }
                for c in clients
            }
            restarted = time.monotonic()
            world.url = await server.start()
            outcome.restart_s = time.monotonic() - restarted
            world.up.set()
            for tab in verifiers:
                await tab.connect(world.url)
            outcome.crash = await check_crash(stats, verifiers, held, killed_at, outcome.window_s)
            await asyncio.wait(tasks)
        outcome.events_during = stats.events
        outcome.seconds = max(client.finished_at for client in clients) - began
        async with asyncio.TaskGroup() as group:
            for client in clients:
                group.create_task(client.wind_down(15.0))
        outcome.runs_checked = await check_final(stats, verifiers, [c.tab for c in clients])
        for client in clients:
            await client.tab.close()
        for tab in verifiers:
            await tab.close()
    finally:
        outcome.shutdown_code = await server.terminate()
        for text in vstats.violations:
            stats.violate(text)
    if outcome.shutdown_code != 0:
        stats.violate(f"the server exited with {outcome.shutdown_code} on SIGTERM")
    if stats.violation_count:
        print(f"-- server log (tail)\n{server.tail()}", file=sys.stderr)
    return stats, outcome


def report(stats: Stats, outcome: Outcome) -> str:
    crash = outcome.crash
    rate = outcome.events_during / max(outcome.seconds, 1e-9)
    lines = [
        f"clients: {outcome.clients}, seconds: {outcome.seconds:.1f}",
        f"load held: {outcome.events_during:,} events delivered ({rate:,.0f}/s), "
        f"{stats.replies:,} replies to {stats.frames_sent:,} frames",
        f"faults injected: {stats.drops} drops, {stats.stops} stops, kills: {stats.kills} "
        f"(restart in {outcome.restart_s:.2f} s), {stats.bursts} ping bursts "
        f"({stats.burst_pings:,} pings, {stats.rate_limited:,} rate_limited)",
        f"ops: {stats.starts} starts, {stats.responds} answers "
        f"(+{stats.stale_responds} stale), {stats.resumes} resumes, {stats.resets} resets",
        f"bad inputs tried: {stats.bad_inputs} (each answered, connection kept)",
        f"crash: {crash.crashed} live runs interrupted (new epoch), {crash.kept} ended runs "
        f"kept; {outcome.runs_checked} runs checked against their logs at the end",
        f"events lost: {crash.lost_beyond_window} beyond the crash window "
        f"({crash.lost_in_window} within it: appended less than {outcome.window_s:.2f} s "
        f"before the kill, after the last flush; the oldest {crash.oldest_lost_s:.2f} s)",
        f"duplicates: {stats.duplicates}, gaps: {stats.gaps}, "
        f"after terminal: {stats.after_terminal}",
        f"invariants: {'ok' if not stats.violation_count else 'BROKEN'} "
        f"({stats.violation_count} violations)",
    ]
    lines += [f"  - {text}" for text in stats.violations]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``runcast bench chaos`` (on the bench parser)."""
    group = parser.add_argument_group("chaos (runcast bench chaos)")
    group.add_argument("--clients", type=int, default=20, help="chaos: clients")
    group.add_argument("--seconds", type=float, default=15.0, help="chaos: seconds of load")
    group.add_argument(
        "--burst", type=int, default=1200, help="chaos: most pings in one burst (from 100)"
    )
    group.add_argument(
        "--flush-interval", type=float, default=0.2, help="chaos: the server's flush interval"
    )
    group.add_argument(
        "--crash-window",
        type=float,
        default=None,
        help="chaos: seconds before a kill whose events may be lost (default: 2 flush "
        "intervals, PROTOCOL.md §4)",
    )


def main(args: argparse.Namespace) -> int:
    """``runcast bench chaos``: print the report; 1 when an invariant broke."""
    if args.clients < 1 or args.seconds <= 0:
        print("runcast bench chaos: --clients and --seconds must be positive", file=sys.stderr)
        return 2
    if getattr(args, "url", None):
        print("runcast bench chaos: starts (and kills) its own server; no --url", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="runcast-chaos-") as tmp:
        try:
            stats, outcome = asyncio.run(run_chaos(args, Path(tmp)))
        except (ChaosError, ExceptionGroup) as exc:
            failure = _first_chaos_error(exc)
            if failure is None:
                raise
            print(f"runcast bench chaos: FAILED: {failure}", file=sys.stderr)
            return 1
    print(f"runcast bench chaos, {time.strftime('%Y-%m-%d %H:%M')}")
    print(report(stats, outcome))
    return 1 if stats.violation_count else 0


def _first_chaos_error(exc: BaseException) -> ChaosError | None:
    """The ChaosError in ``exc`` (itself, or inside task groups' exception groups)."""
    if isinstance(exc, ChaosError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _first_chaos_error(inner)
            if found is not None:
                return found
    return None
