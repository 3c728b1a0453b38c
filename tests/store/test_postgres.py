"""PostgresStore on the machine's PostgreSQL: every method of the Store protocol with the
semantics of SqliteStore (tests/store/test_sqlite.py and test_records.py, which stay
SQLite's: they read the file), and what a database shared by several processes adds:
row-locked thread writes, one active run per thread, migrations by one node at a time.
Then one real server on PostgreSQL, end to end.

Each test gets a database of its own (``CREATE DATABASE`` with a random name, dropped
``WITH (FORCE)`` at teardown), so tests never see each other, in one run or in two run
side by side. ``RUNCAST_TEST_POSTGRES`` names the server's maintenance database (default
``postgresql://postgres@127.0.0.1:5432/postgres``); without a server the tests are
skipped, except under CI, where they fail.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import uvicorn

from app.config import Settings
from app.core.events import Event
from app.core.turns import Turn
from app.errors import ConflictError, NotFoundError, RunInProgressError, StoreError
from app.store import open_store
from app.store.base import Key, RunQuery, RunRecord, RunWrite, ShareRecord, ThreadRecord
from app.store.postgres import (
    SCHEMA_VERSION,
    PostgresStore,
    redact,
    run_page_query,
    thread_page_query,
)
from app.store.sqlite import SqliteStore
from app.transport.app import Runtime, create_app
from tests.cluster.nodes import fresh_database
from tests.transport.helpers import connect

pytestmark = pytest.mark.timeout(30)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """The URL of a new, empty database, dropped after the test."""
    async with fresh_database() as url:
        yield url


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(pg_url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def raw(pg_url: str, store: PostgresStore) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own to the test's database (another process, as it were)."""
    connection = await asyncpg.connect(pg_url)
    try:
        yield connection
    finally:
        await connection.close()


def record(
    run_id: str,
    *,
    thread_id: str = "thr_1",
    status: str = "queued",
    last_index: int = 0,
    created_at: float = 10.0,
    epoch: str = "e1",
    agent: str = "demo",
    metadata: dict[str, Any] | None = None,
    content: str = "x",
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        thread_id=thread_id,
        agent=agent,
        input={"prompt": "héllo ✓", "tokens": 3},
        status=status,
        epoch=epoch,
        last_index=last_index,
        snapshot={"status": status, "message": {"content": content}, "usage": {"t": 1.5}},
        created_at=created_at,
        updated_at=created_at + 1,
        title=f"title of {run_id}",
        metadata=metadata or {},
    )


def events(first: int, last: int) -> list[Event]:
    return [
        Event(i, "text", {"text": f'tök {i} "quoted" \u2028 \u0000', "n": i / 3}, 1.7e9 + i)
        for i in range(first, last + 1)
    ]


def ended_events(text: str) -> list[Event]:
    return [
        Event(1, "status", {"status": "running"}, 1.0),
        Event(2, "text", {"text": text}, 2.0),
        Event(3, "status", {"status": "completed"}, 3.0),
    ]


async def thread(store: PostgresStore, thread_id: str = "thr_1") -> ThreadRecord:
    written = ThreadRecord(thread_id, {"title": "t", "tags": ["a"]}, 1.0, 2.0)
    await store.create_thread(written)
    return written


# -- schema ---------------------------------------------------------------------------------


async def test_open_creates_the_schema(store: PostgresStore, raw: asyncpg.Connection) -> None:
    tables = {
        row[0]
        for row in await raw.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    }
    assert tables == {
        "meta",
        "threads",
        "runs",
        "events",
        "keyframes",
        "turns",
        "shares",
        "signals",
    }
    version = await raw.fetchval("SELECT value FROM meta WHERE key = 'schema_version'")
    assert version == str(SCHEMA_VERSION)


async def test_nodes_opening_a_new_database_together_migrate_it_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await thread(stores[0])
        assert await stores[3].get_thread("thr_1") is not None
    finally:
        for s in stores:
            await s.close()
            await s.close()  # twice is harmless


async def test_data_survives_a_reopen(pg_url: str) -> None:
    first = PostgresStore(pg_url)
    await first.open()
    await thread(first)
    await first.write([RunWrite(record("run_a", last_index=3), events(1, 3))])
    await first.close()
    second = PostgresStore(pg_url)
    await second.open()
    try:
        assert await second.get_run("run_a") == record("run_a", last_index=3)
        assert [e.json for e in await second.read_events("run_a", 0, None)] == [
            e.json for e in events(1, 3)
        ]
    finally:
        await second.close()


