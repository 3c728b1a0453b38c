"""RunManager: start, one active run per thread, stop, respond, supervision, shutdown,
crash recovery, reading back from the store, linger and eviction."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from app.agents.builtin import register_builtins
from app.agents.context import RunContext
from app.agents.registry import Agent, AnyInput, Registry
from app.config import Settings
from app.core import events as ev
from app.core.events import Event, JsonObject, RunStatus
from app.core.turns import Turn
from app.engine.manager import EngineSettings, RunManager, ThreadChange
from app.engine.run import LiveRun
from app.engine.threads import ThreadChanged
from app.errors import (
    AgentError,
    BadRequestError,
    NotFoundError,
    NotWaitingError,
    OverloadedError,
    RunInProgressError,
    ShuttingDownError,
    StoreError,
    UnknownAgentError,
)
from app.store.base import RunQuery, RunRecord, RunWrite, ThreadRecord
from app.store.sqlite import SqliteStore
from tests.fakes import (
    RecordingStore,
    Stubborn,
    boom,
    cleanup_fails,
    hold,
    run_data,
    self_cancel,
    settle,
    swallow,
    until,
)

pytestmark = pytest.mark.timeout(15)

MakeManager = Callable[..., Awaitable[RunManager]]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "runcast.db"


class FaultyStore(RecordingStore):
    """RecordingStore with more faults: ``fail_load_turns = k`` fails the next k reads of
    turns (StoreError); ``bugs = k`` makes the next k writes raise an error that is not a
    StoreError (a bug); ``on_write`` is called as each write begins; ``write_gate`` holds
    flushes (not thread changes) as ``gate`` holds both, and ``write_entered`` is set once
    one waits there."""

    fail_load_turns = 0
    bugs = 0
    on_write: Callable[[], None] | None = None
    write_gate: asyncio.Event | None = None
    write_entered: asyncio.Event | None = None

    async def load_turns(self, thread_id: str) -> list[Turn]:
        if self.fail_load_turns:
            self.fail_load_turns -= 1
            raise StoreError("injected read failure")
        return await super().load_turns(thread_id)

    async def write(self, batch: Sequence[RunWrite]) -> None:
        if self.on_write is not None:
            self.on_write()
        if self.write_gate is not None:
            if self.write_entered is not None:
                self.write_entered.set()
            await self.write_gate.wait()
        if self.bugs:
            self.bugs -= 1
            raise RuntimeError("a bug in the store")
        await super().write(batch)


@pytest.fixture
async def store(db: Path) -> AsyncIterator[FaultyStore]:
    """A real SQLite store; the manager opens it, the fixture closes it last."""
    store = FaultyStore(db)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def stubborn() -> Stubborn:
    return Stubborn()


@pytest.fixture
def registry(stubborn: Stubborn) -> Registry:
    registry = Registry()
    register_builtins(registry)
    registry.add("hold", hold)
    registry.add("boom", boom)
    registry.add("swallow", swallow)
    registry.add("cleanup_fails", cleanup_fails)
    registry.add("self_cancel", self_cancel)
    registry.add("stubborn", stubborn)
    return registry


@pytest.fixture
async def managers(
    store: RecordingStore, registry: Registry, stubborn: Stubborn
) -> AsyncIterator[MakeManager]:
    """``await managers(**settings)`` opens a manager; teardown closes every one of them,
    then lets the stubborn agent go and awaits what is left of it."""
    opened: list[RunManager] = []

    async def make(agents: Any = None, **overrides: Any) -> RunManager:
        settings: dict[str, Any] = {
            # A long interval: only commits (start, end) and close() write, unless a test
            # asks for the throttle.
            "flush_interval_s": 60.0,
            "stop_grace_s": 0.2,
            "shutdown_grace_s": 0.5,
            "linger_s": 60.0,
            **overrides,
        }
        manager = RunManager(store, agents or registry, EngineSettings(**settings))
        await manager.open()
        opened.append(manager)
        return manager

    try:
        yield make
    finally:
        async with asyncio.timeout(10):
            for manager in opened:
                await manager.close()
            stubborn.release.set()
            leftovers = [
                run.agent_task
                for manager in opened
                for run in manager.runs.values()
                if run.agent_task is not None
            ]
            await asyncio.gather(*leftovers, return_exceptions=True)


@pytest.fixture
async def manager(managers: MakeManager) -> RunManager:
    return await managers()


async def ended(run: LiveRun, timeout_s: float = 3.0) -> LiveRun:
    async with asyncio.timeout(timeout_s):
        await run.wait_ended()
    return run


async def started(run: LiveRun) -> LiveRun:
    """Wait until the agent has emitted its first event (``held`` for the test agents)."""
    async with asyncio.timeout(3):
        await until(run, lambda r: r.last_index >= 2)
    return run


def last_data(run: LiveRun) -> JsonObject:
    return run.read_after(run.last_index - 1)[0].data


# -- start ---------------------------------------------------------------------------------


async def test_start_persists_the_run_before_returning(
    manager: RunManager, store: RecordingStore
) -> None:
    run = await manager.start("hold", {})
    record = await store.get_run(run.run_id)
    assert record is not None
    assert (record.thread_id, record.agent, record.status) == (run.thread_id, "hold", "queued")
    assert record.epoch == run.epoch
    assert await store.get_thread(run.thread_id) is not None
    assert manager.runs[run.run_id] is run
    assert run.info()["run_id"] == run.run_id


async def test_start_fills_in_input_defaults(manager: RunManager) -> None:
    run = await manager.start("counter", {"n": 2})
    assert run.input == {"n": 2, "delay_s": 0.0, "start_delay_s": 0.0}
    await ended(run)
    assert run.status == RunStatus.COMPLETED
    assert [e.type for e in run.read_after(0)] == ["status", "tick", "tick", "status"]


async def test_one_active_run_per_thread(manager: RunManager, store: RecordingStore) -> None:
    first = await manager.start("hold", {})
    thread_id = first.thread_id

    with pytest.raises(RunInProgressError) as caught:
        await manager.start("counter", {"n": 1}, thread_id=thread_id)
    assert caught.value.details == {"active_run_id": first.run_id}
    assert [r.run_id for r in await store.list_runs(RunQuery(thread_id=thread_id), limit=9)] == [
        first.run_id
    ], "a refused start creates nothing"
    thread = await manager.get_thread(thread_id)
    assert manager.thread_info(thread)["active_run_id"] == first.run_id

    other = await manager.start("counter", {"n": 1})  # another thread is not affected
    assert other.thread_id != thread_id

    manager.stop(first)
    await ended(first)
    # Released as soon as the end is published.
    assert manager.thread_info(thread)["active_run_id"] is None
    second = await manager.start("counter", {"n": 1}, thread_id=thread_id)
    await ended(second)
    assert second.status == RunStatus.COMPLETED
    third = await manager.start("counter", {"n": 1}, thread_id=thread_id)
    await ended(third)


async def test_unknown_agent(manager: RunManager) -> None:
    with pytest.raises(UnknownAgentError) as caught:
        await manager.start("nope", {})
    assert caught.value.details == {"field": "agent"}
    assert manager.runs == {}


@pytest.mark.parametrize(
    ("input", "field"),
    [
        ({"n": "many"}, "input.n"),
        ({}, "input.n"),
        ({"n": -1}, "input.n"),
        ({"n": 1, "extra": True}, "input.extra"),
    ],
)
async def test_bad_input_names_the_field(
    manager: RunManager, input: JsonObject, field: str
) -> None:
    with pytest.raises(BadRequestError) as caught:
        await manager.start("counter", input)
    assert caught.value.details["field"] == field
    assert manager.runs == {}


async def test_bad_multitask(manager: RunManager) -> None:
    with pytest.raises(BadRequestError) as caught:
        await manager.start("counter", {"n": 1}, multitask="sometimes")
    assert caught.value.details["field"] == "multitask"
    first = await manager.start("hold", {})
    with pytest.raises(BadRequestError) as caught:  # enqueue is for operations with a run
        await manager.change_thread(first.thread_id, ThreadChange("undo", multitask="enqueue"))
    assert caught.value.details["field"] == "multitask"


async def test_unknown_thread(manager: RunManager) -> None:
    with pytest.raises(NotFoundError):
        await manager.start("counter", {"n": 1}, thread_id="thr_nope")
    assert manager.runs == {}


async def test_a_start_cancelled_while_it_is_written_still_starts_whole(
    manager: RunManager, store: RecordingStore
) -> None:
    # Once the write has begun, the caller going away changes nothing: the run is on disk,
    # in memory, active in its thread, and runs to its end.
    thread = await manager.create_thread()
    started = asyncio.Event()
    manager.watch_thread(
        thread.thread_id, lambda change: change.change == "run_started" and started.set()
    )
    store.gate = asyncio.Event()
    starting = asyncio.create_task(manager.start("counter", {"n": 1}, thread_id=thread.thread_id))
    async with asyncio.timeout(2):
        await store.entered.wait()
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert manager.runs == {}
    store.gate.set()
    store.gate = None
    async with asyncio.timeout(5):
        await started.wait()
    (run,) = manager.runs.values()
    assert await store.get_run(run.run_id) is not None
    await ended(run)
    assert manager.thread_info(thread)["active_run_id"] is None


async def test_start_is_refused_once_closing(manager: RunManager) -> None:
    await manager.close()
    assert manager.closing
    with pytest.raises(ShuttingDownError):
        await manager.start("counter", {"n": 1})


# -- supervision ---------------------------------------------------------------------------


async def test_a_failing_agent_fails_its_run_and_no_other(
    manager: RunManager, store: RecordingStore, caplog: pytest.LogCaptureFixture
) -> None:
    keep = await started(await manager.start("hold", {}))
    bad = await ended(await manager.start("boom", {}))

    # The exception's text is for the log, never for clients.
    error = {"code": "agent_error", "message": "the agent failed"}
    (logged,) = [r for r in caplog.records if r.exc_info and r.exc_info[1] is not None]
    assert logged.levelno == logging.WARNING
    assert f"run_id={bad.run_id}" in logged.getMessage()
    assert repr(logged.exc_info[1]) == "RuntimeError('boom')"  # type: ignore[index]
    assert bad.status == RunStatus.FAILED
    assert bad.state["error"] == error
    assert last_data(bad) == {"status": "failed", "error": error}
    assert bad.state["message"]["content"] == "about to fail"
    record = await store.get_run(bad.run_id)
    assert record is not None and record.status == "failed"

    await settle()
    assert not keep.ended and keep.status == RunStatus.RUNNING
    assert keep.agent_task is not None and not keep.agent_task.done()
    keep.append("tick", {"n": 1})  # still writable
    manager.stop(keep)
    assert (await ended(keep)).status == RunStatus.STOPPED


async def test_an_agent_that_cancels_itself_fails(manager: RunManager) -> None:
    run = await ended(await manager.start("self_cancel", {}))
    assert run.status == RunStatus.FAILED
    assert run.state["error"]["code"] == "cancelled"


async def test_stop_ends_the_run_stopped_with_by(
    manager: RunManager, store: RecordingStore
) -> None:
    run = await started(await manager.start("hold", {}))
    assert manager.stop(run, by="conn_1") == {"stopping": True, "status": "running"}
    assert manager.stop(run, by="conn_2") == {"stopping": True, "status": "running"}
    await ended(run)
    assert run.status == RunStatus.STOPPED
    assert last_data(run) == {"status": "stopped", "by": "conn_1"}, "the first stop wins"
    # The terminal status was on disk before the run was reported ended.
    record = await store.get_run(run.run_id)
    assert record is not None
    assert (record.status, record.last_index) == ("stopped", run.last_index)
    assert manager.stop(run, by="conn_2") == {"stopping": False, "status": "stopped"}


async def test_stop_without_by(manager: RunManager) -> None:
    run = await started(await manager.start("hold", {}))
    manager.stop(run)
    await ended(run)
    assert last_data(run) == {"status": "stopped"}


async def test_stopping_a_queued_run_never_runs_the_agent(manager: RunManager) -> None:
    first = await manager.start("hold", {})
    run = await manager.start("hold", {}, thread_id=first.thread_id, multitask="enqueue")
    assert manager.stop(run, by="c") == {"stopping": True, "status": "queued"}
    await ended(run)
    assert run_data(run) == [("status", {"status": "stopped", "by": "c"})]
    assert run.agent_task is None
    assert manager.thread_info(await manager.get_thread(first.thread_id))["active_run_id"] == (
        first.run_id
    )
    manager.stop(first)
    await ended(first)


async def test_stop_of_an_ended_run_is_not_an_error(manager: RunManager) -> None:
    run = await ended(await manager.start("counter", {"n": 1}))
    assert manager.stop(run, by="c") == {"stopping": False, "status": "completed"}
    assert run.status == RunStatus.COMPLETED


async def test_stop_while_the_end_is_being_written_is_too_late(
    manager: RunManager, store: RecordingStore
) -> None:
    run = await manager.start("counter", {"n": 0})
    store.gate = asyncio.Event()
    async with asyncio.timeout(2):
        await store.entered.wait()  # the end, staged, on its way to disk
    assert run.staged is not None
    assert manager.stop(run, by="c") == {"stopping": False, "status": "running"}
    store.gate.set()
    await ended(run)
    assert run.status == RunStatus.COMPLETED


async def test_stop_during_requires_action(manager: RunManager) -> None:
    run = await manager.start("ask", {"prompt": "name?"})
    async with asyncio.timeout(3):
        await until(run, lambda r: r.status == RunStatus.REQUIRES_ACTION)
    request_id = run.state["pending_input"]["request_id"]
    assert run.pending_input is not None

    assert manager.stop(run, by="c2") == {"stopping": True, "status": "requires_action"}
    with pytest.raises(NotWaitingError):
        manager.respond(run, request_id, "too late")  # stopping: no answer taken
    await ended(run)

    assert run.status == RunStatus.STOPPED
    assert run.pending_input is None
    assert [(e.type, e.data.get("status")) for e in run.read_after(0)] == [
        ("status", "running"),
        ("input_required", None),
        ("status", "requires_action"),
        ("status", "stopped"),
    ]
    assert last_data(run) == {"status": "stopped", "by": "c2"}
    with pytest.raises(NotWaitingError):
        manager.respond(run, request_id, "later still")
    assert run.status == RunStatus.STOPPED


class StubbornAsker:
    """Asks for input and keeps waiting for it through any cancellation (shielded)."""

    def __init__(self) -> None:
        self.request: asyncio.Future[Any] | None = None

    async def __call__(self, ctx: Any) -> None:
        self.request = asyncio.ensure_future(ctx.request_input("still there?"))
        while not self.request.done():
            try:
                await asyncio.shield(self.request)
            except asyncio.CancelledError:
                pass


async def test_an_abandoned_run_waiting_for_input_takes_no_answer(
    manager: RunManager, registry: Registry
) -> None:
    asker = StubbornAsker()
    registry.add("stubborn_ask", asker)
    run = await manager.start("stubborn_ask", {})
    async with asyncio.timeout(3):
        await until(run, lambda r: r.status == RunStatus.REQUIRES_ACTION)
    assert run.pending_input is not None
    request_id = run.pending_input[0]
    manager.stop(run, by="c")
    await ended(run)  # after the grace: the agent is abandoned, its request still open
    assert run.status == RunStatus.STOPPED
    assert run.pending_input is None
    with pytest.raises(NotWaitingError):
        manager.respond(run, request_id, "x")
    assert asker.request is not None and run.agent_task is not None
    asker.request.cancel()
    async with asyncio.timeout(2):
        await run.agent_task


async def test_an_agent_ignoring_cancellation_is_abandoned_after_the_grace(
    managers: MakeManager, stubborn: Stubborn
) -> None:
    manager = await managers(stop_grace_s=0.2)
    run = await started(await manager.start("stubborn", {}))
    clock = asyncio.get_running_loop().time
    began = clock()
    manager.stop(run, by="c")
    await ended(run)
    elapsed = clock() - began

    assert 0.19 <= elapsed < 1.5
    assert run.status == RunStatus.STOPPED
    assert last_data(run) == {"status": "stopped", "by": "c"}
    assert stubborn.cancellations == 1
    assert run.agent_task is not None and not run.agent_task.done(), "abandoned, not awaited"
    assert manager.thread_info(await manager.get_thread(run.thread_id))["active_run_id"] is None

    stubborn.release.set()
    async with asyncio.timeout(2):
        await run.agent_task


async def test_an_agent_that_swallows_the_stop_still_ends_stopped(manager: RunManager) -> None:
    run = await started(await manager.start("swallow", {}))
    manager.stop(run, by="c")
    await ended(run)
    assert last_data(run) == {"status": "stopped", "by": "c"}


async def test_an_agent_whose_cleanup_fails_on_stop_ends_stopped(manager: RunManager) -> None:
    run = await started(await manager.start("cleanup_fails", {}))
    manager.stop(run, by="c")
    await ended(run)
    assert last_data(run) == {"status": "stopped", "by": "c"}
    assert run.state["error"] is None


async def test_an_agent_error_chooses_what_clients_see(
    manager: RunManager, registry: Registry, store: RecordingStore
) -> None:
    async def refuses(ctx: RunContext) -> None:
        await ctx.text("checking")
        raise AgentError("quota_exceeded", "the monthly quota is used up")

    async def leaks(ctx: RunContext) -> None:
        raise ValueError("password=hunter2 at /srv/secret.txt")

    registry.add("refuses", refuses)
    registry.add("leaks", leaks)
    chosen = await ended(await manager.start("refuses", {}))
    generic = await ended(await manager.start("leaks", {}))

    assert last_data(chosen) == {
        "status": "failed",
        "error": {"code": "quota_exceeded", "message": "the monthly quota is used up"},
    }
    assert last_data(generic) == {
        "status": "failed",
        "error": {"code": "agent_error", "message": "the agent failed"},
    }
    stored = await store.read_events(generic.run_id, 0, None)
    assert not any("hunter2" in event.json for event in stored)
    record = await store.get_run(generic.run_id)
    assert record is not None and "hunter2" not in repr(record)


def plain(ctx: RunContext) -> None:
    """A plain ``def``: calling it runs it at once and returns None, not a coroutine."""


def plain_raises(ctx: RunContext) -> None:
    raise RuntimeError("raised by a plain def")


class WithUnchecked:
    """The registry, plus agents ``Registry.add`` would refuse: the engine gets agents
    through a protocol, so it must survive them anyway."""

    def __init__(self, registry: Registry, **unchecked: Callable[[RunContext], None]) -> None:
        self.registry = registry
        self.unchecked = unchecked

    def get(self, name: str) -> Agent:
        fn = self.unchecked.get(name)
        if fn is None:
            return self.registry.get(name)
        return Agent(name, fn, "", AnyInput)  # type: ignore[arg-type]


@pytest.mark.parametrize("agent", ["plain", "plain_raises"])
async def test_a_plain_def_agent_fails_its_run_and_the_thread_goes_on(
    managers: MakeManager, registry: Registry, agent: str, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = WithUnchecked(registry, plain=plain, plain_raises=plain_raises)
    manager = await managers(agents=catalog)
    first = await started(await manager.start("hold", {}))
    bad = await manager.start(agent, {}, thread_id=first.thread_id, multitask="enqueue")
    after = await manager.start("counter", {"n": 2}, thread_id=first.thread_id, multitask="enqueue")
    manager.stop(first)

    assert (await ended(bad)).status == RunStatus.FAILED
    assert last_data(bad)["error"] == {"code": "agent_error", "message": "the agent failed"}
    assert (await ended(after)).status == RunStatus.COMPLETED
    assert manager.thread_info(await manager.get_thread(first.thread_id))["active_run_id"] is None
    assert manager.live_runs == 0
    details = [str(r.exc_info[1]) for r in caplog.records if r.exc_info and r.exc_info[1]]
    if agent == "plain":
        assert details == [
            "agent 'plain' must be an async function (async def); it returned NoneType"
        ]
    else:
        assert details == ["raised by a plain def"]


async def test_a_store_error_as_a_queued_run_begins_fails_it_and_the_next_one_runs(
    manager: RunManager, store: FaultyStore, caplog: pytest.LogCaptureFixture
) -> None:
    thread = await manager.create_thread()
    _, first = await manager.change_thread(
        thread.thread_id, ThreadChange("send", agent="hold", content="one")
    )
    assert first is not None
    await started(first)
    queued = []
    for content in ("two", "three"):
        _, run = await manager.change_thread(
            thread.thread_id,
            ThreadChange("send", agent="echo", content=content, multitask="enqueue"),
        )
        assert run is not None
        queued.append(run)
    store.fail_load_turns = 1  # the next run's turn comes: its turns cannot be read
    manager.stop(first)

    failing, next_one = queued
    assert (await ended(failing)).status == RunStatus.FAILED
    assert run_data(failing) == [
        ("status", {"status": "failed", "error": {"code": "internal", "message": ANY_TEXT}})
    ]
    assert (await ended(next_one)).status == RunStatus.COMPLETED
    assert next_one.state["message"]["content"] == "three"
    assert manager.thread_info(await manager.get_thread(thread.thread_id))["active_run_id"] is None
    record = await store.get_run(failing.run_id)
    assert record is not None and record.status == "failed"
    (logged,) = [r for r in caplog.records if r.exc_info and r.exc_info[1] is not None]
    assert f"run_id={failing.run_id}" in logged.getMessage()
    assert isinstance(logged.exc_info[1], StoreError)  # type: ignore[index]


class _AnyText:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and bool(other)


ANY_TEXT: Any = _AnyText()


async def test_a_failing_thread_listener_does_not_hold_up_the_run(
    manager: RunManager, caplog: pytest.LogCaptureFixture
) -> None:
    thread = await manager.create_thread()
    frames: list[ThreadChanged] = []

    def broken(change: ThreadChanged) -> None:
        raise RuntimeError("listener bug")

    manager.watch_thread(thread.thread_id, broken)
    manager.watch_thread(thread.thread_id, frames.append)
    run = await ended(await manager.start("counter", {"n": 1}, thread_id=thread.thread_id))
    assert run.status == RunStatus.COMPLETED
    assert [change.change for change in frames] == ["run_started", "run_ended"]
    assert sum("a thread listener failed" in r.getMessage() for r in caplog.records) == 2


async def test_a_flusher_that_fails_unexpectedly_is_restarted(
    manager: RunManager, store: FaultyStore, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[bool] = []
    store.on_write = lambda: seen.append(manager.store_degraded)
    store.bugs = 1
    run = await manager.start("counter", {"n": 1})
    # The end is committed through the flusher: its first write fails with a bug, and
    # the loop is started again by the manager.
    assert (await ended(run)).status == RunStatus.COMPLETED
    assert seen == [False, True], "degraded while the flusher is restarted"
    assert not manager.store_degraded, "a good flush clears it"
    record = await store.get_run(run.run_id)
    assert record is not None and record.status == "completed"
    (logged,) = [r for r in caplog.records if "the flusher failed" in r.getMessage()]
    assert logged.levelno == logging.ERROR
    assert repr(logged.exc_info[1]) == "RuntimeError('a bug in the store')"  # type: ignore[index]


async def test_the_flusher_restart_backoff_doubles_and_starts_over_once_it_has_written(
    manager: RunManager, store: FaultyStore, caplog: pytest.LogCaptureFixture
) -> None:
    def delays() -> list[str]:
        return [
            r.getMessage().rsplit(" ", 1)[-1]
            for r in caplog.records
            if "the flusher failed" in r.getMessage()
        ]

    store.bugs = 2
    await ended(await manager.start("counter", {"n": 1}))
    assert delays() == ["0.1s", "0.2s"]
    store.bugs = 1
    await ended(await manager.start("counter", {"n": 1}))
    assert delays() == ["0.1s", "0.2s", "0.1s"]


async def test_cancelling_a_supervisor_cancels_its_agent_and_is_not_swallowed(
    manager: RunManager,
) -> None:
    run = await started(await manager.start("hold", {}))
    assert run.task is not None and run.agent_task is not None
    run.task.cancel()
    # Not pytest.raises(CancelledError) under asyncio.timeout: it would swallow the
    # timeout's own cancellation, and a hang would pass.
    async with asyncio.timeout(2):
        await asyncio.wait({run.task, run.agent_task})
    assert run.task.cancelled() and run.agent_task.cancelled()
    assert not run.ended


async def test_store_degraded_while_writes_fail(managers: MakeManager, store: FaultyStore) -> None:
    manager = await managers(flush_interval_s=0.02)
    run = await started(await manager.start("hold", {}))
    seen: list[bool] = []
    store.on_write = lambda: seen.append(manager.store_degraded)
    store.fail_writes = 2
    run.append("tick", {"n": 1})
    async with asyncio.timeout(5):
        await store.until(lambda: any(item.last_index >= 3 for item in store.written(run.run_id)))
    assert seen[-3:] == [False, True, True]  # before the first failure; then failing
    assert not manager.store_degraded


# -- respond ---------------------------------------------------------------------------------


async def test_respond_answers_the_pending_request(manager: RunManager) -> None:
    run = await manager.start("ask", {})
    async with asyncio.timeout(3):
        await until(run, lambda r: r.status == RunStatus.REQUIRES_ACTION)
    request_id = run.state["pending_input"]["request_id"]

    with pytest.raises(NotWaitingError):
        manager.respond(run, "req_wrong", "x")
    assert run.status == RunStatus.REQUIRES_ACTION and run.pending_input is not None

    manager.respond(run, request_id, "Ada")
    assert run.status == RunStatus.RUNNING
    assert run.state["pending_input"] is None
    with pytest.raises(NotWaitingError):
        manager.respond(run, request_id, "twice")
    await ended(run)
    assert run.status == RunStatus.COMPLETED
    assert run.state["message"]["content"] == "You said: Ada"
    assert [e.type for e in run.read_after(3)] == ["input_received", "status", "text", "status"]
    assert run.read_after(3)[0].data == {"request_id": request_id, "value": "Ada"}


async def test_respond_when_nothing_is_pending(manager: RunManager) -> None:
    run = await started(await manager.start("hold", {}))
    with pytest.raises(NotWaitingError):
        manager.respond(run, "req_x", 1)


# -- shutdown and recovery -----------------------------------------------------------------


async def test_close_interrupts_live_runs_and_leaves_everything_on_disk(
    managers: MakeManager, db: Path
) -> None:
    manager = await managers()
    held = await started(await manager.start("hold", {}))
    held.append("tick", {"n": 1})  # not flushed yet: the interval is long
    asking = await manager.start("ask", {})
    async with asyncio.timeout(3):
        await until(asking, lambda r: r.status == RunStatus.REQUIRES_ACTION)
    done = await ended(await manager.start("counter", {"n": 3}))
    epochs = {run.run_id: run.epoch for run in (held, asking, done)}

    async with asyncio.timeout(5):
        await manager.close()
        await manager.close()  # twice is harmless

    for run in (held, asking):
        assert run.ended and run.status == RunStatus.INTERRUPTED
        assert last_data(run) == {"status": "interrupted", "reason": "shutdown"}
    assert done.status == RunStatus.COMPLETED

    fresh = SqliteStore(db)
    await fresh.open()
    try:
        assert await fresh.live_runs() == []
        for run in (held, asking, done):
            record = await fresh.get_run(run.run_id)
            assert record is not None
            assert (record.status, record.last_index) == (run.status.value, run.last_index)
            assert record.epoch == epochs[run.run_id], "a clean shutdown keeps the epoch"
            assert record.snapshot == run.state
            stored = await fresh.read_events(run.run_id, 0, None)
            assert [e.json for e in stored] == [e.json for e in run.read_after(0)]
    finally:
        await fresh.close()


async def test_close_abandons_an_agent_ignoring_cancellation(
    managers: MakeManager, registry: Registry
) -> None:
    once = Stubborn(patience=1)  # ignores the shutdown, not the final cancel
    registry.add("stubborn_once", once)
    manager = await managers(shutdown_grace_s=0.2)
    run = await started(await manager.start("stubborn_once", {}))
    async with asyncio.timeout(5):
        await manager.close()
    assert run.status == RunStatus.INTERRUPTED
    assert last_data(run) == {"status": "interrupted", "reason": "shutdown"}
    assert run.agent_task is not None
    async with asyncio.timeout(2):
        await asyncio.wait({run.agent_task})
    assert run.agent_task.cancelled()
    assert once.cancellations == 2


async def test_close_finishes_against_a_failing_store(
    managers: MakeManager, store: RecordingStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.engine.manager")
    manager = await managers(shutdown_grace_s=0.2)
    run = await started(await manager.start("hold", {}))
    store.fail_writes = 1_000_000
    clock = asyncio.get_running_loop().time
    began = clock()
    async with asyncio.timeout(5):
        await manager.close()
    assert clock() - began < 3.0
    assert not manager._supervisors
    # Its end is not on disk, so nobody was told it: the next start recovers it.
    assert not run.ended
    assert [record.run_id for record in await store.live_runs()] == [run.run_id]
    logged = [r.getMessage() for r in caplog.records if r.name == "app.engine.manager"]
    for phase in (
        "shutdown: refusing new runs; ending 1 live runs",
        "shutdown: 1 runs did not end within 1.2s; cancelling their supervision",
        "shutdown: stopping the flusher",
        "shutdown: final flush",
        "shutdown: the final flush failed; runs not written are left to recovery",
        "shutdown: engine closed",
    ):
        assert phase in logged
    store.fail_writes = 0


async def test_close_finishes_against_a_store_that_hangs(
    managers: MakeManager, store: RecordingStore, caplog: pytest.LogCaptureFixture
) -> None:
    manager = await managers(shutdown_grace_s=0.2)
    run = await started(await manager.start("hold", {}))
    gate = store.gate = asyncio.Event()
    try:
        async with asyncio.timeout(5):
            await manager.close()
        assert not manager._supervisors and not run.ended
        assert any(
            "the final flush did not finish within 0.2s" in r.getMessage() for r in caplog.records
        )
    finally:
        gate.set()


async def test_close_cancels_a_queued_run_stuck_beginning_on_a_hanging_store(
    managers: MakeManager, store: RecordingStore
) -> None:
    manager = await managers(shutdown_grace_s=0.2)
    thread = await manager.create_thread()
    _, first = await manager.change_thread(
        thread.thread_id, ThreadChange("send", agent="hold", content="one")
    )
    _, queued = await manager.change_thread(
        thread.thread_id, ThreadChange("send", agent="echo", content="two", multitask="enqueue")
    )
    assert first is not None and queued is not None
    await started(first)
    gate = asyncio.Event()

    def hang_the_store(change: ThreadChanged) -> None:
        # Once the first run has ended, and before the queued one writes its turns.
        if change.change == "run_ended":
            store.gate = gate

    manager.watch_thread(thread.thread_id, hang_the_store)
    manager.stop(first)
    await ended(first)
    try:
        async with asyncio.timeout(2):
            await store.entered.wait()  # the queued run's turns, held
        async with asyncio.timeout(5):
            await manager.close()
        assert not manager._supervisors
        assert queued.task is not None and queued.task.cancelled()
        assert not queued.ended and queued.agent_task is None
    finally:
        gate.set()


async def test_close_does_not_wait_for_agents_that_ignore_cancellation(
    managers: MakeManager, stubborn: Stubborn
) -> None:
    manager = await managers(shutdown_grace_s=0.2)
    run = await started(await manager.start("stubborn", {}))
    async with asyncio.timeout(5):
        await manager.close()
    assert run.status == RunStatus.INTERRUPTED
    assert run.agent_task is not None and not run.agent_task.done()
    await settle()
    assert stubborn.cancellations == 2  # the shutdown's, then close() cancels it again


async def test_close_before_open_is_harmless(store: RecordingStore, registry: Registry) -> None:
    manager = RunManager(store, registry)
    async with asyncio.timeout(2):
        await manager.close()
    assert manager.closing


async def _write_run(
    store: SqliteStore, run_id: str, status: str, events: list[Event], epoch: str = "old"
) -> RunRecord:
    thread_id = f"thr_{run_id}"
    await store.create_thread(ThreadRecord(thread_id, {}, 1.0, 1.0))
    state: JsonObject = {
        "status": status,
        "message": {"content": "partial", "thinking": "", "tools": []},
        "usage": {},
        "pending_input": None,
        "data": {},
        "error": None,
    }
    record = RunRecord(
        run_id=run_id,
        thread_id=thread_id,
        agent="counter",
        input={"n": 9},
        status=status,
        epoch=epoch,
        last_index=len(events),
        snapshot=state,
        created_at=1.0,
        updated_at=2.0,
    )
    await store.write([RunWrite(record, events)])
    return record


def _events(*statuses: str) -> list[Event]:
    out = [Event(1, ev.STATUS, {"status": "running"}, 1.1), Event(2, ev.TEXT, {"text": "p"}, 1.2)]
    out += [Event(3 + k, ev.STATUS, {"status": s}, 1.3 + k) for k, s in enumerate(statuses)]
    return out


async def test_open_recovers_runs_a_crash_cut_off(
    managers: MakeManager, store: RecordingStore, db: Path
) -> None:
    raw = SqliteStore(db)
    await raw.open()
    try:
        await _write_run(raw, "run_live", "running", _events())
        await _write_run(raw, "run_asking", "requires_action", _events("requires_action"))
        done = await _write_run(raw, "run_done", "completed", _events("completed"))
    finally:
        await raw.close()

    manager = await managers()

    assert await store.live_runs() == []
    for run_id, last in (("run_live", 2), ("run_asking", 3)):
        record = await store.get_run(run_id)
        assert record is not None
        assert record.status == "interrupted"
        assert record.epoch != "old" and len(record.epoch) >= 16
        assert record.last_index == last + 1
        assert record.snapshot["status"] == "interrupted"
        assert record.snapshot["message"]["content"] == "partial"
        stored = await store.read_events(run_id, 0, None)
        assert [e.index for e in stored] == list(range(1, last + 2))
        assert stored[-1].type == "status"
        assert stored[-1].data == {"status": "interrupted", "reason": "crash"}

        run = await manager.get(run_id)
        assert run.ended and run.status == RunStatus.INTERRUPTED
        assert run.epoch == record.epoch
    assert await store.get_run("run_done") == done, "an ended run is left alone"
    assert len(store.batches) == 1, "recovery is one transaction"
    assert {item.run_id for item in store.batches[0]} == {"run_live", "run_asking"}


async def test_get_reads_a_run_not_in_memory_back_from_the_store(
    manager: RunManager, store: RecordingStore
) -> None:
    await _write_run(store.inner, "run_old", "completed", _events("completed"), epoch="e0")
    run = await manager.get("run_old")
    assert run.ended and run.status == RunStatus.COMPLETED
    assert (run.epoch, run.last_index) == ("e0", 3)
    # Read back as its row: its events are read from disk by each reader, as it asks.
    assert len(run.log) == 0
    assert [e.index for e in await run.read_page(0, 100)] == [1, 2, 3]
    assert (await run.snapshot_at())["message"]["content"] == "partial"
    assert (await run.snapshot_at(2))["message"]["content"] == "p"
    assert await manager.get("run_old") is run
    async with asyncio.timeout(0):
        await run.wait_ended()

    await _write_run(store.inner, "run_twice", "completed", _events("completed"))
    first, second = await asyncio.gather(manager.get("run_twice"), manager.get("run_twice"))
    assert first is second

    with pytest.raises(NotFoundError):
        await manager.get("run_nope")


def eviction_queue(manager: RunManager) -> asyncio.Queue[str]:
    """Report each eviction (a timer, so nothing a test could await otherwise)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    evict = manager._evict

    def reporting(run_id: str) -> None:
        evict(run_id)
        queue.put_nowait(run_id)

    manager._evict = reporting  # type: ignore[method-assign]
    return queue


