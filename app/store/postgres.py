"""PostgreSQL implementation of the Store, through asyncpg: the store nodes share.

It keeps the semantics of ``store/sqlite.py`` (the reference) with what one database
shared by several processes needs on top:

- **Group commit.** ``write`` is ONE transaction per flush for every run of the batch:
  one upsert of all the runs' rows and one of all their keyframes, each a single
  statement over arrays (``unnest``), and one binary ``COPY`` of all their events, so a
  flush costs a few round trips whatever its size. (An ``unnest`` INSERT of the events
  took 3 to 5 times as long as the COPY from 500 events a flush up, and as long below.)
- **Thread operations** are one transaction each that first locks the row it changes:
  ``write_thread`` the thread's (``SELECT ... FOR NO KEY UPDATE``: the lock an UPDATE of
  the row takes, so it serializes thread writers in every process without blocking the
  foreign-key checks of inserts that merely reference the thread), ``delete_thread`` the
  thread's and its runs', ``delete_run`` the run's (``FOR UPDATE``).
  Under that lock a write that would take the thread's revision back (a writer that read
  it before another process moved it on) is refused with ``ConflictError``, and so is
  one whose ``expected_revision`` (the revision its caller read) is no longer the
  thread's.
- **One active run per thread** is a partial unique index: at most one run of a thread
  has the status ``running`` or ``requires_action``. Queued runs are outside it: a thread
  may hold any number of them (``multitask: enqueue``), each written ``queued`` by the
  operation that created it. A queued run enters the index when the flush that writes
  its ``running`` status commits, and the engine makes it running only after the
  previous active run's terminal status is committed (staged -> committed -> handed
  over), so one node never trips the index. Across nodes the index is the last word: a
  flush that would make a second run of a thread active fails whole (``StoreError``,
  nothing written) and is retried, so the engine must not activate a run another node
  holds. Within a batch, rows that leave the active set are written before rows that
  enter it, so a hand-over flushed in one batch never trips the index either.
- **Ids** are ``COLLATE "C"``: listings order them bytewise, as SQLite and Python do,
  whatever the database's collation.
- **Schema versions.** A ``meta`` table holds the schema version; each migration runs in
  its own transaction under an advisory lock, so nodes starting together migrate once. A
  database at a newer version is refused as it is, named (its URL, never its password)
  with both versions.
- **Deleting for good** (PROTOCOL.md §10) is one transaction; at its commit every node
  stops seeing the rows. PostgreSQL has no ``secure_delete``: the dead rows' bytes stay
  in the table files until (auto)vacuum reclaims the space and a rebuild overwrites it;
  ``vacuum()`` (``runcast db vacuum``) is that rebuild.

JSON goes in as the text it was encoded to once (events, snapshots, inputs, keyframes),
so nothing is re-encoded on the way in or out; metadata is ``jsonb``, for its filters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from app.core.events import TERMINAL_STATUSES, Event, JsonObject, RunStatus, decode, encode
from app.core.turns import Turn
from app.errors import ConflictError, NotFoundError, RunInProgressError, StoreError
from app.store import paging
from app.store.base import Key, RunQuery, RunRecord, RunWrite, ShareRecord, ThreadRecord
from app.store.paging import Dialect
from app.store.rows import (
    RUN_COLUMNS,
    THREAD_COLUMNS,
    run_from_row,
    thread_from_row,
    thread_row,
)

logger = logging.getLogger(__name__)

# Every failure of the database or of the connection to it: a StoreError to callers.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

# The statuses of an active run: at most one run of a thread has one of them.
ACTIVE_STATUSES = (RunStatus.RUNNING.value, RunStatus.REQUIRES_ACTION.value)
_ACTIVE_SQL = ", ".join(f"'{status}'" for status in ACTIVE_STATUSES)
_LIVE_SQL = ", ".join(f"'{status.value}'" for status in RunStatus if not status.is_terminal)

# Each entry upgrades the schema by one version, in its own transaction. Append, never
# edit: databases in the field went through the old entries as they were.
_MIGRATIONS: tuple[str, ...] = (
    # 1: everything SQLite's schema 4 has, and the one-active-run index
    f"""
    CREATE TABLE threads (
        thread_id  text COLLATE "C" PRIMARY KEY,
        metadata   jsonb NOT NULL,
        revision   bigint NOT NULL DEFAULT 0,
        head       text COLLATE "C",
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        title      text
    );
    CREATE INDEX threads_by_created ON threads (created_at, thread_id);
    CREATE TABLE runs (
        run_id     text COLLATE "C" PRIMARY KEY,
        thread_id  text COLLATE "C" NOT NULL REFERENCES threads (thread_id),
        agent      text COLLATE "C" NOT NULL,
        input      text NOT NULL,
        status     text COLLATE "C" NOT NULL,
        epoch      text NOT NULL,
        last_index bigint NOT NULL,
        snapshot   text NOT NULL,
        created_at double precision NOT NULL,
        updated_at double precision NOT NULL,
        title      text,
        metadata   jsonb NOT NULL DEFAULT '{{}}'
    );
    CREATE INDEX runs_by_created ON runs (created_at, run_id);
    CREATE INDEX runs_by_thread_created ON runs (thread_id, created_at, run_id);
    CREATE INDEX runs_by_status_created ON runs (status, created_at, run_id);
    CREATE INDEX runs_by_agent_created ON runs (agent, created_at, run_id);
    CREATE UNIQUE INDEX runs_one_active ON runs (thread_id) WHERE status IN ({_ACTIVE_SQL});
    CREATE TABLE events (
        run_id text COLLATE "C" NOT NULL,
        i      bigint NOT NULL,
        body   text NOT NULL,
        PRIMARY KEY (run_id, i)
    );
    CREATE TABLE keyframes (
        run_id text COLLATE "C" NOT NULL,
        i      bigint NOT NULL,
        state  text NOT NULL,
        PRIMARY KEY (run_id, i)
    );
    CREATE TABLE turns (
        turn_id    text COLLATE "C" PRIMARY KEY,
        thread_id  text COLLATE "C" NOT NULL REFERENCES threads (thread_id),
        parent_id  text COLLATE "C",
        role       text NOT NULL,
        content    text NOT NULL,
        run_id     text COLLATE "C",
        status     text,
        created_at double precision NOT NULL,
        seq        bigint GENERATED ALWAYS AS IDENTITY
    );
    CREATE INDEX turns_by_thread ON turns (thread_id, created_at, seq);
    CREATE INDEX turns_by_run ON turns (run_id);
    CREATE TABLE shares (
        share_id    text COLLATE "C" PRIMARY KEY,
        kind        text NOT NULL,
        resource_id text COLLATE "C" NOT NULL,
        role        text NOT NULL,
        created_by  text NOT NULL,
        created_at  double precision NOT NULL,
        expires_at  double precision NOT NULL,
        revoked_at  double precision
    );
    CREATE INDEX shares_revoked ON shares (expires_at) WHERE revoked_at IS NOT NULL;
    CREATE INDEX shares_by_resource ON shares (resource_id);
    """,
    # 2: several nodes: the node that owns each live run (its writes are fenced on it),
    # and the stop and respond signals recorded until the owner acts on them
    f"""
    ALTER TABLE runs ADD COLUMN owner text COLLATE "C";
    CREATE INDEX runs_live_by_owner ON runs (owner) WHERE status IN ({_LIVE_SQL});
    CREATE TABLE signals (
        signal_id  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        run_id     text COLLATE "C" NOT NULL,
        body       text NOT NULL,
        created_at double precision NOT NULL
    );
    CREATE INDEX signals_by_run ON signals (run_id);
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)
TABLES = ("meta", "threads", "runs", "events", "keyframes", "turns", "shares", "signals")

