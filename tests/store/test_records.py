"""SqliteStore: titles and metadata, keyset listing (and its query plans), deleting for
good, the checks that find what a delete could leave behind, vacuum, and the upgrade of
a file written before them."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.core.events import Event
from app.core.turns import Turn
from app.errors import StoreError
from app.store.base import Key, RunQuery, RunRecord, RunWrite, ShareRecord, ThreadRecord
from app.store.sqlite import (
    _MIGRATIONS,
    SqliteStore,
    run_page_query,
    thread_page_query,
)

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


def run_record(
    run_id: str,
    thread_id: str,
    created_at: float,
    *,
    status: str = "completed",
    agent: str = "echo",
    metadata: dict[str, Any] | None = None,
    content: str = "",
    last_index: int = 0,
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        thread_id=thread_id,
        agent=agent,
        input={"text": content},
        status=status,
        epoch="e1",
        last_index=last_index,
        snapshot={"status": status, "message": {"content": content}},
        created_at=created_at,
        updated_at=created_at,
        title=f"title of {run_id}",
        metadata=metadata or {},
    )


def ended_events(text: str) -> list[Event]:
    return [
        Event(1, "status", {"status": "running"}, 1.0),
        Event(2, "text", {"text": text}, 2.0),
        Event(3, "status", {"status": "completed"}, 3.0),
    ]


# -- titles and metadata ------------------------------------------------------------------


async def test_titles_and_metadata_round_trip(store: SqliteStore) -> None:
    thread = ThreadRecord("thr_1", {"a": 1}, 1.0, 1.0, title="first")
    await store.create_thread(thread)
    assert await store.get_thread("thr_1") == thread
    renamed = ThreadRecord("thr_1", {"b": "2"}, 1.0, 2.0, revision=1, title=None)
    await store.write_thread(renamed, [])
    assert await store.get_thread("thr_1") == renamed
    run = run_record("run_1", "thr_1", 5.0, metadata={"k": "v"})
    await store.write([RunWrite(run)])
    assert await store.get_run("run_1") == run
    # A flush writes the row again: title and metadata are left as they are.
    await store.update_run("run_1", title="renamed", metadata={"k": "w"}, updated_at=6.0)
    later = run_record("run_1", "thr_1", 5.0, metadata={"stale": "yes"}, last_index=0)
    await store.write([RunWrite(later)])
    stored = await store.get_run("run_1")
    assert stored is not None
    assert (stored.title, stored.metadata) == ("renamed", {"k": "w"})


# -- listing ------------------------------------------------------------------------------


async def fill(store: SqliteStore, threads: int, runs_per_thread: int) -> None:
    for t in range(threads):
        thread_id = f"thr_{t:03d}"
        # Every third thread shares its creation time with the one before: ties are
        # broken by id.
        created = float(t - t % 3 // 2)
        await store.create_thread(
            ThreadRecord(thread_id, {"team": "red" if t % 2 else "blue"}, created, created)
        )
        await store.write(
            [
                RunWrite(
                    run_record(
                        f"run_{t:03d}_{r}",
                        thread_id,
                        created + r / 10,
                        status=("completed", "failed")[r % 2],
                        agent=("echo", "demo")[t % 2],
                        metadata={"r": str(r)},
                    )
                )
                for r in range(runs_per_thread)
            ]
        )


async def walk_threads(
    store: SqliteStore, limit: int, metadata: list[tuple[str, str]] | None = None
) -> list[str]:
    seen: list[str] = []
    before: Key | None = None
    while True:
        page = await store.list_threads(metadata=metadata or [], before=before, limit=limit)
        seen += [thread.thread_id for thread in page]
        if len(page) < limit:
            return seen
        before = (page[-1].created_at, page[-1].thread_id)


async def test_threads_page_newest_first_by_time_then_id(store: SqliteStore) -> None:
    await fill(store, 20, 0)
    every = await store.list_threads(metadata=[], limit=100)
    keys = [(t.created_at, t.thread_id) for t in every]
    assert keys == sorted(keys, reverse=True) and len(keys) == 20
    assert len({t.created_at for t in every}) < 20  # there are ties
    for limit in (1, 3, 7, 20):
        assert await walk_threads(store, limit) == [t.thread_id for t in every]
    red = await walk_threads(store, 4, [("team", "red")])
    assert red == [t.thread_id for t in every if t.metadata["team"] == "red"]
    assert await walk_threads(store, 4, [("team", "red"), ("team", "blue")]) == []


async def test_runs_page_by_every_filter(store: SqliteStore) -> None:
    await fill(store, 6, 4)
    every = await store.list_runs(RunQuery(), limit=100)
    assert [(r.created_at, r.run_id) for r in every] == sorted(
        ((r.created_at, r.run_id) for r in every), reverse=True
    )

    async def walk(query: RunQuery, limit: int) -> list[str]:
        seen: list[str] = []
        before: Key | None = None
        while True:
            page = await store.list_runs(query, before=before, limit=limit)
            seen += [run.run_id for run in page]
            if len(page) < limit:
                return seen
            before = (page[-1].created_at, page[-1].run_id)

    def expect(match: Any) -> list[str]:
        return [r.run_id for r in every if match(r)]

    assert await walk(RunQuery(), 5) == expect(lambda r: True)
    assert await walk(RunQuery(status="failed"), 2) == expect(lambda r: r.status == "failed")
    assert await walk(RunQuery(thread_id="thr_002"), 3) == expect(
        lambda r: r.thread_id == "thr_002"
    )
    assert await walk(RunQuery(agent="demo", metadata=[("r", "0")]), 1) == expect(
        lambda r: r.agent == "demo" and r.metadata["r"] == "0"
    )
    assert await walk(RunQuery(status="completed", thread_id="thr_001"), 1) == expect(
        lambda r: r.status == "completed" and r.thread_id == "thr_001"
    )


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
    after: Key = (10.0, "thr_010")
    cases = [
        ("threads", thread_page_query([], None, 50)),
        ("threads", thread_page_query([], after, 50)),
        ("threads", thread_page_query([("team", "red")], after, 50)),
        ("runs", run_page_query(RunQuery(), None, 50)),
        ("runs", run_page_query(RunQuery(), after, 50)),
        ("runs", run_page_query(RunQuery(status="completed"), after, 50)),
        ("runs", run_page_query(RunQuery(thread_id="thr_003"), after, 50)),
        ("runs", run_page_query(RunQuery(status="failed", thread_id="thr_003"), None, 50)),
        ("runs", run_page_query(RunQuery(agent="echo"), after, 50)),
        ("runs", run_page_query(RunQuery(metadata=[("r", "1")]), after, 50)),
    ]
    for table, (sql, params) in cases:
        lines = plan(db, sql, params)
        assert_index_range(lines, table)
        if "<" in sql:  # after a cursor: a SEARCH of a range, not a walk from the start
            assert any(line.startswith(f"SEARCH {table}") for line in lines), lines


# -- deleting -----------------------------------------------------------------------------


async def make_thread(store: SqliteStore, thread_id: str, text: str) -> tuple[str, str]:
    """A thread with a user turn answered by an ended run; (run_id, assistant turn id)."""
    run_id = f"run_of_{thread_id}"
    question = Turn(f"turn_q_{thread_id}", thread_id, None, "user", text, None, "completed", 1.0)
    answer = Turn(
        f"turn_a_{thread_id}", thread_id, question.turn_id, "assistant", "", run_id, "queued", 1.0
    )
    record = run_record(run_id, thread_id, 1.0, content=text, last_index=3)
    await store.write_thread(
        ThreadRecord(thread_id, {"s": text}, 1.0, 1.0, 1, answer.turn_id, title=text),
        [question, answer],
        [RunWrite(record, ended_events(text), keyframes=[(2, '{"k": 1}')])],
    )
    share = ShareRecord(f"shr_{thread_id}", "run", run_id, "viewer", "open", 1.0, 9e9)
    await store.create_share(share)
    await store.create_share(
        ShareRecord(f"shr_t_{thread_id}", "thread", thread_id, "viewer", "open", 1.0, 9e9)
    )
    return run_id, answer.turn_id


def contents(db: Path) -> str:
    """Every cell of every table, as text."""
    connection = sqlite3.connect(db)
    try:
        cells = []
        tables = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        for (table,) in tables.fetchall():
            for row in connection.execute(f"SELECT * FROM {table}"):
                cells += [str(cell) for cell in row]
        return "\n".join(cells)
    finally:
        connection.close()


async def test_deleting_a_run_keeps_its_turn_text_and_status(store: SqliteStore, db: Path) -> None:
    run_id, answer_id = await make_thread(store, "thr_1", "words to keep")
    await make_thread(store, "thr_2", "other words")
    assert await store.delete_run(run_id) is True
    assert await store.get_run(run_id) is None
    assert await store.read_events(run_id, 0, None) == []
    assert await store.read_keyframe(run_id, 10) is None
    assert await store.get_share("shr_thr_1") is None
    assert await store.get_share("shr_t_thr_1") is not None  # the thread's own stays
    turns = {turn.turn_id: turn for turn in await store.load_turns("thr_1")}
    answer = turns[answer_id]
    assert (answer.run_id, answer.content, answer.status) == (None, "words to keep", "completed")
    assert run_id not in contents(db)
    assert await store.check() == []
    assert await store.delete_run(run_id) is False
    assert await store.get_run("run_of_thr_2") is not None


def file_bytes(db: Path) -> bytes:
    """The database file and its WAL, as they are on disk."""
    wal = db.with_name(db.name + "-wal")
    return db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


async def test_deleting_a_thread_erases_everything_of_it(store: SqliteStore, db: Path) -> None:
    run_id, answer_id = await make_thread(store, "thr_1", "secret words")
    await make_thread(store, "thr_2", "other words")
    assert await store.delete_thread("thr_1") == [run_id]
    assert await store.get_thread("thr_1") is None
    assert await store.load_turns("thr_1") == []
    assert await store.get_run(run_id) is None
    text = contents(db)
    for gone in ("thr_1", run_id, answer_id, "secret words", "shr_thr_1", "shr_t_thr_1"):
        assert gone not in text, gone
    raw = file_bytes(db)
    assert b"secret words" not in raw and run_id.encode() not in raw
    assert "other words" in text
    assert await store.check() == []
    assert await store.delete_thread("thr_1") is None


async def test_check_finds_what_a_delete_could_leave_behind(store: SqliteStore, db: Path) -> None:
    await make_thread(store, "thr_1", "words")
    connection = sqlite3.connect(db)
    try:
        connection.execute("PRAGMA foreign_keys=OFF")
        connection.execute("DELETE FROM runs")
        connection.execute("UPDATE threads SET head = 'turn_nope'")
        connection.commit()
    finally:
        connection.close()
    problems = await store.check()
    assert any("turn turn_a_thr_1: its run run_of_thr_1 does not exist" in p for p in problems)
    assert any("thread thr_1: its head turn_nope is not a turn" in p for p in problems)
    assert any(p.startswith("events of run run_of_thr_1") for p in problems)
    assert any(p.startswith("keyframes of run run_of_thr_1") for p in problems)
    assert any(p.startswith("share shr_thr_1: its run") for p in problems)


async def test_vacuum_reports_the_size_before_and_after(store: SqliteStore) -> None:
    await store.create_thread(ThreadRecord("thr_1", {}, 1.0, 1.0))
    events = [Event(i, "text", {"text": "x" * 200}, float(i)) for i in range(1, 5001)]
    record = run_record("run_1", "thr_1", 1.0, status="running", last_index=5000)
    await store.write([RunWrite(record, events)])
    await store.delete_thread("thr_1")
    before, after = await store.vacuum()
    assert after < before // 4, (before, after)


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