async def test_an_ended_run_is_evicted_after_linger_and_its_readers_read_on(
    managers: MakeManager,
) -> None:
    manager = await managers(linger_s=0.05)
    evicted = eviction_queue(manager)
    clock = asyncio.get_running_loop().time
    run = await ended(await manager.start("counter", {"n": 3}))
    ended_at = clock()
    assert run.run_id in manager.runs
    async with asyncio.timeout(2):
        assert await evicted.get() == run.run_id
    assert clock() - ended_at >= 0.045
    assert run.run_id not in manager.runs

    # A reader that holds the run reads on undisturbed.
    assert [e.index for e in run.read_after(0)] == [1, 2, 3, 4, 5]
    async with asyncio.timeout(0):
        await run.wait_after(2)
        await run.wait_ended()
    # A new reader gets the same run back from the store.
    again = await manager.get(run.run_id)
    assert again is not run
    assert [e.json for e in await again.read_page(0, 100)] == [e.json for e in run.read_after(0)]
    assert again.info() == run.info()
    assert manager.runs[run.run_id] is again
    async with asyncio.timeout(2):
        assert await evicted.get() == run.run_id  # loaded runs linger and go too
    assert run.run_id not in manager.runs


async def test_a_run_with_unwritten_events_is_not_evicted(manager: RunManager) -> None:
    run = await ended(await manager.start("counter", {"n": 1}))
    run.flushed_index = 0  # pretend the end is not on disk yet
    manager._evict(run.run_id)
    assert manager.runs[run.run_id] is run
    manager._evict("run_gone")  # already gone: nothing to do