# Any constant: the key of the advisory lock migrations take (pg_advisory_xact_lock).
_MIGRATION_LOCK = 0x72756E63617374  # "runcast"

LOCK_TIMEOUT_MS = 5_000  # what a statement waits for a lock (SQLite's busy timeout)
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0  # close() waits this long for connections in use, then cuts them

# Metadata is jsonb: read as its text, as SQLite keeps it.
_RUN_COLUMNS = ", ".join(RUN_COLUMNS).replace("metadata", "metadata::text")
_THREAD_COLUMNS = ", ".join(THREAD_COLUMNS).replace("metadata", "metadata::text")
_SHARE_COLUMNS = "share_id, kind, resource_id, role, created_by, created_at, expires_at, revoked_at"

# A run's title and metadata are written when it is created and by ``update_run`` (PATCH)
# only: a flush never overwrites them.
#
# Fenced: a row is updated only by the node that owns it ($13; NULL for a store of one
# node), so a node whose run another node took over writes nothing more of it. RETURNING
# names the rows written; the events and keyframes of the others are left out.
_UPSERT_RUNS = """
INSERT INTO runs (run_id, thread_id, agent, input, status, epoch, last_index, snapshot,
                  created_at, updated_at, title, metadata, owner)
SELECT r, t, a, inp, s, e, li, snap, ca, ua, ti, m::jsonb, $13::text
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::bigint[], $8::text[], $9::float8[], $10::float8[], $11::text[], $12::text[])
    AS u (r, t, a, inp, s, e, li, snap, ca, ua, ti, m)
ON CONFLICT (run_id) DO UPDATE SET
    status = excluded.status, epoch = excluded.epoch, last_index = excluded.last_index,
    snapshot = excluded.snapshot, updated_at = excluded.updated_at
WHERE runs.owner IS NOT DISTINCT FROM excluded.owner
RETURNING run_id
"""
_UPSERT_KEYFRAMES = """
INSERT INTO keyframes (run_id, i, state)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[])
ON CONFLICT (run_id, i) DO UPDATE SET state = excluded.state
"""
_INSERT_TURNS = """
INSERT INTO turns (turn_id, thread_id, parent_id, role, content, run_id, created_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::float8[])
"""

