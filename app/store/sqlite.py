"""SQLite implementation of the Store, through aiosqlite, in WAL mode.

Runs (rows, events, keyframes) are written by the store's writer process, one transaction
a write (see "the write path"); one connection serves every other read and write
(aiosqlite runs it on its own thread, so calls are serialized). Events are stored as the
JSON text they were encoded to once, so reading them back costs no re-encoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import pickle
import sqlite3
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import aiosqlite

from app.core.events import TERMINAL_STATUSES, Event, JsonObject, decode, encode
from app.core.turns import Turn
from app.errors import StoreError
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

_META = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Each entry upgrades the schema by one version; a file at version v gets entries v.. in
# order, each in its own transaction. Append, never edit: files in the field went
# through the old entries as they were.
_MIGRATIONS: tuple[str, ...] = (
    # 1: threads, runs and their events
    """
    CREATE TABLE IF NOT EXISTS threads (
        thread_id  TEXT PRIMARY KEY,
        metadata   TEXT NOT NULL,
        revision   INTEGER NOT NULL DEFAULT 0,
        head       TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE IF NOT EXISTS runs (
        run_id     TEXT PRIMARY KEY,
        thread_id  TEXT NOT NULL REFERENCES threads(thread_id),
        agent      TEXT NOT NULL,
        input      TEXT NOT NULL,
        status     TEXT NOT NULL,
        epoch      TEXT NOT NULL,
        last_index INTEGER NOT NULL,
        snapshot   TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS runs_by_thread ON runs (thread_id, created_at);
    CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, created_at);
    CREATE TABLE IF NOT EXISTS events (
        run_id TEXT NOT NULL,
        i      INTEGER NOT NULL,
        body   TEXT NOT NULL,
        PRIMARY KEY (run_id, i)
    ) WITHOUT ROWID;
    """,
    # 2: turns of threads; keyframes (snapshots every K events) of long runs
    """
    CREATE TABLE IF NOT EXISTS turns (
        turn_id    TEXT PRIMARY KEY,
        thread_id  TEXT NOT NULL REFERENCES threads(thread_id),
        parent_id  TEXT,
        role       TEXT NOT NULL,
        content    TEXT NOT NULL,
        run_id     TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX IF NOT EXISTS turns_by_thread ON turns (thread_id, created_at);
    CREATE INDEX IF NOT EXISTS turns_by_run ON turns (run_id);
    CREATE TABLE IF NOT EXISTS keyframes (
        run_id TEXT NOT NULL,
        i      INTEGER NOT NULL,
        state  TEXT NOT NULL,
        PRIMARY KEY (run_id, i)
    ) WITHOUT ROWID;
    """,
    # 3: share links
    """
    CREATE TABLE IF NOT EXISTS shares (
        share_id    TEXT PRIMARY KEY,
        kind        TEXT NOT NULL,
        resource_id TEXT NOT NULL,
        role        TEXT NOT NULL,
        created_by  TEXT NOT NULL,
        created_at  REAL NOT NULL,
        expires_at  REAL NOT NULL,
        revoked_at  REAL
    );
    CREATE INDEX IF NOT EXISTS shares_revoked ON shares (expires_at) WHERE revoked_at IS NOT NULL;
    """,
    # 4: titles and metadata of runs; listing by (created_at, id) ranges of indexes; the
    # status an assistant turn keeps when its run is deleted; shares found by resource
    """
    ALTER TABLE threads ADD COLUMN title TEXT;
    ALTER TABLE runs ADD COLUMN title TEXT;
    ALTER TABLE runs ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE turns ADD COLUMN status TEXT;
    DROP INDEX IF EXISTS runs_by_thread;
    DROP INDEX IF EXISTS runs_by_status;
    CREATE INDEX IF NOT EXISTS threads_by_created ON threads (created_at, thread_id);
    CREATE INDEX IF NOT EXISTS runs_by_created ON runs (created_at, run_id);
    CREATE INDEX IF NOT EXISTS runs_by_thread_created ON runs (thread_id, created_at, run_id);
    CREATE INDEX IF NOT EXISTS runs_by_status_created ON runs (status, created_at, run_id);
    CREATE INDEX IF NOT EXISTS runs_by_agent_created ON runs (agent, created_at, run_id);
    CREATE INDEX IF NOT EXISTS shares_by_resource ON shares (resource_id);
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)

_SHARE_COLUMNS = "share_id, kind, resource_id, role, created_by, created_at, expires_at, revoked_at"

_RUN_COLUMNS = ", ".join(RUN_COLUMNS)

# A run's title and metadata are written when it is created and by ``update_run`` (PATCH)
# only: a flush never overwrites them.
_UPSERT_RUN = f"""
INSERT INTO runs ({_RUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run_id) DO UPDATE SET
    status = excluded.status, epoch = excluded.epoch, last_index = excluded.last_index,
    snapshot = excluded.snapshot, updated_at = excluded.updated_at
"""

_TERMINAL = tuple(sorted(status.value for status in TERMINAL_STATUSES))
BUSY_TIMEOUT_MS = 5_000  # what the connection waits for a lock (sqlite3's own default)


SQLITE = Dialect(
    placeholder=lambda n: "?",
    metadata_match=lambda table, key, value: (
        f"EXISTS (SELECT 1 FROM json_each({table}.metadata)"
        f" WHERE key = {key} AND type = 'text' AND value = {value})"
    ),
)


def run_page_query(query: RunQuery, before: Key | None, limit: int) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters of a page of runs (its query plan is tested)."""
    return paging.run_page_query(SQLITE, _RUN_COLUMNS, query, before, limit)


def thread_page_query(
    metadata: Sequence[tuple[str, str]], before: Key | None, limit: int
) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters of a page of threads (its query plan is tested)."""
    return paging.thread_page_query(SQLITE, _THREAD_COLUMNS, metadata, before, limit)


_THREAD_COLUMNS = ", ".join(THREAD_COLUMNS)
_THREAD_VALUES = "VALUES (?, ?, ?, ?, ?, ?, ?)"


# -- the write path ---------------------------------------------------------------------
#
# Every write of runs (the flusher's, a thread's change) is ONE transaction, made by the
# store's writer process (app/store/sqlite_writer.py, the standard library only) with a
# connection of its own: the server sends it the transaction's statements (a pickle in a
# temporary file both hold open, its size through a pipe) and waits for its answer. The
# writer has a GIL of its own. A thread of the server's own does not: each time it takes
# the GIL back (after each statement, to take the next, to answer) it may wait for the
# event loop's thread, 5 ms (Python's switch interval) while an agent emits flat out, and
# tens of ms when a garbage collection runs there (several a second with hundreds of
# thousands of events in memory). Measured side by side (runcast bench persist
# --persist-events 1000000, three rounds, each tree after the other, two shared cores):
# aiosqlite, an await per statement (as before): 230,000 to 248,000 durable events/s,
# 2.5 to 2.7 commits/s where 5 were meant, the newest event on disk at a SIGKILL 1.7 to
# 2.1 flush intervals old (median of 5 kills); the whole transaction in one call on
# aiosqlite's thread: 241,000 to 254,000/s, 2.6 to 2.8/s, 1.6 to 1.7 intervals; all of it
# ONE statement (a TEMP view whose trigger wrote rows, events and keyframes: one GIL wait
# a flush): 276,000 to 285,000/s, 3.3 to 3.4/s, 1.1 to 1.9 intervals; this writer
# process: 310,000 to 335,000/s, 4.7 to 5.1/s, 0.4 to 0.9 intervals.
#
# The statements: one per run's row, one per run's new events (their encodings joined
# into one JSON array, which json_each splits inside SQLite: the value of an object
# element is its text as it stands in the array, so each is stored to the byte as it
# was encoded), one per keyframe. (One statement per event, executemany over per-event
# tuples, took twice the time: 80,000 events inserted in 160 ms instead of 72. An array
# of the encodings as JSON strings took 0.49 µs an event to encode in the server, where
# joining them takes 0.14, and 1.9 µs to insert where objects take 1.4.)

# Events go in with one statement per run (per contiguous stretch of its events).
_INSERT_EVENTS = "INSERT INTO events (run_id, i, body) SELECT ?, ? + key, value FROM json_each(?)"
_INSERT_KEYFRAME = "INSERT OR REPLACE INTO keyframes (run_id, i, state) VALUES (?, ?, ?)"

# (sql, parameters, many): ``executemany(sql, parameters)`` when many, else ``execute``.
Statement = tuple[str, Sequence[Any], bool]

_encoding = operator.attrgetter("json")


def _event_rows(batch: Sequence[RunWrite]) -> list[tuple[str, int, str]]:
    """(run_id, first index, JSON array of the events) per contiguous stretch of events.

    A run's events are oldest first with no index twice (RunWrite), so they are one
    stretch when the last index is the first plus their count: checked in O(1), not with
    a Python step per event.
    """
    rows = []
    for item in batch:
        events = item.events
        if not events:
            continue
        if events[-1].index - events[0].index == len(events) - 1:
            stretches = [events]  # a run's new events always are one stretch
        else:
            stretches, start = [], 0
            for k in range(1, len(events) + 1):
                if k == len(events) or events[k].index != events[k - 1].index + 1:
                    stretches.append(events[start:k])
                    start = k
        for stretch in stretches:
            array = "[" + ",".join(map(_encoding, stretch)) + "]"
            rows.append((item.record.run_id, stretch[0].index, array))
    return rows


def _run_rows(batch: Sequence[RunWrite]) -> list[tuple[Any, ...]]:
    run_rows = []
    for item in batch:
        record = item.record
        run_rows.append(
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
            )
        )
    return run_rows


