"""The run manager: starts, stops and supervises runs; one active run per thread.

It owns every task it starts: the flusher loop (restarted if it fails), one supervisor
per run, and through each supervisor the agent's own task. A supervisor always ends its
run, whatever fails, and hands its thread on. ``close()`` ends them all, in the order of
STYLE.md: refuse new runs -> end live runs (grace, then abandon) -> final flush; every
wait in it is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from app.core import events as ev
from app.core import snapshot
from app.core.events import JsonObject, RunStatus
from app.core.ids import new_epoch, new_run_id, new_thread_id
from app.engine.agent import AgentCatalog, AgentSpec
from app.engine.flusher import Flusher
from app.engine.records import RecordPatch
from app.engine.run import LiveRun, Retention, setting_default
from app.engine.threads import ThreadChange, ThreadOperations, materialize
from app.errors import (
    AgentError,
    ConflictError,
    NotFoundError,
    NotWaitingError,
    OverloadedError,
    RunInProgressError,
    ShuttingDownError,
)
from app.store.base import Key, RunQuery, RunRecord, RunWrite, Store, ThreadRecord

logger = logging.getLogger(__name__)

REVIVED_TAIL = 100  # events read back into memory with a run that was not there
FLUSHER_RESTART_MIN_S = 0.1  # backoff before restarting a failed flusher loop, doubling
FLUSHER_RESTART_MAX_S = 5.0

# What clients see of a failure: the detail goes to the log only.
AGENT_FAILED: JsonObject = {"code": "agent_error", "message": "the agent failed"}
SUPERVISION_FAILED: JsonObject = {"code": "internal", "message": "the server failed to run it"}


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """The engine's settings: each has a field of the same name in ``app.config.Settings``,
    whose default it takes."""

    flush_interval_s: float = setting_default("flush_interval_s")
    stop_grace_s: float = setting_default("stop_grace_s")
    shutdown_grace_s: float = setting_default("shutdown_grace_s")
    linger_s: float = setting_default("linger_s")
    default_agent: str = setting_default("default_agent")
    tail_events: int = setting_default("tail_events")
    keyframe_every: int = setting_default("keyframe_every")
    max_unflushed: int = setting_default("max_unflushed")
    max_live_runs: int = setting_default("max_live_runs")
    max_event_bytes: int = setting_default("max_event_bytes")


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing: its items (RunInfo or ThreadInfo), newest first, and the
    key to ask the next page after (None on the last page)."""

    items: list[JsonObject]
    next: Key | None


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    """The engine's counts at one moment, for monitoring. Totals are over the manager's
    life: runs ``started`` per agent, ``ended`` per terminal status, events appended,
    writes of the flusher that failed."""

    live_runs: int
    runs_in_memory: int
    started: dict[str, int]
    ended: dict[str, int]
    events_appended: int
    store_errors: int


