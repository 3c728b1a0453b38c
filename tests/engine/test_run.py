"""LiveRun: the log, its wake-up, staging of the terminal event, persistence bookkeeping.

The wake-up tests follow anyio's tests/test_synchronization.py: cancel while waiting,
notify after a cancel, many waiters on one notify.
"""

from __future__ import annotations

import asyncio

import pytest

from app.core import events as ev
from app.core.events import Event, RunStatus
from app.engine.run import LiveRun, Retention
from app.errors import CursorOutOfRangeError, PayloadTooLargeError
from app.store.base import RunRecord
from tests.fakes import ManualClock, settle

pytestmark = pytest.mark.timeout(10)


def make_run(clock: ManualClock | None = None, dirty: list[str] | None = None) -> LiveRun:
    def on_dirty(run: LiveRun) -> None:
        if dirty is not None:
            dirty.append(run.run_id)

    return LiveRun(
        run_id="run_1",
        thread_id="thr_1",
        agent="counter",
        input={"n": 3},
        epoch="e1",
        created_at=100.0,
        clock=clock or ManualClock(100.0),
        on_dirty=on_dirty,
    )


def running(clock: ManualClock | None = None) -> LiveRun:
    run = make_run(clock)
    run.append(ev.STATUS, ev.status_data(RunStatus.RUNNING))
    return run


def waiter(run: LiveRun, cursor: int) -> asyncio.Task[None]:
    return asyncio.create_task(run.wait_after(cursor))


# -- appending and reading ----------------------------------------------------------------


async def test_append_indexes_folds_and_marks_dirty() -> None:
    clock = ManualClock(100.0)
    dirty: list[str] = []
    run = make_run(clock, dirty)
    assert (run.last_index, run.status, run.ended) == (0, RunStatus.QUEUED, False)

    first = run.append(ev.STATUS, ev.status_data(RunStatus.RUNNING))
    clock.advance(0.5)
    second = run.append(ev.TEXT, {"text": "Hel"})
    clock.advance(0.25)
    third = run.append(ev.TEXT, {"text": "lo"})

    assert [first.index, second.index, third.index] == [1, 2, 3]
    assert [first.ts, second.ts, third.ts] == [100.0, 100.5, 100.75]
    assert run.updated_at == 100.75
    assert run.status == RunStatus.RUNNING
    assert run.state["message"]["content"] == "Hello"
    assert dirty == ["run_1"] * 3
    assert run.statistics() == {"events": 3, "unflushed": 3, "watchers": 0}


async def test_read_after_slices_and_refuses_a_cursor_past_the_end() -> None:
    run = running()
    for k in range(5):
        run.append("tick", {"n": k})
    assert [e.index for e in run.read_after(0)] == [1, 2, 3, 4, 5, 6]
    assert [e.index for e in run.read_after(3)] == [4, 5, 6]
    assert [e.index for e in run.read_after(1, limit=2)] == [2, 3]
    assert run.read_after(6) == []
    with pytest.raises(CursorOutOfRangeError) as caught:
        run.read_after(7)
    assert caught.value.details == {"last_index": 6, "field": "after"}


async def test_readers_of_the_same_page_share_one_text_until_the_next_loop_turn() -> None:
    run = running()
    for k in range(3):
        run.append("tick", {"n": k})
    built: list[list[int]] = []

    def build(run_id: str, epoch: str, events: list[Event]) -> str:
        built.append([e.index for e in events])
        return f"{run_id} {epoch} {[e.index for e in events]}"

    first = run.shared_text(run.read_after(0), build)
    assert first == "run_1 e1 [1, 2, 3, 4]"
    assert run.shared_text(run.read_after(0), build) is first  # another reader, same page
    assert run.shared_text(run.read_after(1), build) == "run_1 e1 [2, 3, 4]"  # another page
    run.append("tick", {"n": 3})
    assert run.shared_text(run.read_after(1), build) == "run_1 e1 [2, 3, 4, 5]"
    assert built == [[1, 2, 3, 4], [2, 3, 4], [2, 3, 4, 5]]
    await asyncio.sleep(0)  # the loop's next turn: an idle run holds no text
    assert run._shared is None
    assert run.shared_text(run.read_after(1), build) == "run_1 e1 [2, 3, 4, 5]"
    assert len(built) == 4


async def test_append_refuses_terminal_status_and_bad_transitions() -> None:
    run = make_run()
    with pytest.raises(AssertionError):
        run.append(ev.STATUS, ev.status_data(RunStatus.COMPLETED))
    with pytest.raises(AssertionError):
        run.append(ev.STATUS, ev.status_data(RunStatus.REQUIRES_ACTION))  # from queued
    assert run.last_index == 0