async def test_a_newer_schema_is_refused_as_it_is(pg_url: str) -> None:
    connection = await asyncpg.connect(pg_url)
    try:
        await connection.execute(
            "CREATE TABLE meta (key text PRIMARY KEY, value text NOT NULL);"
            f"INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION + 1}');"
            "CREATE TABLE runs_v2 (id text)"
        )
        refused = PostgresStore(pg_url.replace("postgres@", "postgres:hunter2@"))
        with pytest.raises(StoreError, match="newer") as caught:
            await refused.open()
        message = str(caught.value)
        assert f"version {SCHEMA_VERSION + 1}" in message and "hunter2" not in message
        assert urlsplit(pg_url).path in message  # named
        with pytest.raises(AssertionError):
            _ = refused.pool  # closed again, not left half open
        tables = {
            row[0]
            for row in await connection.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        assert tables == {"meta", "runs_v2"}
    finally:
        await connection.close()


async def test_an_unreachable_database_is_a_store_error(pg_url: str) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for url in (
        f"postgresql://postgres:secret@127.0.0.1:{port}/x",
        with_database(pg_url, "runcast_no_such_database"),
    ):
        store = PostgresStore(url)
        with pytest.raises(StoreError, match="cannot open database") as caught:
            await store.open()
        assert "secret" not in str(caught.value)
        with pytest.raises(AssertionError):
            _ = store.pool


def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_store("postgresql://u@h/db"), PostgresStore)
    assert isinstance(open_store("postgres://u@h/db"), PostgresStore)
    assert isinstance(open_store(tmp_path / "a.db"), SqliteStore)
    assert isinstance(open_store(str(tmp_path / "a.db")), SqliteStore)
    with pytest.raises(ValueError, match="as a string"):
        open_store(Path("postgresql://u@h/db"))


def test_redact_drops_passwords() -> None:
    assert redact("postgresql://bob:pw@h:5/db?sslmode=require&password=pw2") == (
        "postgresql://bob@h:5/db?sslmode=require"
    )
    assert redact("postgresql://h/db") == "postgresql://h/db"


# -- runs and their events -----------------------------------------------------------------


async def test_write_and_read_back_runs_and_events(store: PostgresStore) -> None:
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


async def test_get_runs_reads_many_rows_in_one_query(store: PostgresStore) -> None:
    await thread(store)
    a, b = record("run_a", last_index=2), record("run_b", last_index=3)
    await store.write([RunWrite(a, events(1, 2)), RunWrite(b, events(1, 3))])
    assert await store.get_runs(["run_b", "run_nope", "run_a"]) == {"run_a": a, "run_b": b}
    assert await store.get_runs([]) == {}


async def test_a_later_write_updates_the_row_and_appends_events(store: PostgresStore) -> None:
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


async def test_one_batch_is_one_transaction(store: PostgresStore) -> None:
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
    assert isinstance(caught.value.__cause__, asyncpg.UniqueViolationError)
    assert await store.get_run("run_b") is None
    assert await store.read_events("run_b", 0, None) == []
    got = await store.get_run("run_a")
    assert got is not None and (got.status, got.last_index) == ("queued", 1)
    await store.write([RunWrite(record("run_b", last_index=2), events(1, 2))])
    assert len(await store.read_events("run_b", 0, None)) == 2


async def test_a_big_flush_is_one_transaction(
    store: PostgresStore, raw: asyncpg.Connection
) -> None:
    await thread(store)
    await store.write([RunWrite(record("run_z"))])
    batch = [RunWrite(record(f"run_{k}", last_index=5_000), events(1, 5_000)) for k in range(5)]
    await store.write(batch)
    assert await raw.fetchval("SELECT count(*) FROM events") == 25_000
    assert [e.json for e in await store.read_events("run_3", 4_990, None)] == [
        e.json for e in events(4_991, 5_000)
    ]
    # A COPY that fails (run_0's events again) takes the whole batch with it.
    again = [RunWrite(record("run_z", status="completed", last_index=1), events(1, 1)), *batch]
    with pytest.raises(StoreError):
        await store.write(again)
    got = await store.get_run("run_z")
    assert got is not None and got.status == "queued"
    assert await raw.fetchval("SELECT count(*) FROM events") == 25_000


async def test_a_run_needs_its_thread(store: PostgresStore) -> None:
    with pytest.raises(StoreError):
        await store.write([RunWrite(record("run_a", thread_id="thr_missing"))])
    assert await store.get_run("run_a") is None


async def test_an_empty_batch_writes_nothing(store: PostgresStore) -> None:
    await store.write([])
    assert (await store.stats())["runs"] == 0