class RunManager(ThreadOperations):
    """Every live run, the thread each belongs to, and their lifecycles; the thread
    operations are ``ThreadOperations``'s (app/engine/threads.py)."""

    def __init__(
        self, store: Store, agents: AgentCatalog, settings: EngineSettings | None = None
    ) -> None:
        self.store = store
        self.agents = agents
        self.settings = settings or EngineSettings()
        self.flusher = Flusher(store, self.settings.flush_interval_s)
        self.retention = Retention(
            store=store,
            commit=self.flusher.commit,
            tail_events=self.settings.tail_events,
            keyframe_every=self.settings.keyframe_every,
            max_unflushed=self.settings.max_unflushed,
            max_event_bytes=self.settings.max_event_bytes,
        )
        self.runs: dict[str, LiveRun] = {}
        self._live_runs = 0  # runs created and not ended (queued included)
        # For monitoring, over the manager's life: runs started per agent, ended per status.
        self._started: collections.Counter[str] = collections.Counter()
        self._ended: collections.Counter[str] = collections.Counter()
        self._active: dict[str, str] = {}  # thread_id -> run_id of its active run
        self._queues: dict[str, collections.deque[LiveRun]] = {}  # queued runs per thread
        self._supervisors: set[asyncio.Task[None]] = set()
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._evictions: dict[str, asyncio.TimerHandle] = {}
        # Ids deleted in this process's life: a read back from the store that began
        # before the delete must not bring its run back into memory.
        self._deleted: set[str] = set()
        self._flusher_task: asyncio.Task[NoReturn] | None = None
        self._closing = False
        self._init_threads()

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store, end runs a crash cut off, and start the flusher."""
        await self.store.open()
        await self._recover()
        self._flusher_task = asyncio.create_task(self._keep_flushing(), name="runcast flusher")

    async def _keep_flushing(self) -> NoReturn:
        """Run the flusher's loop, and start it again (after a backoff: 0.1 s doubling to
        5 s, from 0.1 s again once it has written) whenever it fails: a bug in a flush
        must not stop every later write. ``store_degraded`` holds until a good flush.

        Cancellation: ends the loop (``close()`` then flushes one last time).
        """
        backoff_s = FLUSHER_RESTART_MIN_S
        while True:
            flushes = self.flusher.flushes
            try:
                await self.flusher.run()
            except Exception:
                if self.flusher.flushes != flushes:
                    backoff_s = FLUSHER_RESTART_MIN_S
                self.flusher.store_degraded = True
                logger.exception("the flusher failed; restarting it in %.1fs", backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(FLUSHER_RESTART_MAX_S, backoff_s * 2)

    @property
    def store_degraded(self) -> bool:
        """True while writes are failing or the flusher is being restarted; False again
        after a good flush."""
        return self.flusher.store_degraded

    @property
    def live_runs(self) -> int:
        """Runs created and not ended, queued ones included: O(1)."""
        return self._live_runs

    def statistics(self) -> EngineStatistics:
        """The engine's counts now: O(agents + statuses), nothing counted per event."""
        return EngineStatistics(
            live_runs=self._live_runs,
            runs_in_memory=len(self.runs),
            started=dict(self._started),
            ended=dict(self._ended),
            events_appended=self.retention.backlog.appended,
            store_errors=self.flusher.failures,
        )

    async def _recover(self) -> None:
        """End every run the store still holds as live: interrupted (crash), new epoch,
        the terminal event appended after the last persisted one. One transaction."""
        now = time.time()
        batch = []
        for record in await self.store.live_runs():
            event = ev.Event(
                record.last_index + 1,
                ev.STATUS,
                ev.status_data(RunStatus.INTERRUPTED, reason="crash"),
                now,
            )
            state = record.snapshot
            snapshot.apply(state, event.type, event.data)
            updated = RunRecord(
                run_id=record.run_id,
                thread_id=record.thread_id,
                agent=record.agent,
                input=record.input,
                status=RunStatus.INTERRUPTED.value,
                epoch=new_epoch(),
                last_index=event.index,
                snapshot=state,
                created_at=record.created_at,
                updated_at=event.ts,
            )
            batch.append(RunWrite(record=updated, events=[event]))
            logger.warning(
                "run_id=%s was live at a crash: interrupted after index %d, epoch %s",
                record.run_id,
                record.last_index,
                updated.epoch,
            )
        await self.store.write(batch)

    async def close(self) -> None:
        """Shut down, in phases, each logged: refuse new runs -> end live runs as
        interrupted (grace, then cancel their supervision) -> stop the flusher -> final
        flush -> cancel abandoned agents.

        It always finishes: every wait is bounded by the shutdown grace (plus a second), a
        store that fails or hangs included. What it could not write is left on disk as
        live, and the next start ends it ``interrupted`` (crash).

        Cancellation: the final flush runs on in its own task.
        """
        if self._closing:
            return
        self._closing = True
        grace_s = self.settings.shutdown_grace_s
        # 1. Refuse new runs (``_closing``), and ask every live run to end.
        live = [run for run in self.runs.values() if not run.ended]
        logger.info("shutdown: refusing new runs; ending %d live runs", len(live))
        for run in live:
            self._request_stop(run, reason="shutdown", by=None)
        # 2. Wait for the runs to end: agents get the grace, then are abandoned; what is
        # still not over (an end the store cannot take) is cancelled.
        if self._supervisors:
            _, pending = await asyncio.wait(set(self._supervisors), timeout=grace_s + 1.0)
            if pending:
                logger.warning(
                    "shutdown: %d runs did not end within %.1fs; cancelling their supervision",
                    len(pending),
                    grace_s + 1.0,
                )
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=1.0)
        for handle in self._evictions.values():
            handle.cancel()
        self._evictions.clear()
        # 3. Stop the flusher's loop; 4. write what is left, once.
        logger.info("shutdown: stopping the flusher")
        if self._flusher_task is not None:
            self._flusher_task.cancel()
            await asyncio.wait({self._flusher_task}, timeout=1.0)
        logger.info("shutdown: final flush")
        final = asyncio.create_task(self.flusher.close(), name="runcast final flush")
        await asyncio.wait({final}, timeout=grace_s)
        if not final.done():
            final.cancel()
            await asyncio.wait({final}, timeout=1.0)
            logger.error(
                "shutdown: the final flush did not finish within %.1fs; runs not written are "
                "left to recovery",
                grace_s,
            )
        elif not final.cancelled() and (error := final.exception()) is not None:
            logger.error(
                "shutdown: the final flush failed; runs not written are left to recovery",
                exc_info=error,
            )
        # 5. Agents that ignored their cancellation are not waited for.
        if self._abandoned:
            logger.warning("shutdown: cancelling %d abandoned agents", len(self._abandoned))
        for task in list(self._abandoned):
            task.cancel()
        logger.info("shutdown: engine closed")

    @property
    def closing(self) -> bool:
        return self._closing

    # -- runs ---------------------------------------------------------------------------

    async def start(
        self,
        agent_name: str,
        input: JsonObject,
        *,
        thread_id: str | None = None,
        multitask: str = "reject",
        title: str | None = None,
        metadata: JsonObject | None = None,
    ) -> LiveRun:
        """Start a run of ``agent_name`` on ``input`` (no turns); a new thread if none.
        ``title`` and ``metadata`` are the run's; a new thread takes the title too.

        Returns once the run is on disk (it may be ``queued`` with ``enqueue``).

        Raises:
            ShuttingDownError, UnknownAgentError, BadRequestError (input, multitask),
            NotFoundError (thread), RunInProgressError (the thread is busy, ``reject``),
            OverloadedError (``max_live_runs`` runs are live), PayloadTooLargeError
            (metadata).
        """
        self._check_open()
        change = ThreadChange(
            "start",
            agent=agent_name,
            input=input,
            multitask=multitask,
            title=title,
            metadata=metadata,
        )
        if thread_id is None:
            # A new thread: nothing to read, and it is written with the run, in one
            # transaction.
            now = time.time()
            thread = ThreadRecord(new_thread_id(), {}, now, now, title=title)
            _, run = await self.change_thread(thread.thread_id, change, new_thread=thread)
        else:
            _, run = await self.change_thread(thread_id, change)
        assert run is not None
        return run

    def _new_run(
        self,
        thread_id: str,
        agent: str,
        input: JsonObject,
        now: float,
        title: str | None = None,
        metadata: JsonObject | None = None,
    ) -> LiveRun:
        return LiveRun(
            run_id=new_run_id(),
            thread_id=thread_id,
            agent=agent,
            input=input,
            epoch=new_epoch(),
            created_at=now,
            on_dirty=self._on_dirty(),
            retention=self.retention,
            title=title,
            metadata=metadata,
        )

    def _on_dirty(self) -> Callable[[LiveRun], None]:
        """What a new run calls each time it has something new to write (on every append:
        a callable, not a chain of calls)."""
        return self.flusher.mark_dirty

    def _spawn_supervisor(self, run: LiveRun, agent: AgentSpec, history: list[JsonObject]) -> None:
        if self._closing:
            # Its start was already being written when shutdown began: it ends at once,
            # as every other live run does, and is never left live on disk.
            self._request_stop(run, reason="shutdown", by=None)
        task = asyncio.create_task(self._supervise(run, agent, history), name=f"run {run.run_id}")
        run.task = task
        self._supervisors.add(task)
        task.add_done_callback(functools.partial(self._supervisor_done, run.run_id))
        logger.info(
            "run_id=%s created agent=%s thread_id=%s", run.run_id, agent.name, run.thread_id
        )

    def _supervisor_done(self, run_id: str, task: asyncio.Task[None]) -> None:
        self._supervisors.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # A bug of ours in ending the run (an assert): said, never swallowed silently.
            logger.error("run_id=%s: its supervisor failed", run_id, exc_info=error)

    def _admit(
        self,
        run: LiveRun,
        agent: AgentSpec,
        history: list[JsonObject],
        active: LiveRun | None,
        multitask: str,
    ) -> None:
        """Take a run whose start is on disk: in memory, active in its thread or queued
        (``active``: the thread's active run now), and supervised."""
        run.mark_flushed(0)
        self.runs[run.run_id] = run
        self._started[run.agent] += 1
        thread_id = run.thread_id
        if run.go is None:  # decided on an idle thread: it starts now, turns written
            self._active[thread_id] = run.run_id
        else:
            queue = self._queues.setdefault(thread_id, collections.deque())
            if multitask == "enqueue":
                queue.append(run)
            else:
                queue.appendleft(run)
            if active is None:  # nothing left to hand the thread over when it ends
                self._hand_over(thread_id)
        self._spawn_supervisor(run, agent, history)

    def _check_open(self) -> None:
        if self._closing:
            raise ShuttingDownError("the server is shutting down; no new runs")

    def _check_capacity(self) -> None:
        """Raises: OverloadedError when ``max_live_runs`` runs are live."""
        limit = self.settings.max_live_runs
        if self._live_runs >= limit:
            raise OverloadedError(
                f"the server has {limit} live runs, its limit; try again when some have ended"
            )

    async def get(self, run_id: str) -> LiveRun:
        """The run, from memory or read back from the store.

        Raises:
            NotFoundError: no such run.
        """
        run = self.runs.get(run_id)
        if run is not None:
            return run
        record = await self.store.get_run(run_id)
        if record is None:
            raise NotFoundError(f"no run {run_id}")
        # An ended run comes back as its row only: each reader reads from disk just the
        # events after its cursor (one range of the primary key), none for "latest". A
        # tail read with it cost a resume more than the resume's own read.
        if run_id in self._deleted:  # deleted while it was being read
            raise NotFoundError(f"no run {run_id}")
        run = self.runs.get(run_id)  # another reader may have loaded it meanwhile
        if run is None:
            run = LiveRun.from_record(record, [], self.retention)
            self.runs[run_id] = run
            self._schedule_eviction(run)
        return run

    # -- records: titles and metadata, listing, deleting -------------------------------

    async def list_runs(
        self, query: RunQuery | None = None, *, before: Key | None = None, limit: int = 50
    ) -> Page:
        """A page of RunInfo matching ``query``, newest first, older than ``before``.

        The store's rows are shown as the runs are in memory; with a status filter, a run
        in memory whose status its row does not show yet (the flusher writes it within an
        interval) is listed by its status now. Paging visits every run once, even while
        runs are created: a new run is newer than every page already read.
        """
        query = query or RunQuery()
        records = await self.store.list_runs(query, before=before, limit=limit + 1)
        full = len(records) > limit
        if query.status is None:
            shown = records[:limit]
            items = [self._run_info(record) for record in shown]
            last = shown[-1] if full else None
            return Page(items, None if last is None else (last.created_at, last.run_id))
        # By status: the rows fetched cover the keys from ``before`` down to the last
        # one fetched (all keys, when not full). Within that range a run is listed when
        # its status now is the one asked: its row may say otherwise.
        floor = (records[-1].created_at, records[-1].run_id) if full else None
        found = {record.run_id: self._run_info(record) for record in records}
        for run in self.runs.values():
            key = (run.created_at, run.run_id)
            if (
                run.run_id not in found
                and run.status.value == query.status
                and (before is None or key < before)
                and (floor is None or key >= floor)
                and _matches(run, query)
            ):
                found[run.run_id] = run.info()
        items = sorted(
            (info for info in found.values() if info["status"] == query.status),
            key=lambda info: (info["created_at"], info["run_id"]),
            reverse=True,
        )
        if len(items) > limit:
            del items[limit:]
            return Page(items, (items[-1]["created_at"], items[-1]["run_id"]))
        return Page(items, floor)

    def _run_info(self, record: RunRecord) -> JsonObject:
        run = self.runs.get(record.run_id)
        return run.info() if run is not None else record_info(record)

    async def list_threads(
        self,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        before: Key | None = None,
        limit: int = 50,
    ) -> Page:
        """A page of ThreadInfo, newest first, older than ``before``."""
        records = await self.store.list_threads(metadata=metadata, before=before, limit=limit + 1)
        shown = records[:limit]
        last = shown[-1] if len(records) > limit else None
        return Page(
            [self.thread_info(record) for record in shown],
            None if last is None else (last.created_at, last.thread_id),
        )

    async def patch_run(self, run: LiveRun, patch: RecordPatch) -> LiveRun:
        """Change a run's title and metadata (live or ended); on disk before it returns.

        Raises: PayloadTooLargeError (metadata), NotFoundError (deleted meanwhile).
        """
        async with self._thread_lock(run.thread_id):
            if run.deleted:
                raise NotFoundError(f"no run {run.run_id}")
            run = await self.get(run.run_id)  # evicted and read back meanwhile: the current one
            title, metadata = patch.apply(run.title, run.metadata)
            now = max(time.time(), run.updated_at)
            await self.store.update_run(run.run_id, title=title, metadata=metadata, updated_at=now)
            run.title, run.metadata, run.updated_at = title, metadata, now
        return run

    async def patch_thread(
        self, thread_id: str, patch: RecordPatch, expected_revision: int | None = None
    ) -> ThreadRecord:
        """Change a thread's title and metadata: an operation of its own (one revision,
        ``updated`` to its watchers), allowed while a run is active (it changes no turn).

        Raises: NotFoundError, ConflictError (stale ``expected_revision``),
        PayloadTooLargeError (metadata).
        """
        async with self._thread_lock(thread_id):
            thread = await self.get_thread(thread_id)
            if expected_revision is not None and expected_revision != thread.revision:
                raise ConflictError(
                    f"thread {thread_id} is at revision {thread.revision}",
                    expected_revision=expected_revision,
                    actual_revision=thread.revision,
                )
            title, metadata = patch.apply(thread.title, thread.metadata)
            updated = dataclasses.replace(
                thread,
                title=title,
                metadata=metadata,
                revision=thread.revision + 1,
                updated_at=max(time.time(), thread.updated_at),
            )
            await asyncio.shield(self._apply_patch(updated))
        return updated

    async def _apply_patch(self, updated: ThreadRecord) -> None:
        await self.store.write_thread(updated, [])
        self._revisions[updated.thread_id] = updated.revision
        self._notify_thread(updated.thread_id, "updated")

    async def delete_run(self, run_id: str) -> None:
        """Erase an ended run for good (PROTOCOL.md §10): from disk in one transaction,
        then from memory; its readers are told (``deleted``) and stop. The assistant turn
        it wrote keeps its text, with no run id.

        Raises:
            NotFoundError: no such run.
            RunInProgressError: the run is live (queued included).
        """
        run = await self.get(run_id)
        async with self._thread_lock(run.thread_id):
            run = await self.get(run_id)  # deleted or read back meanwhile: the current one
            if not run.ended:
                raise _live(run, f"run {run_id} is {run.status.value}; stop it first")
            if run.needs_flush:
                await self.flusher.commit(run)
            # Once the write has begun, memory follows whatever the caller does.
            await asyncio.shield(self._erase_run(run))

    async def _erase_run(self, run: LiveRun) -> None:
        if not await self.store.delete_run(run.run_id):
            raise NotFoundError(f"no run {run.run_id}")
        self._forget_run(run)
        logger.info("run_id=%s deleted", run.run_id)

    async def delete_thread(self, thread_id: str) -> None:
        """Erase a thread for good with its turns and runs (PROTOCOL.md §10): from disk in
        one transaction, then from memory; its runs' readers are told (``deleted``), its
        watchers get ``deleted`` and their watch ends.

        Raises:
            NotFoundError: no such thread.
            RunInProgressError: a run of the thread is live (active or queued).
        """
        async with self._thread_lock(thread_id):
            await self.get_thread(thread_id)
            active = self._active.get(thread_id)
            live = [r for r in self.runs.values() if r.thread_id == thread_id and not r.ended]
            if active is not None or live:
                run_id = active or live[0].run_id
                raise RunInProgressError(thread_id, run_id)
            await asyncio.shield(self._erase_thread(thread_id))

    async def _erase_thread(self, thread_id: str) -> None:
        run_ids = await self.store.delete_thread(thread_id)
        if run_ids is None:
            raise NotFoundError(f"no thread {thread_id}")
        for run_id in run_ids:
            run = self.runs.get(run_id)
            if run is not None:
                self._forget_run(run)
            else:
                self._deleted.add(run_id)
        self._notify_thread(thread_id, "deleted")
        self._thread_listeners.pop(thread_id, None)
        self._revisions.pop(thread_id, None)
        logger.info("thread_id=%s deleted with %d runs", thread_id, len(run_ids))

    def _forget_run(self, run: LiveRun) -> None:
        """Drop an erased run from memory and wake its readers to find it deleted."""
        self._deleted.add(run.run_id)
        if self.runs.get(run.run_id) is run:
            del self.runs[run.run_id]
        handle = self._evictions.pop(run.run_id, None)
        if handle is not None:
            handle.cancel()
        run.mark_deleted()

    def stop(self, run: LiveRun, by: str | None = None) -> JsonObject:
        """Ask a run to stop; any client may. Stopping an ended run is not an error."""
        if run.ended or run.staged is not None:
            return {"stopping": False, "status": run.status.value}
        self._request_stop(run, reason="stop", by=by)
        return {"stopping": True, "status": run.status.value}

    def _request_stop(self, run: LiveRun, *, reason: str, by: str | None) -> None:
        if run.stop_reason is not None:
            return
        run.stop_reason = reason
        run.stop_by = by
        queue = self._queues.get(run.thread_id)
        if queue is not None and run in queue:
            queue.remove(run)
        if run.agent_task is None:
            if run.abandon is not None:
                _resolve(run.abandon)  # nothing to cancel: end it now
            return
        run.agent_task.cancel()
        grace_s = self.settings.stop_grace_s if reason == "stop" else self.settings.shutdown_grace_s
        abandon = run.abandon
        if abandon is not None:
            asyncio.get_running_loop().call_later(grace_s, _resolve, abandon)

    def respond(self, run: LiveRun, request_id: str, value: Any) -> None:
        """Answer the run's pending input request.

        Raises:
            NotWaitingError: no input is pending, or ``request_id`` is not the pending one.
        """
        pending = run.pending_input
        if pending is None or run.stop_reason is not None:
            raise NotWaitingError(f"run {run.run_id} is not waiting for input")
        pending_id, answer = pending
        if pending_id != request_id:
            raise NotWaitingError(
                f"request_id {request_id!r} is not the pending request of run {run.run_id}"
            )
        # Appended first: an answer the log refuses (too large) leaves the request pending.
        run.append(ev.INPUT_RECEIVED, {"request_id": request_id, "value": value})
        run.pending_input = None
        run.append(ev.STATUS, ev.status_data(RunStatus.RUNNING))
        answer.set_result(value)

    def add_watcher(self, run: LiveRun) -> None:
        run.watchers += 1
        run.poke()

    def remove_watcher(self, run: LiveRun) -> None:
        run.watchers -= 1
        assert run.watchers >= 0
        run.poke()

    # -- supervision --------------------------------------------------------------------

    async def _supervise(self, run: LiveRun, agent: AgentSpec, history: list[JsonObject]) -> None:
        """Run the agent in its own task and end the run with its outcome.

        The agent's failure is caught here, once: the run ends ``failed`` and no other run
        notices. A stop cancels the agent's task (not this one); an agent that ignores the
        cancellation is abandoned after the grace period and the run ends all the same.
        Whatever else fails on the way (the store, while a queued run begins) ends the run
        ``failed`` too, and the thread goes on to its next queued run.

        Cancellation: the agent's task is cancelled too, and the run is left as it is.
        """
        try:
            data = await self._drive(run, agent, history)
        except asyncio.CancelledError:
            self._abandon(run, cancel=True)
            raise
        except Exception:
            logger.exception("run_id=%s: supervision failed; the run ends failed", run.run_id)
            self._abandon(run, cancel=True)
            data = ev.status_data(RunStatus.FAILED, error=dict(SUPERVISION_FAILED))
        await self._finish(run, data)

    async def _drive(self, run: LiveRun, agent: AgentSpec, history: list[JsonObject]) -> JsonObject:
        """Wait for the thread's turn (a queued run), run the agent until it returns, fails
        or is abandoned; returns the data of the run's terminal event."""
        loop = asyncio.get_running_loop()
        run.abandon = loop.create_future()
        if run.stop_reason is not None:
            _resolve(run.abandon)
        if run.go is not None:  # queued: wait for the thread's turn, or a stop
            await asyncio.wait({run.go, run.abandon}, return_when=asyncio.FIRST_COMPLETED)
            if run.stop_reason is None:
                history = await self._begin(run)
        if run.stop_reason is None:
            run.append(ev.STATUS, ev.status_data(RunStatus.RUNNING))
            self._notify_thread(run.thread_id, "run_started", run)
            run.agent_task = asyncio.create_task(
                _call_agent(agent, run, history), name=f"agent {run.run_id}"
            )
            await asyncio.wait({run.agent_task, run.abandon}, return_when=asyncio.FIRST_COMPLETED)
        return self._outcome(run)

    async def _begin(self, run: LiveRun) -> list[JsonObject]:
        """A queued run's turn has come: write its turns at the head; return its history."""
        async with self._thread_lock(run.thread_id):
            if run.stop_reason is not None:
                # Stopped (an interrupt, a rollback) while it waited for the lock: it never
                # starts, so it writes no turns.
                return []
            thread = await self.get_thread(run.thread_id)
            turns = {turn.turn_id: turn for turn in await self.store.load_turns(run.thread_id)}
            now = time.time()
            new_turns, head, history = materialize(thread, turns, run.plan, run, now)
            if new_turns:
                # Joining the active path when it starts is part of the operation that
                # queued it; the revision does not change again.
                updated = dataclasses.replace(thread, head=head, updated_at=now)
                await self.store.write_thread(updated, new_turns)
        return history

    def _outcome(self, run: LiveRun) -> JsonObject:
        task = run.agent_task
        if task is not None and not task.done():
            logger.warning("run_id=%s: agent ignored cancellation; abandoned", run.run_id)
            self._abandon(run, cancel=False)
        elif task is not None and not task.cancelled():
            error = task.exception()
            # An agent that swallows a stop and returns still ends as the stop said.
            if error is None and run.stop_reason is None:
                return ev.status_data(RunStatus.COMPLETED)
            if error is not None and run.stop_reason is None:
                return ev.status_data(RunStatus.FAILED, error=_agent_failure(run, error))
        if run.stop_reason == "shutdown":
            return ev.status_data(RunStatus.INTERRUPTED, reason="shutdown")
        if run.stop_reason == "stop":
            return ev.status_data(RunStatus.STOPPED, by=run.stop_by)
        # The agent cancelled itself, with nobody asking.
        return ev.status_data(
            RunStatus.FAILED, error={"code": "cancelled", "message": "the agent was cancelled"}
        )

    def _abandon(self, run: LiveRun, *, cancel: bool) -> None:
        """Let the run's agent task go on without it (cancelled, with ``cancel``), owned by
        ``_abandoned`` until it ends; ``close()`` cancels what is left."""
        task = run.agent_task
        if task is None or task.done():
            return
        if cancel:
            task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(_forget(self._abandoned))

    async def _finish(self, run: LiveRun, data: JsonObject) -> None:
        """Stage the terminal event, put it on disk, then publish it and free the thread."""
        if run.pending_input is not None:
            run.pending_input = None
        run.stage_terminal(data)
        await self.flusher.commit(run)
        run.publish_staged()
        self._live_runs -= 1
        self._ended[data["status"]] += 1
        # Ended and all on disk: while it lingers it keeps only a short tail, as a run read
        # back does; memory holds what is live (1,000 ended runs of 10,000 events lingering
        # 2 s each left the process at 241 MiB RSS after eviction, against 45 idle).
        run.log.trim_before(run.last_index - min(self.settings.tail_events, REVIVED_TAIL) + 1)
        if self._active.get(run.thread_id) == run.run_id:
            self._hand_over(run.thread_id)
        logger.info("run_id=%s ended %s", run.run_id, data["status"])
        self._notify_thread(run.thread_id, "run_ended", run)
        self._schedule_eviction(run)

    def _hand_over(self, thread_id: str) -> None:
        """The thread's active run ended: the next queued run (if any) becomes active."""
        queue = self._queues.get(thread_id)
        if not queue:
            self._queues.pop(thread_id, None)
            del self._active[thread_id]
            return
        run = queue.popleft()
        if not queue:
            del self._queues[thread_id]
        self._active[thread_id] = run.run_id
        assert run.go is not None
        _resolve(run.go)

    def _schedule_eviction(self, run: LiveRun) -> None:
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        self._evictions[run.run_id] = loop.call_later(
            self.settings.linger_s, self._evict, run.run_id
        )

    def _evict(self, run_id: str) -> None:
        """Drop an ended run from memory; readers still holding it read on undisturbed."""
        self._evictions.pop(run_id, None)
        run = self.runs.get(run_id)
        if run is not None and run.ended and not run.needs_flush:
            del self.runs[run_id]


