"""A node of a cluster (PROTOCOL.md §9): the run manager of one process, whose runs'
logs go through Redis and whose state is in the PostgreSQL every node shares.

The engine runs agents exactly as on one node: a run executes in the ``LiveRun`` of the
node that accepted its start (its *source*, in ``runs``). What readers read is a *view*
(``views``), a LiveRun that only ever holds events Redis has acknowledged:

- on the owner, the publisher ships every new event of its sources to their streams in
  one pipelined, fenced call per batch, then adds them to the views;
- on every other node with readers of the run, ONE mirror is fed by the node's single
  blocking XREAD over all its mirrored streams; a gap (a cursor older than the stream's
  tail) is read from PostgreSQL, once.

So every event any reader anywhere has received is in Redis or on disk: a node's death
loses none of them. Ownership: the owner renews a lease per run (every lease / 3, one
call for all its runs); the sweeper on every node takes over, in PostgreSQL (one winner),
each live run whose lease expired, joins what its stream holds to the disk and ends it
``interrupted`` (``node_lost``). The epoch changes only when the stream is gone (Redis
lost it): events a reader may have received may be gone with it.

Signals (stop, respond) from a node that does not own the run are recorded in
PostgreSQL and published on Redis; the owner acts on the message, or on the record at its
next renewal. Presence and thread changes are published to every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from app.cluster.broker import BROKER_ERRORS, Broker, RunAppend
from app.core import events as ev
from app.core import snapshot
from app.core.events import Event, JsonObject, RunStatus, decode, encode
from app.core.ids import new_epoch
from app.core.turns import Turn
from app.engine.agent import AgentCatalog, AgentSpec
from app.engine.manager import REVIVED_TAIL, EngineSettings, RunManager, record_info
from app.engine.run import Backlog, LiveRun, Retention
from app.engine.threads import HasInfo, RunInfo, ThreadChange
from app.errors import (
    ConflictError,
    NotFoundError,
    NotWaitingError,
    OverloadedError,
    RunInProgressError,
)
from app.store.base import RunRecord, RunWrite, ThreadRecord
from app.store.postgres import PostgresStore

logger = logging.getLogger(__name__)

RETRY_S = 0.5  # wait after Redis failed, before trying again
READ_BLOCK_MS = 1_000  # the mirrors' blocking read returns at least this often
CLOSE_WAIT_S = 2.0  # what close() waits for the cluster's tasks to end
CHANGE_ATTEMPTS = 5  # a thread change that lost a race to another node is decided again
PRESENCE_TTL_MS = 3_600_000  # how long a run's presence outlives the last change of it


def default_node_id() -> str:
    """Host and pid: unique among the processes of a cluster."""
    return f"{socket.gethostname()}:{os.getpid()}"


class ClusterManager(RunManager):
    """``RunManager`` over a shared PostgreSQL store and a Redis broker."""

    def __init__(
        self,
        store: PostgresStore,
        agents: AgentCatalog,
        settings: EngineSettings,
        broker: Broker,
        lease_s: float,
    ) -> None:
        store.node_id = broker.node_id
        super().__init__(store, agents, settings)
        self.pg = store
        self.broker = broker
        self.node_id = broker.node_id
        self.lease_s = lease_s
        self.flusher.on_fenced = self._lost
        # What readers read: a view per run, fed only with events Redis holds.
        self.views: dict[str, LiveRun] = {}
        self._mirror_retention = Retention(
            store=store,
            tail_events=self.settings.tail_events,
            keyframe_every=self.settings.keyframe_every,
            max_event_bytes=self.settings.max_event_bytes,
            backlog=Backlog(),
        )
        self._to_publish: dict[str, LiveRun] = {}  # sources with events not yet in Redis
        self._published: dict[str, int] = {}  # run id -> last index in its stream
        self._publish = asyncio.Event()
        self._mirrors: dict[str, LiveRun] = {}  # views fed from Redis (runs of other nodes)
        self._reader_id: int | None = None
        self._reader_blocked = False
        self._mirrors_changed = asyncio.Event()
        self._local_watchers: dict[str, int] = {}
        self._remote_watchers: dict[str, dict[str, int]] = {}
        self._presence_dirty: set[str] = set()
        self._suspects: dict[str, float] = {}
        self._outbox: list[str] = []  # messages to the other nodes, in order
        self._outbox_ready = asyncio.Event()
        self._remote_active: dict[str, str] = {}  # thread id -> its run active on another node
        self._tasks: list[asyncio.Task[Any]] = []

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        await self.broker.open()
        await super().open()
        loops: list[tuple[str, Callable[[], Awaitable[None]], float]] = [
            ("publisher", self._publish_loop, 0.0),
            ("mirrors", self._read_loop, 0.0),
            ("messages", self._message_loop, 0.0),
            ("outbox", self._send_loop, 0.0),
            ("leases", self._renew_once, self.lease_s / 3),
            ("sweeper", self._sweep_once, self.lease_s / 5),
        ]
        for name, step, every_s in loops:
            self._tasks.append(
                asyncio.create_task(self._keep(name, step, every_s), name=f"cluster {name}")
            )
        logger.info("node %s joined the cluster on %s", self.node_id, self.broker.name)

    async def _keep(
        self, name: str, step: Callable[[], Awaitable[None]], every_s: float
    ) -> NoReturn:
        """Run ``step`` forever (every ``every_s``), again after a failure: Redis or the
        database going away for a while stops nothing for good.

        Cancellation: ends the loop.
        """
        while True:
            try:
                await step()
            except BROKER_ERRORS as exc:
                logger.warning("cluster %s: Redis failed (%s); retrying", name, exc)
                if name == "publisher":
                    self._republish()
                await asyncio.sleep(RETRY_S)
            except Exception:
                logger.exception("cluster %s failed; restarting it", name)
                await asyncio.sleep(RETRY_S)
            else:
                if every_s:
                    await asyncio.sleep(every_s)

    async def close(self) -> None:
        """Close as one node does, then ship the last events (the runs' ends) to Redis."""
        if self.closing:
            return
        await super().close()
        with contextlib.suppress(*BROKER_ERRORS):
            async with asyncio.timeout(self.settings.shutdown_grace_s):
                while self._to_publish:
                    await self._publish_batch()
        await self._wake_reader()  # its blocking read ends now, not at its timeout
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=CLOSE_WAIT_S) if tasks else ((), ())
        if pending:
            logger.warning("shutdown: %d cluster tasks did not end", len(pending))
        await self.broker.close()

    # -- the owner: runs, publishing, leases --------------------------------------------

    def _on_dirty(self) -> Callable[[LiveRun], None]:
        """A run's new events go to the flusher and to Redis."""
        flusher_dirty = self.flusher.mark_dirty

        def dirty(source: LiveRun) -> None:
            flusher_dirty(source)
            self._to_publish[source.run_id] = source
            self._publish.set()

        return dirty

    def _admit(
        self,
        run: LiveRun,
        agent: AgentSpec,
        history: list[JsonObject],
        active: LiveRun | None,
        multitask: str,
    ) -> None:
        self.views[run.run_id] = LiveRun.view(run, self._mirror_retention)
        self._published[run.run_id] = 0
        super()._admit(run, agent, history, active, multitask)

    async def _finish(self, run: LiveRun, data: JsonObject) -> None:
        await super()._finish(run, data)
        if not run.fenced:
            self._to_publish[run.run_id] = run  # its terminal event
            self._publish.set()

    async def _publish_loop(self) -> None:
        while True:
            await self._publish.wait()
            self._publish.clear()
            await self._publish_batch()

    async def _publish_batch(self) -> None:
        """Ship every pending source's new events to Redis in one call, then show them to
        this node's readers. Raises: RedisError (the runs stay pending)."""
        pending, self._to_publish = self._to_publish, {}
        batches: list[tuple[LiveRun, RunAppend]] = []
        for run in pending.values():
            if run.fenced:
                continue
            after = self._published.get(run.run_id, 0)
            events = run.log.read_after(after) if run.log.holds(after) else None
            if events is None:
                # The log was trimmed past what Redis holds (a republish after Redis lost
                # it): what is on disk readers read from there.
                events = run.log.read_after(run.log.first_index - 1)
            if not events:
                continue
            final = run.ended and events[-1].index == run.last_index
            batches.append((run, RunAppend(run.run_id, events, run.flushed_index, final)))
        if not batches:
            return
        # A status change is on disk before any reader sees it: a listing by status on
        # any node (read from the database) then agrees with what its watchers were told.
        changed = [
            (run, batch.events[-1].index)
            for run, batch in batches
            if not run.ended and any(event.type == ev.STATUS for event in batch.events)
        ]
        try:
            if changed:
                await asyncio.gather(*(self.flusher.commit(run, index) for run, index in changed))
            results = await self.broker.append([batch for _, batch in batches])
        except BaseException:
            for run, _ in batches:
                self._to_publish.setdefault(run.run_id, run)
            raise
        for (run, batch), added in zip(batches, results, strict=True):
            if added < 0:
                logger.warning("run_id=%s: another node holds its lease", run.run_id)
                self._lost(run)
                continue
            self._published[run.run_id] = batch.events[-1].index
            view = self.views.get(run.run_id)
            if view is not None and not view.deleted:
                view.absorb(batch.events, run.flushed_index)
                if view.ended:
                    self._linger(run.run_id, view)
            if batch.final:
                self._published.pop(run.run_id, None)

    def _republish(self) -> None:
        """After Redis failed: every live source is published again from what is on disk
        (appends skip what the stream holds; a Redis that restarted holds nothing)."""
        for run_id, run in self.runs.items():
            if run_id in self._published and not run.fenced:
                self._published[run_id] = min(self._published[run_id], run.flushed_index)
                self._to_publish[run_id] = run
        self._publish.set()

    def _owned(self) -> list[LiveRun]:
        return [run for run in self.runs.values() if not run.ended and not run.fenced]

    async def _renew_once(self) -> None:
        """Renew every lease of this node (one call), and act on signals recorded for its
        runs that no message brought."""
        owned = self._owned()
        held = await self.broker.renew([run.run_id for run in owned])
        for run, ok in zip(owned, held, strict=True):
            if not ok:
                logger.warning("run_id=%s: lease lost to another node", run.run_id)
                self._lost(run)
        if owned:
            for signal_id, run_id, body in await self.pg.take_signals([r.run_id for r in owned]):
                self._act(signal_id, run_id, decode(body), recorded=False)

    def _lost(self, run: LiveRun) -> None:
        """Another node took ``run`` over: nothing more of it is written or published
        here; its agent is stopped and it ends here without a word (the new owner has
        ended it for everyone)."""
        if not run.fenced:
            run.fenced = True
            self._to_publish.pop(run.run_id, None)
            self._published.pop(run.run_id, None)
            self._request_stop(run, reason="lost", by=None)

    # -- readers: views and mirrors -----------------------------------------------------

    async def get(self, run_id: str) -> LiveRun:
        """The run's view (a live run), or the ended run. An ended run in memory is
        checked against the database first: another node may have deleted it, and every
        read after a delete answers ``not_found`` on every node (PROTOCOL.md §10)."""
        held = self.views.get(run_id)
        if held is None and (source := self.runs.get(run_id)) is not None and source.ended:
            held = source
        if held is not None and not held.ended:
            return held
        record = await self.store.get_run(run_id)
        if record is None:
            self._forget_deleted(run_id)
            raise NotFoundError(f"no run {run_id}")
        if held is not None:
            return held
        if RunStatus(record.status).is_terminal:
            return await super().get(run_id)
        return await self._mirror(record)

    def _forget_deleted(self, run_id: str) -> None:
        """Another node deleted the run: drop what this one holds of it; its readers
        here are told ``deleted``."""
        self._deleted.add(run_id)
        self._mirrors.pop(run_id, None)
        for held in (self.views.pop(run_id, None), self.runs.pop(run_id, None)):
            if held is not None and held.ended and not held.deleted:
                held.mark_deleted()

    async def _mirror(self, record: RunRecord) -> LiveRun:
        """A view of another node's live run: the disk's tail, then its stream."""
        run_id = record.run_id
        tail_from = max(0, record.last_index - min(self.settings.tail_events, REVIVED_TAIL))
        # As of the record: its snapshot is the state at its last index, no later.
        tail = await self.store.read_events(run_id, tail_from, record.last_index - tail_from)
        try:
            counts = await self.broker.watcher_counts(run_id)
        except BROKER_ERRORS as exc:
            # Redis is away: the view starts from the disk and its reader catches up once
            # Redis is back; meanwhile stop and respond still reach the owner (recorded).
            logger.warning("run_id=%s: mirrored without Redis for now (%s)", run_id, exc)
            counts = {}
        view = self.views.get(run_id)
        if view is not None:  # another reader made it meanwhile
            return view
        view = LiveRun.from_record(record, tail, self._mirror_retention)
        view.fenced = True
        self._remote_watchers[run_id] = {
            node: count for node, count in counts.items() if node != self.node_id
        }
        view.watchers = sum(self._remote_watchers[run_id].values())
        self.views[run_id] = view
        self._mirrors[run_id] = view
        self._mirrors_changed.set()
        await self._wake_reader()
        # What the stream holds now: the blocking read may have begun without this run.
        with contextlib.suppress(*BROKER_ERRORS):
            events, _ = await self.broker.read_range(run_id, view.last_index)
            if events and view.last_index < events[-1].index:
                await self._feed(view, events, 0)
        return view

    async def _wake_reader(self) -> None:
        """Make the blocking read start again, with the mirrors it has now."""
        if self._reader_blocked and self._reader_id is not None:
            with contextlib.suppress(*BROKER_ERRORS):
                await self.broker.wake_reader(self._reader_id)

    async def _read_loop(self) -> None:
        """The node's ONE reader of Redis: a blocking XREAD over every mirrored stream."""
        self._reader_id = await self.broker.reader_id()
        while True:
            cursors = {
                run_id: view.last_index
                for run_id, view in self._mirrors.items()
                if not view.ended and not view.deleted
            }
            if not cursors:
                self._mirrors_changed.clear()
                await self._mirrors_changed.wait()  # nothing mirrored: woken by the next
                continue
            self._reader_blocked = True
            try:
                found = await self.broker.read(cursors, READ_BLOCK_MS)
            finally:
                self._reader_blocked = False
            for run_id, events, flushed in found:
                view = self._mirrors.get(run_id)
                if view is not None and events:
                    await self._feed(view, events, flushed)

    async def _feed(self, view: LiveRun, events: list[Event], flushed: int) -> None:
        """Add events read from a stream to a mirror; a gap before them (the stream's
        tail is newer than the mirror) is read from the disk first."""
        cursor = view.last_index
        first = events[0].index
        if first > cursor + 1:
            missing = await self.store.read_events(view.run_id, cursor, first - cursor - 1)
            if len(missing) != first - cursor - 1:
                logger.warning(
                    "run_id=%s: events %d..%d are in neither Redis nor the database yet",
                    view.run_id,
                    cursor + 1,
                    first - 1,
                )
                return
            view.absorb(missing)
        view.absorb(events, flushed)
        if view.ended:
            self._mirrors.pop(view.run_id, None)
            self._linger(view.run_id, view)

    def _linger(self, run_id: str, view: LiveRun) -> None:
        """An ended view leaves after the linger; readers holding it read on."""

        def evict() -> None:
            if self.views.get(run_id) is view:
                del self.views[run_id]
                self._remote_watchers.pop(run_id, None)

        asyncio.get_running_loop().call_later(self.settings.linger_s, evict)

    # -- signals ------------------------------------------------------------------------

    def stop(self, run: LiveRun, by: str | None = None) -> JsonObject:
        source = self.runs.get(run.run_id)
        if source is not None and not source.fenced:
            return super().stop(source, by)
        if run.ended:
            return {"stopping": False, "status": run.status.value}
        self._signal(run.run_id, {"op": "stop", "by": by})
        return {"stopping": True, "status": run.status.value}

    def respond(self, run: LiveRun, request_id: str, value: Any) -> None:
        source = self.runs.get(run.run_id)
        if source is not None and not source.fenced:
            return super().respond(source, request_id, value)
        pending = run.state.get("pending_input")
        if run.ended or not isinstance(pending, dict):
            raise NotWaitingError(f"run {run.run_id} is not waiting for input")
        if pending.get("request_id") != request_id:
            raise NotWaitingError(
                f"request_id {request_id!r} is not the pending request of run {run.run_id}"
            )
        self._signal(run.run_id, {"op": "respond", "request_id": request_id, "value": value})
        return None

    def _signal(self, run_id: str, body: JsonObject) -> None:
        """Record a signal for the run's owner and tell it; recorded first, so that a lost
        message is still acted on (at the owner's next renewal)."""
        task = asyncio.create_task(self._send_signal(run_id, body), name=f"signal {run_id}")
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _send_signal(self, run_id: str, body: JsonObject) -> None:
        text = encode(body)
        try:
            signal_id = await self.pg.add_signal(run_id, text, time.time())
            await self._publish_message(
                encode(
                    {"node": self.node_id, "kind": "signal", "id": signal_id, "run_id": run_id}
                    | body
                )
            )
        except BROKER_ERRORS as exc:
            logger.warning("run_id=%s: signal recorded, not published (%s)", run_id, exc)
        except Exception:
            logger.exception("run_id=%s: a signal could not be recorded", run_id)

    def _act(self, signal_id: int, run_id: str, body: JsonObject, *, recorded: bool) -> None:
        """Act on a signal if this node owns its run; ``recorded``: its record is still in
        the database (it came by message) and is dropped now."""
        run = self.runs.get(run_id)
        if run is None or run.fenced:
            return
        try:
            if body.get("op") == "stop":
                super().stop(run, by=body.get("by"))
            elif body.get("op") == "respond":
                super().respond(run, str(body.get("request_id")), body.get("value"))
        except NotWaitingError as exc:
            logger.info("run_id=%s: signal not acted on: %s", run_id, exc)
        except Exception:
            logger.exception("run_id=%s: a signal failed", run_id)
        if recorded:
            task = asyncio.create_task(self.pg.drop_signal(signal_id), name="drop signal")
            self._tasks.append(task)
            task.add_done_callback(self._tasks.remove)

    # -- messages: signals, presence, thread changes ------------------------------------

    async def _message_loop(self) -> None:
        """The node's subscription to the cluster's channel: every message of every node
        (its own included, and skipped)."""
        pubsub = self.broker.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.broker.channel)
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is not None:
                    body = decode(message["data"])
                    if body.get("node") != self.node_id:
                        self._on_message(body)
        finally:
            with contextlib.suppress(*BROKER_ERRORS):
                await pubsub.aclose()

    def _on_message(self, body: JsonObject) -> None:
        kind = body.get("kind")
        if kind == "signal":
            self._act(int(body["id"]), str(body["run_id"]), body, recorded=True)
        elif kind == "presence":
            self._on_presence(str(body["run_id"]), str(body["node"]), int(body["count"]))
        elif kind == "thread":
            info = body.get("run")
            self._track_active(str(body["thread_id"]), str(body["change"]), info)
            super()._notify_thread(
                str(body["thread_id"]),
                str(body["change"]),
                RunInfo(info) if isinstance(info, dict) else None,
                int(body["revision"]),
            )
        elif kind == "deleted":
            self._forget_deleted(str(body["run_id"]))

    def _notify_thread(
        self,
        thread_id: str,
        change: str,
        run: HasInfo | None = None,
        revision: int | None = None,
    ) -> None:
        super()._notify_thread(thread_id, change, run, revision)
        self._send(
            {
                "kind": "thread",
                "thread_id": thread_id,
                "change": change,
                "revision": self._revisions.get(thread_id, 0) if revision is None else revision,
                "run": None if run is None else run.info(),
            }
        )

    def _track_active(self, thread_id: str, change: str, info: Any) -> None:
        """Keep which run of a thread another node holds active, from its messages."""
        run_id = info.get("run_id") if isinstance(info, dict) else None
        if change == "run_started" and run_id is not None:
            self._remote_active[thread_id] = run_id
        elif change == "deleted" or (
            change == "run_ended" and self._remote_active.get(thread_id) == run_id
        ):
            self._remote_active.pop(thread_id, None)

    def thread_info(self, thread: ThreadRecord) -> JsonObject:
        info = super().thread_info(thread)
        if info["active_run_id"] is None:
            info["active_run_id"] = self._remote_active.get(thread.thread_id)
        return info

    async def _turns_now(self, thread_id: str) -> list[Turn]:
        """As on one node, with the runs of other nodes as their views show them: a live
        run's turn on disk may be a flush behind what its watchers have seen."""
        turns = await self.store.load_turns(thread_id)
        for turn in turns:
            run_id = turn.run_id
            if (
                run_id is not None
                and run_id not in self.runs
                and run_id not in self.views
                and not RunStatus(turn.status).is_terminal
            ):
                with contextlib.suppress(NotFoundError):
                    await self.get(run_id)
        return [self._live_turn(turn) for turn in turns]

    def _live_turn(self, turn: Turn) -> Turn:
        view = self.views.get(turn.run_id or "")
        if view is None:
            return super()._live_turn(turn)
        return dataclasses.replace(
            turn, content=view.state["message"]["content"], status=view.status.value
        )

    def _forget_run(self, run: LiveRun) -> None:
        super()._forget_run(run)
        view = self.views.pop(run.run_id, None)
        if view is not None and view is not run:
            view.mark_deleted()
        self._send({"kind": "deleted", "run_id": run.run_id})

    def _send(self, body: JsonObject) -> None:
        """Tell every other node, in order (a message on the cluster's channel; lost if
        Redis is down: what it says is repaired by the readers, PROTOCOL.md §6)."""
        self._outbox.append(encode({"node": self.node_id, **body}))
        self._outbox_ready.set()

    async def _send_loop(self) -> None:
        """Publish the outbox in order: one pipelined call for what has gathered."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            messages, self._outbox = self._outbox, []
            try:
                async with self.broker.redis.pipeline(transaction=False) as pipe:
                    for text in messages:
                        pipe.publish(self.broker.channel, text)
                    await pipe.execute()
            except BROKER_ERRORS as exc:
                logger.warning("%d messages to the other nodes were lost (%s)", len(messages), exc)

    async def _publish_message(self, text: str) -> None:
        try:
            await self.broker.redis.publish(self.broker.channel, text)
        except BROKER_ERRORS as exc:
            logger.warning("a message to the other nodes was lost (%s)", exc)

    # -- presence -----------------------------------------------------------------------

    def add_watcher(self, run: LiveRun) -> None:
        self._count(run, +1)

    def remove_watcher(self, run: LiveRun) -> None:
        self._count(run, -1)

    def _count(self, run: LiveRun, delta: int) -> None:
        run_id = run.run_id
        local = self._local_watchers.get(run_id, 0) + delta
        assert local >= 0
        if local:
            self._local_watchers[run_id] = local
        else:
            self._local_watchers.pop(run_id, None)
        run.watchers = local + sum(self._remote_watchers.get(run_id, {}).values())
        run.poke()
        if run_id not in self._presence_dirty:
            self._presence_dirty.add(run_id)
            asyncio.get_running_loop().call_soon(self._share_presence)

    def _share_presence(self) -> None:
        """Tell the other nodes this node's watchers of the runs whose count changed (once
        per loop turn, however many joined)."""
        dirty, self._presence_dirty = self._presence_dirty, set()
        task = asyncio.create_task(self._publish_presence(dirty), name="presence")
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    async def _publish_presence(self, run_ids: set[str]) -> None:
        try:
            async with self.broker.redis.pipeline(transaction=False) as pipe:
                for run_id in run_ids:
                    count = self._local_watchers.get(run_id, 0)
                    key = self.broker.watchers(run_id)
                    if count:
                        pipe.hset(key, self.node_id, count)
                        pipe.pexpire(key, PRESENCE_TTL_MS)
                    else:
                        pipe.hdel(key, self.node_id)
                    body = {"kind": "presence", "run_id": run_id, "node": self.node_id}
                    pipe.publish(self.broker.channel, encode(body | {"count": count}))
                await pipe.execute()
        except BROKER_ERRORS as exc:
            logger.warning("presence not shared with the other nodes (%s)", exc)

    def _on_presence(self, run_id: str, node: str, count: int) -> None:
        if node == self.node_id:
            return
        view = self.views.get(run_id)
        if view is None:
            return
        remote = self._remote_watchers.setdefault(run_id, {})
        if count:
            remote[node] = count
        else:
            remote.pop(node, None)
        view.watchers = self._local_watchers.get(run_id, 0) + sum(remote.values())
        view.poke()

    # -- threads across nodes -----------------------------------------------------------

    async def change_thread(
        self, thread_id: str, change: ThreadChange, *, new_thread: ThreadRecord | None = None
    ) -> tuple[ThreadRecord, LiveRun | None]:
        """As on one node; a change that lost a race to another node's is decided again,
        and ``interrupt`` / ``rollback`` stop an active run another node holds first."""
        for attempt in range(1, CHANGE_ATTEMPTS + 1):
            try:
                thread, run = await super().change_thread(thread_id, change, new_thread=new_thread)
            except RunInProgressError as exc:
                other = str(exc.details.get("active_run_id"))
                if (
                    change.multitask not in ("interrupt", "rollback")
                    or other in self.runs
                    or attempt == CHANGE_ATTEMPTS
                ):
                    raise
                view = await self.get(other)
                self.stop(view, by=change.multitask)
                async with asyncio.timeout(self.settings.stop_grace_s + self.lease_s + 5.0):
                    await view.wait_ended()
            except ConflictError:
                if change.expected_revision is not None or attempt == CHANGE_ATTEMPTS:
                    raise
            else:
                # Callers read the run: its view (what Redis holds), not the source.
                return thread, None if run is None else self.views.get(run.run_id, run)
        raise AssertionError("unreachable")

    async def _write_thread(
        self,
        thread: ThreadRecord,
        turns: list[Any],
        runs: list[RunWrite],
        read_revision: int,
    ) -> None:
        # Another node may have changed the thread since it was read: PostgreSQL decides.
        if runs:
            # A live run on disk always has a lease: without one, another node's sweeper
            # would take a run over that its owner is only starting.
            try:
                await self.broker.renew([item.record.run_id for item in runs])
            except BROKER_ERRORS as exc:
                raise OverloadedError(
                    "the cluster's Redis is unreachable: no run can start now; try again"
                ) from exc
        # (Revision 0 is a thread nobody changed yet, or one being created: the store's
        # check that the stored revision is not newer covers it.)
        await self.pg.write_thread(
            thread, turns, runs, expected_revision=read_revision or None, exclusive=True
        )

    # -- the sweeper --------------------------------------------------------------------

    async def _sweep_once(self) -> None:
        """Take over the live runs of nodes that are gone (their lease expired), and catch
        up mirrors whose run ended while their stream said nothing."""
        others = await self.pg.live_runs_of_others()
        if others:
            held = await self.broker.held([run_id for run_id, _ in others])
            now = time.monotonic()
            free = [other for other, h in zip(others, held, strict=True) if not h]
            if free and await self.broker.uptime_s() > self.broker.lease_ms / 1000:
                # Only a Redis up for longer than a lease can have let a lease expire: one
                # that just restarted lost them all, and their owners take them back.
                for run_id, owner in free:
                    await self._take_over(run_id, owner)
            self._suspects = {run_id: now for run_id, _ in free}
        mirrors = list(self._mirrors.values())
        records = await self.pg.get_runs([view.run_id for view in mirrors]) if mirrors else {}
        for view in mirrors:
            record = records.get(view.run_id)
            if record is None or (
                RunStatus(record.status).is_terminal and record.last_index > view.last_index
            ):
                await self._catch_up(view, record)

    async def _catch_up(self, view: LiveRun, record: RunRecord | None) -> None:
        """A mirror whose run ended (or was deleted) on disk past what it holds."""
        if record is None:
            self._mirrors.pop(view.run_id, None)
            return
        events = await self.store.read_events(view.run_id, view.last_index, None)
        if events and events[0].index == view.last_index + 1:
            view.absorb(events)
        if view.ended or view.epoch != record.epoch:
            self._mirrors.pop(view.run_id, None)
            self.views.pop(view.run_id, None)
            if not view.ended:
                # A new epoch (Redis lost the stream, then the owner died): this view's log
                # is not the run's any more; its readers' subscriptions end, and a client
                # that subscribes again with its epoch is told ``reset``.
                view.cut_off()

    async def _take_over(self, run_id: str, owner: str | None) -> None:
        """End a run whose owner is gone: ``interrupted`` / ``node_lost``, after the events
        its stream holds beyond the disk; one winner among the nodes (PostgreSQL)."""
        record = await self.pg.take_over(run_id, owner)
        if record is None:
            return  # another node won, or the run ended
        await self.broker.seize(run_id)  # from here the old owner cannot append
        events, exists = await self.broker.read_range(run_id, record.last_index)
        contiguous = not events or events[0].index == record.last_index + 1
        epoch = record.epoch
        if (not exists and record.last_index > 0) or not contiguous:
            # Redis lost the stream: readers may have received events that are gone.
            epoch = new_epoch()
            events = []
        state = record.snapshot
        for event in events:
            snapshot.apply(state, event.type, event.data)
        last = events[-1].index if events else record.last_index
        end = Event(
            last + 1,
            ev.STATUS,
            ev.status_data(RunStatus.INTERRUPTED, reason="node_lost"),
            max(time.time(), record.updated_at),
        )
        snapshot.apply(state, end.type, end.data)
        updated = RunRecord(
            run_id=run_id,
            thread_id=record.thread_id,
            agent=record.agent,
            input=record.input,
            status=RunStatus.INTERRUPTED.value,
            epoch=epoch,
            last_index=end.index,
            snapshot=state,
            created_at=record.created_at,
            updated_at=end.ts,
            title=record.title,
            metadata=record.metadata,
        )
        await self.pg.write([RunWrite(record=updated, events=[*events, end])])
        if epoch == record.epoch:
            await self.broker.append([RunAppend(run_id, [end], end.index, final=True)])
        else:
            # A new epoch: the stream's old entries (if any) are of the old one.
            await self.broker.redis.delete(self.broker.stream(run_id))
        logger.warning(
            "run_id=%s: node %s is gone; run ended node_lost after index %d%s",
            run_id,
            owner,
            last,
            "" if epoch == record.epoch else f", new epoch {epoch}",
        )
        await self.pg.take_signals([run_id])  # what it was told is moot now
        thread = await self.store.get_thread(record.thread_id)
        if thread is not None:
            self._notify_thread(
                thread.thread_id, "run_ended", RunInfo(record_info(updated)), thread.revision
            )
        view = self._mirrors.get(run_id)
        if view is not None and epoch != record.epoch:
            await self._catch_up(view, updated)
