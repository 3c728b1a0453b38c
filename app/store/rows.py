"""The rows of runs and threads as every SQL store keeps them, in one column order: a
record to a thread's row, a run's or a thread's row back to its record. (A row is
anything indexed by column: sqlite3's, asyncpg's, a tuple.)"""

from __future__ import annotations

from typing import Any, Protocol

from app.core.events import decode, encode
from app.store.base import RunRecord, ThreadRecord

# The columns the rows below are read from, in order (a store may cast them: PostgreSQL
# reads ``metadata::text``).
RUN_COLUMNS = (
    "run_id",
    "thread_id",
    "agent",
    "input",
    "status",
    "epoch",
    "last_index",
    "snapshot",
    "created_at",
    "updated_at",
    "title",
    "metadata",
)
THREAD_COLUMNS = ("thread_id", "metadata", "revision", "head", "created_at", "updated_at", "title")


class Row(Protocol):
    def __getitem__(self, column: int, /) -> Any: ...


def run_from_row(row: Row) -> RunRecord:
    return RunRecord(
        run_id=row[0],
        thread_id=row[1],
        agent=row[2],
        input=decode(row[3]),
        status=row[4],
        epoch=row[5],
        last_index=row[6],
        snapshot=decode(row[7]),
        created_at=row[8],
        updated_at=row[9],
        title=row[10],
        metadata=decode(row[11]),
    )


def thread_row(thread: ThreadRecord) -> tuple[Any, ...]:
    """A thread's row, in ``THREAD_COLUMNS`` order."""
    return (
        thread.thread_id,
        encode(thread.metadata),
        thread.revision,
        thread.head,
        thread.created_at,
        thread.updated_at,
        thread.title,
    )


def thread_from_row(row: Row) -> ThreadRecord:
    return ThreadRecord(
        thread_id=row[0],
        metadata=decode(row[1]),
        revision=row[2],
        head=row[3],
        created_at=row[4],
        updated_at=row[5],
        title=row[6],
    )
