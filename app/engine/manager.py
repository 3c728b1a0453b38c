"""The run manager: starts, stops and supervises runs; one active run per thread.

It owns every task it starts: the flusher loop, one supervisor per run, and through each
supervisor the agent's own task. ``close()`` ends them all, in the order of STYLE.md:
refuse new runs -> end live runs (grace, then abandon) -> final flush.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.core import events as ev
from app.core import snapshot
from app.core.events import JsonObject, RunStatus
from app.core.ids import new_epoch, new_run_id, new_thread_id
from app.engine.agent import AgentCatalog, AgentSpec
from app.engine.flusher import Flusher
from app.engine.run import LiveRun
from app.errors import (
    BadRequestError,
    NotFoundError,
    NotWaitingError,
    RunInProgressError,
    ShuttingDownError,
)
from app.store.base import RunRecord, RunWrite, Store, ThreadRecord

logger = logging.getLogger(__name__)

ThreadListener = Callable[[JsonObject], None]

MULTITASK_STRATEGIES = ("reject", "interrupt", "enqueue", "rollback")


@dataclass(frozen=True, slots=True)
class EngineSettings:
    flush_interval_s: float = 0.2
    stop_grace_s: float = 2.0
    shutdown_grace_s: float = 5.0
    linger_s: float = 30.0


class RunManager:
    """Every live run, the thread each belongs to, and their lifecycles."""

    def __init__(
        self, store: Store, agents: AgentCatalog, settings: EngineSettings | None = None
    ) -> None:
        self.store = store
        self.agents = agents
        self.settings = settings or EngineSettings()
        self.flusher = Flusher(store, self.settings.flush_interval_s)
        self.runs: dict[str, LiveRun] = {}
        self._active: dict[str, str] = {}  # thread_id -> run_id of its active run
        self._thread_listeners: dict[str, set[ThreadListener]] = {}
        self._supervisors: set[asyncio.Task[None]] = set()
        self._abandoned: set[asyncio.Task[Any]] = set()
        self._evictions: dict[str, asyncio.TimerHandle] = {}
        self._flusher_task: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the store, end runs a crash cut off, and start the flusher."""
        await self.store.open()
        await self._recover()
        self._flusher_task = asyncio.create_task(self.flusher.run(), name="runcast flusher")

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
        """Shut down: refuse new runs, end live runs as interrupted, final flush.

        Cancellation: the final flush runs shielded, bounded by the shutdown grace.
        """
        if self._closing:
            return
        self._closing = True
        live = [run for run in self.runs.values() if not run.ended]
        logger.info("shutdown: ending %d live runs", len(live))
        for run in live:
            self._request_stop(run, reason="shutdown", by=None)
        if self._supervisors:
            await asyncio.wait(set(self._supervisors), timeout=self.settings.shutdown_grace_s + 1.0)
        for handle in self._evictions.values():
            handle.cancel()
        self._evictions.clear()
        logger.info("shutdown: final flush")
        if self._flusher_task is not None:
            self._flusher_task.cancel()
            await asyncio.gather(self._flusher_task, return_exceptions=True)
        async with asyncio.timeout(self.settings.shutdown_grace_s):
            await asyncio.shield(self.flusher.close())
        for task in self._abandoned:
            task.cancel()

    @property
    def closing(self) -> bool:
        return self._closing

    # -- threads ------------------------------------------------------------------------

    async def create_thread(self, metadata: JsonObject | None = None) -> ThreadRecord:
        """Create a thread; it is on disk before this returns."""
        now = time.time()
        thread = ThreadRecord(new_thread_id(), metadata or {}, now, now)
        await self.store.create_thread(thread)
        return thread

    async def get_thread(self, thread_id: str) -> ThreadRecord:
        """Raises: NotFoundError."""
        thread = await self.store.get_thread(thread_id)
        if thread is None:
            raise NotFoundError(f"no thread {thread_id}")
        return thread

    def thread_info(self, thread: ThreadRecord) -> JsonObject:
        """ThreadInfo of PROTOCOL.md §6."""
        return {
            "thread_id": thread.thread_id,
            "revision": thread.revision,
            "head": thread.head,
            "active_run_id": self._active.get(thread.thread_id),
            "metadata": thread.metadata,
            "created_at": thread.created_at,
            "updated_at": thread.updated_at,
        }

    def watch_thread(self, thread_id: str, listener: ThreadListener) -> None:
        self._thread_listeners.setdefault(thread_id, set()).add(listener)

    def unwatch_thread(self, thread_id: str, listener: ThreadListener) -> None:
        listeners = self._thread_listeners.get(thread_id)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._thread_listeners[thread_id]

    def _notify_thread(self, run: LiveRun, change: str, revision: int = 0) -> None:
        listeners = self._thread_listeners.get(run.thread_id)
        if not listeners:
            return
        frame = {
            "type": "thread",
            "thread_id": run.thread_id,
            "change": change,
            "run": run.info(),
            "revision": revision,
        }
        for listener in list(listeners):
            listener(frame)

    # -- runs ---------------------------------------------------------------------------

    async def start(
        self,
        agent_name: str,
        input: JsonObject,
        *,
        thread_id: str | None = None,
        multitask: str = "reject",
        history: list[JsonObject] | None = None,
    ) -> LiveRun:
        """Create a run, persist it, and start its agent; returns once it is on disk.

        Raises:
            ShuttingDownError, UnknownAgentError, BadRequestError (input, multitask),
            NotFoundError (thread), RunInProgressError (the thread is busy, ``reject``).
        """
        if self._closing:
            raise ShuttingDownError("the server is shutting down; no new runs")
        agent = self.agents.get(agent_name)
        clean_input = agent.validate_input(input)
        if multitask not in MULTITASK_STRATEGIES:
            raise BadRequestError(
                f"multitask must be one of {', '.join(MULTITASK_STRATEGIES)}", field="multitask"
            )
        if thread_id is None:
            thread_id = (await self.create_thread()).thread_id
        else:
            await self.get_thread(thread_id)
        active = self._active.get(thread_id)
        if active is not None:
            if multitask == "reject":
                raise RunInProgressError(thread_id, active)
            raise BadRequestError(
                f"multitask {multitask!r} is not supported yet; use 'reject'", field="multitask"
            )
        run_id = new_run_id()
        # Reserve the thread before the first await, so two starts cannot both win.
        self._active[thread_id] = run_id
        run = LiveRun(
            run_id=run_id,
            thread_id=thread_id,
            agent=agent.name,
            input=clean_input,
            epoch=new_epoch(),
            created_at=time.time(),
            on_dirty=self.flusher.mark_dirty,
        )
        try:
            await self.flusher.commit(run)
        except BaseException:
            del self._active[thread_id]
            raise
        self.runs[run_id] = run
        task = asyncio.create_task(self._supervise(run, agent, history), name=f"run {run_id}")
        run.task = task
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)
        logger.info("run_id=%s started agent=%s thread_id=%s", run_id, agent.name, thread_id)
        self._notify_thread(run, "run_started")
        return run

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
        events = await self.store.read_events(run_id, 0, None)
        run = self.runs.get(run_id)  # another reader may have loaded it meanwhile
        if run is None:
            run = LiveRun.from_record(record, events)
            self.runs[run_id] = run
            self._schedule_eviction(run)
        return run

    async def list_runs(
        self, *, status: str | None = None, thread_id: str | None = None, limit: int = 50
    ) -> list[JsonObject]:
        records = await self.store.list_runs(status=status, thread_id=thread_id, limit=limit)
        infos = []
        for record in records:
            run = self.runs.get(record.run_id)
            info = run.info() if run is not None else record_info(record)
            if status is None or info["status"] == status:
                infos.append(info)
        if status is not None:
            # A run in memory may have a status its stored row does not show yet.
            listed = {info["run_id"] for info in infos}
            for run in self.runs.values():
                if (
                    run.status.value == status
                    and run.run_id not in listed
                    and (thread_id is None or run.thread_id == thread_id)
                ):
                    infos.append(run.info())
            infos.sort(key=lambda info: info["created_at"], reverse=True)
            del infos[limit:]
        return infos

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
        if run.agent_task is not None:
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
        run.pending_input = None
        run.append(ev.INPUT_RECEIVED, {"request_id": request_id, "value": value})
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

    async def _supervise(
        self, run: LiveRun, agent: AgentSpec, history: list[JsonObject] | None
    ) -> None:
        """Run the agent in its own task and end the run with its outcome.

        The agent's failure is caught here, once: the run ends ``failed`` and no other run
        notices. A stop cancels the agent's task (not this one); an agent that ignores the
        cancellation is abandoned after the grace period and the run ends all the same.
        """
        loop = asyncio.get_running_loop()
        run.abandon = loop.create_future()
        if run.stop_reason is None:
            run.append(ev.STATUS, ev.status_data(RunStatus.RUNNING))
            run.agent_task = asyncio.create_task(
                agent.invoke(run, history or []), name=f"agent {run.run_id}"
            )
            await asyncio.wait({run.agent_task, run.abandon}, return_when=asyncio.FIRST_COMPLETED)
        await self._finish(run, self._outcome(run))

    def _outcome(self, run: LiveRun) -> JsonObject:
        task = run.agent_task
        if task is not None and not task.done():
            logger.warning("run_id=%s: agent ignored cancellation; abandoned", run.run_id)
            self._abandoned.add(task)
            task.add_done_callback(_forget(self._abandoned))
        elif task is not None and not task.cancelled():
            error = task.exception()
            # An agent that swallows a stop and returns still ends as the stop said.
            if error is None and run.stop_reason is None:
                return ev.status_data(RunStatus.COMPLETED)
            if error is not None and run.stop_reason is None:
                logger.warning("run_id=%s: agent failed: %r", run.run_id, error)
                return ev.status_data(
                    RunStatus.FAILED,
                    error={"code": "agent_error", "message": f"{type(error).__name__}: {error}"},
                )
        if run.stop_reason == "shutdown":
            return ev.status_data(RunStatus.INTERRUPTED, reason="shutdown")
        if run.stop_reason == "stop":
            return ev.status_data(RunStatus.STOPPED, by=run.stop_by)
        # The agent cancelled itself, with nobody asking.
        return ev.status_data(
            RunStatus.FAILED, error={"code": "cancelled", "message": "the agent was cancelled"}
        )

    async def _finish(self, run: LiveRun, data: JsonObject) -> None:
        """Stage the terminal event, put it on disk, then publish it and free the thread."""
        if run.pending_input is not None:
            run.pending_input = None
        run.stage_terminal(data)
        await self.flusher.commit(run)
        run.publish_staged()
        if self._active.get(run.thread_id) == run.run_id:
            del self._active[run.thread_id]
        logger.info("run_id=%s ended %s", run.run_id, data["status"])
        self._notify_thread(run, "run_ended")
        self._schedule_eviction(run)

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
    }


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _forget(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: the abandoned agent's error is not news

    return done