# -- limits -----------------------------------------------------------------------------------


def test_engine_settings_take_their_names_and_defaults_from_settings() -> None:
    names = {field.name for field in dataclasses.fields(EngineSettings)}
    assert {"max_live_runs", "max_event_bytes", "max_unflushed"} <= names
    engine, settings = EngineSettings(), Settings()
    for name in names:
        assert getattr(engine, name) == getattr(settings, name), name


async def test_starting_past_max_live_runs_is_overloaded_and_writes_nothing(
    managers: MakeManager, store: RecordingStore
) -> None:
    manager = await managers(max_live_runs=2)
    first = await started(await manager.start("hold", {}))
    queued = await manager.start("hold", {}, thread_id=first.thread_id, multitask="enqueue")
    assert manager.live_runs == 2  # a queued run counts
    thread = await manager.get_thread(first.thread_id)
    stored = await store.list_runs(RunQuery(), limit=99)

    with pytest.raises(OverloadedError) as caught:
        await manager.start("counter", {"n": 1})
    assert caught.value.code == "overloaded"
    with pytest.raises(OverloadedError):
        await manager.change_thread(
            first.thread_id, ThreadChange("send", agent="echo", content="x", multitask="enqueue")
        )
    assert await store.list_runs(RunQuery(), limit=99) == stored
    assert await manager.get_thread(first.thread_id) == thread
    assert len(manager.runs) == 2

    manager.stop(queued)
    await ended(queued)
    assert manager.live_runs == 1
    other = await ended(await manager.start("counter", {"n": 1}))
    assert other.status == RunStatus.COMPLETED
    manager.stop(first)
    await ended(first)
    assert manager.live_runs == 0


