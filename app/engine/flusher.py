"""The flusher: throttled group commit of every dirty run in ONE transaction.

Runs mark themselves dirty when they change. Every ``interval_s`` (or at once when some
caller awaits :meth:`Flusher.commit`), the flusher takes every dirty run's unwritten
events, current snapshot and row, and hands them to ``Store.write`` as one batch. A
failed write leaves the runs dirty; the next flush retries, after a backoff.

A write that does not end well may have been committed all the same (cancelled while in
flight, the store's transaction goes on; a store may lose its answer): it leaves its runs
*unsure*. Before their next write, the flusher reads their rows back, and what a row says
is on disk is (a row and its events are written in one transaction): nothing is written
twice, which the store would refuse (an event's index is its key).

``run()`` ends only when cancelled, or with an error that is not a ``StoreError`` (a bug):
its owner (the manager) then restarts it. ``store_degraded`` says whether writes are
failing right now; ``last_error`` is the last failure's text, for the log only.
``failures`` counts failed writes, and ``on_flush`` (if set) is told each good write's
duration and events: what monitoring reads, a few integers per flush, none per event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NoReturn

from app.engine.run import LiveRun
from app.errors import StoreError
from app.store.base import Store

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 5.0


class Flusher:
    """Owns the single writer task; ``run()`` is awaited by the manager."""

    def __init__(self, store: Store, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self._dirty: dict[str, LiveRun] = {}
        self._unsure: dict[str, LiveRun] = {}  # see the module's docstring
        self._kick = asyncio.Event()
        self._flushed = asyncio.Event()
        # One flush at a time: a commit that flushes inline (after close) must wait for a
        # write in flight, or it would find nothing dirty and spin without yielding.
        self._lock = asyncio.Lock()
        self._closing = False
        self.last_error: str | None = None
        # True from a failed flush (or the loop's restart, set by its owner) to a good one.
        self.store_degraded = False
        self.flushes = 0
        self.failures = 0  # writes that failed, over the flusher's life
        # Told (seconds, events) after each write that succeeded.
        self.on_flush: Callable[[float, int], None] | None = None
        # Told of each run the store refused because another node owns it now.
        self.on_fenced: Callable[[LiveRun], None] | None = None

    def mark_dirty(self, run: LiveRun) -> None:
        self._dirty[run.run_id] = run

    async def flush(self) -> int:
        """Write every dirty run now, in one transaction; returns how many runs.

        Raises:
            StoreError: the write failed; the runs stay dirty. Any other error leaves
                them dirty too.
        """
        async with self._lock:
            if self._unsure:
                await self._read_back()
            runs = [run for run in self._dirty.values() if run.needs_flush]
            self._dirty.clear()
            if not runs:
                self.store_degraded = False
                return 0
            began = time.perf_counter()
            try:
                batch = [run.unflushed() for run in runs]
                fenced = await self.store.write(batch) or ()
            except BaseException as exc:
                for run in runs:
                    self._dirty.setdefault(run.run_id, run)
                    self._unsure[run.run_id] = run
                if isinstance(exc, Exception):
                    self.store_degraded = True
                    self.failures += 1
                raise
            took_s = time.perf_counter() - began
            for run, item in zip(runs, batch, strict=True):
                if run.run_id in fenced:
                    # Another node took the run over: nothing more of it is ours to write.
                    run.fenced = True
                    if self.on_fenced is not None:
                        self.on_fenced(run)
                else:
                    run.mark_flushed(item.record.last_index)
            self.flushes += 1
            self.store_degraded = False
            if self.on_flush is not None:
                self.on_flush(took_s, sum(len(item.events) for item in batch))
            return len(runs)

    async def _read_back(self) -> None:
        """Mark on disk what the rows of the unsure runs say is (see the docstring).

        Raises:
            StoreError: a read failed; the runs not read back yet stay unsure.
        """
        for run_id, run in list(self._unsure.items()):
            record = await self.store.get_run(run_id)
            if record is not None and record.epoch == run.epoch:
                if record.last_index > run.flushed_index:
                    logger.info("run %s: a failed write was committed after all", run_id)
                    run.mark_flushed(record.last_index)
            del self._unsure[run_id]

    async def commit(self, run: LiveRun, index: int | None = None) -> None:
        """Return once everything ``run`` holds now (staged terminal event included), or
        with ``index`` its events up to that index, is on disk. Triggers a flush at once;
        concurrent callers share it (group commit). (Without ``index`` it waits for the
        run to be all on disk: for a run that keeps appending, give the index.)

        Cancellation: safe; the run stays dirty and is written by a later flush.
        """
        self.mark_dirty(run)
        while run.needs_flush if index is None else run.flushed_index < index and not run.fenced:
            if self._closing:
                await self.flush()
                continue
            self._kick.set()
            flushed = self._flushed
            await flushed.wait()

    async def run(self) -> NoReturn:
        """The writer loop: flush on the throttle or when kicked, until cancelled.

        Raises:
            Exception: anything but a ``StoreError`` (those are retried): a bug, which
                ends the loop; every waiting commit is woken first, and the runs stay
                dirty for the loop its owner starts again.

        Cancellation: the loop ends; the owner calls :meth:`close` for the last flush.
        """
        backoff_s = 0.0
        clock = asyncio.get_running_loop().time
        began = clock()
        while True:
            # The interval counts from the start of the last flush, not its end: a write
            # that takes a while under load does not stretch it, so events wait about one
            # interval for the disk as long as writes keep up (PROTOCOL.md §4).
            try:
                async with asyncio.timeout_at(began + self.interval_s):
                    await self._kick.wait()
            except TimeoutError:
                pass
            if backoff_s:
                await asyncio.sleep(backoff_s)
            self._kick.clear()
            began = clock()
            try:
                await self.flush()
            except StoreError as exc:
                backoff_s = min(MAX_BACKOFF_S, max(self.interval_s, backoff_s * 2))
                self.last_error = str(exc)
                logger.error("flush failed, retrying in %.1fs: %s", backoff_s, exc)
            else:
                backoff_s = 0.0
                self.last_error = None
            finally:
                flushed, self._flushed = self._flushed, asyncio.Event()
                flushed.set()

    async def close(self) -> None:
        """Final flush after the loop has stopped; later commits flush inline."""
        self._closing = True
        flushed, self._flushed = self._flushed, asyncio.Event()
        flushed.set()
        await self.flush()
