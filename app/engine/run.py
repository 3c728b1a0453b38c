"""LiveRun: a run's event log, its wake-up, its current snapshot and its agent task.

Readers are cursors: ``read_after(cursor)`` never waits, ``wait_after(cursor)`` waits
until there is something after the cursor (or the run is poked, for presence). There is
no per-reader queue; a thousand readers share one log and one copy of every event.

A terminal status event is *staged* before it is *published*: the flusher writes it to
disk first, and only then do readers see it, so a client never sees a run end that a
crash could take back (PROTOCOL.md §4).

An ended run can be *deleted* (PROTOCOL.md §10): readers are woken, every read after
that finds nothing, and a reader that sees ``deleted`` tells its client and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.config import Settings
from app.core import events as ev
from app.core import snapshot
from app.core.events import Event, JsonObject, RunStatus, decode, encode
from app.core.log import EventLog
from app.core.turns import TurnPlan
from app.errors import CursorOutOfRangeError, PayloadTooLargeError
from app.store.base import RunRecord, RunWrite, Store

Clock = Callable[[], float]

# How long a reader that finds a run's events gone from disk waits for the deletion that
# erased them to be announced (it follows its commit at once).
DELETION_WAIT_S = 5.0


def setting_default(name: str) -> Any:
    """The default of the setting ``name``: every default lives in ``app.config``."""
    return Settings.model_fields[name].default


class Backlog:
    """Events appended to a run but not yet on disk, summed over every run that shares it
    (the runs of one manager): one budget for the whole server, kept O(1) per append.

    ``written`` counts the events that left the backlog for the disk, so that every event
    ever appended is ``appended`` (one or the other) with nothing added per append."""

    __slots__ = ("events", "written")

    def __init__(self) -> None:
        self.events = 0
        self.written = 0

    @property
    def appended(self) -> int:
        """Events appended (a staged terminal event included) over the backlog's life."""
        return self.events + self.written


@dataclass(frozen=True, slots=True)
class Retention:
    """How much of a run stays in memory, where the rest is read from, and how much may
    wait for the disk.

    Only events already on disk leave memory: a run keeps its last ``tail_events`` (plus
    a quarter, so trimming is amortized), and reads before them page from ``store``. A
    keyframe (the state at an index) is kept every ``keyframe_every`` events, so the state
    at any index costs at most that many folds. Past ``max_unflushed`` events not yet on
    disk, summed over every run sharing this Retention (``backlog``), an agent's appends
    wait for the flusher (``commit``). An event whose JSON is over ``max_event_bytes`` is
    refused.
    """

    store: Store | None = None
    commit: Callable[[LiveRun], Awaitable[None]] | None = None
    tail_events: int = setting_default("tail_events")
    keyframe_every: int = setting_default("keyframe_every")
    max_unflushed: int = setting_default("max_unflushed")
    max_event_bytes: int = setting_default("max_event_bytes")
    backlog: Backlog = field(default_factory=Backlog)