async def test_concurrent_starts_cannot_all_pass_the_live_run_limit(
    managers: MakeManager, store: RecordingStore
) -> None:
    manager = await managers(max_live_runs=2)
    store.gate = asyncio.Event()  # every start waits in its write, after the count
    starts = [asyncio.create_task(manager.start("counter", {"n": 1})) for _ in range(5)]
    async with asyncio.timeout(3):
        await store.entered.wait()
    store.gate.set()
    store.gate = None
    async with asyncio.timeout(3):
        results = await asyncio.gather(*starts, return_exceptions=True)
    runs = [r for r in results if isinstance(r, LiveRun)]
    assert len(runs) == 2
    assert all(isinstance(r, OverloadedError) for r in results if r not in runs)
    assert len(await store.list_runs(RunQuery(), limit=99)) == 2
    for run in runs:
        await ended(run)
    assert manager.live_runs == 0


async def test_a_start_whose_write_fails_gives_its_live_run_back(
    managers: MakeManager, store: RecordingStore
) -> None:
    manager = await managers(max_live_runs=1)
    store.fail_writes = 1
    with pytest.raises(StoreError):
        await manager.start("counter", {"n": 1})
    assert manager.live_runs == 0
    assert (await ended(await manager.start("counter", {"n": 1}))).status == RunStatus.COMPLETED