def _run_statements(batch: Sequence[RunWrite]) -> list[Statement]:
    """The statements that write ``batch``: rows, new events, new keyframes."""
    keyframe_rows = [
        (item.record.run_id, index, state) for item in batch for index, state in item.keyframes
    ]
    return [
        (_UPSERT_RUN, _run_rows(batch), True),
        (_INSERT_EVENTS, _event_rows(batch), True),
        (_INSERT_KEYFRAME, keyframe_rows, True),
    ]


# The writer process's program (run by its path: see its docstring).
_WRITER = str(Path(__file__).with_name("sqlite_writer.py"))

# Every connection that writes: the store's own and its writer's. (WAL is the file's, set
# by ``open``.)
_CONNECTION_PRAGMAS = (
    # NORMAL in WAL mode: a process crash loses nothing committed; only a power loss may
    # drop the last transactions.
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
    # Deleted content is overwritten with zeros, so that a run or a thread erased for good
    # (PROTOCOL.md §10) leaves no trace in the file's free space.
    "PRAGMA secure_delete=ON",
)

# The writer's connection: the same, and the store connection's busy timeout as the
# writer starts.
_WRITER_PRAGMAS = (
    *_CONNECTION_PRAGMAS,
    # A flush's new pages stay in the cache until its commit instead of spilling to the
    # WAL half-way: 32 MiB hold an interval of some 300,000 events. (The default, 2 MiB,
    # made the insert of 80,000 events a fifth slower.)
    "PRAGMA cache_size=-32768",
)


