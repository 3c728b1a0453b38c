"""Thread operations (PROTOCOL.md §6): creating and reading threads, their views, the
operations that change their turns (``change_thread``) and the listeners told of each
change. ``RunManager`` holds them as a mixin; the runs they start it supervises.

A listener gets a ``ThreadChanged``: the engine says what changed, transport says it on
the wire (``app.transport.wire.thread_frame``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from app.core import turns as turns_
from app.core.events import JsonObject, RunStatus
from app.core.ids import new_thread_id, new_turn_id
from app.engine.agent import AgentCatalog, AgentSpec
from app.engine.records import check_metadata
from app.engine.run import LiveRun
from app.errors import BadRequestError, ConflictError, NotFoundError, RunInProgressError
from app.store.base import RunWrite, Store, ThreadRecord

if TYPE_CHECKING:
    from app.engine.manager import EngineSettings

logger = logging.getLogger(__name__)

MULTITASK_STRATEGIES = ("reject", "interrupt", "enqueue", "rollback")


class HasInfo(Protocol):
    """A run as a thread change shows it: a LiveRun, or the RunInfo another node sent."""

    def info(self) -> JsonObject: ...


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run known by its RunInfo only (told by another node)."""

    data: JsonObject

    def info(self) -> JsonObject:
        return self.data


@dataclass(frozen=True, slots=True)
class ThreadChanged:
    """What a thread listener is told: ``change`` (``updated``, ``run_started``,
    ``run_ended``, ``deleted``) of ``thread_id``, at ``revision``, with the run it
    concerns, if any."""

    thread_id: str
    change: str
    revision: int
    run: HasInfo | None = None


ThreadListener = Callable[[ThreadChanged], None]


@dataclass(frozen=True, slots=True)
class ThreadChange:
    """One thread operation: ``kind`` is one of ``turns.OPERATIONS``. ``run`` false: an
    ``edit`` saved without a run. ``title`` and ``metadata``: those of the run it starts
    (``start``)."""

    kind: str
    agent: str | None = None
    input: JsonObject | None = None
    content: str | None = None
    turn_id: str | None = None
    multitask: str = "reject"
    expected_revision: int | None = None
    run: bool = True
    title: str | None = None
    metadata: JsonObject | None = None


