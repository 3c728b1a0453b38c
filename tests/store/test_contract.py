"""What every store does the same, run once on each: SqliteStore on a file under
``tmp_path`` and PostgresStore on a database of its own (``fresh_database``: the
machine's PostgreSQL, ``RUNCAST_TEST_POSTGRES``). Runs and their events, batches as
transactions, threads, titles and metadata, keyset listing, deleting for good, the checks
that find what a delete could leave behind, vacuum.

What only one store has (schemas and migrations, query plans, SQLite's file and WAL,
PostgreSQL's row locks, owners and signals) stays in test_sqlite.py, test_records.py and
test_postgres.py."""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app.core.events import Event
from app.errors import StoreError
from app.store import open_store
from app.store.base import Key, RunQuery, RunRecord, RunWrite, Store, ThreadRecord
from app.store.postgres import redact
from tests.cluster.nodes import fresh_database
from tests.store.helpers import events, fill, make_thread, record, thread

pytestmark = pytest.mark.timeout(30)


class SqliteBackend:
    """A SQLite file, and what the tests do to it behind the store's back."""

    driver_error = sqlite3.Error
    unique_violation = sqlite3.IntegrityError

    def __init__(self, path: Path) -> None:
        self.database = str(path)
        self.stats = {"path": self.database}

    async def tamper(self, sql: str) -> None:
        """Run ``sql`` on a connection of its own, foreign keys off (a broken delete)."""
        connection = sqlite3.connect(self.database)
        try:
            connection.execute("PRAGMA foreign_keys=OFF")
            connection.executescript(sql)
            connection.commit()
        finally:
            connection.close()

    async def contents(self) -> str:
        """Every cell of every table, as text."""
        connection = sqlite3.connect(self.database)
        try:
            cells = []
            tables = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            for (table,) in tables.fetchall():
                for row in connection.execute(f"SELECT * FROM {table}"):
                    cells += [str(cell) for cell in row]
            return "\n".join(cells)
        finally:
            connection.close()


class PostgresBackend:
    """A PostgreSQL database, and what the tests do to it behind the store's back."""

    driver_error = asyncpg.PostgresError
    unique_violation = asyncpg.UniqueViolationError

    def __init__(self, url: str) -> None:
        self.database = url
        self.stats = {"url": redact(url)}

    async def tamper(self, sql: str) -> None:
        """Run ``sql`` on a connection of its own, foreign keys off (a broken delete)."""
        connection = await asyncpg.connect(self.database)
        try:
            await connection.execute(f"SET session_replication_role = replica; {sql}")
        finally:
            await connection.close()

    async def contents(self) -> str:
        """Every cell of every table, as text."""
        connection = await asyncpg.connect(self.database)
        try:
            cells: list[str] = []
            tables = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            for (table,) in await connection.fetch(tables):
                for row in await connection.fetch(f"SELECT * FROM {table}"):
                    cells += [str(cell) for cell in row]
            return "\n".join(cells)
        finally:
            await connection.close()


Backend = SqliteBackend | PostgresBackend


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "sqlite":
        yield SqliteBackend(tmp_path / "store.db")
    else:
        async with fresh_database() as url:
            yield PostgresBackend(url)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    store = open_store(backend.database)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


# -- runs and their events -----------------------------------------------------------------


async def test_write_and_read_back_runs_and_events(store: Store) -> None:
    await thread(store)
    written = events(1, 5)
    run = record("run_a", last_index=5, metadata={"k": "v", "n": 1})
    await store.write([RunWrite(run, written)])
    assert await store.get_run("run_a") == run
    read = await store.read_events("run_a", 0, None)
    assert [e.json for e in read] == [e.json for e in written], "the text is stored as is"
    assert [e.to_dict() for e in read] == [e.to_dict() for e in written]
    assert await store.get_run("run_nope") is None
    assert await store.read_events("run_nope", 0, None) == []