class LiveRun:
    """One run in memory. Only the engine mutates it; transport only reads and waits."""

    def __init__(
        self,
        *,
        run_id: str,
        thread_id: str,
        agent: str,
        input: JsonObject,
        epoch: str,
        created_at: float,
        clock: Clock = time.time,
        on_dirty: Callable[[LiveRun], None] | None = None,
        retention: Retention | None = None,
        title: str | None = None,
        metadata: JsonObject | None = None,
    ) -> None:
        self.run_id = run_id
        self.thread_id = thread_id
        self.agent = agent
        self.input = input
        self.title = title
        self.metadata: JsonObject = metadata if metadata is not None else {}
        self.deleted = False
        self.created_at = created_at
        self.updated_at = created_at
        self.log = EventLog(epoch)
        self.retention = retention = retention or Retention()
        self._backlog = retention.backlog
        # An event of at most this many characters is within max_event_bytes whatever they
        # are (UTF-8 takes at most 4 bytes a character): only a longer one is measured.
        self._surely_small = retention.max_event_bytes // 4
        self.state: JsonObject = snapshot.initial_state()
        self.watchers = 0
        self._clock = clock
        self._on_dirty = on_dirty
        # Wake-ups, created only when someone waits: ``_wakeup`` for a new event or the
        # end (every reader), ``_poked`` for those too and for a change of watchers
        # (readers that send presence). An idle reader without presence is not woken
        # when other connections join: C joins cost O(C), not O(C^2), wake-ups.
        self._wakeup: asyncio.Event | None = None
        self._poked: asyncio.Event | None = None
        self._ended = asyncio.Event()
        self._deleted: asyncio.Event | None = None
        # The page a reader last sent, shared with the readers woken with it (shared_text).
        self._shared: tuple[Event, Event, str] | None = None
        # Persistence bookkeeping, owned by the flusher.
        self.flushed_index = 0
        self.record_flushed = False
        # Several nodes: another node took the run over; nothing more of it is written.
        self.fenced = False
        self.staged: Event | None = None
        self.keyframes: list[tuple[int, str]] = []  # not yet on disk: (index, state JSON)
        # Task bookkeeping, owned by the manager.
        self.task: asyncio.Task[None] | None = None
        self.agent_task: asyncio.Task[Any] | None = None
        self.stop_by: str | None = None
        self.stop_reason: str | None = None
        self.abandon: asyncio.Future[None] | None = None
        self.pending_input: tuple[str, asyncio.Future[Any]] | None = None
        # A queued run: ``go`` resolves when its thread's turn comes; ``plan`` says which
        # turns it writes then (a TurnPlan; None for a run without turns).
        self.go: asyncio.Future[None] | None = None
        self.plan: TurnPlan | None = None

    @classmethod
    def from_record(
        cls, record: RunRecord, tail: list[Event], retention: Retention | None = None
    ) -> LiveRun:
        """A run read back from the store with the ``tail`` of its log (its last events);
        reads before the tail page from the store."""
        run = cls._named_as(record, retention)
        first = tail[0].index if tail else record.last_index + 1
        run.log = EventLog(record.epoch, tail, first_index=first)
        run.state = record.snapshot
        run.updated_at = record.updated_at
        run.flushed_index = run.log.last_index
        run.record_flushed = True
        if run.status.is_terminal:
            run._ended.set()
        return run

    @classmethod
    def view(cls, source: LiveRun, retention: Retention | None = None) -> LiveRun:
        """An empty run named as ``source``, never written (``fenced``): what another
        process acknowledged of ``source``'s log is appended to it (a cluster node's view
        of the runs it owns)."""
        run = cls._named_as(source, retention)
        run.fenced = True
        return run

    @classmethod
    def _named_as(cls, source: RunRecord | LiveRun, retention: Retention | None) -> LiveRun:
        """A new run with ``source``'s id, thread, agent, input, epoch, birth and names."""
        return cls(
            run_id=source.run_id,
            thread_id=source.thread_id,
            agent=source.agent,
            input=source.input,
            epoch=source.epoch,
            created_at=source.created_at,
            retention=retention,
            title=source.title,
            metadata=source.metadata,
        )

    # -- reading ---------------------------------------------------------------------

    @property
    def epoch(self) -> str:
        return self.log.epoch

    @property
    def last_index(self) -> int:
        return self.log.last_index

    @property
    def status(self) -> RunStatus:
        return RunStatus(self.state["status"])

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def read_after(self, cursor: int, limit: int | None = None) -> list[Event]:
        """Events after ``cursor``, at most ``limit``; never waits.

        Raises:
            CursorOutOfRangeError: ``cursor`` is past the last index.
        """
        if cursor > self.log.last_index:
            raise CursorOutOfRangeError(cursor, self.log.last_index)
        return self.log.read_after(cursor, limit)

    async def read_page(self, cursor: int, limit: int) -> list[Event]:
        """Events after ``cursor``, at most ``limit``: from memory, or from the store when
        ``cursor`` is older than the tail in memory. Every event before the tail is on
        disk, so a reader paging from disk joins the tail with no gap and no duplicate.

        Raises:
            CursorOutOfRangeError: ``cursor`` is past the last index.

        Cancellation: safe; nothing is consumed.
        """
        if self.deleted:
            return []  # erased, from memory and disk: nothing more to read
        if self.log.holds(cursor):
            return self.log.read_after(cursor, limit)
        if cursor > self.log.last_index or cursor < 0:
            raise CursorOutOfRangeError(cursor, self.log.last_index)
        store = self.retention.store
        assert store is not None, f"run {self.run_id} trimmed its log with no store"
        events = await store.read_events(self.run_id, cursor, limit)
        if not events and limit > 0:
            # Events before the last index are on disk, unless the run was just erased:
            # the reader learns that from ``deleted``, once the deletion is announced.
            if self._deleted is None:
                self._deleted = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DELETION_WAIT_S):
                    await self._deleted.wait()
        return events

    def shared_text(
        self, events: list[Event], build: Callable[[str, str, list[Event]], str]
    ) -> str:
        """``build(run_id, epoch, events)`` (a frame of ``events``, a page read from this
        run), made once for every reader that sends the same page: a run's watchers wake
        together and read the same events, so the first builds the text and the others
        reuse it. The text is kept until the event loop's next turn only: an idle run
        holds none.

        The same first and last event objects mean the same page: the log is contiguous
        and its events are immutable (a page read from the store has events of its own).
        """
        first, last = events[0], events[-1]
        shared = self._shared
        if shared is not None and shared[0] is first and shared[1] is last:
            return shared[2]
        text = build(self.run_id, self.log.epoch, events)
        if shared is None:
            asyncio.get_running_loop().call_soon(self._forget_shared)
        self._shared = (first, last, text)
        return text

    def _forget_shared(self) -> None:
        self._shared = None

    async def wait_after(self, cursor: int, *, presence: bool = True) -> None:
        """Return once an event after ``cursor`` exists, the run has ended (or has been
        deleted), or (when ``presence``) ``poke`` was called.

        Cancellation: always safe; waiting consumes nothing and changes no state.
        """
        if self.log.last_index > cursor or self._ended.is_set():
            return
        if presence:
            if self._poked is None:
                self._poked = asyncio.Event()
            await self._poked.wait()
        else:
            if self._wakeup is None:
                self._wakeup = asyncio.Event()
            await self._wakeup.wait()

    async def wait_ended(self) -> None:
        """Return once the terminal event is published.

        Cancellation: always safe.
        """
        await self._ended.wait()

    async def wait_started(self) -> None:
        """Return once the run has left ``queued`` (its first event) or has ended.

        Cancellation: always safe.
        """
        while self.log.last_index == 0 and not self._ended.is_set():
            await self.wait_after(0)

    def poke(self) -> None:
        """Wake the readers waiting with ``presence`` without appending (the number of
        watchers changed)."""
        poked = self._poked
        if poked is not None:
            self._poked = None
            poked.set()

    def _wake(self) -> None:
        """Wake every waiting reader (a new event, or the end)."""
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set()
        poked = self._poked
        if poked is not None:
            self._poked = None
            poked.set()

    async def snapshot_at(self, index: int | None = None) -> JsonObject:
        """The run's state after events 1..``index`` (default: the last index), folded
        from the nearest keyframe at or before ``index``: O(keyframe_every), not O(index).

        Raises:
            CursorOutOfRangeError: ``index`` is past the last index (field ``at``).

        Cancellation: safe.
        """
        last = self.log.last_index
        if index is None or index == last:
            return self.state
        if index < 0 or index > last:
            raise CursorOutOfRangeError(index, last, field="at")
        base, state = await self._keyframe(index)
        cursor = base
        while cursor < index:
            events = await self.read_page(cursor, min(index - cursor, 10_000))
            for event in events:
                snapshot.apply(state, event.type, event.data)
            cursor = events[-1].index
        return state

    async def _keyframe(self, index: int) -> tuple[int, JsonObject]:
        """The newest keyframe at or before ``index`` (a fresh state object)."""
        for at, state_json in reversed(self.keyframes):
            if at <= index:
                return at, decode(state_json)
        store = self.retention.store
        found = await store.read_keyframe(self.run_id, index) if store is not None else None
        if found is None:
            return 0, snapshot.initial_state()
        return found

    async def snapshot_frame(self, index: int | None = None) -> JsonObject:
        at = self.log.last_index if index is None else index
        return {
            "run_id": self.run_id,
            "index": at,
            "epoch": self.epoch,
            "state": await self.snapshot_at(at),
        }

    def info(self) -> JsonObject:
        """RunInfo of PROTOCOL.md §2."""
        return {
            "run_id": self.run_id,
            "thread_id": self.thread_id,
            "agent": self.agent,
            "status": self.status.value,
            "epoch": self.epoch,
            "last_index": self.log.last_index,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "watchers": self.watchers,
            "title": self.title,
            "metadata": self.metadata,
        }

    def statistics(self) -> JsonObject:
        return {
            "events": len(self.log),
            "unflushed": self.log.last_index - self.flushed_index,
            "watchers": self.watchers,
        }

    # -- writing (engine only) ----------------------------------------------------------

    def append(self, type: str, data: JsonObject) -> Event:
        """Append a non-terminal event, fold it into the state and wake readers.

        Raises:
            PayloadTooLargeError: the event's JSON is over ``max_event_bytes`` (field
                ``data``); nothing is appended.
            TypeError: ``data`` is not JSON; nothing is appended.
        """
        assert self.staged is None and not self._ended.is_set(), (
            f"append to ended run {self.run_id}"
        )
        if type == ev.STATUS:
            new = RunStatus(data["status"])
            assert not new.is_terminal, "terminal status goes through stage_terminal()"
            assert ev.can_transition(self.status, new), f"{self.status} -> {new}"
        log = self.log
        event = log.append(type, data, self._clock())
        if len(event.json) > self._surely_small:
            try:
                self._check_size(event)
            except BaseException:
                log.take_back(event)  # before anything could read it: no await between
                raise
        self._backlog.events += 1
        if type in ev.STANDARD_TYPES:  # an agent's own type leaves the state as it is
            snapshot.apply(self.state, type, data)
        self.updated_at = event.ts
        index = event.index
        if index % self.retention.keyframe_every == 0:
            self.keyframes.append((index, encode(self.state)))
        # Wake the readers: only the first append after they wait finds any (they read the
        # rest of a burst with it), so the others cost two tests.
        if self._wakeup is not None or self._poked is not None:
            self._wake()
        if self._on_dirty is not None:
            self._on_dirty(self)
        return event

    def _check_size(self, event: Event) -> None:
        """Raises: PayloadTooLargeError (field ``data``) past ``max_event_bytes``."""
        limit = self.retention.max_event_bytes
        text = event.json
        # The encoding is UTF-8 (orjson's); an ASCII text (an O(1) test) is one byte a
        # character, so only text with other characters is encoded again to be measured.
        size = len(text) if text.isascii() else len(text.encode())
        if size > limit:
            raise PayloadTooLargeError(size, limit, field="data")

    @property
    def backlog(self) -> int:
        """Events of this run appended but not yet on disk."""
        return self.log.last_index - self.flushed_index

    async def throttle(self) -> None:
        """Wait for the flusher while more than ``max_unflushed`` events of all runs (that
        share this run's Retention) are not on disk: when the store is slower than the
        agents (or failing), they slow down instead of memory growing without bound.

        Cancellation: safe; the events stay in memory and are written later.
        """
        commit = self.retention.commit
        if commit is not None and self._backlog.events > self.retention.max_unflushed:
            await commit(self)

    def stage_terminal(self, data: JsonObject) -> Event:
        """Build the terminal status event; readers see it only after ``publish_staged``."""
        assert self.staged is None and not self.ended, f"run {self.run_id} ended twice"
        assert RunStatus(data["status"]).is_terminal
        self.staged = self.log.next_event(ev.STATUS, data, self._clock())
        self._backlog.events += 1
        if self._on_dirty is not None:
            self._on_dirty(self)
        return self.staged

    def publish_staged(self) -> None:
        """Make the staged terminal event visible: append it and end the run."""
        event = self.staged
        assert event is not None
        self.log.add(event)
        snapshot.apply(self.state, event.type, event.data)
        self.updated_at = event.ts
        self.staged = None
        self._ended.set()
        self._wake()

    def absorb(self, events: Sequence[Event], flushed: int = 0) -> None:
        """A mirror's append (several nodes): events the run's owner appended, oldest
        first, as its broker delivers them; those already held are skipped, and a terminal
        status event ends the mirror. ``flushed``: the owner's index on disk, up to which
        the mirror may trim its log (older reads page from the store)."""
        log = self.log
        for event in events:
            if event.index <= log.last_index:
                continue
            assert event.index == log.last_index + 1, f"gap in mirror of {self.run_id}"
            log.add(event)
            snapshot.apply(self.state, event.type, event.data)
            self.updated_at = event.ts
            if event.type == ev.STATUS and RunStatus(event.data["status"]).is_terminal:
                self._ended.set()
        if flushed > self.flushed_index:
            self.flushed_index = min(flushed, log.last_index)
        tail = self.retention.tail_events
        if len(log) > tail + tail // 4:
            log.trim_before(min(self.flushed_index + 1, log.last_index - tail + 1))
        self._wake()

    def cut_off(self) -> None:
        """End a mirror whose log is no longer the run's (a new epoch): its readers stop,
        with no terminal event."""
        self._ended.set()
        self._wake()

    def mark_deleted(self) -> None:
        """The run was erased (it had ended): wake every reader, each to find ``deleted``
        set and nothing more to read, and drop the log's tail."""
        assert self.ended, f"deleting live run {self.run_id}"
        self.deleted = True
        self.log.trim_before(self.log.last_index + 1)
        self.keyframes = []
        if self._deleted is not None:
            self._deleted.set()
        self._wake()

    # -- persistence (flusher only) -----------------------------------------------------

    def unflushed(self) -> RunWrite:
        """Row and events not yet written, the staged terminal event included."""
        events = self.log.read_after(self.flushed_index)
        # A copy, as of ``last``: the store encodes it later (after it has a connection),
        # and the events appended meanwhile must not be in it.
        state = decode(encode(self.state))
        last = self.log.last_index
        updated_at = self.updated_at
        if self.staged is not None:
            events = [*events, self.staged]
            snapshot.apply(state, self.staged.type, self.staged.data)
            last = self.staged.index
            updated_at = self.staged.ts
        record = RunRecord(
            run_id=self.run_id,
            thread_id=self.thread_id,
            agent=self.agent,
            input=self.input,
            status=state["status"],
            epoch=self.epoch,
            last_index=last,
            snapshot=state,
            created_at=self.created_at,
            updated_at=updated_at,
            title=self.title,
            metadata=self.metadata,
        )
        return RunWrite(record=record, events=events, keyframes=list(self.keyframes))

    def mark_flushed(self, index: int) -> None:
        """Everything up to ``index`` is on disk: forget written keyframes, and trim the
        log to its tail (only events on disk leave memory)."""
        if index > self.flushed_index:
            self._backlog.events -= index - self.flushed_index
            self._backlog.written += index - self.flushed_index
            self.flushed_index = index
        self.record_flushed = True
        if self.keyframes and self.keyframes[0][0] <= self.flushed_index:
            self.keyframes = [kf for kf in self.keyframes if kf[0] > self.flushed_index]
        tail = self.retention.tail_events
        if len(self.log) > tail + tail // 4:
            self.log.trim_before(min(self.flushed_index + 1, self.log.last_index - tail + 1))

    @property
    def needs_flush(self) -> bool:
        if self.fenced:
            return False
        target = self.staged.index if self.staged is not None else self.log.last_index
        return not self.record_flushed or self.flushed_index < target
