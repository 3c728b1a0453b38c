"""SqliteStore on a real file: schema, WAL, the batched write, reads, schema versions."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.core.events import Event
from app.errors import StoreError
from app.store.base import RunQuery, RunRecord, RunWrite, ThreadRecord
from app.store.sqlite import SCHEMA_VERSION, SqliteStore

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(db)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def record(
    run_id: str,
    *,
    thread_id: str = "thr_1",
    status: str = "running",
    last_index: int = 0,
    created_at: float = 10.0,
    epoch: str = "e1",
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        thread_id=thread_id,
        agent="demo",
        input={"prompt": "héllo ✓", "tokens": 3},
        status=status,
        epoch=epoch,
        last_index=last_index,
        snapshot={"status": status, "message": {"content": "x"}, "usage": {"t": 1.5}},
        created_at=created_at,
        updated_at=created_at + 1,
    )


def events(first: int, last: int) -> list[Event]:
    return [
        Event(i, "text", {"text": f'tök {i} "quoted" \u2028', "n": i / 3}, 1_763_773_200.5 + i)
        for i in range(first, last + 1)
    ]


async def thread(store: SqliteStore, thread_id: str = "thr_1") -> ThreadRecord:
    record = ThreadRecord(thread_id, {"title": "t", "tags": ["a"]}, 1.0, 2.0)
    await store.create_thread(record)
    return record


async def scalar(store: SqliteStore, sql: str) -> object:
    async with store.db.execute(sql) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return row[0]


async def test_open_creates_the_schema(store: SqliteStore) -> None:
    async with store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'") as cursor:
        tables = {row[0] for row in await cursor.fetchall()}
    assert {"meta", "threads", "runs", "events"} <= tables
    version = await scalar(store, "SELECT value FROM meta WHERE key = 'schema_version'")
    assert version == str(SCHEMA_VERSION)
    assert await scalar(store, "PRAGMA foreign_keys") == 1


async def test_wal_mode_is_on(store: SqliteStore, db: Path) -> None:
    assert await scalar(store, "PRAGMA journal_mode") == "wal"
    with sqlite3.connect(db) as other:  # persistent: another connection sees it too
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_write_and_read_back_runs_and_events(store: SqliteStore) -> None:
    await thread(store)
    written = events(1, 5)
    run = record("run_a", last_index=5)
    await store.write([RunWrite(run, written)])

    assert await store.get_run("run_a") == run
    read = await store.read_events("run_a", 0, None)
    assert [e.json for e in read] == [e.json for e in written], "the text is stored as is"
    assert [e.to_dict() for e in read] == [e.to_dict() for e in written]
    assert await store.get_run("run_nope") is None
    assert await store.read_events("run_nope", 0, None) == []


async def test_a_later_write_updates_the_row_and_appends_events(store: SqliteStore) -> None:
    await thread(store)
    first = record("run_a", last_index=2)
    await store.write([RunWrite(first, events(1, 2))])
    later = RunRecord(
        **{
            **{f: getattr(first, f) for f in first.__dataclass_fields__},
            "status": "completed",
            "epoch": "e2",
            "last_index": 4,
            "snapshot": {"status": "completed"},
            "updated_at": 99.0,
            # Identity columns of an existing row are never rewritten.
            "input": {"changed": True},
            "created_at": 55.0,
        }
    )
    await store.write([RunWrite(later, events(3, 4))])

    got = await store.get_run("run_a")
    assert got is not None
    assert (got.status, got.epoch, got.last_index, got.updated_at) == ("completed", "e2", 4, 99.0)
    assert got.snapshot == {"status": "completed"}
    assert (got.input, got.created_at) == (first.input, first.created_at)
    assert [e.index for e in await store.read_events("run_a", 0, None)] == [1, 2, 3, 4]


async def test_one_batch_is_one_transaction(store: SqliteStore) -> None:
    await thread(store)
    await store.write([RunWrite(record("run_a", last_index=1), events(1, 1))])
    # run_b is fine, run_a repeats event 1: the whole batch is refused.
    with pytest.raises(StoreError) as caught:
        await store.write(
            [
                RunWrite(record("run_b", last_index=2), events(1, 2)),
                RunWrite(record("run_a", last_index=2, status="completed"), events(1, 2)),
            ]
        )
    assert isinstance(caught.value.__cause__, sqlite3.Error)
    assert await store.get_run("run_b") is None
    assert await store.read_events("run_b", 0, None) == []
    got = await store.get_run("run_a")
    assert got is not None and (got.status, got.last_index) == ("running", 1)
    # and the connection is usable afterwards
    await store.write([RunWrite(record("run_b", last_index=2), events(1, 2))])
    assert len(await store.read_events("run_b", 0, None)) == 2


async def test_a_run_needs_its_thread(store: SqliteStore) -> None:
    with pytest.raises(StoreError):
        await store.write([RunWrite(record("run_a", thread_id="thr_missing"))])
    assert await store.get_run("run_a") is None


async def test_an_empty_batch_writes_nothing(store: SqliteStore) -> None:
    await store.write([])
    assert await store.stats() == {"path": str(store.path), "runs": 0}


async def test_threads_round_trip(store: SqliteStore) -> None:
    written = await thread(store, "thr_x")
    assert await store.get_thread("thr_x") == written
    assert await store.get_thread("thr_nope") is None
    with pytest.raises(StoreError):
        await thread(store, "thr_x")  # the id is taken


async def test_list_runs_filters_orders_and_limits(store: SqliteStore) -> None:
    await thread(store, "thr_1")
    await thread(store, "thr_2")
    rows = [
        record("run_1", thread_id="thr_1", status="completed", created_at=1.0),
        record("run_2", thread_id="thr_1", status="running", created_at=2.0),
        record("run_3", thread_id="thr_2", status="completed", created_at=3.0),
        record("run_4", thread_id="thr_2", status="failed", created_at=4.0),
    ]
    await store.write([RunWrite(row) for row in rows])

    async def ids(
        status: str | None = None, thread_id: str | None = None, limit: int = 50
    ) -> list[str]:
        runs = await store.list_runs(RunQuery(status, thread_id), limit=limit)
        return [r.run_id for r in runs]

    assert await ids() == ["run_4", "run_3", "run_2", "run_1"], "newest first"
    assert await ids(status="completed") == ["run_3", "run_1"]
    assert await ids(thread_id="thr_1") == ["run_2", "run_1"]
    assert await ids(status="completed", thread_id="thr_2") == ["run_3"]
    assert await ids(limit=2) == ["run_4", "run_3"]
    assert await ids(status="queued") == []
    assert await store.stats() == {"path": str(store.path), "runs": 4}


async def test_live_runs_are_those_not_ended(store: SqliteStore) -> None:
    await thread(store)
    statuses = ["queued", "running", "requires_action", "completed", "failed", "stopped"]
    statuses.append("interrupted")
    await store.write([RunWrite(record(f"run_{s}", status=s)) for s in statuses])
    live = await store.live_runs()
    assert {r.run_id for r in live} == {"run_queued", "run_running", "run_requires_action"}


async def test_read_events_after_and_limit(store: SqliteStore) -> None:
    await thread(store)
    await store.write([RunWrite(record("run_a", last_index=10), events(1, 10))])

    async def indexes(after: int, limit: int | None) -> list[int]:
        return [e.index for e in await store.read_events("run_a", after, limit)]

    assert await indexes(0, None) == list(range(1, 11))
    assert await indexes(7, None) == [8, 9, 10]
    assert await indexes(2, 3) == [3, 4, 5]
    assert await indexes(0, 0) == []
    assert await indexes(10, None) == []
    assert await indexes(12, 5) == []


async def test_data_survives_a_reopen(db: Path) -> None:
    first = SqliteStore(db)
    await first.open()
    await thread(first)
    await first.write([RunWrite(record("run_a", last_index=3), events(1, 3))])
    await first.close()
    await first.close()  # twice is harmless

    second = SqliteStore(db)
    await second.open()
    try:
        assert await second.get_run("run_a") == record("run_a", last_index=3)
        assert [e.json for e in await second.read_events("run_a", 0, None)] == [
            e.json for e in events(1, 3)
        ]
    finally:
        await second.close()


async def test_a_newer_schema_is_refused(db: Path) -> None:
    store = SqliteStore(db)
    await store.open()
    await store.close()
    with sqlite3.connect(db) as raw:
        raw.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    refused = SqliteStore(db)
    with pytest.raises(StoreError, match="newer"):
        await refused.open()
    with pytest.raises(AssertionError):
        _ = refused.db  # closed again, not left half open
    with sqlite3.connect(db) as raw:  # and nothing was rewritten
        row = raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert row[0] == str(SCHEMA_VERSION + 1)


async def test_a_newer_file_is_refused_as_it_is(db: Path) -> None:
    """A file from a newer runcast (a schema this one does not know) is not touched."""
    with sqlite3.connect(db) as raw:
        raw.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        raw.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION + 1),))
        raw.execute("CREATE TABLE runs_v2 (id TEXT)")
    with pytest.raises(StoreError, match="newer"):
        await SqliteStore(db).open()
    with sqlite3.connect(db) as raw:
        rows = raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = {row[0] for row in rows}
    assert tables == {"meta", "runs_v2"}


async def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database, not at all" * 200)
    store = SqliteStore(path)
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert isinstance(caught.value.__cause__, sqlite3.Error)
    with pytest.raises(AssertionError):
        _ = store.db


async def test_a_failed_read_is_a_store_error(store: SqliteStore) -> None:
    await store.db.execute("DROP TABLE events")
    with pytest.raises(StoreError):
        await store.read_events("run_a", 0, None)
