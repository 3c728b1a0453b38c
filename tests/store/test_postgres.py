"""PostgresStore on the machine's PostgreSQL: what only it has, and what a database shared
by several processes adds: row-locked thread writes, one active run per thread, migrations
by one node at a time, owners, fencing and signals. Then one real server on PostgreSQL,
end to end. What it does as every store does (the semantics of SqliteStore) is tested on
both in test_contract.py.

Each test gets a database of its own (``CREATE DATABASE`` with a random name, dropped
``WITH (FORCE)`` at teardown), so tests never see each other, in one run or in two run
side by side. ``RUNCAST_TEST_POSTGRES`` names the server's maintenance database (default
``postgresql://postgres@127.0.0.1:5432/postgres``); without a server the tests fail,
naming it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import uvicorn

from app.config import Settings
from app.errors import ConflictError, NotFoundError, RunInProgressError, StoreError
from app.store import open_store
from app.store.base import RunQuery, RunWrite, ShareRecord, ThreadRecord
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
from tests.fakes import opened
from tests.store.helpers import (
    ended_events,
    events,
    fill,
    make_thread,
    page_queries,
    record,
    thread,
    turns_of,
)
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
    async with opened(PostgresStore(pg_url)) as store:
        yield store


@pytest.fixture
async def raw(pg_url: str, store: PostgresStore) -> AsyncIterator[asyncpg.Connection]:
    """A connection of its own to the test's database (another process, as it were)."""
    connection = await asyncpg.connect(pg_url)
    try:
        yield connection
    finally:
        await connection.close()


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


async def test_get_runs_reads_many_rows_in_one_query(store: PostgresStore) -> None:
    await thread(store)
    a, b = record("run_a", last_index=2), record("run_b", last_index=3)
    await store.write([RunWrite(a, events(1, 2)), RunWrite(b, events(1, 3))])
    assert await store.get_runs(["run_b", "run_nope", "run_a"]) == {"run_a": a, "run_b": b}
    assert await store.get_runs([]) == {}


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


async def test_keyframes_newest_at_or_before(store: PostgresStore) -> None:
    await thread(store)
    first = RunWrite(record("run_a", last_index=4), events(1, 4), [(2, '{"k":2}'), (4, '{"k":4}')])
    await store.write([first])
    await store.write([RunWrite(record("run_a", last_index=4), (), [(4, '{"k":"again"}')])])
    assert await store.read_keyframe("run_a", 1) is None
    assert await store.read_keyframe("run_a", 3) == (2, {"k": 2})
    assert await store.read_keyframe("run_a", 9) == (4, {"k": "again"})


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


# -- listing ----------------------------------------------------------------------------------


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
    for table, (sql, params) in page_queries(thread_page_query, run_page_query):
        plan = "\n".join(row[0] for row in await raw.fetch(f"EXPLAIN {sql}", *params))
        assert "Index Scan Backward using" in plan and f" on {table}" in plan, plan
        assert "Sort" not in plan and "Seq Scan" not in plan, plan
        if "<" in sql:  # after a cursor: the range starts there (an index condition)
            assert "Index Cond" in plan, plan


# -- checking ---------------------------------------------------------------------------------


async def test_check_reads_the_indexes_with_amcheck(
    store: PostgresStore, raw: asyncpg.Connection
) -> None:
    await make_thread(store, "thr_1", "words")
    await raw.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
    assert await store.check() == []  # the indexes checked too


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