async def test_an_emit_over_max_event_bytes_fails_the_run_not_the_server(
    managers: MakeManager, registry: Registry
) -> None:
    async def big(ctx: RunContext) -> None:
        await ctx.text("small")
        await ctx.text("x" * 2_000)

    registry.add("big", big)
    manager = await managers(max_event_bytes=1_024)
    keep = await started(await manager.start("hold", {}))
    run = await ended(await manager.start("big", {}))
    assert run.status == RunStatus.FAILED
    assert run.state["error"] == {"code": "agent_error", "message": "the agent failed"}
    assert run.state["message"]["content"] == "small"
    assert all(len(event.json) <= 1_024 for event in run.read_after(0))
    assert not keep.ended
    assert (await ended(await manager.start("counter", {"n": 2}))).status == RunStatus.COMPLETED
    manager.stop(keep)
    await ended(keep)


async def test_the_unflushed_budget_is_shared_by_every_run_of_the_manager(
    managers: MakeManager, store: FaultyStore
) -> None:
    manager = await managers(max_unflushed=1_500)
    store.write_gate = asyncio.Event()  # no flush reaches the disk until the test says so
    store.write_entered = asyncio.Event()
    runs = [await manager.start("counter", {"n": 3_000}) for _ in range(2)]
    async with asyncio.timeout(5):
        for run in runs:
            await until(run, lambda r: r.last_index >= 1_001)
        await store.write_entered.wait()
    await settle(20)
    # A run checks the budget after each 1,000 events. Both runs are held, and one of
    # them with 1,001 events: under the budget on its own, not with the other's.
    assert not any(run.ended for run in runs)
    assert min(run.last_index for run in runs) == 1_001
    assert manager.retention.backlog.events == sum(run.backlog for run in runs) > 1_500
    store.write_gate.set()
    for run in runs:
        assert (await ended(run, timeout_s=5)).status == RunStatus.COMPLETED
    assert manager.retention.backlog.events == 0


