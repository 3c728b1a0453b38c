"""RunManager: start, one active run per thread, stop, respond, supervision, shutdown,
crash recovery, reading back from the store, linger and eviction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from app.agents.builtin import register_builtins
from app.agents.registry import Registry
from app.core import events as ev
from app.core.events import Event, JsonObject, RunStatus
from app.engine.manager import EngineSettings, RunManager, ThreadChange
from app.engine.run import LiveRun
from app.errors import (
    BadRequestError,
    NotFoundError,
    NotWaitingError,
    RunInProgressError,
    ShuttingDownError,
    UnknownAgentError,
)
from app.store.base import RunRecord, RunWrite, ThreadRecord
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


@pytest.fixture
async def store(db: Path) -> AsyncIterator[RecordingStore]:
    """A real SQLite store; the manager opens it, the fixture closes it last."""
    store = RecordingStore(db)
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

    async def make(**overrides: Any) -> RunManager:
        settings: dict[str, Any] = {
            # A long interval: only commits (start, end) and close() write, unless a test
            # asks for the throttle.
            "flush_interval_s": 60.0,
            "stop_grace_s": 0.2,
            "shutdown_grace_s": 0.5,
            "linger_s": 60.0,
            **overrides,
        }
        manager = RunManager(store, registry, EngineSettings(**settings))
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
    assert [r.run_id for r in await store.list_runs(status=None, thread_id=thread_id, limit=9)] == [
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
        thread.thread_id, lambda frame: frame["change"] == "run_started" and started.set()
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
    manager: RunManager, store: RecordingStore
) -> None:
    keep = await started(await manager.start("hold", {}))
    bad = await ended(await manager.start("boom", {}))

    error = {"code": "agent_error", "message": "RuntimeError: boom"}
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
        with pytest.raises(asyncio.CancelledError):
            await run.agent_task
    assert once.cancellations == 2


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
    assert [e.index for e in run.read_after(0)] == [1, 2, 3]
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
    assert [e.json for e in again.read_after(0)] == [e.json for e in run.read_after(0)]
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

    everything = await manager.list_runs()
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

    async def ids(**filters: Any) -> list[str]:
        return [info["run_id"] for info in await manager.list_runs(**filters)]

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

    frames: list[JsonObject] = []
    others: list[JsonObject] = []
    manager.watch_thread(thread.thread_id, frames.append)
    manager.watch_thread(thread.thread_id, others.append)
    run = await ended(await manager.start("counter", {"n": 1}, thread_id=thread.thread_id))
    assert [(f["type"], f["change"], f["run"]["run_id"]) for f in frames] == [
        ("thread", "run_started", run.run_id),
        ("thread", "run_ended", run.run_id),
    ]
    assert frames[1]["run"]["status"] == "completed"
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