async def test_stats_name_the_database_without_its_password(pg_url: str) -> None:
    store = PostgresStore(pg_url.replace("postgres@", "postgres:hunter2@"))
    await store.open()
    try:
        await thread(store)
        await store.write([RunWrite(record("run_a"))])
        stats = await store.stats()
        assert stats == {"url": redact(pg_url), "runs": 1}
        assert "hunter2" not in repr(stats)
    finally:
        await store.close()


async def test_read_events_after_and_limit(store: PostgresStore) -> None:
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


async def test_keyframes_newest_at_or_before(store: PostgresStore) -> None:
    await thread(store)
    first = RunWrite(record("run_a", last_index=4), events(1, 4), [(2, '{"k":2}'), (4, '{"k":4}')])
    await store.write([first])
    await store.write([RunWrite(record("run_a", last_index=4), (), [(4, '{"k":"again"}')])])
    assert await store.read_keyframe("run_a", 1) is None
    assert await store.read_keyframe("run_a", 3) == (2, {"k": 2})
    assert await store.read_keyframe("run_a", 9) == (4, {"k": "again"})


async def test_live_runs_are_those_not_ended(store: PostgresStore) -> None:
    statuses = ["queued", "running", "requires_action", "completed", "failed", "stopped"]
    statuses.append("interrupted")
    for k, status in enumerate(statuses):  # one thread each: one active run per thread
        await thread(store, f"thr_{k}")
        await store.write([RunWrite(record(f"run_{status}", thread_id=f"thr_{k}", status=status))])
    live = await store.live_runs()
    assert {r.run_id for r in live} == {"run_queued", "run_running", "run_requires_action"}


# -- one active run per thread ---------------------------------------------------------------


async def test_one_active_run_per_thread_queued_ones_aside(store: PostgresStore) -> None:
    await thread(store)
    queued = [RunWrite(record(f"run_q{k}", status="queued")) for k in range(3)]
    await store.write([RunWrite(record("run_a", status="running")), *queued])
    # A second active run of the thread is refused, with everything else of its batch.
    await thread(store, "thr_2")
    with pytest.raises(StoreError) as caught:
        await store.write(
            [
                RunWrite(record("run_other", thread_id="thr_2", status="running")),
                RunWrite(record("run_q0", status="requires_action", last_index=1), events(1, 1)),
            ]
        )
    assert isinstance(caught.value.__cause__, asyncpg.UniqueViolationError)
    assert "runs_one_active" in str(caught.value)
    assert await store.get_run("run_other") is None
    assert await store.read_events("run_q0", 0, None) == []
    # A hand-over in one batch (the new active run first) goes through: rows that leave
    # the active set are written first.
    await store.write(
        [
            RunWrite(record("run_q0", status="running")),
            RunWrite(record("run_a", status="stopped")),
        ]
    )
    statuses = {r.run_id: r.status for r in await store.list_runs(RunQuery(), limit=10)}
    assert statuses == {
        "run_a": "stopped",
        "run_q0": "running",
        "run_q1": "queued",
        "run_q2": "queued",
    }


async def test_a_run_written_twice_in_a_batch_keeps_its_last_row(store: PostgresStore) -> None:
    await thread(store)
    await store.write(
        [
            RunWrite(record("run_a", last_index=2), events(1, 2)),
            RunWrite(record("run_a", last_index=3, status="completed"), events(3, 3)),
        ]
    )
    got = await store.get_run("run_a")
    assert got is not None and (got.status, got.last_index) == ("completed", 3)
    assert len(await store.read_events("run_a", 0, None)) == 3


# -- threads and turns -----------------------------------------------------------------------


def turns_of(thread_id: str, run_id: str, text: str) -> tuple[Turn, Turn]:
    question = Turn(f"turn_q_{thread_id}", thread_id, None, "user", text, None, "completed", 1.0)
    answer = Turn(
        f"turn_a_{thread_id}", thread_id, question.turn_id, "assistant", "", run_id, "queued", 1.0
    )
    return question, answer


async def make_thread(store: PostgresStore, thread_id: str, text: str) -> tuple[str, str]:
    """A thread with a user turn answered by an ended run, shared twice; (run_id,
    assistant turn id)."""
    run_id = f"run_of_{thread_id}"
    question, answer = turns_of(thread_id, run_id, text)
    run = record(run_id, thread_id=thread_id, status="completed", last_index=3, content=text)
    await store.write_thread(
        ThreadRecord(thread_id, {"s": text}, 1.0, 1.0, 1, answer.turn_id, title=text),
        [question, answer],
        [RunWrite(run, ended_events(text), keyframes=[(2, '{"k": 1}')])],
    )
    share = ShareRecord(f"shr_{thread_id}", "run", run_id, "viewer", "open", 1.0, 9e9)
    await store.create_share(share)
    await store.create_share(
        ShareRecord(f"shr_t_{thread_id}", "thread", thread_id, "viewer", "open", 1.0, 9e9)
    )
    return run_id, answer.turn_id