_TERMINAL = sorted(status.value for status in TERMINAL_STATUSES)
_LIVE = sorted(status.value for status in RunStatus if not status.is_terminal)


def redact(url: str) -> str:
    """``url`` without its password (in the authority or a ``password`` parameter)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}@{host}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k.lower() != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


POSTGRES = Dialect(
    placeholder=lambda n: f"${n}",
    # @> of a one-key object with a string value: that key holds exactly that string.
    metadata_match=lambda table, key, value: (
        f"metadata @> jsonb_build_object({key}::text, {value}::text)"
    ),
)


def run_page_query(query: RunQuery, before: Key | None, limit: int) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters of a page of runs (its query plan is tested)."""
    return paging.run_page_query(POSTGRES, _RUN_COLUMNS, query, before, limit)


def thread_page_query(
    metadata: Sequence[tuple[str, str]], before: Key | None, limit: int
) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters of a page of threads (its query plan is tested)."""
    return paging.thread_page_query(POSTGRES, _THREAD_COLUMNS, metadata, before, limit)


def _message_content(snapshot_text: str | None) -> str | None:
    """``message.content`` of a stored snapshot, when it is a string (as SQLite's
    ``json_extract`` gives it); decoded here, not by a jsonb cast, which refuses some
    valid JSON (``\\u0000``)."""
    if snapshot_text is None:
        return None
    message = decode(snapshot_text).get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else None


def _run_columns(batch: Sequence[RunWrite]) -> list[list[Any]]:
    """The runs' rows as twelve columns (arrays for ``_UPSERT_RUNS``): one row per run
    (the last of a run written twice), those leaving the active set first."""
    records = {item.record.run_id: item.record for item in batch}
    ordered = sorted(records.values(), key=lambda record: record.status in ACTIVE_STATUSES)
    columns: list[list[Any]] = [[] for _ in range(12)]
    for record in ordered:
        for column, value in zip(
            columns,
            (
                record.run_id,
                record.thread_id,
                record.agent,
                encode(record.input),
                record.status,
                record.epoch,
                record.last_index,
                encode(record.snapshot),
                record.created_at,
                record.updated_at,
                record.title,
                encode(record.metadata),
            ),
            strict=True,
        ):
            column.append(value)
    return columns


def _event_columns(batch: Sequence[RunWrite]) -> tuple[list[str], list[int], list[str]]:
    """(run ids, indexes, bodies) of every event of ``batch``."""
    run_ids: list[str] = []
    indexes: list[int] = []
    bodies: list[str] = []
    for item in batch:
        events = item.events
        if events:
            run_ids.extend([item.record.run_id] * len(events))
            indexes.extend([event.index for event in events])
            bodies.extend([event.json for event in events])
    return run_ids, indexes, bodies


class PostgresStore:
    """The shared store: one PostgreSQL database, a pool of connections, one transaction
    per write. ``url`` is a libpq-style URL (``postgresql://user@host:5432/db``)."""

    def __init__(self, url: str, *, pool_size: int = 10, node_id: str | None = None) -> None:
        self.url = url
        self.pool_size = pool_size
        # The node this store writes for (several nodes): the owner of the runs it creates,
        # and the only one whose writes of them are taken. None: one node, owner NULL.
        self.node_id = node_id
        self._pool: asyncpg.Pool | None = None

    @property
    def name(self) -> str:
        """The database's URL without its password: what logs and errors show."""
        return redact(self.url)

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "PostgresStore used before open() or after close()"
        return self._pool

    async def open(self) -> None:
        """Connect and bring the schema up to date.

        Raises:
            StoreError: the database cannot be reached, or was written by a newer runcast
                (refused as it is, nothing touched).
        """
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.pool_size,
                timeout=CONNECT_TIMEOUT_S,
                server_settings={
                    "application_name": "runcast",
                    "lock_timeout": str(LOCK_TIMEOUT_MS),
                },
            )
            version = await self._migrate()
        except _DB_ERRORS as exc:
            await self.close()
            raise StoreError(f"cannot open database {self.name}: {exc}") from exc
        except BaseException:
            await self.close()
            raise
        if version > SCHEMA_VERSION:
            await self.close()
            raise StoreError(
                f"database {self.name} has schema version {version}, newer than this "
                f"runcast understands ({SCHEMA_VERSION}); upgrade runcast"
            )

    async def _migrate(self) -> int:
        """Bring the database to SCHEMA_VERSION, one migration a transaction, each under
        the migration lock (nodes starting together wait for each other, and the second
        finds the work done). Returns the version found, if newer (then nothing is
        touched), else SCHEMA_VERSION."""
        async with self.pool.acquire() as db:
            while True:
                async with db.transaction():
                    await db.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                    if await db.fetchval("SELECT to_regclass('meta')") is None:
                        version = 0
                    else:
                        value = await db.fetchval(
                            "SELECT value FROM meta WHERE key = 'schema_version'"
                        )
                        version = 0 if value is None else int(value)
                    if version >= SCHEMA_VERSION:
                        return version
                    if version == 0:
                        await db.execute(
                            "CREATE TABLE IF NOT EXISTS meta"
                            " (key text PRIMARY KEY, value text NOT NULL)"
                        )
                    await db.execute(_MIGRATIONS[version])
                    await db.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', $1)"
                        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        str(version + 1),
                    )
                if version > 0:
                    logger.info("database %s upgraded to schema version %d", self.name, version + 1)

    async def close(self) -> None:
        """Close every connection: those in use get ``CLOSE_TIMEOUT_S`` to be released,
        then are cut. Twice is harmless."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await pool.close()
        except TimeoutError:
            logger.warning("database %s: connections still in use at close; cut", self.name)
            pool.terminate()

    # -- threads and turns ---------------------------------------------------------------

    async def create_thread(self, thread: ThreadRecord) -> None:
        """Raises: StoreError (a thread with this id exists)."""
        await self._execute(
            "INSERT INTO threads (thread_id, metadata, revision, head, created_at, updated_at,"
            " title) VALUES ($1, $2::jsonb, $3, $4, $5, $6, $7)",
            *thread_row(thread),
        )

    async def get_thread(self, thread_id: str) -> ThreadRecord | None:
        rows = await self._fetch(
            f"SELECT {_THREAD_COLUMNS} FROM threads WHERE thread_id = $1", thread_id
        )
        return thread_from_row(rows[0]) if rows else None

    async def write_thread(
        self,
        thread: ThreadRecord,
        turns: Sequence[Turn],
        runs: Sequence[RunWrite] = (),
        *,
        expected_revision: int | None = None,
        exclusive: bool = False,
    ) -> None:
        """Write a thread's row (created if new), add ``turns`` and write ``runs``, in ONE
        transaction that holds the thread's row lock from its first statement.

        Under the lock, the stored revision must not be newer than ``thread.revision``
        (the writer read an older thread than there is now) and, when given, must be
        ``expected_revision`` (the revision the writer read; the thread must exist). With
        several nodes, no other node may hold a live run of the thread if the write adds
        runs or is ``exclusive`` (a change of its turns).

        Raises:
            ConflictError: the thread moved on since the writer read it; nothing written.
            RunInProgressError: another node holds a live run of the thread (with runs or
                ``exclusive``, several nodes); nothing written.
            NotFoundError: ``expected_revision`` given, and there is no such thread.
            StoreError: nothing was written.
        """
        async with self._transaction(f"write of thread {thread.thread_id}") as db:
            stored = await db.fetchval(
                "SELECT revision FROM threads WHERE thread_id = $1 FOR NO KEY UPDATE",
                thread.thread_id,
            )
            if expected_revision is not None:
                if stored is None:
                    raise NotFoundError(f"no thread {thread.thread_id}")
                if stored != expected_revision:
                    raise ConflictError(
                        f"thread {thread.thread_id} is at revision {stored}",
                        expected_revision=expected_revision,
                        actual_revision=stored,
                    )
            if stored is not None and stored > thread.revision:
                raise ConflictError(
                    f"thread {thread.thread_id} is at revision {stored}",
                    expected_revision=thread.revision,
                    actual_revision=stored,
                )
            if (runs or exclusive) and self.node_id is not None:
                # Several nodes: a run another node holds live keeps the thread (one active
                # run per thread, decided here under the thread's lock); so it does from
                # a change of its turns (``exclusive``).
                other = await db.fetchval(
                    "SELECT run_id FROM runs WHERE thread_id = $1 AND status = ANY($2::text[])"
                    " AND owner IS DISTINCT FROM $3 AND run_id <> ALL($4::text[]) LIMIT 1",
                    thread.thread_id,
                    _LIVE,
                    self.node_id,
                    [item.record.run_id for item in runs],
                )
                if other is not None:
                    raise RunInProgressError(thread.thread_id, other)
            await db.execute(
                "INSERT INTO threads (thread_id, metadata, revision, head, created_at,"
                " updated_at, title) VALUES ($1, $2::jsonb, $3, $4, $5, $6, $7)"
                " ON CONFLICT (thread_id) DO UPDATE SET revision = excluded.revision,"
                " head = excluded.head, updated_at = excluded.updated_at,"
                " title = excluded.title, metadata = excluded.metadata",
                *thread_row(thread),
            )
            if turns:
                await db.execute(
                    _INSERT_TURNS,
                    [t.turn_id for t in turns],
                    [t.thread_id for t in turns],
                    [t.parent_id for t in turns],
                    [t.role for t in turns],
                    [t.content for t in turns],
                    [t.run_id for t in turns],
                    [t.created_at for t in turns],
                )
            if await self._write_runs(db, runs):
                raise StoreError(f"write of thread {thread.thread_id}: a run of it is fenced")

    async def load_turns(self, thread_id: str) -> list[Turn]:
        """Every turn of the thread, oldest first. An assistant turn's content and status
        are its run's (as of the run's last flush); once its run is deleted, the ones it
        kept."""
        rows = await self._fetch(
            "SELECT t.turn_id, t.thread_id, t.parent_id, t.role, t.content, t.run_id,"
            " t.created_at, r.status, r.snapshot, t.status"
            " FROM turns t LEFT JOIN runs r ON r.run_id = t.run_id"
            " WHERE t.thread_id = $1 ORDER BY t.created_at, t.seq",
            thread_id,
        )
        return [
            Turn(
                turn_id=row[0],
                thread_id=row[1],
                parent_id=row[2],
                role=row[3],
                content=row[4] if row[5] is None else (_message_content(row[8]) or ""),
                run_id=row[5],
                status=(row[9] or "completed") if row[5] is None else (row[7] or "queued"),
                created_at=row[6],
            )
            for row in rows
        ]

    async def turn_of_run(self, run_id: str) -> tuple[str, str | None] | None:
        """(assistant turn id, its parent id) of the turn ``run_id`` writes, if any."""
        rows = await self._fetch(
            "SELECT turn_id, parent_id FROM turns WHERE run_id = $1 AND role = 'assistant'",
            run_id,
        )
        return (rows[0][0], rows[0][1]) if rows else None

    # -- runs ------------------------------------------------------------------------------

    async def write(self, batch: Sequence[RunWrite]) -> list[str]:
        """Write every run of ``batch`` in one transaction (group commit). Returns the ids
        of the runs left unwritten because another node owns them now (fenced).

        Raises:
            StoreError: the transaction failed and was rolled back; nothing was written.
        """
        if not batch:
            return []
        async with self._transaction(f"write of {len(batch)} runs") as db:
            return await self._write_runs(db, batch)

    async def _write_runs(self, db: PoolConnectionProxy, batch: Sequence[RunWrite]) -> list[str]:
        """Rows, new events and new keyframes of ``batch``: an upsert, a COPY and an
        upsert, whatever its size; inside a transaction. Returns the fenced runs' ids."""
        if not batch:
            return []
        rows = await db.fetch(_UPSERT_RUNS, *_run_columns(batch), self.node_id)
        written = {row[0] for row in rows}
        fenced = [item.record.run_id for item in batch if item.record.run_id not in written]
        if fenced:
            logger.warning("runs %s are owned by another node now: not written", fenced)
            batch = [item for item in batch if item.record.run_id in written]
        run_ids, indexes, bodies = _event_columns(batch)
        if bodies:
            await db.copy_records_to_table(
                "events",
                records=zip(run_ids, indexes, bodies, strict=True),
                columns=("run_id", "i", "body"),
            )
        keyframes = {
            (item.record.run_id, index): state for item in batch for index, state in item.keyframes
        }
        if keyframes:
            await db.execute(
                _UPSERT_KEYFRAMES,
                [run_id for run_id, _ in keyframes],
                [index for _, index in keyframes],
                list(keyframes.values()),
            )
        return fenced

    async def get_run(self, run_id: str) -> RunRecord | None:
        rows = await self._fetch(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = $1", run_id)
        return run_from_row(rows[0]) if rows else None

    async def get_runs(self, run_ids: Sequence[str]) -> dict[str, RunRecord]:
        """The rows of ``run_ids`` that exist, by id: one query for them all."""
        rows = await self._fetch(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ANY($1::text[])", list(run_ids)
        )
        return {record.run_id: record for record in map(run_from_row, rows)}

    async def list_runs(
        self, query: RunQuery, *, before: Key | None = None, limit: int
    ) -> list[RunRecord]:
        sql, params = run_page_query(query, before, limit)
        return [run_from_row(row) for row in await self._fetch(sql, *params)]

    async def list_threads(
        self, *, metadata: Sequence[tuple[str, str]], before: Key | None = None, limit: int
    ) -> list[ThreadRecord]:
        sql, params = thread_page_query(metadata, before, limit)
        return [thread_from_row(row) for row in await self._fetch(sql, *params)]

    async def update_run(
        self, run_id: str, *, title: str | None, metadata: JsonObject, updated_at: float
    ) -> None:
        await self._execute(
            "UPDATE runs SET title = $1, metadata = $2::jsonb, updated_at = $3 WHERE run_id = $4",
            title,
            encode(metadata),
            updated_at,
            run_id,
        )

    async def delete_run(self, run_id: str) -> bool:
        async with self._transaction(f"delete of run {run_id}") as db:
            row = await db.fetchrow(
                "SELECT status, snapshot, thread_id FROM runs WHERE run_id = $1 FOR UPDATE",
                run_id,
            )
            if row is None:
                return False
            if row[0] in _LIVE:  # live on some node (the caller's own check is per node)
                raise RunInProgressError(row[2], run_id)
            # The assistant turn it wrote keeps its text and status, and no longer names it.
            await db.execute(
                "UPDATE turns SET content = coalesce($2, content), status = $3, run_id = NULL"
                " WHERE run_id = $1",
                run_id,
                _message_content(row[1]),
                row[0],
            )
            await db.execute("DELETE FROM events WHERE run_id = $1", run_id)
            await db.execute("DELETE FROM keyframes WHERE run_id = $1", run_id)
            await db.execute("DELETE FROM signals WHERE run_id = $1", run_id)
            await db.execute("DELETE FROM shares WHERE kind = 'run' AND resource_id = $1", run_id)
            await db.execute("DELETE FROM runs WHERE run_id = $1", run_id)
        return True

    async def delete_thread(self, thread_id: str) -> list[str] | None:
        async with self._transaction(f"delete of thread {thread_id}") as db:
            if (
                await db.fetchval(
                    "SELECT 1 FROM threads WHERE thread_id = $1 FOR UPDATE", thread_id
                )
                is None
            ):
                return None
            rows = await db.fetch(
                "SELECT run_id, status FROM runs WHERE thread_id = $1 FOR UPDATE", thread_id
            )
            live = [row[0] for row in rows if row[1] in _LIVE]
            if live:  # a run of it is live on some node
                raise RunInProgressError(thread_id, live[0])
            run_ids: list[str] = [row[0] for row in rows]
            await db.execute("DELETE FROM events WHERE run_id = ANY($1::text[])", run_ids)
            await db.execute("DELETE FROM keyframes WHERE run_id = ANY($1::text[])", run_ids)
            await db.execute("DELETE FROM signals WHERE run_id = ANY($1::text[])", run_ids)
            await db.execute(
                "DELETE FROM shares WHERE (kind = 'run' AND resource_id = ANY($1::text[]))"
                " OR (kind = 'thread' AND resource_id = $2)",
                run_ids,
                thread_id,
            )
            for table in ("turns", "runs", "threads"):
                await db.execute(f"DELETE FROM {table} WHERE thread_id = $1", thread_id)
        return run_ids

    async def read_events(self, run_id: str, after: int, limit: int | None) -> list[Event]:
        rows = await self._fetch(
            "SELECT body FROM events WHERE run_id = $1 AND i > $2 ORDER BY i LIMIT $3",
            run_id,
            after,
            limit,
        )
        return [Event.from_json(row[0]) for row in rows]

    async def read_keyframe(self, run_id: str, index: int) -> tuple[int, dict[str, Any]] | None:
        rows = await self._fetch(
            "SELECT i, state FROM keyframes WHERE run_id = $1 AND i <= $2 ORDER BY i DESC LIMIT 1",
            run_id,
            index,
        )
        return (rows[0][0], decode(rows[0][1])) if rows else None

    async def live_runs(self) -> list[RunRecord]:
        """Live runs this node owns (with several nodes, another node's are not its to end
        at start: its sweeper ends them once their owner is gone)."""
        rows = await self._fetch(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE status = ANY($1::text[])"
            " AND owner IS NOT DISTINCT FROM $2",
            _LIVE,
            self.node_id,
        )
        return [run_from_row(row) for row in rows]

    # -- several nodes ---------------------------------------------------------------------

    async def live_runs_of_others(self) -> list[tuple[str, str | None]]:
        """(run id, owner) of every live run another node owns (an index range)."""
        rows = await self._fetch(
            "SELECT run_id, owner FROM runs WHERE status = ANY($1::text[])"
            " AND owner IS DISTINCT FROM $2",
            _LIVE,
            self.node_id,
        )
        return [(row[0], row[1]) for row in rows]

    async def take_over(self, run_id: str, owner: str | None) -> RunRecord | None:
        """Make this node the owner of a live run ``owner`` held: one winner among the
        nodes that try (the row's update is atomic). Returns the run's row, or None when
        another node won, the owner changed, or the run has ended."""
        rows = await self._fetch(
            f"UPDATE runs SET owner = $3 WHERE run_id = $1 AND owner IS NOT DISTINCT FROM $2"
            f" AND status = ANY($4::text[]) RETURNING {_RUN_COLUMNS}",
            run_id,
            owner,
            self.node_id,
            _LIVE,
        )
        return run_from_row(rows[0]) if rows else None

    async def add_signal(self, run_id: str, body: str, at: float) -> int:
        """Record a signal (stop, respond) for a run's owner; returns its id."""
        signal_id: int = await self._fetchval(
            "INSERT INTO signals (run_id, body, created_at) VALUES ($1, $2, $3)"
            " RETURNING signal_id",
            run_id,
            body,
            at,
        )
        return signal_id

    async def take_signals(self, run_ids: Sequence[str]) -> list[tuple[int, str, str]]:
        """Remove and return (id, run id, body) of every signal recorded for ``run_ids``,
        oldest first."""
        rows = await self._fetch(
            "DELETE FROM signals WHERE run_id = ANY($1::text[]) RETURNING signal_id, run_id, body",
            list(run_ids),
        )
        return sorted((row[0], row[1], row[2]) for row in rows)

    async def drop_signal(self, signal_id: int) -> None:
        """Forget a signal acted on."""
        await self._execute("DELETE FROM signals WHERE signal_id = $1", signal_id)

    # -- maintenance -----------------------------------------------------------------------

    async def check(self) -> list[str]:
        """PostgreSQL's index check (``amcheck``, when the extension is installed), then
        runcast's: every run's log is contiguous from 1 to its last index, every ended run
        ends with its terminal event, and nothing a delete could leave behind is left."""
        problems: list[str] = []
        if await self._fetch("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'"):
            for (index,) in await self._fetch(
                # Every index of runcast's tables is a btree.
                "SELECT indexrelid::regclass::text FROM pg_index"
                " WHERE indrelid = ANY($1::regclass[])",
                list(TABLES),
            ):
                try:
                    await self._fetch("SELECT bt_index_check($1::regclass)", index)
                except StoreError as exc:
                    problems.append(f"postgresql: index {index}: {exc.__cause__}")
        rows = await self._fetch(
            "SELECT r.run_id, r.status, r.last_index, count(e.i), min(e.i), max(e.i), l.body"
            " FROM runs r LEFT JOIN events e ON e.run_id = r.run_id"
            " LEFT JOIN events l ON l.run_id = r.run_id AND l.i = r.last_index"
            " GROUP BY r.run_id, l.body"
        )
        terminal = set(_TERMINAL)
        for run_id, status, last_index, count, first, last, body in rows:
            if count != last_index or (count and (first != 1 or last != last_index)):
                problems.append(
                    f"run {run_id}: events are not contiguous from 1 to {last_index}"
                    f" ({count} events, {first}..{last})"
                )
            elif status in terminal:
                event = Event.from_json(body) if body is not None else None
                if event is None or event.type != "status" or event.data.get("status") != status:
                    problems.append(
                        f"run {run_id}: {status}, but its last event is not that status"
                    )
        for turn_id, run_id in await self._fetch(
            "SELECT t.turn_id, t.run_id FROM turns t WHERE t.run_id IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.run_id = t.run_id)"
        ):
            problems.append(f"turn {turn_id}: its run {run_id} does not exist")
        for thread_id, head in await self._fetch(
            "SELECT h.thread_id, h.head FROM threads h WHERE h.head IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM turns t WHERE t.turn_id = h.head)"
        ):
            problems.append(f"thread {thread_id}: its head {head} is not a turn")
        for table in ("events", "keyframes"):
            for (run_id,) in await self._fetch(
                f"SELECT DISTINCT run_id FROM {table} x"
                " WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.run_id = x.run_id)"
            ):
                problems.append(f"{table} of run {run_id}, which does not exist")
        for share_id, kind, resource_id in await self._fetch(
            "SELECT share_id, kind, resource_id FROM shares s WHERE NOT EXISTS"
            " (SELECT 1 FROM runs r WHERE s.kind = 'run' AND r.run_id = s.resource_id)"
            " AND NOT EXISTS"
            " (SELECT 1 FROM threads h WHERE s.kind = 'thread' AND h.thread_id = s.resource_id)"
        ):
            problems.append(f"share {share_id}: its {kind} {resource_id} does not exist")
        return problems

    async def _table_bytes(self) -> int:
        """runcast's tables, with their indexes and TOAST, in bytes."""
        size = await self._fetchval(
            "SELECT coalesce(sum(pg_total_relation_size(t)), 0)::bigint"
            " FROM unnest($1::text[]) AS n, to_regclass(n) AS t WHERE t IS NOT NULL",
            list(TABLES),
        )
        return int(size)

    async def vacuum(self) -> tuple[int, int]:
        """Rebuild runcast's tables without their dead rows and free space (``VACUUM
        FULL``, then ``ANALYZE``; ``runcast db vacuum``): what deletes left in the files
        is overwritten. Returns their size in bytes (indexes included) before and after.

        Each table is locked while it is rebuilt: writers on every node wait for it (up
        to the lock timeout), so run it when the service is quiet.

        Raises:
            StoreError: a lock was not had in time, or the rebuild failed.
        """
        before = await self._table_bytes()
        await self._execute(f"VACUUM (FULL, ANALYZE) {', '.join(TABLES)}")
        return before, await self._table_bytes()

    async def stats(self) -> dict[str, Any]:
        """The database (its URL without the password) and how many runs it holds."""
        return {"url": self.name, "runs": await self._fetchval("SELECT count(*) FROM runs")}

    # -- shares --------------------------------------------------------------------------

    async def share_secret(self, new: str) -> str:
        # Two statements: the SELECT sees a secret another node committed meanwhile.
        await self._execute(
            "INSERT INTO meta (key, value) VALUES ('share_secret', $1)"
            " ON CONFLICT (key) DO NOTHING",
            new,
        )
        return str(await self._fetchval("SELECT value FROM meta WHERE key = 'share_secret'"))

    async def create_share(self, share: ShareRecord) -> None:
        await self._execute(
            f"INSERT INTO shares ({_SHARE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            share.share_id,
            share.kind,
            share.resource_id,
            share.role,
            share.created_by,
            share.created_at,
            share.expires_at,
            share.revoked_at,
        )

    async def get_share(self, share_id: str) -> ShareRecord | None:
        rows = await self._fetch(
            f"SELECT {_SHARE_COLUMNS} FROM shares WHERE share_id = $1", share_id
        )
        return ShareRecord(*rows[0]) if rows else None

    async def revoke_share(self, share_id: str, at: float) -> None:
        await self._execute(
            "UPDATE shares SET revoked_at = $1 WHERE share_id = $2 AND revoked_at IS NULL",
            at,
            share_id,
        )

    async def revoked_shares(self, now: float) -> list[str]:
        rows = await self._fetch(
            "SELECT share_id FROM shares WHERE revoked_at IS NOT NULL AND expires_at > $1", now
        )
        return [row[0] for row in rows]

    # -- statements ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _transaction(self, what: str) -> AsyncIterator[PoolConnectionProxy]:
        """One transaction on a connection of the pool: committed when the block ends,
        rolled back if it raises. Raises: StoreError (with the driver's error as its
        cause); other errors (ConflictError) pass through, after the rollback."""
        try:
            async with self.pool.acquire() as db, db.transaction():
                yield db
        except _DB_ERRORS as exc:
            raise StoreError(f"{what} failed: {exc}") from exc

    async def _execute(self, sql: str, *params: Any) -> None:
        """One write statement, committed on its own."""
        try:
            await self.pool.execute(sql, *params)
        except _DB_ERRORS as exc:
            raise StoreError(f"database statement failed: {exc}") from exc

    async def _fetch(self, sql: str, *params: Any) -> list[asyncpg.Record]:
        try:
            return await self.pool.fetch(sql, *params)
        except _DB_ERRORS as exc:
            raise StoreError(f"database read failed: {exc}") from exc

    async def _fetchval(self, sql: str, *params: Any) -> Any:
        try:
            return await self.pool.fetchval(sql, *params)
        except _DB_ERRORS as exc:
            raise StoreError(f"database read failed: {exc}") from exc