# -- listing, threads, watchers ------------------------------------------------------------


async def test_list_runs(manager: RunManager, store: RecordingStore) -> None:
    thread = await manager.create_thread({"title": "t"})
    a = await ended(await manager.start("counter", {"n": 1}, thread_id=thread.thread_id))
    c = await ended(await manager.start("counter", {"n": 2}))
    await _write_run(store.inner, "run_cold", "completed", _events("completed"))
    b = await started(await manager.start("hold", {}, thread_id=thread.thread_id))
    # Started last, with a long flush interval: on disk it is still queued.
    d = await started(await manager.start("hold", {}))
    record = await store.get_run(d.run_id)
    assert record is not None and record.status == "queued"
    manager.add_watcher(b)

    everything = (await manager.list_runs()).items
    assert [info["run_id"] for info in everything] == [
        d.run_id,
        b.run_id,
        c.run_id,
        a.run_id,
        "run_cold",  # created long ago
    ]
    by_id = {info["run_id"]: info for info in everything}
    assert by_id[b.run_id] == b.info() and by_id[b.run_id]["watchers"] == 1
    assert by_id[b.run_id]["status"] == "running"
    assert by_id["run_cold"]["watchers"] == 0 and by_id["run_cold"]["last_index"] == 3

    async def ids(limit: int = 50, **filters: Any) -> list[str]:
        page = await manager.list_runs(RunQuery(**filters), limit=limit)
        return [info["run_id"] for info in page.items]

    assert await ids(status="completed") == [c.run_id, a.run_id, "run_cold"]
    assert await ids(thread_id=thread.thread_id) == [b.run_id, a.run_id]
    assert await ids(limit=2) == [d.run_id, b.run_id]
    # The listing goes by what a run is now, not by its row on disk.
    assert await ids(status="queued") == []
    assert await ids(status="running") == [d.run_id, b.run_id]
    assert await ids(status="running", thread_id=thread.thread_id) == [b.run_id]
    assert await ids(status="running", limit=1) == [d.run_id]