async def test_a_later_write_updates_the_row_and_appends_events(store: Store) -> None:
    await thread(store)
    first = record("run_a", last_index=2, metadata={"k": "v"})
    await store.write([RunWrite(first, events(1, 2))])
    later = RunRecord(
        **{
            **{f: getattr(first, f) for f in first.__dataclass_fields__},
            "status": "completed",
            "epoch": "e2",
            "last_index": 4,
            "snapshot": {"status": "completed"},
            "updated_at": 99.0,
            # Identity columns, title and metadata of an existing row are never rewritten.
            "input": {"changed": True},
            "created_at": 55.0,
            "title": "stale",
            "metadata": {"stale": "yes"},
        }
    )
    await store.write([RunWrite(later, events(3, 4))])
    got = await store.get_run("run_a")
    assert got is not None
    assert (got.status, got.epoch, got.last_index, got.updated_at) == ("completed", "e2", 4, 99.0)
    assert got.snapshot == {"status": "completed"}
    assert (got.input, got.created_at, got.title, got.metadata) == (
        first.input,
        first.created_at,
        first.title,
        first.metadata,
    )
    assert [e.index for e in await store.read_events("run_a", 0, None)] == [1, 2, 3, 4]


async def test_one_batch_is_one_transaction(store: Store, backend: Backend) -> None:
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
    assert isinstance(caught.value.__cause__, backend.unique_violation)
    assert await store.get_run("run_b") is None
    assert await store.read_events("run_b", 0, None) == []
    got = await store.get_run("run_a")
    assert got is not None and (got.status, got.last_index) == ("queued", 1)
    # and the store is usable afterwards
    await store.write([RunWrite(record("run_b", last_index=2), events(1, 2))])
    assert len(await store.read_events("run_b", 0, None)) == 2