def _matches(run: LiveRun, query: RunQuery) -> bool:
    """True when the run in memory matches ``query`` (its status aside)."""
    return (
        (query.thread_id is None or run.thread_id == query.thread_id)
        and (query.agent is None or run.agent == query.agent)
        and all(
            isinstance(run.metadata.get(key), str) and run.metadata[key] == value
            for key, value in query.metadata
        )
    )


def _live(run: LiveRun, message: str) -> RunInProgressError:
    """The ``run_in_progress`` refusal of an operation on a live run itself."""
    error = RunInProgressError(run.thread_id, run.run_id)
    error.message = message
    error.args = (message,)
    return error


def record_info(record: RunRecord) -> JsonObject:
    """RunInfo of a run that is not in memory."""
    return {
        "run_id": record.run_id,
        "thread_id": record.thread_id,
        "agent": record.agent,
        "status": record.status,
        "epoch": record.epoch,
        "last_index": record.last_index,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "watchers": 0,
        "title": record.title,
        "metadata": record.metadata,
    }


async def _call_agent(agent: AgentSpec, run: LiveRun, history: list[JsonObject]) -> None:
    """The agent's task. The agent is called in it, so that whatever the call does (raise
    at once; return no coroutine, as a plain ``def`` does) is the agent's failure."""
    coroutine = agent.invoke(run, history)
    if not inspect.isawaitable(coroutine):
        raise TypeError(
            f"agent {agent.name!r} must be an async function (async def); "
            f"it returned {type(coroutine).__name__}"
        )
    await coroutine


def _agent_failure(run: LiveRun, error: BaseException) -> JsonObject:
    """The ``error`` of a failed run's terminal event. Clients see a generic message; the
    log gets the detail. An AgentError is the agent's own word to clients, shown as is."""
    if isinstance(error, AgentError):
        logger.warning(
            "run_id=%s: agent %s failed with %s: %s",
            run.run_id,
            run.agent,
            error.code,
            error.message,
            exc_info=error,
        )
        return {"code": error.code, "message": error.message}
    logger.warning("run_id=%s: agent %s failed", run.run_id, run.agent, exc_info=error)
    return dict(AGENT_FAILED)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _forget(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the abandoned agent's error is not news

    return done