async def test_threads_and_their_listeners(manager: RunManager) -> None:
    thread = await manager.create_thread({"title": "hello"})
    assert (await manager.get_thread(thread.thread_id)) == thread
    info = manager.thread_info(thread)
    assert info["metadata"] == {"title": "hello"} and info["revision"] == 0
    assert info["active_run_id"] is None and info["head"] is None
    with pytest.raises(NotFoundError):
        await manager.get_thread("thr_nope")

    frames: list[ThreadChanged] = []
    others: list[ThreadChanged] = []
    manager.watch_thread(thread.thread_id, frames.append)
    manager.watch_thread(thread.thread_id, others.append)
    run = await ended(await manager.start("counter", {"n": 1}, thread_id=thread.thread_id))
    assert [(f.change, f.run) for f in frames] == [("run_started", run), ("run_ended", run)]
    manager.unwatch_thread(thread.thread_id, others.append)
    manager.unwatch_thread(thread.thread_id, frames.append)
    manager.unwatch_thread(thread.thread_id, frames.append)  # already gone
    manager.unwatch_thread("thr_other", frames.append)
    await ended(await manager.start("counter", {"n": 1}, thread_id=thread.thread_id))
    assert len(frames) == 2 and len(others) == 2


async def test_watchers_are_counted_and_wake_readers(manager: RunManager) -> None:
    run = await started(await manager.start("hold", {}))
    waiting = asyncio.create_task(run.wait_after(run.last_index))
    await settle()
    assert not waiting.done()
    manager.add_watcher(run)
    async with asyncio.timeout(2):
        await waiting
    assert run.watchers == 1 and run.info()["watchers"] == 1
    waiting = asyncio.create_task(run.wait_after(run.last_index))
    await settle()
    manager.remove_watcher(run)
    async with asyncio.timeout(2):
        await waiting
    assert run.watchers == 0
    with pytest.raises(AssertionError):
        manager.remove_watcher(run)