async def test_threads_round_trip(store: PostgresStore) -> None:
    written = await thread(store, "thr_x")
    assert await store.get_thread("thr_x") == written
    assert await store.get_thread("thr_nope") is None
    with pytest.raises(StoreError):
        await thread(store, "thr_x")  # the id is taken


async def test_write_thread_writes_row_turns_and_run_at_once(store: PostgresStore) -> None:
    run_id, answer_id = await make_thread(store, "thr_1", "héllo")
    got = await store.get_thread("thr_1")
    assert got == ThreadRecord("thr_1", {"s": "héllo"}, 1.0, 1.0, 1, answer_id, title="héllo")
    turns = await store.load_turns("thr_1")
    assert [t.turn_id for t in turns] == ["turn_q_thr_1", answer_id], "in insertion order"
    # An assistant turn shows its run's content and status.
    assert (turns[1].content, turns[1].status, turns[1].run_id) == ("héllo", "completed", run_id)
    assert (turns[0].content, turns[0].status) == ("héllo", "completed")
    assert await store.turn_of_run(run_id) == (answer_id, "turn_q_thr_1")
    assert await store.turn_of_run("run_nope") is None
    # Renamed: title and metadata, a revision more.
    renamed = ThreadRecord("thr_1", {"b": "2"}, 1.0, 2.0, revision=2, head=answer_id, title=None)
    await store.write_thread(renamed, [])
    assert await store.get_thread("thr_1") == renamed
    # A failing part (a turn id taken) writes nothing.
    with pytest.raises(StoreError):
        await store.write_thread(
            ThreadRecord("thr_1", {}, 1.0, 3.0, revision=3), [turns_of("thr_1", "r", "x")[0]]
        )
    assert await store.get_thread("thr_1") == renamed


async def test_a_stale_thread_write_is_refused(store: PostgresStore) -> None:
    base = ThreadRecord("thr_1", {}, 1.0, 1.0, revision=0)
    await store.write_thread(base, [])
    await store.write_thread(ThreadRecord("thr_1", {}, 1.0, 2.0, revision=1), [])
    # A writer that read revision 0 writes 0 (no bump): the thread moved on; refused.
    with pytest.raises(ConflictError) as caught:
        await store.write_thread(ThreadRecord("thr_1", {"old": "x"}, 1.0, 3.0, revision=0), [])
    assert caught.value.details == {"expected_revision": 0, "actual_revision": 1}
    # With the revision it read: a write over a thread that moved on is refused too.
    with pytest.raises(ConflictError):
        await store.write_thread(
            ThreadRecord("thr_1", {}, 1.0, 3.0, revision=1), [], expected_revision=0
        )
    await store.write_thread(
        ThreadRecord("thr_1", {}, 1.0, 3.0, revision=2), [], expected_revision=1
    )
    with pytest.raises(NotFoundError):
        await store.write_thread(
            ThreadRecord("thr_gone", {}, 1.0, 3.0, revision=1), [], expected_revision=0
        )
    got = await store.get_thread("thr_1")
    assert got is not None and (got.revision, got.metadata) == (2, {})


async def blocked_on_a_lock(raw: asyncpg.Connection) -> None:
    """Return once a connection of the store waits for a lock in this database (what
    PostgreSQL itself reports; checked every 10 ms)."""
    async with asyncio.timeout(5):
        while True:
            if await raw.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'runcast' AND wait_event_type = 'Lock'"
            ):
                return
            await asyncio.sleep(0.01)


async def test_thread_writes_wait_for_the_row_lock(
    store: PostgresStore, raw: asyncpg.Connection
) -> None:
    """Another process holding the thread's row: a write waits for it, then sees what it
    committed (and so refuses to take the revision back)."""
    await store.write_thread(ThreadRecord("thr_1", {}, 1.0, 1.0, revision=0), [])
    transaction = raw.transaction()
    await transaction.start()
    await raw.execute("SELECT 1 FROM threads WHERE thread_id = 'thr_1' FOR UPDATE")
    write = asyncio.create_task(
        store.write_thread(ThreadRecord("thr_1", {"mine": "1"}, 1.0, 2.0, revision=1), [])
    )
    await blocked_on_a_lock(raw)
    assert not write.done()
    await raw.execute("UPDATE threads SET revision = 1 WHERE thread_id = 'thr_1'")
    await transaction.commit()
    async with asyncio.timeout(5):
        await write  # revision 1 over 1: no bump, allowed
    transaction = raw.transaction()
    await transaction.start()
    await raw.execute("UPDATE threads SET revision = 2 WHERE thread_id = 'thr_1'")
    late = asyncio.create_task(
        store.write_thread(ThreadRecord("thr_1", {"late": "1"}, 1.0, 3.0, revision=1), [])
    )
    await blocked_on_a_lock(raw)
    await transaction.commit()
    with pytest.raises(ConflictError):
        async with asyncio.timeout(5):
            await late
    got = await store.get_thread("thr_1")
    assert got is not None and (got.revision, got.metadata) == (2, {"mine": "1"})


