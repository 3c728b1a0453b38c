"""SqliteStore's write path: a write is one transaction, one request to the store's writer
process; many runs, keyframes and odd stretches of events land where they belong;
encodings and floats are kept exactly; a cancelled write returns once the writer has
answered; the writer outlives SIGINT and SIGTERM, is started again after it dies, and
ends with the store."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from app.core.events import Event, JsonObject
from app.core.turns import Turn
from app.errors import StoreError
from app.store.base import RunRecord, RunWrite, ThreadRecord
from app.store.sqlite import SqliteStore, Statement, _Writer

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "writes.db")
    await store.open()
    await store.create_thread(ThreadRecord("thr_1", {}, 1.0, 1.0))
    try:
        yield store
    finally:
        await store.close()


def record(run_id: str, last_index: int, status: str = "running") -> RunRecord:
    return RunRecord(
        run_id=run_id,
        thread_id="thr_1",
        agent="counter",
        input={"n": last_index},
        status=status,
        epoch="e1",
        last_index=last_index,
        snapshot={"status": status, "at": last_index},
        created_at=1_763_773_200.123456,
        updated_at=1_763_773_201.654321 + last_index,
    )


def ticks(first: int, last: int, run_id: str = "") -> list[Event]:
    return [Event(i, "tick", {"n": i, "of": run_id}, 1.5 + i) for i in range(first, last + 1)]


def keyframes(first: int, last: int) -> list[tuple[int, str]]:
    return [(i, f'{{"at": {i}}}') for i in range(first, last + 1) if i % 100 == 0]


async def on_disk(store: SqliteStore, run_id: str) -> list[Event]:
    return await store.read_events(run_id, 0, None)


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of statements of each request to a writer process."""
    seen: list[int] = []
    transact = _Writer.transact

    async def counted(self: _Writer, statements: Sequence[Statement]) -> None:
        seen.append(len(statements))
        await transact(self, statements)

    monkeypatch.setattr(_Writer, "transact", counted)
    return seen


async def test_a_big_write_is_one_request_to_the_writer(
    store: SqliteStore, requests: list[int]
) -> None:
    batch = [
        RunWrite(record(run_id, 5_000), ticks(1, 5_000, run_id), keyframes(1, 5_000))
        for run_id in ("run_a", "run_b", "run_c")
    ]
    await store.write(batch)
    # One request; a statement per table (executemany: a row per run, per keyframe).
    assert requests == [3]
    for run_id in ("run_a", "run_b", "run_c"):
        assert await on_disk(store, run_id) == ticks(1, 5_000, run_id)
        assert await store.read_keyframe(run_id, 5_000) == (5_000, {"at": 5_000})


async def test_the_file_requests_go_through_is_empty_between_writes(store: SqliteStore) -> None:
    await store.write([RunWrite(record("run_a", 2_000), ticks(1, 2_000, "secret text"))])
    assert store._writer is not None
    assert os.fstat(store._writer._transfer.fileno()).st_size == 0
    assert len(await on_disk(store, "run_a")) == 2_000


async def test_many_runs_in_one_write_all_land_and_all_or_nothing(store: SqliteStore) -> None:
    """More runs than one statement takes (rows, events, keyframes each split over several
    statements): every one lands; and one bad run refuses the whole batch."""
    run_ids = [f"run_{k:03d}" for k in range(150)]
    await store.write(
        [RunWrite(record(r, 200), ticks(1, 200, r), keyframes(1, 200)) for r in run_ids]
    )
    for run_id in (run_ids[0], run_ids[63], run_ids[64], run_ids[149]):
        got = await store.get_run(run_id)
        assert got == record(run_id, 200)
        assert await on_disk(store, run_id) == ticks(1, 200, run_id)
        assert await store.read_keyframe(run_id, 10_000) == (200, {"at": 200})
    # The last run repeats an event already on disk: nothing of the batch is written.
    batch = [RunWrite(record(r, 300), ticks(201, 300, r)) for r in run_ids[:-1]]
    batch.append(RunWrite(record(run_ids[-1], 300), ticks(200, 300, run_ids[-1])))
    with pytest.raises(StoreError) as caught:
        await store.write(batch)
    assert isinstance(caught.value.__cause__, sqlite3.Error)
    for run_id in run_ids:
        got = await store.get_run(run_id)
        assert got is not None and got.last_index == 200
    assert len(await on_disk(store, run_ids[0])) == 200


async def test_events_that_are_not_one_stretch_land_at_their_indexes(store: SqliteStore) -> None:
    events = ticks(1, 3) + ticks(7, 8)
    await store.write([RunWrite(record("run_a", 8), events)])
    assert await on_disk(store, "run_a") == events


async def test_encodings_are_kept_to_the_byte(store: SqliteStore) -> None:
    texts = ['"quoted" \\ back', "line\nbreak\ttab\x01", "héllo ✓ \u2028 😀", "", "}]{["]
    events = [
        Event(i + 1, "text", {"text": t, "f": 0.1 * i}, 1e9 + i / 7) for i, t in enumerate(texts)
    ]
    odd: list[JsonObject] = [
        {"big": 2**63 - 1, "small": -(2**63), "e": 1e16, "tiny": 1.5e-7, "neg": -0.0},
        {"nested": {"a": [1, [2, {"b": None}], {}], "t": True, "f": False}, "empty": []},
        {'k"ey\\': "v", "ключ": "значение", "\x00": "\x1f"},
        {"deep": [[[[[[[[[[{"x": 1}]]]]]]]]]]},
    ]
    events += [Event(len(events) + 1 + k, "custom", data, 1e9) for k, data in enumerate(odd)]
    texts += ["", "", "", ""]
    await store.write([RunWrite(record("run_a", len(texts)), events)])
    got = await on_disk(store, "run_a")
    assert [e.json for e in got] == [e.json for e in events]
    row = await store.get_run("run_a")
    assert row == record("run_a", len(texts))  # floats of the row exactly as written


