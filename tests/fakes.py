"""Shared fakes for engine, store and agent tests: fakes over mocks, real SQLite always.

- :class:`RecordingStore` is a real :class:`SqliteStore` that records every ``write()``
  batch, can fail the next writes with :class:`StoreError`, and can hold writes at a gate.
- :class:`ManualClock` is a clock a test moves by hand (``LiveRun(clock=...)``).
- :func:`until` awaits a condition on a run through ``wait_after`` (never a sleep).
- Test agents: :func:`hold`, :func:`boom`, :func:`swallow`, :func:`self_cancel` and
  :class:`Stubborn` (ignores cancellation until the test releases it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from app.agents.context import RunContext
from app.core.events import Event, JsonObject
from app.core.turns import Turn
from app.engine.run import LiveRun
from app.errors import StoreError
from app.store.base import Key, RunQuery, RunRecord, RunWrite, Store, ThreadRecord
from app.store.sqlite import SqliteStore


class ManualClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True, slots=True)
class WrittenRun:
    """One run's part of a recorded batch, copied when ``write()`` was called."""

    run_id: str
    status: str
    last_index: int
    indexes: tuple[int, ...]
    types: tuple[str, ...]


class RecordingStore:
    """A real SqliteStore on a file that records each ``write()`` batch.

    ``fail_writes = k`` makes the next k writes raise StoreError (nothing written);
    ``gate = asyncio.Event()`` holds every write until the gate is set, and ``entered``
    is set once a write waits at the gate.
    """

    def __init__(self, path: str | Path) -> None:
        self.inner = SqliteStore(path)
        self.batches: list[list[WrittenRun]] = []
        self.attempts = 0
        self.fail_writes = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self._changed = asyncio.Condition()

    # -- recording --------------------------------------------------------------------

    async def write(self, batch: Sequence[RunWrite]) -> None:
        self.attempts += 1
        summary = [
            WrittenRun(
                item.record.run_id,
                item.record.status,
                item.record.last_index,
                tuple(event.index for event in item.events),
                tuple(event.type for event in item.events),
            )
            for item in batch
        ]
        await self._before_write()
        await self.inner.write(batch)
        if summary:
            self.batches.append(summary)
        async with self._changed:
            self._changed.notify_all()

    async def _before_write(self) -> None:
        """Hold the write at ``gate`` if set; fail it if ``fail_writes`` says so."""
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        if self.fail_writes:
            self.fail_writes -= 1
            raise StoreError("injected write failure")

    def written(self, run_id: str) -> list[WrittenRun]:
        """Every recorded part of ``run_id``, oldest first."""
        return [item for batch in self.batches for item in batch if item.run_id == run_id]

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, checked after each successful write."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    # -- the rest of the Store protocol, delegated --------------------------------------

    async def open(self) -> None:
        await self.inner.open()

    async def write_thread(
        self, thread: ThreadRecord, turns: Sequence[Turn], runs: Sequence[RunWrite] = ()
    ) -> None:
        """Thread changes (and the runs they create) are not flushes: not recorded, but
        held by ``gate`` and failed by ``fail_writes`` as writes are."""
        await self._before_write()
        await self.inner.write_thread(thread, turns, runs)
        async with self._changed:
            self._changed.notify_all()

    async def read_keyframe(self, run_id: str, index: int) -> tuple[int, dict[str, Any]] | None:
        return await self.inner.read_keyframe(run_id, index)

    async def check(self) -> list[str]:
        return await self.inner.check()

    async def load_turns(self, thread_id: str) -> list[Turn]:
        return await self.inner.load_turns(thread_id)

    async def turn_of_run(self, run_id: str) -> tuple[str, str | None] | None:
        return await self.inner.turn_of_run(run_id)

    async def close(self) -> None:
        await self.inner.close()

    async def create_thread(self, thread: ThreadRecord) -> None:
        await self.inner.create_thread(thread)

    async def get_thread(self, thread_id: str) -> ThreadRecord | None:
        return await self.inner.get_thread(thread_id)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self.inner.get_run(run_id)

    async def list_runs(
        self, query: RunQuery, *, before: Key | None = None, limit: int
    ) -> list[RunRecord]:
        return await self.inner.list_runs(query, before=before, limit=limit)

    async def list_threads(
        self, *, metadata: Sequence[tuple[str, str]], before: Key | None = None, limit: int
    ) -> list[ThreadRecord]:
        return await self.inner.list_threads(metadata=metadata, before=before, limit=limit)

    async def update_run(
        self, run_id: str, *, title: str | None, metadata: JsonObject, updated_at: float
    ) -> None:
        await self.inner.update_run(run_id, title=title, metadata=metadata, updated_at=updated_at)

    async def delete_run(self, run_id: str) -> bool:
        return await self.inner.delete_run(run_id)

    async def delete_thread(self, thread_id: str) -> list[str] | None:
        return await self.inner.delete_thread(thread_id)

    async def read_events(self, run_id: str, after: int, limit: int | None) -> list[Event]:
        return await self.inner.read_events(run_id, after, limit)

    async def live_runs(self) -> list[RunRecord]:
        return await self.inner.live_runs()

    async def stats(self) -> dict[str, Any]:
        return await self.inner.stats()


S = TypeVar("S", bound=Store)


@contextlib.asynccontextmanager
async def opened(store: S) -> AsyncIterator[S]:
    """``store``, opened, and closed at the end of the block."""
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def settle(rounds: int = 5) -> None:
    """Let every ready task run to its next suspension point (not a wait for a condition:
    used before asserting that something is still waiting)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(run: LiveRun, predicate: Callable[[LiveRun], bool]) -> None:
    """Await ``predicate(run)`` by following the run's log with ``wait_after``."""
    cursor = 0
    while not predicate(run):
        assert not run.ended, f"run ended ({run.status}) before the condition held"
        await run.wait_after(cursor)
        cursor = run.last_index


# -- test agents ---------------------------------------------------------------------------


async def hold(ctx: RunContext) -> None:
    """Emits one event, then waits until cancelled."""
    await ctx.emit("held", {})
    await asyncio.Event().wait()


async def boom(ctx: RunContext) -> None:
    """Emits one event, then fails."""
    await ctx.text("about to fail")
    raise RuntimeError("boom")


async def swallow(ctx: RunContext) -> None:
    """Waits; on cancellation returns normally, swallowing it (a badly behaved agent)."""
    await ctx.emit("held", {})
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        return


async def cleanup_fails(ctx: RunContext) -> None:
    """Waits; on cancellation its cleanup raises another error."""
    await ctx.emit("held", {})
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        raise RuntimeError("cleanup failed") from None


async def self_cancel(ctx: RunContext) -> None:
    """Cancels itself with nobody asking."""
    await ctx.emit("held", {})
    raise asyncio.CancelledError


class Stubborn:
    """An agent that ignores cancellation until ``release`` is set, then returns.

    With ``patience=k`` it ignores only the first k cancellations and lets the next one
    through. A test that uses it sets ``release`` in the end, so no task outlives it.
    """

    def __init__(self, patience: int | None = None) -> None:
        self.release = asyncio.Event()
        self.patience = patience
        self.cancellations = 0

    async def __call__(self, ctx: RunContext) -> None:
        await ctx.emit("held", {})
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancellations += 1
                if self.patience is not None and self.cancellations > self.patience:
                    raise


def run_data(run: LiveRun) -> list[tuple[str, JsonObject]]:
    """The run's visible events as (type, data) pairs."""
    return [(event.type, event.data) for event in run.read_after(0)]