# -- wait_after -------------------------------------------------------------------------------


async def test_wait_after_returns_at_once_when_something_is_after_the_cursor() -> None:
    run = running()
    # A zero timeout cancels any await that suspends: returning proves it did not.
    async with asyncio.timeout(0):
        await run.wait_after(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await run.wait_after(1)


async def test_wait_after_wakes_on_append() -> None:
    run = running()
    task = waiter(run, 1)
    await settle()
    assert not task.done()
    run.append(ev.TEXT, {"text": "x"})
    async with asyncio.timeout(2):
        await task
    assert [e.index for e in run.read_after(1)] == [2]


async def test_wait_after_wakes_on_poke_without_an_event() -> None:
    run = running()
    task = waiter(run, 1)
    await settle()
    assert not task.done()
    run.poke()
    async with asyncio.timeout(2):
        await task
    assert run.last_index == 1
    run.poke()  # nobody waiting: nothing to wake, no error


async def test_wait_after_wakes_when_the_run_ends_and_returns_at_once_after() -> None:
    run = running()
    task = waiter(run, 1)
    ended = asyncio.create_task(run.wait_ended())
    await settle()
    run.stage_terminal(ev.status_data(RunStatus.COMPLETED))
    await settle()
    assert not task.done() and not ended.done(), "a staged event must not wake readers"
    run.publish_staged()
    async with asyncio.timeout(2):
        await task
        await ended
    async with asyncio.timeout(0):
        await run.wait_after(run.last_index)
        await run.wait_ended()


async def test_cancelling_a_waiter_is_safe_and_a_later_append_wakes_the_others() -> None:
    run = running()
    cancelled = waiter(run, 1)
    others = [waiter(run, 1) for _ in range(3)]
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await settle()
    assert not any(task.done() for task in others)

    run.append(ev.TEXT, {"text": "x"})
    async with asyncio.timeout(2):
        await asyncio.gather(*others)
    assert run.last_index == 2 and run.read_after(1)[0].data == {"text": "x"}


async def test_notify_in_the_same_step_as_a_cancel_still_wakes_the_others() -> None:
    run = running()
    cancelled = waiter(run, 1)
    other = waiter(run, 1)
    await settle()
    cancelled.cancel()
    run.append(ev.TEXT, {"text": "x"})  # before the cancelled waiter has run again
    async with asyncio.timeout(2):
        await other
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    # and waiting works as before afterwards
    late = waiter(run, 2)
    await settle()
    assert not late.done()
    run.append(ev.TEXT, {"text": "y"})
    async with asyncio.timeout(2):
        await late


async def test_cancelling_every_waiter_leaves_the_wakeup_usable() -> None:
    run = running()
    tasks = [waiter(run, 1) for _ in range(3)]
    await settle()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    fresh = waiter(run, 1)
    await settle()
    assert not fresh.done()
    run.append(ev.TEXT, {"text": "x"})
    async with asyncio.timeout(2):
        await fresh


async def test_many_waiters_all_wake_on_one_append() -> None:
    run = running()
    tasks = [waiter(run, 1) for _ in range(200)]
    await settle()
    assert not any(task.done() for task in tasks)
    run.append(ev.TEXT, {"text": "x"})
    async with asyncio.timeout(2):
        await asyncio.gather(*tasks)


async def test_wait_ended_is_cancel_safe() -> None:
    run = running()
    first = asyncio.create_task(run.wait_ended())
    second = asyncio.create_task(run.wait_ended())
    await settle()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    run.stage_terminal(ev.status_data(RunStatus.STOPPED, by="c1"))
    run.publish_staged()
    async with asyncio.timeout(2):
        await second


# -- the staged terminal event ------------------------------------------------------------


async def test_terminal_event_is_invisible_until_published() -> None:
    clock = ManualClock(100.0)
    dirty: list[str] = []
    run = make_run(clock, dirty)
    run.append(ev.STATUS, ev.status_data(RunStatus.RUNNING))
    run.append(ev.TEXT, {"text": "hi"})
    before = (await run.snapshot_at())["status"]
    clock.advance(1.0)

    staged = run.stage_terminal(ev.status_data(RunStatus.COMPLETED))

    assert (staged.index, staged.ts, staged.data) == (3, 101.0, {"status": "completed"})
    assert dirty[-1] == "run_1", "staging marks the run dirty so the flusher writes it"
    # Readers see nothing of it.
    assert run.last_index == 2
    assert [e.index for e in run.read_after(0)] == [1, 2]
    assert run.status == RunStatus.RUNNING and before == "running"
    assert not run.ended
    assert run.info()["status"] == "running"
    with pytest.raises(CursorOutOfRangeError):
        run.read_after(3)
    # The flusher does: the staged event and a terminal row, together.
    write = run.unflushed()
    assert [e.index for e in write.events] == [1, 2, 3]
    assert write.events[-1] is staged
    assert (write.record.status, write.record.last_index) == ("completed", 3)
    assert write.record.snapshot["status"] == "completed"
    assert write.record.updated_at == 101.0
    assert run.state["status"] == "running", "unflushed() must not touch the live state"
    # Written but not yet published: still invisible, nothing left to flush.
    run.mark_flushed(write.record.last_index)
    assert not run.needs_flush
    assert run.last_index == 2 and not run.ended

    run.publish_staged()

    assert run.ended and run.status == RunStatus.COMPLETED
    assert run.last_index == 3 and run.read_after(2) == [staged]
    assert run.updated_at == 101.0
    assert not run.needs_flush


async def test_nothing_is_appended_or_staged_after_the_end() -> None:
    run = running()
    run.stage_terminal(ev.status_data(RunStatus.FAILED, error={"code": "x", "message": "y"}))
    with pytest.raises(AssertionError):
        run.append(ev.TEXT, {"text": "late"})
    with pytest.raises(AssertionError):
        run.stage_terminal(ev.status_data(RunStatus.STOPPED))
    run.publish_staged()
    assert run.state["error"] == {"code": "x", "message": "y"}
    with pytest.raises(AssertionError):
        run.append(ev.TEXT, {"text": "late"})
    with pytest.raises(AssertionError):
        run.stage_terminal(ev.status_data(RunStatus.STOPPED))
    with pytest.raises(AssertionError):
        run.stage_terminal(ev.status_data(RunStatus.RUNNING))


# -- snapshots and info -----------------------------------------------------------------


async def test_snapshot_at_folds_earlier_indexes_and_refuses_out_of_range() -> None:
    run = running()
    run.append(ev.TEXT, {"text": "a"})
    run.append(ev.TEXT, {"text": "b"})
    assert (await run.snapshot_at())["message"]["content"] == "ab"
    assert (await run.snapshot_at(3)) is run.state
    assert (await run.snapshot_at(2))["message"]["content"] == "a"
    assert (await run.snapshot_at(0))["status"] == "queued"
    for bad in (-1, 4):
        with pytest.raises(CursorOutOfRangeError) as caught:
            (await run.snapshot_at(bad))
        assert caught.value.details["field"] == "at"
    frame = await run.snapshot_frame(2)
    assert (frame["run_id"], frame["index"], frame["epoch"]) == ("run_1", 2, "e1")
    assert (await run.snapshot_frame())["index"] == 3


async def test_info_is_run_info_of_the_protocol() -> None:
    run = running()
    run.watchers = 2
    assert run.info() == {
        "run_id": "run_1",
        "thread_id": "thr_1",
        "agent": "counter",
        "status": "running",
        "epoch": "e1",
        "last_index": 1,
        "created_at": 100.0,
        "updated_at": 100.0,
        "watchers": 2,
        "title": None,
        "metadata": {},
    }


# -- persistence bookkeeping -------------------------------------------------------------


async def test_unflushed_holds_only_what_is_new_and_mark_flushed_never_goes_back() -> None:
    run = running()
    run.append(ev.TEXT, {"text": "a"})
    assert run.needs_flush and not run.record_flushed
    first = run.unflushed()
    assert [e.index for e in first.events] == [1, 2]
    # A copy as of index 2: the store encodes it later, and what is appended meanwhile
    # must not be in it.
    assert first.record.snapshot == run.state and first.record.snapshot is not run.state
    run.mark_flushed(2)
    assert not run.needs_flush and run.record_flushed
    assert run.unflushed().events == []

    run.append(ev.TEXT, {"text": "b"})
    assert run.needs_flush
    assert [e.index for e in run.unflushed().events] == [3]
    assert first.record.snapshot["message"]["content"] == "a"
    run.mark_flushed(3)
    run.mark_flushed(1)  # an older batch finishing late does not move the mark back
    assert run.flushed_index == 3
    assert run.statistics()["unflushed"] == 0


async def test_a_new_run_needs_its_row_written_even_with_no_event() -> None:
    run = make_run()
    assert run.needs_flush
    write = run.unflushed()
    assert write.events == [] and write.record.status == "queued"
    assert write.record.last_index == 0
    run.mark_flushed(0)
    assert not run.needs_flush


def _record(status: str, last_index: int) -> RunRecord:
    return RunRecord(
        run_id="run_9",
        thread_id="thr_9",
        agent="echo",
        input={"text": "x"},
        status=status,
        epoch="e9",
        last_index=last_index,
        snapshot={"status": status, "message": {"content": "x"}},
        created_at=1.0,
        updated_at=2.0,
    )


async def test_from_record_serves_an_ended_run_from_the_store() -> None:
    events = [
        Event(1, ev.STATUS, {"status": "running"}, 1.5),
        Event(2, ev.TEXT, {"text": "x"}, 1.6),
        Event(3, ev.STATUS, {"status": "completed"}, 2.0),
    ]
    run = LiveRun.from_record(_record("completed", 3), events)
    assert run.ended and run.status == RunStatus.COMPLETED
    assert (run.last_index, run.epoch, run.updated_at) == (3, "e9", 2.0)
    assert run.read_after(1) == events[1:]
    assert not run.needs_flush
    async with asyncio.timeout(0):
        await run.wait_ended()
        await run.wait_after(3)


async def test_from_record_of_a_live_row_is_not_ended() -> None:
    run = LiveRun.from_record(
        _record("running", 1), [Event(1, ev.STATUS, {"status": "running"}, 1.5)]
    )
    assert not run.ended and run.status == RunStatus.RUNNING
    # A run with no flusher attached can still be ended.
    run.stage_terminal(ev.status_data(RunStatus.INTERRUPTED, reason="crash"))
    run.publish_staged()
    assert run.ended and run.last_index == 2


# -- limits ---------------------------------------------------------------------------------


def sharing(retention: Retention, name: str) -> LiveRun:
    """A running run of a manager whose runs share ``retention``."""
    run = LiveRun(
        run_id=f"run_{name}",
        thread_id=f"thr_{name}",
        agent="counter",
        input={},
        epoch="e1",
        created_at=100.0,
        clock=ManualClock(100.0),
        retention=retention,
    )
    run.append(ev.STATUS, ev.status_data(RunStatus.RUNNING))
    return run


async def test_append_refuses_an_event_over_max_event_bytes_before_it_is_logged() -> None:
    retention = Retention(max_event_bytes=200)
    run = sharing(retention, "a")
    overhead = len(Event(2, ev.TEXT, {"text": ""}, 100.0).json)
    before = (run.last_index, repr(run.state), retention.backlog.events, run.needs_flush)
    for text in ("x" * (200 - overhead + 1), "€" * 100, "x" * 10_000):
        with pytest.raises(PayloadTooLargeError) as caught:
            run.append(ev.TEXT, {"text": text})
        assert caught.value.details == {"field": "data"}
        assert "over the limit of 200 bytes" in caught.value.message
    assert (run.last_index, repr(run.state), retention.backlog.events, run.needs_flush) == before
    assert run.append(ev.TEXT, {"text": "x" * (200 - overhead)}).index == 2
    # "€" is three bytes in UTF-8: measured in bytes, not characters.
    assert run.append(ev.TEXT, {"text": "€" * ((200 - overhead) // 3)}).index == 3
    # A terminal event is never refused: the end of a run must be told.
    run.stage_terminal(ev.status_data(RunStatus.FAILED, error={"code": "x", "message": "y" * 300}))


async def test_the_backlog_is_one_count_over_every_run_sharing_a_retention() -> None:
    retention = Retention()
    a, b = sharing(retention, "a"), sharing(retention, "b")
    a.append(ev.TEXT, {"text": "1"})
    assert (a.backlog, b.backlog, retention.backlog.events) == (2, 1, 3)
    a.mark_flushed(2)
    assert retention.backlog.events == 1
    a.mark_flushed(1)  # a late, older batch changes nothing
    assert retention.backlog.events == 1
    b.stage_terminal(ev.status_data(RunStatus.COMPLETED))  # the staged end waits for the disk
    assert retention.backlog.events == 2
    b.mark_flushed(b.unflushed().record.last_index)
    b.publish_staged()
    assert (retention.backlog.events, b.backlog) == (0, 0)
    ended = LiveRun.from_record(_record("completed", 3), [], retention)
    assert retention.backlog.events == 0 and not ended.needs_flush  # read back: on disk


async def test_throttle_waits_for_the_flusher_past_one_budget_for_all_runs() -> None:
    commits: list[str] = []

    async def commit(run: LiveRun) -> None:
        commits.append(run.run_id)
        run.mark_flushed(run.last_index)

    retention = Retention(commit=commit, max_unflushed=10)
    runs = [sharing(retention, name) for name in "abc"]
    for run in runs:
        for k in range(3):
            run.append("tick", {"n": k})
    # 12 events not on disk, though no run has more than 4 of them.
    assert max(run.backlog for run in runs) == 4 and retention.backlog.events == 12
    await runs[0].throttle()
    assert commits == ["run_a"]
    assert retention.backlog.events == 8
    for run in runs:
        await run.throttle()  # within the budget again: nobody waits
    assert commits == ["run_a"]