async def test_write_thread_is_one_request_with_its_turns_and_runs(
    store: SqliteStore, requests: list[int]
) -> None:
    thread = ThreadRecord("thr_2", {"k": "v"}, 5.0, 6.0, revision=1, head="turn_2")
    turns = [
        Turn("turn_1", "thr_2", None, "user", "hi", None, "completed", 5.0),
        Turn("turn_2", "thr_2", "turn_1", "assistant", "", "run_x", "queued", 5.5),
    ]
    run = RunRecord("run_x", "thr_2", "demo", {}, "queued", "e1", 0, {"status": "queued"}, 5.5, 5.5)
    await store.write_thread(thread, turns, [RunWrite(run)])
    assert len(requests) == 1
    assert await store.get_thread("thr_2") == thread
    assert [t.turn_id for t in await store.load_turns("thr_2")] == ["turn_1", "turn_2"]
    assert await store.get_run("run_x") == run


async def test_a_cancelled_write_returns_once_the_writer_has_answered(
    store: SqliteStore,
) -> None:
    await store.write([RunWrite(record("run_a", 1), ticks(1, 1))])  # the writer is up
    other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # the writer will wait for this lock
        writing = asyncio.create_task(store.write([RunWrite(record("run_a", 3), ticks(2, 3))]))
        await asyncio.sleep(0.2)
        writing.cancel()
        await asyncio.sleep(0.1)
        assert not writing.done()  # the writer has not answered yet
        other.rollback()
        with pytest.raises(asyncio.CancelledError):
            await writing
    finally:
        other.close()
    # It was committed all the same (its caller cannot know: the flusher reads the row
    # back), and the next request gets its own answer.
    assert [e.index for e in await on_disk(store, "run_a")] == [1, 2, 3]
    with pytest.raises(StoreError):
        await store.write([RunWrite(record("run_a", 3), ticks(3, 3))])  # index 3 is taken
    await store.write([RunWrite(record("run_a", 4), ticks(4, 4))])
    assert len(await on_disk(store, "run_a")) == 4


def writer_pid(store: SqliteStore) -> int:
    assert store._writer is not None
    return store._writer._process.pid


async def test_the_writer_outlives_sigint_and_sigterm(store: SqliteStore) -> None:
    """Its process group may get them (^C in a terminal, a service manager stopping the
    server): the server still writes through it as it shuts down."""
    await store.write([RunWrite(record("run_a", 1), ticks(1, 1))])
    pid = writer_pid(store)
    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    await asyncio.sleep(0.2)
    await store.write([RunWrite(record("run_a", 2), ticks(2, 2))])
    assert writer_pid(store) == pid
    assert len(await on_disk(store, "run_a")) == 2


async def test_a_writer_that_died_is_started_again(store: SqliteStore) -> None:
    await store.write([RunWrite(record("run_a", 1), ticks(1, 1))])
    pid = writer_pid(store)
    os.kill(pid, signal.SIGKILL)
    # A write in flight as it dies fails (the flusher reads the rows back, then writes
    # again); the next one starts a new writer.
    for _ in range(2):
        try:
            await store.write([RunWrite(record("run_a", 2), ticks(2, 2))])
            break
        except StoreError:
            continue
    assert writer_pid(store) != pid
    assert len(await on_disk(store, "run_a")) == 2


async def test_the_writer_ends_with_the_store(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "ends.db")
    await store.open()
    await store.create_thread(ThreadRecord("thr_1", {}, 1.0, 1.0))
    await store.write([RunWrite(record("run_a", 1), ticks(1, 1))])
    assert store._writer is not None
    process = store._writer._process
    await store.close()
    assert process.returncode == 0


# A process that opens a store, writes once (its writer starts), tells the writer's pid.
_SERVER = """
import asyncio, sys
from app.store.base import ThreadRecord
from app.store.sqlite import SqliteStore

async def main():
    store = SqliteStore(sys.argv[1])
    await store.open()
    await store.write_thread(ThreadRecord("thr_1", {}, 1.0, 1.0), [])
    print(store._writer._process.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_the_writer_dies_with_the_server(tmp_path: Path) -> None:
    """It does not outlive a server killed with SIGKILL. (Killed in the middle of a
    write, it does not commit it after the crash either: tests/test_writer_kill.py.)"""
    root = Path(__file__).resolve().parent.parent.parent
    with subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(tmp_path / "dies.db")],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    ) as server:
        assert server.stdout is not None
        pid = int(server.stdout.readline())
        server.kill()
        server.wait(10)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break  # ended, not reaped yet
        except FileNotFoundError:
            break
        time.sleep(0.01)
    else:
        pytest.fail(f"the writer {pid} outlived its server by 5 s")
