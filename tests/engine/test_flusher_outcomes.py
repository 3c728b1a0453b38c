"""The flusher against a real SqliteStore: a write whose outcome it cannot know (cancelled
in flight, or failed, and committed all the same) is not written twice; and the loop's
timing, with writes slower and faster than the interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import statistics
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from app.core import events as ev
from app.core.events import RunStatus
from app.engine.flusher import Flusher
from app.engine.run import LiveRun
from app.errors import StoreError
from app.store.base import RunWrite, ThreadRecord
from app.store.sqlite import SqliteStore
from tests.fakes import opened

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with opened(SqliteStore(tmp_path / "outcomes.db")) as store:
        yield store


async def new_run(store: SqliteStore, flusher: Flusher, ticks: int) -> LiveRun:
    await store.create_thread(ThreadRecord("thr_a", {}, 1.0, 1.0))
    run = LiveRun(
        run_id="run_a",
        thread_id="thr_a",
        agent="counter",
        input={"n": ticks},
        epoch="e1",
        created_at=1.0,
        on_dirty=flusher.mark_dirty,
    )
    flusher.mark_dirty(run)
    run.append(ev.STATUS, ev.status_data(RunStatus.RUNNING))
    for k in range(1, ticks + 1):
        run.append("tick", {"n": k})
    return run


async def indexes_on_disk(store: SqliteStore, run: LiveRun) -> list[int]:
    return [event.index for event in await store.read_events(run.run_id, 0, None)]


@contextlib.contextmanager
def database_locked(store: SqliteStore) -> Iterator[sqlite3.Connection]:
    """Another connection holds the file's write lock (until it rolls back or the block
    ends): the store's writer waits for it, up to its busy timeout (5 s)."""
    other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
    finally:
        other.close()


async def test_a_write_cancelled_in_flight_and_committed_anyway_is_not_written_twice(
    store: SqliteStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.engine.flusher")
    flusher = Flusher(store, interval_s=60.0)
    run = await new_run(store, flusher, ticks=3)
    with database_locked(store) as other:
        flushing = asyncio.create_task(flusher.flush())
        await asyncio.sleep(0.2)  # the writer has the batch, and waits for the lock
        flushing.cancel()
        await asyncio.sleep(0.1)
        assert not flushing.done()  # it waits for the writer's answer
        other.rollback()
        with pytest.raises(asyncio.CancelledError):
            await flushing
    # The transaction went on and was committed, though the flush was cancelled.
    assert await indexes_on_disk(store, run) == [1, 2, 3, 4]
    assert run.needs_flush and run.flushed_index == 0  # the flusher could not know

    run.append("tick", {"n": 4})
    assert await flusher.flush() == 1  # not a duplicate key: the row was read back first
    assert await indexes_on_disk(store, run) == [1, 2, 3, 4, 5]
    assert not run.needs_flush and run.flushed_index == 5
    assert "committed after all" in caplog.text


class LosingStore(SqliteStore):
    """Its next write is committed, and then fails all the same (its answer lost)."""

    lose_next = False

    async def write(self, batch: Sequence[RunWrite]) -> None:
        await super().write(batch)
        if self.lose_next:
            self.lose_next = False
            raise StoreError("the answer was lost")


async def test_a_failed_write_that_was_committed_is_not_written_twice(tmp_path: Path) -> None:
    async with opened(LosingStore(tmp_path / "losing.db")) as store:
        flusher = Flusher(store, interval_s=60.0)
        run = await new_run(store, flusher, ticks=2)
        store.lose_next = True
        with pytest.raises(StoreError):
            await flusher.flush()
        assert run.needs_flush and await indexes_on_disk(store, run) == [1, 2, 3]
        run.append("tick", {"n": 3})
        assert await flusher.flush() == 1
        assert await indexes_on_disk(store, run) == [1, 2, 3, 4]
        assert not run.needs_flush


class TimedStore(SqliteStore):
    """Each write takes at least ``write_s`` (a store slower than the interval), and the
    time each write began is kept."""

    write_s = 0.0

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.began: list[float] = []

    async def write(self, batch: Sequence[RunWrite]) -> None:
        self.began.append(asyncio.get_running_loop().time())
        await asyncio.sleep(self.write_s)
        await super().write(batch)


@pytest.mark.parametrize(("interval_s", "write_s", "low", "high"), [
    (0.2, 0.0, 0.17, 0.27),  # writes keep up: one per interval
    (0.15, 0.3, 0.27, 0.4),  # each write takes two intervals: the next begins at once
])  # fmt: skip
async def test_the_interval_counts_from_the_start_of_the_last_flush(
    tmp_path: Path, interval_s: float, write_s: float, low: float, high: float
) -> None:
    """Flushes begin one interval apart, start to start, while writes take less; a write
    that takes longer is followed by the next at once, not an interval later (which
    would have made the gap write_s + interval_s)."""
    async with opened(TimedStore(tmp_path / "timed.db")) as store:
        store.write_s = write_s
        flusher = Flusher(store, interval_s=interval_s)
        loop = asyncio.create_task(flusher.run())
        try:
            run = await new_run(store, flusher, ticks=1)
            k = 1
            while len(store.began) < 7:
                k += 1
                run.append("tick", {"n": k})  # always something new to write
                await asyncio.sleep(0.005)
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
    gaps = [b - a for a, b in zip(store.began[1:], store.began[2:], strict=False)]
    assert low <= statistics.median(gaps) <= high, gaps
