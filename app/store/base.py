"""The Store protocol: what the engine needs from durable storage, and nothing more.

The engine writes through :meth:`Store.write` only (the flusher's group commit) and reads
runs that are not in memory through the read methods. A second backend (a shared SQL
database for several nodes) implements the same protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.core.events import Event, JsonObject
from app.core.turns import Turn

# A listing's position (PROTOCOL.md §5): (created_at, id) of the last item a page showed;
# the next page holds the items strictly older, newest first.
Key = tuple[float, str]


@dataclass(frozen=True, slots=True)
class ThreadRecord:
    thread_id: str
    metadata: JsonObject
    created_at: float
    updated_at: float
    revision: int = 0
    head: str | None = None
    title: str | None = None


@dataclass(frozen=True, slots=True)
class RunQuery:
    """What a listing of runs matches: each given filter must hold. ``metadata``: for
    every (key, value) pair, a top-level key whose value is that string."""

    status: str | None = None
    thread_id: str | None = None
    agent: str | None = None
    metadata: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run's row: who it is and its state as of its last persisted event."""

    run_id: str
    thread_id: str
    agent: str
    input: JsonObject
    status: str
    epoch: str
    last_index: int
    snapshot: JsonObject
    created_at: float
    updated_at: float
    title: str | None = None
    metadata: JsonObject = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunWrite:
    """One run's part of a group commit: its row as of ``record.last_index`` and the
    events after the previously written index (contiguous, oldest first)."""

    record: RunRecord
    events: Sequence[Event] = field(default_factory=tuple)
    keyframes: Sequence[tuple[int, str]] = field(default_factory=tuple)  # (index, state JSON)


@dataclass(frozen=True, slots=True)
class ShareRecord:
    """A share link (PROTOCOL.md §8): ``kind`` run or thread, ``resource_id`` its id."""

    share_id: str
    kind: str
    resource_id: str
    role: str
    created_by: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None


class Store(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create_thread(self, thread: ThreadRecord) -> None: ...

    async def get_thread(self, thread_id: str) -> ThreadRecord | None: ...

    async def write_thread(
        self, thread: ThreadRecord, turns: Sequence[Turn], runs: Sequence[RunWrite] = ()
    ) -> None:
        """Write the thread's row (created if new), add turns, write runs: ONE transaction."""
        ...

    async def load_turns(self, thread_id: str) -> list[Turn]: ...

    async def turn_of_run(self, run_id: str) -> tuple[str, str | None] | None: ...

    async def write(self, batch: Sequence[RunWrite]) -> Sequence[str] | None:
        """Write every run of ``batch`` (rows and events) in ONE transaction. Several
        nodes: returns the ids of runs not written because another node owns them now."""
        ...

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def list_runs(
        self, query: RunQuery, *, before: Key | None = None, limit: int
    ) -> list[RunRecord]:
        """Runs matching ``query`` older than ``before`` (all, without it), newest first
        by (created_at, run_id): a range of an index, never a scan of the table."""
        ...

    async def list_threads(
        self, *, metadata: Sequence[tuple[str, str]], before: Key | None = None, limit: int
    ) -> list[ThreadRecord]:
        """Threads as ``list_runs`` lists runs."""
        ...

    async def update_run(
        self, run_id: str, *, title: str | None, metadata: JsonObject, updated_at: float
    ) -> None:
        """Set a run's title and metadata (PATCH), on disk before it returns."""
        ...

    async def delete_run(self, run_id: str) -> bool:
        """Erase an ended run for good, in ONE transaction: its row, events, keyframes and
        shares; its assistant turn keeps the run's text and status, with no run id.
        Returns False when there was no such run. Raises RunInProgressError when the run
        is live (a store shared by several nodes checks it: another node may run it)."""
        ...

    async def delete_thread(self, thread_id: str) -> list[str] | None:
        """Erase a thread for good, in ONE transaction: its row, turns, runs (with their
        events, keyframes and shares) and shares. Returns the ids of the runs erased;
        None when there was no such thread. Raises RunInProgressError (nothing erased)
        when a run of it is live, checked as ``delete_run`` checks it."""
        ...

    async def read_events(self, run_id: str, after: int, limit: int | None) -> list[Event]: ...

    async def read_keyframe(self, run_id: str, index: int) -> tuple[int, JsonObject] | None:
        """The newest keyframe at or before ``index``: (its index, the state there)."""
        ...

    async def check(self) -> list[str]:
        """Integrity problems of the stored data, as sentences; empty when clean."""
        ...

    async def vacuum(self) -> tuple[int, int]:
        """Reclaim the space deletes left (``runcast db vacuum``): the size in bytes
        before and after."""
        ...

    async def live_runs(self) -> list[RunRecord]:
        """Runs whose stored status is not terminal (at start: those the crash cut off)."""
        ...

    async def stats(self) -> dict[str, Any]: ...

    async def share_secret(self, new: str) -> str:
        """The secret share tokens are signed with: the stored one, or ``new``, stored
        now (the first start)."""
        ...

    async def create_share(self, share: ShareRecord) -> None: ...

    async def get_share(self, share_id: str) -> ShareRecord | None: ...

    async def revoke_share(self, share_id: str, at: float) -> None: ...

    async def revoked_shares(self, now: float) -> list[str]:
        """Ids of revoked shares that have not expired yet (expired ones fail anyway)."""
        ...
