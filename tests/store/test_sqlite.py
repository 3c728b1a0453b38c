"""SqliteStore on a real file: schema, WAL, filtered run lists, schema versions, files that
are not databases. What it does as every store does is tested in test_contract.py."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.errors import StoreError
from app.store.base import RunQuery, RunWrite
from app.store.sqlite import SCHEMA_VERSION, SqliteStore
from tests.store.helpers import record, thread

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