class _Writer:
    """The store's writer process (app/store/sqlite_writer.py), and the file requests go
    through."""

    def __init__(self, process: asyncio.subprocess.Process, transfer: BinaryIO) -> None:
        self._process = process
        self._transfer = transfer
        self._size: int | None = None  # of the answer being read
        self._ended = False

    @property
    def ended(self) -> bool:
        """True once the process has ended, or the store ended it."""
        return self._ended or self._process.returncode is not None

    @classmethod
    async def start(cls, path: Path, pragmas: Sequence[str]) -> _Writer:
        """Raises: sqlite3.Error (it cannot open the file), StoreError (nor start)."""
        transfer = tempfile.TemporaryFile(prefix="runcast-writes-")
        fd = transfer.fileno()
        try:
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-P", _WRITER, str(path), str(fd), *pragmas),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                pass_fds=(fd,),
            )
        except OSError as exc:
            transfer.close()
            raise StoreError(f"cannot start the writer process: {exc}") from exc
        writer = cls(process, transfer)
        try:
            await writer._answer()
        except BaseException:
            await writer.close()
            raise
        return writer

    async def transact(self, statements: Sequence[Statement]) -> None:
        """Have the writer make ``statements`` one transaction.

        Raises:
            sqlite3.Error: the transaction failed and was rolled back.
            StoreError: the writer is gone (``ended``); whether it committed, unknown.

        Cancellation: the writer goes on; its answer is waited for (so that the next
        request gets its own), and then CancelledError raised: whether it committed, the
        caller does not know.
        """
        data = pickle.dumps(statements, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            os.pwrite(self._transfer.fileno(), data, 0)
        except OSError as exc:  # the temporary file's disk is full
            raise StoreError(f"cannot hand the writer process its request: {exc}") from exc
        assert self._process.stdin is not None
        self._process.stdin.write(struct.pack("<Q", len(data)))
        try:
            await self._answer()
        except asyncio.CancelledError:
            await self._any_answer()
            raise
        finally:
            # The writer is done with it: between writes the file holds nothing (no text
            # of a run deleted since stays in it).
            with contextlib.suppress(OSError):
                os.ftruncate(self._transfer.fileno(), 0)

    async def _any_answer(self) -> None:
        """Wait for the answer in flight, whatever it says, however often cancelled."""
        while True:
            try:
                await self._answer()
                return
            except asyncio.CancelledError:
                continue
            except Exception:
                return  # the caller, cancelled, is not told what it was

    async def _answer(self) -> None:
        """Read the writer's next answer; raise the error it carries."""
        assert self._process.stdout is not None
        try:
            if self._size is None:
                (self._size,) = struct.unpack("<Q", await self._process.stdout.readexactly(8))
            data = await self._process.stdout.readexactly(self._size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._ended = True
            raise StoreError("the writer process ended") from exc
        self._size = None
        error = pickle.loads(data)
        if error is not None:
            raise error

    async def close(self) -> None:
        """Let the writer finish and end."""
        self._ended = True
        if self._process.stdin is not None:
            self._process.stdin.close()
        await self._process.wait()
        self._transfer.close()


# The largest page of events read in place (``_point_read``); the wire sends at most 1,000
# events a frame, so a reader's page is at most that.
POINT_READ_MAX_EVENTS = 1_000


class SqliteStore:
    """The embedded store: one SQLite file, WAL journal, one transaction per write."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._point: sqlite3.Connection | None = None  # see _point_read
        self._writer: _Writer | None = None  # writes runs (_WRITER), from the first write
        # Writers share the one connection: a transaction must not begin while another
        # is open on it, nor a write statement land inside another's transaction.
        self._write_lock = asyncio.Lock()

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "SqliteStore used before open() or after close()"
        return self._db

    async def open(self) -> None:
        """Open (creating if needed) the database file and bring its schema up to date.

        Raises:
            StoreError: the file is not a database, or was written by a newer runcast.
        """
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            await self.db.execute("PRAGMA journal_mode=WAL")
            for pragma in _CONNECTION_PRAGMAS:
                await self.db.execute(pragma)
            # The version is read before the schema is touched: a newer runcast's file is
            # refused as it is, not given this version's tables first.
            await self.db.executescript(_META)
            version = await self._schema_version()
            if version <= SCHEMA_VERSION:
                await self._migrate(version)
        except sqlite3.Error as exc:
            await self.close()
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc
        if version > SCHEMA_VERSION:
            await self.close()
            raise StoreError(
                f"database {self.path} has schema version {version}, newer than this "
                f"runcast understands ({SCHEMA_VERSION}); upgrade runcast"
            )

    async def _migrate(self, version: int) -> None:
        """Bring a file at schema ``version`` to SCHEMA_VERSION, one step a transaction."""
        for target in range(version + 1, SCHEMA_VERSION + 1):
            await self.db.executescript(
                f"BEGIN IMMEDIATE; {_MIGRATIONS[target - 1]}"
                f" INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', '{target}');"
                " COMMIT;"
            )
            if version > 0:
                logger.info("database %s upgraded to schema version %d", self.path, target)

    async def _schema_version(self) -> int:
        """The file's schema version; 0 for a new file (no ``meta`` table yet)."""
        async with self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ) as cursor:
            if await cursor.fetchone() is None:
                return 0
        async with self.db.execute("SELECT value FROM meta WHERE key = 'schema_version'") as cursor:
            row = await cursor.fetchone()
        return 0 if row is None else int(row[0])

    async def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer.close()
        if self._point is not None:
            point, self._point = self._point, None
            point.close()
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def create_thread(self, thread: ThreadRecord) -> None:
        """Raises: StoreError (a thread with this id exists)."""
        await self._execute(
            f"INSERT INTO threads ({_THREAD_COLUMNS}) {_THREAD_VALUES}", thread_row(thread)
        )

    async def get_thread(self, thread_id: str) -> ThreadRecord | None:
        rows = await self._fetch(
            f"SELECT {_THREAD_COLUMNS} FROM threads WHERE thread_id = ?",
            (thread_id,),
        )
        return thread_from_row(rows[0]) if rows else None

    async def write_thread(
        self, thread: ThreadRecord, turns: Sequence[Turn], runs: Sequence[RunWrite] = ()
    ) -> None:
        """Write a thread's row (created if new), add ``turns`` and write ``runs``, in ONE
        transaction.

        Raises:
            StoreError: nothing was written.
        """
        turn_rows = [
            (t.turn_id, t.thread_id, t.parent_id, t.role, t.content, t.run_id, t.created_at)
            for t in turns
        ]
        statements: list[Statement] = [
            (
                f"INSERT INTO threads ({_THREAD_COLUMNS}) {_THREAD_VALUES}"
                " ON CONFLICT (thread_id) DO UPDATE SET revision = excluded.revision,"
                " head = excluded.head, updated_at = excluded.updated_at,"
                " title = excluded.title, metadata = excluded.metadata",
                thread_row(thread),
                False,
            ),
            (
                "INSERT INTO turns (turn_id, thread_id, parent_id, role, content, run_id,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                turn_rows,
                True,
            ),
            *_run_statements(runs),
        ]
        await self._write_transaction(f"write of thread {thread.thread_id}", statements)

    async def load_turns(self, thread_id: str) -> list[Turn]:
        """Every turn of the thread, oldest first. An assistant turn's content and status
        are its run's (as of the run's last flush); once its run is deleted, the ones it
        kept."""
        rows = await self._fetch(
            "SELECT t.turn_id, t.thread_id, t.parent_id, t.role, t.content, t.run_id,"
            " t.created_at, r.status, json_extract(r.snapshot, '$.message.content'), t.status"
            " FROM turns t LEFT JOIN runs r ON r.run_id = t.run_id"
            " WHERE t.thread_id = ? ORDER BY t.created_at, t.rowid",
            (thread_id,),
        )
        return [
            Turn(
                turn_id=row[0],
                thread_id=row[1],
                parent_id=row[2],
                role=row[3],
                content=row[4] if row[5] is None else (row[8] or ""),
                run_id=row[5],
                status=(row[9] or "completed") if row[5] is None else (row[7] or "queued"),
                created_at=row[6],
            )
            for row in rows
        ]

    async def turn_of_run(self, run_id: str) -> tuple[str, str | None] | None:
        """(assistant turn id, its parent id) of the turn ``run_id`` writes, if any."""
        rows = await self._fetch(
            "SELECT turn_id, parent_id FROM turns WHERE run_id = ? AND role = 'assistant'",
            (run_id,),
        )
        return (rows[0][0], rows[0][1]) if rows else None

    async def write(self, batch: Sequence[RunWrite]) -> None:
        """Write every run of ``batch`` in one transaction (group commit).

        Raises:
            StoreError: the transaction failed and was rolled back; nothing was written.
        """
        if not batch:
            return
        await self._write_transaction(f"write of {len(batch)} runs", _run_statements(batch))

    async def _write_transaction(self, what: str, statements: Sequence[Statement]) -> None:
        """``statements`` in one transaction, made by the writer process (started again
        if it ended).

        Raises:
            StoreError: the transaction failed and was rolled back (the sqlite3 error is
                its cause); or the writer ended (whether it committed, unknown).

        Cancellation: the writer goes on, and is waited for before CancelledError is
        raised: whether it committed, the caller does not know.
        """
        async with self._write_lock:
            try:
                if self._writer is None or self._writer.ended:
                    if self._writer is not None:
                        await self._writer.close()
                    self._writer = None
                    [(busy_ms,)] = await self._fetch("PRAGMA busy_timeout", ())
                    pragmas = (*_WRITER_PRAGMAS, f"PRAGMA busy_timeout={int(busy_ms)}")
                    self._writer = await _Writer.start(self.path, pragmas)
                await self._writer.transact(statements)
            except sqlite3.Error as exc:
                raise StoreError(f"{what} failed: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _transaction(self, what: str) -> AsyncIterator[aiosqlite.Connection]:
        """One IMMEDIATE transaction: committed when the block ends, rolled back if it
        raises. Raises: StoreError (with the sqlite3 error as its cause)."""
        async with self._write_lock:
            db = self.db
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    await db.execute("COMMIT")
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"{what} failed: {exc}") from exc

    async def get_run(self, run_id: str) -> RunRecord | None:
        rows = self._point_read(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
        return run_from_row(rows[0]) if rows else None

    async def list_runs(
        self, query: RunQuery, *, before: Key | None = None, limit: int
    ) -> list[RunRecord]:
        sql, params = run_page_query(query, before, limit)
        return [run_from_row(row) for row in await self._fetch(sql, params)]

    async def list_threads(
        self, *, metadata: Sequence[tuple[str, str]], before: Key | None = None, limit: int
    ) -> list[ThreadRecord]:
        sql, params = thread_page_query(metadata, before, limit)
        return [thread_from_row(row) for row in await self._fetch(sql, params)]

    async def update_run(
        self, run_id: str, *, title: str | None, metadata: JsonObject, updated_at: float
    ) -> None:
        await self._execute(
            "UPDATE runs SET title = ?, metadata = ?, updated_at = ? WHERE run_id = ?",
            (title, encode(metadata), updated_at, run_id),
        )

    async def delete_run(self, run_id: str) -> bool:
        async with self._transaction(f"delete of run {run_id}") as db:
            async with db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)) as cursor:
                if await cursor.fetchone() is None:
                    return False
            # The assistant turn it wrote keeps its text and status, and no longer names it.
            await db.execute(
                "UPDATE turns SET"
                " content = coalesce((SELECT json_extract(snapshot, '$.message.content')"
                " FROM runs WHERE run_id = ?1), content),"
                " status = (SELECT status FROM runs WHERE run_id = ?1),"
                " run_id = NULL WHERE run_id = ?1",
                (run_id,),
            )
            await db.execute("DELETE FROM events WHERE run_id = ?", (run_id,))
            await db.execute("DELETE FROM keyframes WHERE run_id = ?", (run_id,))
            await db.execute("DELETE FROM shares WHERE kind = 'run' AND resource_id = ?", (run_id,))
            await db.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
        await self._truncate_wal()
        return True

    async def delete_thread(self, thread_id: str) -> list[str] | None:
        async with self._transaction(f"delete of thread {thread_id}") as db:
            async with db.execute(
                "SELECT 1 FROM threads WHERE thread_id = ?", (thread_id,)
            ) as cursor:
                if await cursor.fetchone() is None:
                    return None
            async with db.execute(
                "SELECT run_id FROM runs WHERE thread_id = ?", (thread_id,)
            ) as cursor:
                run_ids = [row[0] for row in await cursor.fetchall()]
            runs = "(SELECT run_id FROM runs WHERE thread_id = ?1)"
            for sql in (
                f"DELETE FROM events WHERE run_id IN {runs}",
                f"DELETE FROM keyframes WHERE run_id IN {runs}",
                f"DELETE FROM shares WHERE kind = 'run' AND resource_id IN {runs}",
                "DELETE FROM shares WHERE kind = 'thread' AND resource_id = ?1",
                "DELETE FROM turns WHERE thread_id = ?1",
                "DELETE FROM runs WHERE thread_id = ?1",
                "DELETE FROM threads WHERE thread_id = ?1",
            ):
                await db.execute(sql, (thread_id,))
        await self._truncate_wal()
        return run_ids

    async def _truncate_wal(self) -> None:
        """Checkpoint and empty the WAL file, so that the pages a delete changed are
        written over in the database file and the WAL keeps no older copy of them. Best
        effort, and at once: a reader in another process that keeps it from finishing is
        not waited for (logged); the next checkpoint writes the pages over."""
        async with self._write_lock:
            try:
                await self.db.execute("PRAGMA busy_timeout = 0")
                try:
                    row = await self._checkpoint()
                finally:
                    await self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            except sqlite3.Error as exc:
                logger.warning("database %s: checkpoint after a delete failed: %s", self.path, exc)
                return
        if row[0]:
            logger.warning(
                "database %s: checkpoint after a delete was blocked by a reader; the WAL "
                "keeps older pages until the next checkpoint",
                self.path,
            )

    async def _checkpoint(self) -> tuple[int, int, int]:
        """``PRAGMA wal_checkpoint(TRUNCATE)``: (busy, WAL frames, frames checkpointed);
        its row is read, so no statement is left in progress. Raises: sqlite3.Error."""
        async with self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return row[0], row[1], row[2]

    def _file_bytes(self) -> int:
        """The database file and its WAL, in bytes."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    async def vacuum(self) -> tuple[int, int]:
        """Rebuild the file without its free pages (``runcast db vacuum``); returns its
        size in bytes (with the WAL) before and after.

        Raises:
            StoreError: the database is busy or the rebuild failed.
        """
        before = self._file_bytes()
        async with self._write_lock:
            try:
                await self._checkpoint()
                await self.db.execute("VACUUM")
                await self._checkpoint()
            except sqlite3.Error as exc:
                raise StoreError(f"vacuum of {self.path} failed: {exc}") from exc
        return before, self._file_bytes()

    async def read_events(self, run_id: str, after: int, limit: int | None) -> list[Event]:
        sql = "SELECT body FROM events WHERE run_id = ? AND i > ? ORDER BY i LIMIT ?"
        if limit is not None and limit <= POINT_READ_MAX_EVENTS:  # a page: read in place
            rows = self._point_read(sql, (run_id, after, limit))
        else:
            rows = await self._fetch(sql, (run_id, after, -1 if limit is None else limit))
        return [Event.from_json(row[0]) for row in rows]

    async def read_keyframe(self, run_id: str, index: int) -> tuple[int, dict[str, Any]] | None:
        rows = await self._fetch(
            "SELECT i, state FROM keyframes WHERE run_id = ? AND i <= ? ORDER BY i DESC LIMIT 1",
            (run_id, index),
        )
        return (rows[0][0], decode(rows[0][1])) if rows else None

    async def check(self) -> list[str]:
        """SQLite's own integrity check, then runcast's: every run's log is contiguous
        from 1 to its last index, and every ended run ends with its terminal event."""
        problems = [
            f"sqlite: {row[0]}"
            for row in await self._fetch("PRAGMA integrity_check", ())
            if row[0] != "ok"
        ]
        rows = await self._fetch(
            "SELECT r.run_id, r.status, r.last_index, count(e.i), min(e.i), max(e.i)"
            " FROM runs r LEFT JOIN events e ON e.run_id = r.run_id GROUP BY r.run_id",
            (),
        )
        terminal = {status.value for status in TERMINAL_STATUSES}
        ended = []
        for run_id, status, last_index, count, first, last in rows:
            if count != last_index or (count and (first != 1 or last != last_index)):
                problems.append(
                    f"run {run_id}: events are not contiguous from 1 to {last_index}"
                    f" ({count} events, {first}..{last})"
                )
            elif status in terminal:
                ended.append((run_id, status, last_index))
        for run_id, status, last_index in ended:
            rows = await self._fetch(
                "SELECT body FROM events WHERE run_id = ? AND i = ?", (run_id, last_index)
            )
            event = Event.from_json(rows[0][0]) if rows else None
            if event is None or event.type != "status" or event.data.get("status") != status:
                problems.append(f"run {run_id}: {status}, but its last event is not that status")
        # What a delete could leave behind: a turn naming a run, a head naming a turn, or
        # events, keyframes or shares of something that is no longer there.
        for turn_id, run_id in await self._fetch(
            "SELECT t.turn_id, t.run_id FROM turns t WHERE t.run_id IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.run_id = t.run_id)",
            (),
        ):
            problems.append(f"turn {turn_id}: its run {run_id} does not exist")
        for thread_id, head in await self._fetch(
            "SELECT h.thread_id, h.head FROM threads h WHERE h.head IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM turns t WHERE t.turn_id = h.head)",
            (),
        ):
            problems.append(f"thread {thread_id}: its head {head} is not a turn")
        for table in ("events", "keyframes"):
            for (run_id,) in await self._fetch(
                f"SELECT DISTINCT run_id FROM {table} x"
                " WHERE NOT EXISTS (SELECT 1 FROM runs r WHERE r.run_id = x.run_id)",
                (),
            ):
                problems.append(f"{table} of run {run_id}, which does not exist")
        for share_id, kind, resource_id in await self._fetch(
            "SELECT share_id, kind, resource_id FROM shares s WHERE NOT EXISTS"
            " (SELECT 1 FROM runs r WHERE s.kind = 'run' AND r.run_id = s.resource_id)"
            " AND NOT EXISTS"
            " (SELECT 1 FROM threads h WHERE s.kind = 'thread' AND h.thread_id = s.resource_id)",
            (),
        ):
            problems.append(f"share {share_id}: its {kind} {resource_id} does not exist")
        return problems

    async def live_runs(self) -> list[RunRecord]:
        marks = ", ".join("?" for _ in _TERMINAL)
        rows = await self._fetch(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE status NOT IN ({marks})", _TERMINAL
        )
        return [run_from_row(row) for row in rows]

    async def stats(self) -> dict[str, Any]:
        rows = await self._fetch("SELECT count(*) FROM runs", ())
        return {"path": str(self.path), "runs": rows[0][0]}

    async def share_secret(self, new: str) -> str:
        await self._execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('share_secret', ?)", (new,)
        )
        rows = await self._fetch("SELECT value FROM meta WHERE key = 'share_secret'", ())
        return str(rows[0][0])

    async def create_share(self, share: ShareRecord) -> None:
        await self._execute(
            f"INSERT INTO shares ({_SHARE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                share.share_id,
                share.kind,
                share.resource_id,
                share.role,
                share.created_by,
                share.created_at,
                share.expires_at,
                share.revoked_at,
            ),
        )

    async def get_share(self, share_id: str) -> ShareRecord | None:
        rows = await self._fetch(
            f"SELECT {_SHARE_COLUMNS} FROM shares WHERE share_id = ?", (share_id,)
        )
        return ShareRecord(*rows[0]) if rows else None

    async def revoke_share(self, share_id: str, at: float) -> None:
        await self._execute(
            "UPDATE shares SET revoked_at = ? WHERE share_id = ? AND revoked_at IS NULL",
            (at, share_id),
        )

    async def revoked_shares(self, now: float) -> list[str]:
        rows = await self._fetch(
            "SELECT share_id FROM shares WHERE revoked_at IS NOT NULL AND expires_at > ?",
            (now,),
        )
        return [row[0] for row in rows]

    async def _execute(self, sql: str, params: tuple[Any, ...]) -> None:
        """One write statement, committed on its own (outside any open transaction)."""
        async with self._write_lock:
            try:
                await self.db.execute(sql, params)
            except sqlite3.Error as exc:
                raise StoreError(f"database statement failed: {exc}") from exc

    def _point_read(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        """A small read (a run's row, a page of its events: a range of a primary key) on
        the event loop's own thread, through a read-only connection of its own. In WAL
        mode it never waits for the writer, and it takes tens of microseconds: less than
        the hop to the database thread and back, which made a resume from disk 1.4 ms
        where one from memory took 0.8. Anything larger goes through ``_fetch``.

        Raises: StoreError.
        """
        try:
            if self._point is None:
                assert self._db is not None, "SqliteStore used before open() or after close()"
                self._point = sqlite3.connect(self.path, isolation_level=None)
                self._point.execute("PRAGMA query_only=ON")
            return self._point.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"database read failed: {exc}") from exc

    async def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        try:
            # One hop to the database's thread (execute, fetch and close in one call), not
            # three: a read back of an evicted run is two of them.
            return list(await self.db.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(f"database read failed: {exc}") from exc
