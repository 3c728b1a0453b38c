"""SqliteStore: the query plans of its keyset listing, deleting for good down to the file's
bytes, a failed vacuum, and the upgrade of a file written before titles and metadata.
What it does as every store does (titles and metadata, listing, deleting, checks, vacuum)
is tested in test_contract.py."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.errors import StoreError
from app.store.base import RunQuery
from app.store.sqlite import (
    _MIGRATIONS,
    SqliteStore,
    run_page_query,
    thread_page_query,
)
from tests.store.helpers import fill, make_thread, page_queries

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "records.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(db)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


# -- listing ------------------------------------------------------------------------------


def plan(db: Path, sql: str, params: tuple[Any, ...]) -> list[str]:
    connection = sqlite3.connect(db)
    try:
        return [row[3] for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    finally:
        connection.close()


def assert_index_range(lines: list[str], table: str) -> None:
    """The page is read along an index: no scan of the table by itself, no sort."""
    assert any(f"{table} USING" in line and "INDEX" in line for line in lines), lines
    for line in lines:
        assert not (line.startswith(f"SCAN {table}") and "INDEX" not in line), lines
        assert "TEMP B-TREE" not in line, lines


async def test_pages_are_ranges_of_indexes_not_scans(store: SqliteStore, db: Path) -> None:
    await fill(store, 30, 3)
    for table, (sql, params) in page_queries(thread_page_query, run_page_query):
        lines = plan(db, sql, params)
        assert_index_range(lines, table)
        if "<" in sql:  # after a cursor: a SEARCH of a range, not a walk from the start
            assert any(line.startswith(f"SEARCH {table}") for line in lines), lines


# -- deleting -----------------------------------------------------------------------------


def file_bytes(db: Path) -> bytes:
    """The database file and its WAL, as they are on disk."""
    wal = db.with_name(db.name + "-wal")
    return db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


async def test_a_deleted_thread_leaves_nothing_in_the_file(store: SqliteStore, db: Path) -> None:
    run_id, _ = await make_thread(store, "thr_1", "secret words")
    await make_thread(store, "thr_2", "other words")
    assert await store.delete_thread("thr_1") == [run_id]
    raw = file_bytes(db)
    assert b"secret words" not in raw and run_id.encode() not in raw
    assert b"other words" in raw  # the file does hold what is left


async def test_a_file_of_schema_3_is_upgraded(db: Path) -> None:
    connection = sqlite3.connect(db)
    try:
        connection.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            + "".join(_MIGRATIONS[:3])
            + "INSERT INTO meta VALUES ('schema_version', '3');"
            "INSERT INTO threads VALUES ('thr_old', '{\"a\":1}', 2, NULL, 1.0, 2.0);"
            "INSERT INTO runs VALUES ('run_old', 'thr_old', 'echo', '{}', 'completed', 'e',"
            ' 0, \'{"status":"completed","message":{"content":""}}\', 1.0, 1.0);'
        )
        connection.commit()
    finally:
        connection.close()
    store = SqliteStore(db)
    await store.open()
    try:
        thread = await store.get_thread("thr_old")
        assert thread is not None and (thread.title, thread.metadata) == (None, {"a": 1})
        run = await store.get_run("run_old")
        assert run is not None and (run.title, run.metadata) == (None, {})
        assert [r.run_id for r in await store.list_runs(RunQuery(), limit=5)] == ["run_old"]
    finally:
        await store.close()


async def test_a_reader_elsewhere_delays_the_wal_truncation_but_not_the_delete(
    store: SqliteStore, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_id, _ = await make_thread(store, "thr_1", "words")
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM runs").fetchone()  # a snapshot held open
        async with asyncio.timeout(1):  # not the busy timeout: the checkpoint gives up
            assert await store.delete_run(run_id) is True
        assert "blocked by a reader" in caplog.text
        reader.execute("COMMIT")
    finally:
        reader.close()
    assert await store.get_run(run_id) is None
    before, after = await store.vacuum()  # the next checkpoint writes the pages over
    assert after <= before
    assert run_id.encode() not in file_bytes(db)


async def test_a_failed_vacuum_is_a_store_error(store: SqliteStore) -> None:
    await make_thread(store, "thr_1", "words")
    await store.db.execute("BEGIN")  # VACUUM cannot run inside a transaction
    try:
        with pytest.raises(StoreError):
            await store.vacuum()
    finally:
        await store.db.execute("ROLLBACK")