async def test_the_flusher_writes_a_live_run_on_its_own(
    managers: MakeManager, store: RecordingStore
) -> None:
    manager = await managers(flush_interval_s=0.02)
    run = await started(await manager.start("hold", {}))

    def on_disk() -> bool:
        return any(item.last_index >= 2 for item in store.written(run.run_id))

    async with asyncio.timeout(2):
        await store.until(on_disk)
    record = await store.get_run(run.run_id)
    assert record is not None and record.status == "running"


async def test_echo_gets_its_history_from_start(manager: RunManager) -> None:
    thread = await manager.create_thread()
    _, first = await manager.change_thread(
        thread.thread_id, ThreadChange("send", agent="echo", content="hi")
    )
    assert first is not None
    await ended(first)
    _, run = await manager.change_thread(
        thread.thread_id, ThreadChange("send", agent="echo", content="again")
    )
    assert run is not None
    await ended(run)
    assert run.state["message"]["content"] == "again"
    assert run.state["data"] == {
        "history": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "again"},
        ]
    }


async def test_a_start_written_as_shutdown_begins_ends_with_the_other_runs(
    manager: RunManager, store: FaultyStore
) -> None:
    # The start passed its checks and its write is on its way when close() begins: the
    # run it creates must end (interrupted, shutdown) like every other, not stay live.
    store.gate = asyncio.Event()
    starting = asyncio.create_task(manager.start("hold", {}))
    async with asyncio.timeout(2):
        await store.entered.wait()
    closing = asyncio.create_task(manager.close())
    await asyncio.sleep(0)  # close() begins: it refuses new runs from its first step
    assert manager.closing
    store.gate.set()
    store.gate = None
    async with asyncio.timeout(5):
        run = await starting
        await closing
        await run.wait_ended()
    assert run.state["status"] == "interrupted"
    record = await store.get_run(run.run_id)
    assert record is not None and record.status == "interrupted"