async def test_a_run_needs_its_thread(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.write([RunWrite(record("run_a", thread_id="thr_missing"))])
    assert await store.get_run("run_a") is None


async def test_an_empty_batch_writes_nothing(store: Store, backend: Backend) -> None:
    await store.write([])
    assert await store.stats() == {**backend.stats, "runs": 0}


async def test_read_events_after_and_limit(store: Store) -> None:
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


async def test_live_runs_are_those_not_ended(store: Store) -> None:
    statuses = ["queued", "running", "requires_action", "completed", "failed", "stopped"]
    statuses.append("interrupted")
    for k, status in enumerate(statuses):  # one thread each: one active run per thread
        await thread(store, f"thr_{k}")
        await store.write([RunWrite(record(f"run_{status}", thread_id=f"thr_{k}", status=status))])
    live = await store.live_runs()
    assert {r.run_id for r in live} == {"run_queued", "run_running", "run_requires_action"}


async def test_data_survives_a_reopen(backend: Backend) -> None:
    first = open_store(backend.database)
    await first.open()
    await thread(first)
    await first.write([RunWrite(record("run_a", last_index=3), events(1, 3))])
    await first.close()
    await first.close()  # twice is harmless
    second = open_store(backend.database)
    await second.open()
    try:
        assert await second.get_run("run_a") == record("run_a", last_index=3)
        assert [e.json for e in await second.read_events("run_a", 0, None)] == [
            e.json for e in events(1, 3)
        ]
    finally:
        await second.close()


async def test_a_failed_read_is_a_store_error(store: Store, backend: Backend) -> None:
    await backend.tamper("DROP TABLE events")
    with pytest.raises(StoreError) as caught:
        await store.read_events("run_a", 0, None)
    assert isinstance(caught.value.__cause__, backend.driver_error)


# -- threads, titles and metadata ------------------------------------------------------------


async def test_threads_round_trip(store: Store) -> None:
    written = await thread(store, "thr_x")
    assert await store.get_thread("thr_x") == written
    assert await store.get_thread("thr_nope") is None
    with pytest.raises(StoreError):
        await thread(store, "thr_x")  # the id is taken


async def test_titles_and_metadata_round_trip(store: Store) -> None:
    first = ThreadRecord("thr_1", {"a": 1}, 1.0, 1.0, title="first")
    await store.create_thread(first)
    assert await store.get_thread("thr_1") == first
    renamed = ThreadRecord("thr_1", {"b": "2"}, 1.0, 2.0, revision=1, title=None)
    await store.write_thread(renamed, [])
    assert await store.get_thread("thr_1") == renamed
    run = record("run_1", metadata={"k": "v"})
    await store.write([RunWrite(run)])
    assert await store.get_run("run_1") == run
    # A flush writes the row again: title and metadata are left as they are.
    await store.update_run("run_1", title="renamed", metadata={"k": "w"}, updated_at=6.0)
    await store.write([RunWrite(record("run_1", metadata={"stale": "yes"}))])
    stored = await store.get_run("run_1")
    assert stored is not None
    assert (stored.title, stored.metadata) == ("renamed", {"k": "w"})


# -- listing ----------------------------------------------------------------------------------


async def test_threads_page_newest_first_by_time_then_id(store: Store) -> None:
    await fill(store, 20, 0)
    # Ids that sort differently under a linguistic collation than bytewise.
    for thread_id in ("thr_A", "thr_a", "thr-b", "thr_b"):
        await store.create_thread(ThreadRecord(thread_id, {"team": "x"}, 0.0, 0.0))
    every = await store.list_threads(metadata=[], limit=100)
    keys = [(t.created_at, t.thread_id) for t in every]
    assert keys == sorted(keys, reverse=True) and len(keys) == 24
    assert len({t.created_at for t in every}) < 20  # there are ties

    async def walk(limit: int, metadata: list[tuple[str, str]]) -> list[str]:
        seen: list[str] = []
        before: Key | None = None
        while True:
            page = await store.list_threads(metadata=metadata, before=before, limit=limit)
            seen += [t.thread_id for t in page]
            if len(page) < limit:
                return seen
            before = (page[-1].created_at, page[-1].thread_id)

    for limit in (1, 3, 7, 20, 24):
        assert await walk(limit, []) == [t.thread_id for t in every]
    red = await walk(4, [("team", "red")])
    assert red == [t.thread_id for t in every if t.metadata["team"] == "red"]
    assert await walk(4, [("team", "red"), ("team", "blue")]) == []


async def test_runs_page_by_every_filter(store: Store) -> None:
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
    # A metadata filter matches strings only: "n" holds numbers.
    assert await walk(RunQuery(metadata=[("n", "0")]), 5) == []


# -- deleting, checking, vacuum ---------------------------------------------------------------


async def test_deleting_a_run_keeps_its_turn_text_and_status(
    store: Store, backend: Backend
) -> None:
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
    assert run_id not in await backend.contents()
    assert await store.check() == []
    assert await store.delete_run(run_id) is False
    assert await store.get_run("run_of_thr_2") is not None


async def test_deleting_a_thread_erases_everything_of_it(store: Store, backend: Backend) -> None:
    run_id, answer_id = await make_thread(store, "thr_1", "secret words")
    await make_thread(store, "thr_2", "other words")
    assert await store.delete_thread("thr_1") == [run_id]
    assert await store.get_thread("thr_1") is None
    assert await store.load_turns("thr_1") == []
    assert await store.get_run(run_id) is None
    text = await backend.contents()
    for gone in ("thr_1", run_id, answer_id, "secret words", "shr_thr_1", "shr_t_thr_1"):
        assert gone not in text, gone
    assert "other words" in text
    assert await store.check() == []
    assert await store.delete_thread("thr_1") is None


async def test_check_finds_what_a_delete_could_leave_behind(store: Store, backend: Backend) -> None:
    await make_thread(store, "thr_1", "words")
    assert await store.check() == []
    await backend.tamper("DELETE FROM runs; UPDATE threads SET head = 'turn_nope'")
    problems = await store.check()
    assert any("turn turn_a_thr_1: its run run_of_thr_1 does not exist" in p for p in problems)
    assert any("thread thr_1: its head turn_nope is not a turn" in p for p in problems)
    assert any(p.startswith("events of run run_of_thr_1") for p in problems)
    assert any(p.startswith("keyframes of run run_of_thr_1") for p in problems)
    assert any(p.startswith("share shr_thr_1: its run") for p in problems)


async def test_vacuum_reports_the_size_before_and_after(store: Store) -> None:
    await store.create_thread(ThreadRecord("thr_1", {}, 1.0, 1.0))
    many = [
        Event(i, "text", {"text": f"{i} {secrets.token_hex(100)}"}, float(i))
        for i in range(1, 5001)
    ]
    await store.write([RunWrite(record("run_1", status="completed", last_index=5000), many)])
    await store.delete_thread("thr_1")
    before, after = await store.vacuum()
    assert after < before // 4, (before, after)