async def test_concurrent_bumps_from_two_processes_all_land(pg_url: str) -> None:
    """Two stores (two pools: two processes, as it were) bump one thread 20 times each,
    each reading then writing with the revision it read: the row lock serializes them,
    a loser retries, and no bump is lost."""
    stores = [PostgresStore(pg_url) for _ in range(2)]
    for s in stores:
        await s.open()
    try:
        await stores[0].write_thread(ThreadRecord("thr_1", {}, 1.0, 1.0, revision=0), [])

        async def bump(s: PostgresStore) -> int:
            conflicts = 0
            for _ in range(20):
                while True:
                    current = await s.get_thread("thr_1")
                    assert current is not None
                    nxt = ThreadRecord("thr_1", {}, 1.0, 1.0, revision=current.revision + 1)
                    try:
                        await s.write_thread(nxt, [], expected_revision=current.revision)
                        break
                    except ConflictError:
                        conflicts += 1
            return conflicts

        await asyncio.gather(*(bump(s) for s in stores))
        got = await stores[1].get_thread("thr_1")
        assert got is not None and got.revision == 40
    finally:
        for s in stores:
            await s.close()


# -- titles, metadata and listing -------------------------------------------------------------


async def test_update_run_sets_title_and_metadata(store: PostgresStore) -> None:
    await thread(store)
    await store.write([RunWrite(record("run_1", metadata={"k": "v"}))])
    await store.update_run("run_1", title="renamed", metadata={"k": "w"}, updated_at=6.0)
    await store.write([RunWrite(record("run_1", metadata={"stale": "yes"}))])
    stored = await store.get_run("run_1")
    assert stored is not None
    assert (stored.title, stored.metadata) == ("renamed", {"k": "w"})