class ThreadOperations:
    """Thread operations, mixed into ``RunManager``: what they need of it is named below."""

    if TYPE_CHECKING:
        store: Store
        agents: AgentCatalog
        settings: EngineSettings
        runs: dict[str, LiveRun]
        _active: dict[str, str]
        _live_runs: int

        def _check_open(self) -> None: ...
        def _check_capacity(self) -> None: ...
        def _new_run(
            self,
            thread_id: str,
            agent: str,
            input: JsonObject,
            now: float,
            title: str | None = None,
            metadata: JsonObject | None = None,
        ) -> LiveRun: ...
        def _admit(
            self,
            run: LiveRun,
            agent: AgentSpec,
            history: list[JsonObject],
            active: LiveRun | None,
            multitask: str,
        ) -> None: ...
        def _request_stop(self, run: LiveRun, *, reason: str, by: str | None) -> None: ...

    def _init_threads(self) -> None:
        self._revisions: dict[str, int] = {}  # last known revision per thread
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._thread_listeners: dict[str, set[ThreadListener]] = {}

    async def create_thread(
        self, metadata: JsonObject | None = None, title: str | None = None
    ) -> ThreadRecord:
        """Create a thread; it is on disk before this returns.

        Raises: PayloadTooLargeError (metadata over its limit).
        """
        check_metadata(metadata or {})
        now = time.time()
        thread = ThreadRecord(new_thread_id(), metadata or {}, now, now, title=title)
        await self.store.create_thread(thread)
        return thread

    async def get_thread(self, thread_id: str) -> ThreadRecord:
        """Raises: NotFoundError."""
        thread = await self.store.get_thread(thread_id)
        if thread is None:
            raise NotFoundError(f"no thread {thread_id}")
        self._revisions[thread_id] = thread.revision
        return thread

    def thread_info(self, thread: ThreadRecord) -> JsonObject:
        """ThreadInfo of PROTOCOL.md §6."""
        return {
            "thread_id": thread.thread_id,
            "revision": thread.revision,
            "head": thread.head,
            "active_run_id": self._active.get(thread.thread_id),
            "title": thread.title,
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

    def _notify_thread(
        self,
        thread_id: str,
        change: str,
        run: HasInfo | None = None,
        revision: int | None = None,
    ) -> None:
        """Tell the thread's listeners of ``change`` (at ``revision``, default the last
        this process knows)."""
        listeners = self._thread_listeners.get(thread_id)
        if not listeners:
            return
        if revision is None:
            revision = self._revisions.get(thread_id, 0)
        event = ThreadChanged(thread_id, change, revision, run)
        for listener in list(listeners):
            try:
                listener(event)
            except Exception:
                # One watcher's failure is its own: the run and the other watchers go on.
                logger.exception("thread_id=%s: a thread listener failed", thread_id)

    async def thread_view(self, thread: ThreadRecord, *, all_turns: bool = False) -> JsonObject:
        """ThreadInfo with ``turns``: the active path, or every turn with ``all_turns``.

        An assistant turn of a run in memory shows the run's current text and status.
        """
        turns = {t.turn_id: t for t in await self._turns_now(thread.thread_id)}
        shown = turns.values() if all_turns else turns_.active_path(turns, thread.head)
        return {**self.thread_info(thread), "turns": [turn.to_dict() for turn in shown]}

    async def _turns_now(self, thread_id: str) -> list[turns_.Turn]:
        """The thread's turns, each of a run in memory as the run is now."""
        return [self._live_turn(turn) for turn in await self.store.load_turns(thread_id)]

    def _live_turn(self, turn: turns_.Turn) -> turns_.Turn:
        run = self.runs.get(turn.run_id or "")
        if run is None:
            return turn
        return dataclasses.replace(
            turn, content=run.state["message"]["content"], status=run.status.value
        )

    async def change_thread(
        self, thread_id: str, change: ThreadChange, *, new_thread: ThreadRecord | None = None
    ) -> tuple[ThreadRecord, LiveRun | None]:
        """Apply a thread operation (PROTOCOL.md §6) and start its run, if it has one.

        Everything is decided before anything changes; then the thread's row, its new
        turns and the new run are written in one transaction before this returns.

        Raises:
            ConflictError (stale ``expected_revision``), RunInProgressError (busy thread,
            ``reject``), NotFoundError (thread or turn), BadRequestError (nothing to act on,
            bad input, bad multitask), UnknownAgentError, ShuttingDownError,
            OverloadedError (it would start a run, and ``max_live_runs`` runs are live;
            nothing is written), PayloadTooLargeError (the run's metadata).
        """
        self._check_open()
        if change.multitask not in MULTITASK_STRATEGIES:
            raise BadRequestError(
                f"multitask must be one of {', '.join(MULTITASK_STRATEGIES)}", field="multitask"
            )
        if change.metadata is not None:
            check_metadata(change.metadata)
        starts_run = change.kind in turns_.RUN_OPERATIONS and change.run
        if change.multitask == "enqueue" and not starts_run:
            raise BadRequestError(
                f"multitask 'enqueue' applies to operations that start a run, not {change.kind}",
                field="multitask",
            )
        agent = self.agents.get(change.agent or self.settings.default_agent) if starts_run else None
        if agent is not None:
            self._check_capacity()  # early, to spare the reads; _apply_change decides
        async with self._thread_lock(thread_id):
            thread = new_thread or await self.get_thread(thread_id)
            if change.expected_revision is not None and change.expected_revision != thread.revision:
                raise ConflictError(
                    f"thread {thread_id} is at revision {thread.revision}",
                    expected_revision=change.expected_revision,
                    actual_revision=thread.revision,
                )
            active = self.runs.get(self._active.get(thread_id, ""))
            if active is not None and change.multitask == "reject":
                raise RunInProgressError(thread_id, active.run_id)
            turns = (
                {}
                if new_thread is not None
                else {turn.turn_id: turn for turn in await self.store.load_turns(thread_id)}
            )
            head = thread.head
            if active is not None and change.multitask == "rollback":
                head = await self._head_before(active, turns, head)
            new_head, plan = turns_.plan_operation(
                change.kind,
                turns,
                head,
                turn_id=change.turn_id,
                content=change.content,
                run=change.run,
            )
            run_input: JsonObject = {}
            if agent is not None:
                if change.kind == "start":
                    run_input = agent.validate_input(change.input or {})
                else:
                    assert plan is not None
                    question = plan.user_content
                    if question is None:
                        assert isinstance(plan.parent, str)
                        question = turns[plan.parent].content
                    run_input = agent.validate_input({"content": question})
            # Decided; from here on the change is applied.
            now = time.time()
            bump = change.kind != "start" or new_head != thread.head
            updated = dataclasses.replace(
                thread,
                revision=thread.revision + (1 if bump else 0),
                head=new_head,
                updated_at=now if bump else thread.updated_at,
            )
            run: LiveRun | None = None
            new_turns: list[turns_.Turn] = []
            history: list[JsonObject] = []
            if agent is not None:
                run = self._new_run(
                    thread_id, agent.name, run_input, now, change.title, change.metadata
                )
                if active is None:
                    new_turns, head_after, history = materialize(updated, turns, plan, run, now)
                    updated = dataclasses.replace(updated, head=head_after)
                else:
                    run.plan = plan
                    run.go = asyncio.get_running_loop().create_future()
            elif plan is not None:  # turns and no run: an edit saved as it is
                new_turns, head_after, _ = materialize(updated, turns, plan, None, now)
                updated = dataclasses.replace(updated, head=head_after)
            # Once the write has begun, it and the bookkeeping after it finish even if the
            # caller goes away: what is on disk is also what is in memory.
            stopped = await asyncio.shield(
                self._apply_change(updated, new_turns, run, agent, history, active, change, bump)
            )
        if active is not None and change.multitask in ("interrupt", "rollback"):
            # Answer once the change has taken effect: the active run ended, and the new
            # run (if any) started with its turns on the active path.
            async with asyncio.timeout(self.settings.stop_grace_s + 5.0):
                await active.wait_ended()
                if stopped is not None:
                    await stopped.wait_ended()
                if run is not None:
                    await run.wait_started()
            return await self.get_thread(thread_id), run
        return updated, run

    async def _apply_change(
        self,
        updated: ThreadRecord,
        new_turns: list[turns_.Turn],
        run: LiveRun | None,
        agent: AgentSpec | None,
        history: list[JsonObject],
        active: LiveRun | None,
        change: ThreadChange,
        bump: bool,
    ) -> LiveRun | None:
        """Write a decided thread change, then register its run and stop the active one.

        Returns the run it stopped (interrupt, rollback), if any.

        Raises:
            OverloadedError: ``run`` would be one live run too many; nothing is written.
        """
        thread_id = updated.thread_id
        if run is not None:
            # Counted from here, before the write: concurrent starts cannot all pass.
            self._check_capacity()
            self._live_runs += 1
        try:
            read = updated.revision - (1 if bump else 0)
            await self._write_thread(updated, new_turns, [run.unflushed()] if run else [], read)
        except BaseException:
            if run is not None:
                self._live_runs -= 1
            raise
        self._revisions[thread_id] = updated.revision
        if active is not None:
            # A run's end does not wait for the thread lock: the active run seen when the
            # change was decided may have ended since, and a queued one taken its place.
            active = self.runs.get(self._active.get(thread_id, ""))
        if run is not None:
            assert agent is not None
            self._admit(run, agent, history, active, change.multitask)
        stopped = None
        if active is not None and change.multitask in ("interrupt", "rollback"):
            self._request_stop(active, reason="stop", by=change.multitask)
            stopped = active
        if bump:
            self._notify_thread(thread_id, "updated", run)
        return stopped

    async def _write_thread(
        self,
        thread: ThreadRecord,
        turns: list[turns_.Turn],
        runs: list[RunWrite],
        read_revision: int,
    ) -> None:
        """Write a decided change (``read_revision``: the revision it was decided on; one
        process's thread lock already keeps it from moving on meanwhile)."""
        await self.store.write_thread(thread, turns, runs)

    async def _head_before(
        self, run: LiveRun, turns: dict[str, turns_.Turn], head: str | None
    ) -> str | None:
        """The head with ``run``'s user and assistant turns taken off the active path (an
        aside's are not on it: the head stays)."""
        own = await self.store.turn_of_run(run.run_id)
        if own is None:
            return head
        _, question_id = own
        if question_id is None or question_id not in turns:
            return head
        if all(turn.turn_id != question_id for turn in turns_.active_path(turns, head)):
            return head
        return turns[question_id].parent_id

    def _thread_lock(self, thread_id: str) -> asyncio.Lock:
        lock = self._locks.get(thread_id)
        if lock is None:
            lock = self._locks[thread_id] = asyncio.Lock()
        return lock


def materialize(
    thread: ThreadRecord,
    turns: dict[str, turns_.Turn],
    plan: turns_.TurnPlan | None,
    run: LiveRun | None,
    now: float,
) -> tuple[list[turns_.Turn], str | None, list[JsonObject]]:
    """The turns written by ``plan`` (``run``'s, when it answers), the head after them,
    and the history the agent gets: the active path up to and including the user turn
    it answers (empty when no run answers)."""
    if plan is None:
        return [], thread.head, turns_.history(turns_.active_path(turns, thread.head))
    parent = thread.head if isinstance(plan.parent, turns_.Head) else plan.parent
    new: list[turns_.Turn] = []
    if plan.user_content is not None:
        question = turns_.Turn(
            new_turn_id(),
            thread.thread_id,
            parent,
            turns_.USER,
            plan.user_content,
            None,
            "completed",
            now,
        )
        new.append(question)
        parent = question.turn_id
        if not plan.answered:
            return new, question.turn_id, []
    assert run is not None, "a plan that is answered needs its run"
    answer = turns_.Turn(
        new_turn_id(),
        thread.thread_id,
        parent,
        turns_.ASSISTANT,
        "",
        run.run_id,
        RunStatus.QUEUED.value,
        now,
    )
    new.append(answer)
    every = {**turns, **{turn.turn_id: turn for turn in new}}
    head = answer.turn_id if plan.moves_head else thread.head
    return new, head, turns_.history(turns_.active_path(every, parent))
