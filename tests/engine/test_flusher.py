"""The flusher: one transaction per flush for every dirty run, group commit, retries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from app.core import events as ev
from app.core.events import RunStatus
from app.engine.flusher import Flusher
from app.engine.run import LiveRun
from app.errors import StoreError
from app.store.base import RunWrite, ThreadRecord
from tests.fakes import RecordingStore, settle

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RecordingStore]:
    store = RecordingStore(tmp_path / "flusher.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def flusher(store: RecordingStore) -> AsyncIterator[Flusher]:
    """A flusher with no loop running: tests flush by hand or start ``run()`` themselves."""
    yield Flusher(store, interval_s=60.0)


@pytest.fixture
async def looping(flusher: Flusher) -> AsyncIterator[Flusher]:
    """The flusher with its loop running; the long interval means only kicks flush."""
    task = asyncio.create_task(flusher.run())
    try:
        yield flusher
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def new_run(store: RecordingStore, flusher: Flusher, name: str) -> LiveRun:
    thread_id = f"thr_{name}"
    await store.create_thread(ThreadRecord(thread_id, {}, 1.0, 1.0))
    run = LiveRun(
        run_id=f"run_{name}",
        thread_id=thread_id,
        agent="counter",
        input={"n": 1},
        epoch="e1",
        created_at=1.0,
        on_dirty=flusher.mark_dirty,
    )
    flusher.mark_dirty(run)  # as the manager's commit at start does
    return run


def start(run: LiveRun, ticks: int = 0) -> None:
    run.append(ev.STATUS, ev.status_data(RunStatus.RUNNING))
    for k in range(1, ticks + 1):
        run.append("tick", {"n": k})


async def indexes_on_disk(store: RecordingStore, run: LiveRun) -> list[int]:
    return [event.index for event in await store.read_events(run.run_id, 0, None)]


async def test_one_write_covers_every_dirty_run(store: RecordingStore, flusher: Flusher) -> None:
    runs = [await new_run(store, flusher, name) for name in "abc"]
    for k, run in enumerate(runs):
        start(run, ticks=k)

    assert await flusher.flush() == 3

    assert store.attempts == 1 and len(store.batches) == 1
    batch = store.batches[0]
    assert {item.run_id for item in batch} == {"run_a", "run_b", "run_c"}
    assert {item.run_id: item.indexes for item in batch} == {
        "run_a": (1,),
        "run_b": (1, 2),
        "run_c": (1, 2, 3),
    }
    for run in runs:
        assert not run.needs_flush
        record = await store.get_run(run.run_id)
        assert record is not None and record.last_index == run.last_index
        assert await indexes_on_disk(store, run) == list(range(1, run.last_index + 1))
    assert flusher.flushes == 1


async def test_nothing_is_written_when_nothing_is_dirty(
    store: RecordingStore, flusher: Flusher
) -> None:
    assert await flusher.flush() == 0
    run = await new_run(store, flusher, "a")
    start(run, ticks=2)
    assert await flusher.flush() == 1
    assert await flusher.flush() == 0
    flusher.mark_dirty(run)  # dirty but with nothing new
    assert await flusher.flush() == 0
    assert store.attempts == 1 and flusher.flushes == 1


async def test_a_second_flush_writes_only_the_new_events(
    store: RecordingStore, flusher: Flusher
) -> None:
    run = await new_run(store, flusher, "a")
    start(run, ticks=2)
    await flusher.flush()
    run.append("tick", {"n": 3})
    await flusher.flush()
    assert [item.indexes for item in store.written("run_a")] == [(1, 2, 3), (4,)]
    assert await indexes_on_disk(store, run) == [1, 2, 3, 4]


async def test_staged_terminal_event_and_terminal_row_go_in_one_batch(
    store: RecordingStore, flusher: Flusher
) -> None:
    run = await new_run(store, flusher, "a")
    start(run, ticks=1)
    await flusher.flush()
    run.append("tick", {"n": 2})
    run.stage_terminal(ev.status_data(RunStatus.COMPLETED))

    await flusher.flush()

    last = store.batches[-1]
    assert len(last) == 1
    assert last[0].indexes == (3, 4) and last[0].types == ("tick", "status")
    assert (last[0].status, last[0].last_index) == ("completed", 4)
    record = await store.get_run(run.run_id)
    assert record is not None
    assert (record.status, record.last_index) == ("completed", 4)
    assert record.snapshot["status"] == "completed"
    # On disk, yet readers still do not see it until the engine publishes it.
    assert run.last_index == 3 and not run.ended
    run.publish_staged()
    assert await flusher.flush() == 0


async def test_commit_returns_only_once_the_run_is_on_disk(
    store: RecordingStore, looping: Flusher
) -> None:
    run = await new_run(store, looping, "a")
    start(run, ticks=2)
    async with asyncio.timeout(2):
        await looping.commit(run)
    record = await store.get_run(run.run_id)
    assert record is not None and record.last_index == 3
    assert await indexes_on_disk(store, run) == [1, 2, 3]
    async with asyncio.timeout(2):
        await looping.commit(run)  # nothing new: returns at once, writes nothing
    assert store.attempts == 1


async def test_commit_of_a_staged_terminal_event_puts_it_on_disk(
    store: RecordingStore, looping: Flusher
) -> None:
    run = await new_run(store, looping, "a")
    start(run)
    run.stage_terminal(ev.status_data(RunStatus.STOPPED, by="c1"))
    async with asyncio.timeout(2):
        await looping.commit(run)
    record = await store.get_run(run.run_id)
    assert record is not None and record.status == "stopped"
    events = await store.read_events(run.run_id, 0, None)
    assert events[-1].data == {"status": "stopped", "by": "c1"}


async def test_concurrent_commits_share_one_flush(store: RecordingStore, looping: Flusher) -> None:
    runs = [await new_run(store, looping, name) for name in "abcd"]
    for run in runs:
        start(run, ticks=1)
    async with asyncio.timeout(2):
        await asyncio.gather(*(looping.commit(run) for run in runs))
    assert store.attempts == 1
    assert len(store.batches) == 1 and len(store.batches[0]) == 4


async def test_commits_during_a_write_are_grouped_into_the_next_one(
    store: RecordingStore, looping: Flusher
) -> None:
    first = await new_run(store, looping, "first")
    start(first)
    store.gate = asyncio.Event()
    committing = asyncio.create_task(looping.commit(first))
    async with asyncio.timeout(2):
        await store.entered.wait()
    # While the first write is held, three more runs commit.
    others = [await new_run(store, looping, name) for name in "abc"]
    for run in others:
        start(run)
    waiting = [asyncio.create_task(looping.commit(run)) for run in others]
    await settle()
    assert not committing.done() and not any(task.done() for task in waiting)
    store.gate.set()
    async with asyncio.timeout(2):
        await committing
        await asyncio.gather(*waiting)
    assert [len(batch) for batch in store.batches] == [1, 3]


async def test_a_failed_write_leaves_runs_dirty_and_loses_nothing(
    store: RecordingStore, flusher: Flusher
) -> None:
    runs = [await new_run(store, flusher, name) for name in "ab"]
    for run in runs:
        start(run, ticks=2)
    await flusher.flush()
    for run in runs:
        run.append("tick", {"n": 3})
    store.fail_writes = 1

    with pytest.raises(StoreError):
        await flusher.flush()

    assert all(run.needs_flush for run in runs)
    assert len(store.batches) == 1  # only the first, successful one
    for run in runs:
        run.append("tick", {"n": 4})
    assert await flusher.flush() == 2
    assert {item.run_id: item.indexes for item in store.batches[-1]} == {
        "run_a": (4, 5),
        "run_b": (4, 5),
    }
    for run in runs:
        assert await indexes_on_disk(store, run) == [1, 2, 3, 4, 5]
        assert not run.needs_flush


async def test_a_cancelled_write_leaves_runs_dirty(store: RecordingStore, flusher: Flusher) -> None:
    run = await new_run(store, flusher, "a")
    start(run, ticks=1)
    store.gate = asyncio.Event()
    task = asyncio.create_task(flusher.flush())
    async with asyncio.timeout(2):
        await store.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert run.needs_flush
    store.gate = None
    assert await flusher.flush() == 1
    assert await indexes_on_disk(store, run) == [1, 2]


async def test_the_loop_retries_a_failed_write_and_commit_waits_for_it(
    store: RecordingStore, flusher: Flusher
) -> None:
    flusher.interval_s = 0.01
    store.fail_writes = 1
    run = await new_run(store, flusher, "a")
    start(run, ticks=2)
    loop = asyncio.create_task(flusher.run())
    try:
        async with asyncio.timeout(5):
            await store.until(lambda: flusher.last_error is not None or bool(store.batches))
            await flusher.commit(run)
        assert store.attempts == 2
        assert flusher.last_error is None, "a good flush clears the error"
        assert await indexes_on_disk(store, run) == [1, 2, 3]
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_the_loop_flushes_on_its_own_within_a_few_intervals(
    store: RecordingStore, flusher: Flusher
) -> None:
    flusher.interval_s = 0.02
    run = await new_run(store, flusher, "a")
    start(run, ticks=3)
    loop = asyncio.create_task(flusher.run())
    try:
        clock = asyncio.get_running_loop().time
        began = clock()
        async with asyncio.timeout(2):
            await store.until(lambda: bool(store.written("run_a")))
        assert clock() - began < 10 * flusher.interval_s
        assert await indexes_on_disk(store, run) == [1, 2, 3, 4]
        # and again for events appended later, with nobody asking
        run.append("tick", {"n": 4})
        async with asyncio.timeout(2):
            await store.until(lambda: len(store.written("run_a")) == 2)
        assert await indexes_on_disk(store, run) == [1, 2, 3, 4, 5]
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_appends_alone_do_not_write_before_the_interval(
    store: RecordingStore, looping: Flusher
) -> None:
    """The throttle: with a long interval, a burst of appends writes nothing until a commit
    (or the interval) comes, and then goes out as one batch."""
    run = await new_run(store, looping, "a")
    start(run, ticks=500)
    await settle(20)
    assert store.attempts == 0
    async with asyncio.timeout(2):
        await looping.commit(run)
    assert store.attempts == 1
    assert store.batches[0][0].indexes == tuple(range(1, 502))


async def test_a_cancelled_commit_leaves_the_run_for_a_later_flush(
    store: RecordingStore, flusher: Flusher
) -> None:
    run = await new_run(store, flusher, "a")
    start(run, ticks=1)
    task = asyncio.create_task(flusher.commit(run))
    await settle()
    assert not task.done()  # no loop running: nobody flushes
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await flusher.flush() == 1
    assert await indexes_on_disk(store, run) == [1, 2]


async def test_close_flushes_everything_and_later_commits_flush_inline(
    store: RecordingStore, flusher: Flusher
) -> None:
    run = await new_run(store, flusher, "a")
    start(run, ticks=2)
    waiting = asyncio.create_task(flusher.commit(run))
    await settle()
    assert not waiting.done()
    await flusher.close()
    async with asyncio.timeout(2):
        await waiting
    assert await indexes_on_disk(store, run) == [1, 2, 3]

    run.append("tick", {"n": 3})
    run.stage_terminal(ev.status_data(RunStatus.INTERRUPTED, reason="shutdown"))
    async with asyncio.timeout(2):
        await flusher.commit(run)
    record = await store.get_run(run.run_id)
    assert record is not None and record.status == "interrupted"
    assert await indexes_on_disk(store, run) == [1, 2, 3, 4, 5]


async def test_a_commit_during_the_final_flush_waits_for_it(
    store: RecordingStore, flusher: Flusher
) -> None:
    """A commit woken by close() while close()'s own write is still in flight must wait
    for that write, not spin: nothing else could run while it spins."""
    run = await new_run(store, flusher, "a")
    start(run, ticks=1)
    waiting = asyncio.create_task(flusher.commit(run))
    await settle()
    store.gate = asyncio.Event()
    closing = asyncio.create_task(flusher.close())
    async with asyncio.timeout(2):
        await store.entered.wait()
    await settle()
    assert not waiting.done() and not closing.done()
    store.gate.set()
    async with asyncio.timeout(2):
        await asyncio.gather(closing, waiting)
    assert store.attempts == 1
    assert await indexes_on_disk(store, run) == [1, 2]


async def test_store_degraded_from_a_failed_flush_to_the_next_good_one(
    store: RecordingStore, flusher: Flusher
) -> None:
    flusher.interval_s = 0.01
    run = await new_run(store, flusher, "a")
    start(run, ticks=1)
    assert not flusher.store_degraded
    store.fail_writes = 2
    seen: list[bool] = []
    store.gate = asyncio.Event()  # each write attempt is let through by the test
    loop = asyncio.create_task(flusher.run())
    try:
        async with asyncio.timeout(5):
            for _ in range(3):
                await store.entered.wait()
                store.entered.clear()
                seen.append(flusher.store_degraded)
                gate, store.gate = store.gate, asyncio.Event()
                gate.set()
            store.gate.set()
            await flusher.commit(run)
        assert seen == [False, True, True]  # before the first failure; then failing
        assert not flusher.store_degraded, "a good flush clears it"
        assert flusher.last_error is None
        assert store.attempts == 3
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


class BuggyStore(RecordingStore):
    """Its next ``bugs`` writes raise an error that is not a StoreError (a bug)."""

    bugs = 0

    async def write(self, batch: Sequence[RunWrite]) -> None:
        if self.bugs:
            self.bugs -= 1
            self.attempts += 1
            raise RuntimeError("a bug in the store")
        await super().write(batch)


async def test_an_unexpected_error_ends_the_loop_leaving_runs_dirty_and_commits_woken(
    tmp_path: Path,
) -> None:
    store = BuggyStore(tmp_path / "buggy.db")
    await store.open()
    try:
        flusher = Flusher(store, interval_s=60.0)
        run = await new_run(store, flusher, "a")
        start(run, ticks=1)
        store.bugs = 1
        committing = asyncio.create_task(flusher.commit(run))
        loop = asyncio.create_task(flusher.run())
        async with asyncio.timeout(2):
            with pytest.raises(RuntimeError, match="a bug in the store"):
                await loop
        assert flusher.store_degraded and run.needs_flush
        assert not committing.done()  # woken, and waiting for the next loop
        loop = asyncio.create_task(flusher.run())  # as its owner does
        try:
            async with asyncio.timeout(2):
                await committing
            assert not flusher.store_degraded
            assert await indexes_on_disk(store, run) == [1, 2]
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
    finally:
        await store.close()