async def fill(store: PostgresStore, threads: int, runs_per_thread: int) -> None:
    for t in range(threads):
        thread_id = f"thr_{t:03d}"
        created = float(t - t % 3 // 2)  # ties, broken by id
        await store.create_thread(
            ThreadRecord(thread_id, {"team": "red" if t % 2 else "blue"}, created, created)
        )
        await store.write(
            [
                RunWrite(
                    record(
                        f"run_{t:03d}_{r}",
                        thread_id=thread_id,
                        created_at=created + r / 10,
                        status=("completed", "failed")[r % 2],
                        agent=("echo", "demo")[t % 2],
                        metadata={"r": str(r), "n": r},
                    )
                )
                for r in range(runs_per_thread)
            ]
        )


async def test_threads_page_newest_first_by_time_then_id(store: PostgresStore) -> None:
    await fill(store, 20, 0)
    # Ids that sort differently under a linguistic collation than bytewise.
    for thread_id in ("thr_A", "thr_a", "thr-b", "thr_b"):
        await store.create_thread(ThreadRecord(thread_id, {"team": "x"}, 0.0, 0.0))
    every = await store.list_threads(metadata=[], limit=100)
    keys = [(t.created_at, t.thread_id) for t in every]
    assert keys == sorted(keys, reverse=True) and len(keys) == 24

    async def walk(limit: int, metadata: list[tuple[str, str]]) -> list[str]:
        seen: list[str] = []
        before: Key | None = None
        while True:
            page = await store.list_threads(metadata=metadata, before=before, limit=limit)
            seen += [t.thread_id for t in page]
            if len(page) < limit:
                return seen
            before = (page[-1].created_at, page[-1].thread_id)

    for limit in (1, 3, 7, 24):
        assert await walk(limit, []) == [t.thread_id for t in every]
    red = await walk(4, [("team", "red")])
    assert red == [t.thread_id for t in every if t.metadata["team"] == "red"]
    assert await walk(4, [("team", "red"), ("team", "blue")]) == []


async def test_runs_page_by_every_filter(store: PostgresStore) -> None:
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


async def test_pages_are_ranges_of_indexes_not_scans(
    store: PostgresStore, raw: asyncpg.Connection
) -> None:
    await fill(store, 30, 3)
    await raw.execute("ANALYZE")
    # With few rows a scan and a sort would be cheaper: ask for the plan as it would be on
    # a big table (a Sort that remains has no index to read the order from).
    await raw.execute(
        "SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off"
    )
    after: Key = (10.0, "thr_010")
    cases = [
        ("threads", thread_page_query([], None, 50)),
        ("threads", thread_page_query([], after, 50)),
        ("threads", thread_page_query([("team", "red")], after, 50)),
        ("runs", run_page_query(RunQuery(), None, 50)),
        ("runs", run_page_query(RunQuery(), after, 50)),
        ("runs", run_page_query(RunQuery(status="completed"), after, 50)),
        ("runs", run_page_query(RunQuery(thread_id="thr_003"), after, 50)),
        ("runs", run_page_query(RunQuery(agent="echo"), after, 50)),
        ("runs", run_page_query(RunQuery(metadata=[("r", "1")]), after, 50)),
    ]
    for table, (sql, params) in cases:
        plan = "\n".join(row[0] for row in await raw.fetch(f"EXPLAIN {sql}", *params))
        assert "Index Scan Backward using" in plan and f" on {table}" in plan, plan
        assert "Sort" not in plan and "Seq Scan" not in plan, plan
        if "<" in sql:  # after a cursor: the range starts there (an index condition)
            assert "Index Cond" in plan, plan


# -- deleting ---------------------------------------------------------------------------------


async def everything(raw: asyncpg.Connection) -> str:
    """Every cell of every table, as text."""
    cells: list[str] = []
    for (table,) in await raw.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"):
        for row in await raw.fetch(f"SELECT * FROM {table}"):
            cells += [str(cell) for cell in row]
    return "\n".join(cells)


async def test_deleting_a_run_keeps_its_turn_text_and_status(
    store: PostgresStore, raw: asyncpg.Connection
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
    assert run_id not in await everything(raw)
    assert await store.check() == []
    assert await store.delete_run(run_id) is False
    assert await store.get_run("run_of_thr_2") is not None


async def test_deleting_a_thread_erases_everything_of_it(
    store: PostgresStore, raw: asyncpg.Connection
) -> None:
    run_id, answer_id = await make_thread(store, "thr_1", "secret words")
    await make_thread(store, "thr_2", "other words")
    assert await store.delete_thread("thr_1") == [run_id]
    assert await store.get_thread("thr_1") is None
    assert await store.load_turns("thr_1") == []
    assert await store.get_run(run_id) is None
    text = await everything(raw)
    for gone in ("thr_1", run_id, answer_id, "secret words", "shr_thr_1", "shr_t_thr_1"):
        assert gone not in text, gone
    assert "other words" in text
    assert await store.check() == []
    assert await store.delete_thread("thr_1") is None


async def test_check_finds_what_a_delete_could_leave_behind(
    store: PostgresStore, raw: asyncpg.Connection
) -> None:
    await make_thread(store, "thr_1", "words")
    await raw.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
    assert await store.check() == []  # the indexes checked too
    await raw.execute(
        "SET session_replication_role = replica;"  # foreign keys off, as a broken delete
        "DELETE FROM runs; UPDATE threads SET head = 'turn_nope'"
    )
    problems = await store.check()
    assert any("turn turn_a_thr_1: its run run_of_thr_1 does not exist" in p for p in problems)
    assert any("thread thr_1: its head turn_nope is not a turn" in p for p in problems)
    assert any(p.startswith("events of run run_of_thr_1") for p in problems)
    assert any(p.startswith("keyframes of run run_of_thr_1") for p in problems)
    assert any(p.startswith("share shr_thr_1: its run") for p in problems)


async def test_check_finds_gaps_and_ends_without_their_event(store: PostgresStore) -> None:
    await thread(store)
    await store.write(
        [
            RunWrite(
                record("run_gap", status="queued", last_index=4), [*events(1, 2), *events(4, 4)]
            ),
            RunWrite(record("run_short", status="queued", last_index=5), events(1, 3)),
            RunWrite(record("run_end", status="completed", last_index=2), events(1, 2)),
            RunWrite(record("run_ok", status="completed", last_index=3), ended_events("ok")),
        ]
    )
    problems = await store.check()
    assert sorted(problems) == [
        "run run_end: completed, but its last event is not that status",
        "run run_gap: events are not contiguous from 1 to 4 (3 events, 1..4)",
        "run run_short: events are not contiguous from 1 to 5 (3 events, 1..3)",
    ]


async def test_vacuum_reports_the_size_before_and_after(store: PostgresStore) -> None:
    await store.create_thread(ThreadRecord("thr_1", {}, 1.0, 1.0))
    many = [
        Event(i, "text", {"text": f"{i} {secrets.token_hex(100)}"}, float(i))
        for i in range(1, 5001)
    ]
    await store.write([RunWrite(record("run_1", status="completed", last_index=5000), many)])
    await store.delete_thread("thr_1")
    before, after = await store.vacuum()
    assert after < before // 4, (before, after)


async def test_a_failed_read_is_a_store_error(
    store: PostgresStore, raw: asyncpg.Connection
) -> None:
    await raw.execute("DROP TABLE events")
    with pytest.raises(StoreError) as caught:
        await store.read_events("run_a", 0, None)
    assert isinstance(caught.value.__cause__, asyncpg.PostgresError)


# -- shares ---------------------------------------------------------------------------------


async def test_the_share_secret_is_stored_once_for_every_node(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(3)]
    for s in stores:
        await s.open()
    try:
        secrets_seen = await asyncio.gather(
            *(s.share_secret(f"new{k}") for k, s in enumerate(stores))
        )
        assert len(set(secrets_seen)) == 1 and secrets_seen[0] in {"new0", "new1", "new2"}
        assert await stores[0].share_secret("later") == secrets_seen[0]
    finally:
        for s in stores:
            await s.close()


async def test_shares_round_trip_and_revoke(store: PostgresStore) -> None:
    share = ShareRecord("shr_1", "run", "run_1", "viewer", "tok_a", 1.0, 100.0)
    old = ShareRecord("shr_2", "thread", "thr_1", "editor", "tok_a", 1.0, 50.0)
    await store.create_share(share)
    await store.create_share(old)
    assert await store.get_share("shr_1") == share
    assert await store.get_share("shr_nope") is None
    with pytest.raises(StoreError):
        await store.create_share(share)
    await store.revoke_share("shr_1", 10.0)
    await store.revoke_share("shr_1", 20.0)  # the first revocation stays
    await store.revoke_share("shr_2", 10.0)
    got = await store.get_share("shr_1")
    assert got is not None and got.revoked_at == 10.0
    assert await store.revoked_shares(60.0) == ["shr_1"]  # shr_2 has expired
    assert sorted(await store.revoked_shares(0.0)) == ["shr_1", "shr_2"]


# -- a real server on PostgreSQL ------------------------------------------------------------


async def serve(
    pg_url: str, tmp_path: Path
) -> tuple[str, Runtime, uvicorn.Server, asyncio.Task[None]]:
    """A runcast server (uvicorn, as tests/conftest.py starts one) on ``pg_url``."""
    settings = Settings(db=tmp_path / "unused.db", port=0, flush_interval_s=0.05)
    app = create_app(settings, store=open_store(pg_url))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", ws_per_message_deflate=False)
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    runtime: Runtime = app.state.runtime
    async with asyncio.timeout(10):
        await runtime.ready.wait()
    return f"127.0.0.1:{port}", runtime, server, task


async def stop(runtime: Runtime, server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    async with asyncio.timeout(20):
        await runtime.shutdown()
        server.should_exit = True
        await task


async def test_a_server_on_postgresql_end_to_end(pg_url: str, tmp_path: Path) -> None:
    """Runs, a thread operation and deletes on a real server over PostgreSQL; then a
    restart of the server reads everything back from PostgreSQL."""
    address, runtime, server, task = await serve(pg_url, tmp_path)
    assert isinstance(runtime.store, PostgresStore)
    try:
        async with connect(f"ws://{address}/ws") as conn:
            run = await conn.start("counter", {"n": 300, "delay_s": 0})
            live = await conn.events_until_end(run["run_id"])
            assert [e["i"] for e in live] == list(range(1, len(live) + 1))
        async with httpx.AsyncClient(base_url=f"http://{address}", timeout=5) as http:
            thread_id = (
                await http.post("/api/threads", json={"metadata": {"team": "red"}})
            ).json()["thread_id"]
            started = await http.post(f"/api/threads/{thread_id}/messages", json={"content": "hi"})
            assert started.status_code == 200, started.text
            ran = started.json()["run"]
            async with connect(f"ws://{address}/ws") as conn:
                await conn.ok("subscribe", run_id=ran["run_id"], after=0)
                await conn.events_until_end(ran["run_id"])
            listed = (await http.get("/api/threads", params={"metadata.team": "red"})).json()
    finally:
        await stop(runtime, server, task)
    assert [t["thread_id"] for t in listed["threads"]] == [thread_id]

    # Restarted on the same database: what the first server wrote is read back.
    address, runtime, server, task = await serve(pg_url, tmp_path)
    try:
        async with connect(f"ws://{address}/ws") as conn:
            result = await conn.ok("subscribe", run_id=run["run_id"], after=0)
            assert result["run"]["status"] == "completed"
            assert await conn.events_until_end(run["run_id"]) == live
        async with httpx.AsyncClient(base_url=f"http://{address}", timeout=5) as http:
            view = (await http.get(f"/api/threads/{thread_id}")).json()
            assert [t["role"] for t in view["turns"]] == ["user", "assistant"]
            assert (await http.delete(f"/api/threads/{thread_id}")).status_code == 200
            assert (await http.get(f"/api/threads/{thread_id}")).status_code == 404
        assert await runtime.store.check() == []
    finally:
        await stop(runtime, server, task)


async def test_runcast_serve_and_db_commands_take_a_postgresql_url(pg_url: str) -> None:
    """``runcast serve --db postgresql://...``: a run is kept there; ``db check`` and
    ``db vacuum`` work on it, and never print a password."""
    import subprocess
    import sys

    import httpx

    from tests.conftest import spawn_server

    server = spawn_server(pg_url)  # type: ignore[arg-type]
    try:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            run = (
                await http.post("/api/runs", json={"agent": "counter", "input": {"n": 100}})
            ).json()
            async with asyncio.timeout(10):  # the SSE stream ends with the run
                sse = await http.get(
                    f"/api/runs/{run['run_id']}/events", headers={"Accept": "text/event-stream"}
                )
            assert '"status":"completed"' in sse.text.rsplit("event: status", 1)[-1]
    finally:
        server.process.terminate()
        server.wait(10)
        assert server.process.stdout is not None
        server.process.stdout.close()
    for command in ("check", "vacuum"):
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "app", "db", command, "--db", pg_url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(pg_url), done.stdout


# -- several nodes: ownership, fencing, signals ---------------------------------------------


@pytest.fixture
async def nodes(pg_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two nodes' stores on one database."""
    a, b = PostgresStore(pg_url, node_id="A"), PostgresStore(pg_url, node_id="B")
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_run_taken_over_is_fenced_for_its_old_owner(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    written = await thread(a)
    await a.write_thread(
        written, [], [RunWrite(record("run_1", status="running", last_index=2), events(1, 2))]
    )
    assert [r.run_id for r in await a.live_runs()] == ["run_1"]
    assert await b.live_runs() == []  # another node's live runs are not B's to recover
    assert await b.live_runs_of_others() == [("run_1", "A")]

    taken = await b.take_over("run_1", "A")
    assert taken is not None and taken.last_index == 2
    assert await a.take_over("run_1", "A") is None  # one winner: the owner changed

    # The old owner's flush writes nothing of the run: no row update, no event.
    later = RunWrite(record("run_1", status="running", last_index=4), events(3, 4))
    assert await a.write([later]) == ["run_1"]
    stored = await b.get_run("run_1")
    assert stored is not None and stored.last_index == 2
    assert [e.index for e in await b.read_events("run_1", 0, None)] == [1, 2]
    # The new owner's does.
    ended = RunWrite(record("run_1", status="interrupted", last_index=3), events(3, 3))
    assert await b.write([ended]) == []
    assert [e.index for e in await a.read_events("run_1", 0, None)] == [1, 2, 3]
    assert await b.take_over("run_1", "B") is None  # ended: nothing to take


async def test_a_live_run_of_another_node_keeps_the_thread(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    written = await thread(a)
    await a.write_thread(written, [], [RunWrite(record("run_a"))])
    with pytest.raises(RunInProgressError) as refused:
        await b.write_thread(written, [], [RunWrite(record("run_b"))])
    assert refused.value.details["active_run_id"] == "run_a"
    assert await b.get_run("run_b") is None
    # Its own queued runs do not keep a node out of its thread (multitask enqueue).
    await a.write_thread(written, [], [RunWrite(record("run_a2"))])
    # Once the run has ended, another node may start one.
    await a.write([RunWrite(record("run_a", status="completed", last_index=1), events(1, 1))])
    await a.write([RunWrite(record("run_a2", status="stopped", last_index=1), events(1, 1))])
    await b.write_thread(written, [], [RunWrite(record("run_b"))])


async def test_signals_are_kept_until_taken_once(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    a, b = nodes
    first = await b.add_signal("run_1", '{"op":"stop"}', 1.0)
    second = await b.add_signal("run_1", '{"op":"respond"}', 2.0)
    await b.add_signal("run_2", '{"op":"stop"}', 3.0)
    assert await a.take_signals(["run_1"]) == [
        (first, "run_1", '{"op":"stop"}'),
        (second, "run_1", '{"op":"respond"}'),
    ]
    assert await a.take_signals(["run_1"]) == []
    third = await b.add_signal("run_3", "{}", 4.0)
    await a.drop_signal(third)
    assert await a.take_signals(["run_2", "run_3"]) == [(third - 1, "run_2", '{"op":"stop"}')]
