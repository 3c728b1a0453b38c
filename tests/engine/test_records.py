"""RunManager: titles and metadata, listing pages (as runs are in memory), aside and a
saved edit as thread changes, and deleting for good: from disk and memory, with readers
and watchers told."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from app.agents.builtin import register_builtins
from app.agents.registry import Registry
from app.engine import run as run_module
from app.engine.manager import EngineSettings, Page, RunManager, ThreadChange
from app.engine.records import MAX_METADATA_BYTES, RecordPatch
from app.engine.run import LiveRun
from app.engine.threads import ThreadChanged
from app.errors import ConflictError, NotFoundError, PayloadTooLargeError, RunInProgressError
from app.store.base import Key, RunQuery
from app.store.sqlite import SqliteStore
from tests.fakes import hold, until

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(tmp_path / "runcast.db")
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def manager(store: SqliteStore) -> AsyncIterator[RunManager]:
    registry = Registry()
    register_builtins(registry)
    registry.add("hold", hold)
    # A long flush interval: a run's row on disk lags its status in memory.
    settings = EngineSettings(
        flush_interval_s=60.0, stop_grace_s=0.2, shutdown_grace_s=0.5, linger_s=60.0
    )
    manager = RunManager(store, registry, settings)
    await manager.open()
    try:
        yield manager
    finally:
        async with asyncio.timeout(10):
            await manager.close()


async def ended(run: LiveRun) -> LiveRun:
    async with asyncio.timeout(5):
        await run.wait_ended()
    return run


async def held(run: LiveRun) -> LiveRun:
    async with asyncio.timeout(5):
        await until(run, lambda r: r.last_index >= 2)
    return run


async def walk(manager: RunManager, query: RunQuery, limit: int) -> list[list[str]]:
    pages: list[list[str]] = []
    before: Key | None = None
    while True:
        page: Page = await manager.list_runs(query, before=before, limit=limit)
        pages.append([info["run_id"] for info in page.items])
        if page.next is None:
            return pages
        before = page.next


def flat(pages: list[list[str]]) -> list[str]:
    return [run_id for page in pages for run_id in page]


# -- titles and metadata ------------------------------------------------------------------


async def test_patching_a_run_and_a_thread(manager: RunManager, store: SqliteStore) -> None:
    run = await ended(await manager.start("counter", {"n": 1}, title="first", metadata={"a": "1"}))
    thread = await manager.get_thread(run.thread_id)
    assert thread.title == "first" and thread.metadata == {}
    patched = await manager.patch_run(run, RecordPatch(metadata={"a": None, "b": {"c": 1}}))
    assert (patched.title, patched.metadata) == ("first", {"b": {"c": 1}})
    await manager.patch_run(run, RecordPatch(set_title=True, title=None))
    record = await store.get_run(run.run_id)
    assert record is not None and (record.title, record.metadata) == (None, {"b": {"c": 1}})
    with pytest.raises(PayloadTooLargeError) as too_large:
        await manager.patch_run(run, RecordPatch(metadata={"x": "y" * MAX_METADATA_BYTES}))
    assert too_large.value.details["field"] == "metadata"
    assert run.metadata == {"b": {"c": 1}}

    frames: list[ThreadChanged] = []
    manager.watch_thread(thread.thread_id, frames.append)
    renamed = await manager.patch_thread(
        thread.thread_id, RecordPatch(set_title=True, title="renamed"), expected_revision=0
    )
    assert (renamed.title, renamed.revision) == ("renamed", 1)
    assert [(f.change, f.revision) for f in frames] == [("updated", 1)]
    with pytest.raises(ConflictError):
        await manager.patch_thread(thread.thread_id, RecordPatch(), expected_revision=0)
    with pytest.raises(PayloadTooLargeError):
        await manager.patch_thread(
            thread.thread_id, RecordPatch(metadata={"x": "y" * MAX_METADATA_BYTES})
        )
    with pytest.raises(PayloadTooLargeError):
        await manager.create_thread({"x": "y" * MAX_METADATA_BYTES})
    with pytest.raises(PayloadTooLargeError):
        await manager.start("counter", {"n": 1}, metadata={"x": "y" * MAX_METADATA_BYTES})
    assert (await manager.get_thread(thread.thread_id)).revision == 1
    assert manager.thread_info(renamed)["title"] == "renamed"


# -- listing ------------------------------------------------------------------------------


async def test_listing_by_status_goes_by_what_runs_are_now(
    manager: RunManager, store: SqliteStore
) -> None:
    runs = [
        await held(await manager.start("hold", {}, metadata={"k": str(n % 2)})) for n in range(5)
    ]
    newest_first = [run.run_id for run in reversed(runs)]
    # On disk every row still says queued; in memory they run.
    assert {r.status for r in await store.list_runs(RunQuery(), limit=9)} == {"queued"}
    assert await walk(manager, RunQuery(status="running"), 2) == [
        newest_first[:2],
        newest_first[2:4],
        newest_first[4:],
    ]
    # Rows that say queued are passed over page by page, and the walk ends.
    assert flat(await walk(manager, RunQuery(status="queued"), 2)) == []
    assert await walk(manager, RunQuery(status="running", metadata=[("k", "1")]), 5) == [
        [runs[3].run_id, runs[1].run_id]
    ]
    assert await walk(manager, RunQuery(status="running", agent="counter"), 5) == [[]]
    other = await manager.create_thread()
    assert await walk(manager, RunQuery(status="running", thread_id=other.thread_id), 5) == [[]]
    # Some rows on disk match (the flusher wrote them), others only in memory.
    await manager.flusher.flush()
    late = await held(await manager.start("hold", {}))
    assert await walk(manager, RunQuery(status="running"), 3) == [
        [late.run_id, *newest_first[:2]],
        newest_first[2:],
    ]
    assert flat(await walk(manager, RunQuery(), 4)) == [late.run_id, *newest_first]
    for run in [*runs, late]:
        manager.stop(run)
        await ended(run)


async def test_listing_threads(manager: RunManager) -> None:
    made = [await manager.create_thread({"n": str(k)}, title=f"t{k}") for k in range(5)]
    page = await manager.list_threads(limit=2)
    assert [t["thread_id"] for t in page.items] == [made[4].thread_id, made[3].thread_id]
    assert page.next == (made[3].created_at, made[3].thread_id)
    rest = await manager.list_threads(before=page.next, limit=3)
    assert [t["title"] for t in rest.items] == ["t2", "t1", "t0"] and rest.next is None
    only = await manager.list_threads(metadata=[("n", "2")])
    assert [t["thread_id"] for t in only.items] == [made[2].thread_id]


# -- aside and a saved edit -----------------------------------------------------------------


async def test_an_enqueued_aside_writes_its_turns_when_it_starts_and_keeps_the_head(
    manager: RunManager, store: SqliteStore
) -> None:
    thread = await manager.create_thread()
    _, first = await manager.change_thread(
        thread.thread_id, ThreadChange("send", agent="echo", content="one")
    )
    assert first is not None
    await ended(first)
    _, blocker = await manager.change_thread(
        thread.thread_id, ThreadChange("send", agent="hold", content="two")
    )
    assert blocker is not None
    await held(blocker)
    after, aside = await manager.change_thread(
        thread.thread_id,
        ThreadChange("aside", agent="echo", content="side", multitask="enqueue"),
    )
    assert aside is not None and aside.status.value == "queued"
    head = after.head
    manager.stop(blocker)
    await ended(aside)
    thread_now = await manager.get_thread(thread.thread_id)
    assert thread_now.head == head
    turns = {t.turn_id: t for t in await store.load_turns(thread.thread_id)}
    side = [t for t in turns.values() if t.content == "side" and t.role == "user"]
    assert len(side) == 1 and side[0].parent_id == head
    assert aside.state["data"]["history"][-1] == {"role": "user", "content": "side"}


async def test_an_edit_saved_without_a_run_starts_nothing(manager: RunManager) -> None:
    thread = await manager.create_thread()
    _, run = await manager.change_thread(
        thread.thread_id, ThreadChange("send", agent="echo", content="draft")
    )
    assert run is not None
    await ended(run)
    view = await manager.thread_view(await manager.get_thread(thread.thread_id))
    question = view["turns"][0]["turn_id"]
    live = manager.live_runs
    saved, none = await manager.change_thread(
        thread.thread_id, ThreadChange("edit", turn_id=question, content="final", run=False)
    )
    assert none is None and manager.live_runs == live
    view = await manager.thread_view(saved)
    assert [(t["role"], t["content"]) for t in view["turns"]] == [("user", "final")]
    assert saved.head == view["turns"][0]["turn_id"] and saved.revision == 2


# -- deleting -------------------------------------------------------------------------------


async def test_deleting_a_run(manager: RunManager, store: SqliteStore) -> None:
    live = await held(await manager.start("hold", {}))
    with pytest.raises(RunInProgressError) as busy:
        await manager.delete_run(live.run_id)
    assert busy.value.details["active_run_id"] == live.run_id
    assert "stop it first" in busy.value.message
    queued = await manager.start("counter", {"n": 1}, thread_id=live.thread_id, multitask="enqueue")
    with pytest.raises(RunInProgressError):
        await manager.delete_run(queued.run_id)
    manager.stop(live)
    await ended(live)
    await ended(queued)
    waiting = asyncio.create_task(live.wait_after(live.last_index))
    await manager.delete_run(live.run_id)
    async with asyncio.timeout(1):
        await waiting  # its readers were woken
    assert live.deleted and live.run_id not in manager.runs
    assert await live.read_page(0, 10) == []
    assert await store.get_run(live.run_id) is None
    with pytest.raises(NotFoundError):
        await manager.get(live.run_id)
    with pytest.raises(NotFoundError):
        await manager.delete_run(live.run_id)
    with pytest.raises(NotFoundError):
        await manager.patch_run(live, RecordPatch(set_title=True, title="x"))
    assert (await manager.get(queued.run_id)).run_id == queued.run_id


async def test_a_run_deleted_while_it_is_read_back_stays_deleted(
    manager: RunManager, store: SqliteStore
) -> None:
    run = await ended(await manager.start("counter", {"n": 1}))
    del manager.runs[run.run_id]  # evicted
    manager._deleted.add(run.run_id)  # as if deleted while get() awaited the store
    with pytest.raises(NotFoundError):
        await manager.get(run.run_id)
    manager._deleted.discard(run.run_id)
    again = await manager.get(run.run_id)
    # Deleted from disk behind the manager's back: the manager says not found.
    assert await store.delete_run(run.run_id)
    with pytest.raises(NotFoundError):
        await manager.delete_run(again.run_id)


async def test_a_run_not_yet_flushed_is_flushed_before_it_is_deleted(
    manager: RunManager, store: SqliteStore
) -> None:
    run = await ended(await manager.start("counter", {"n": 1}))
    run.record_flushed = False  # its row is due for a write
    await manager.delete_run(run.run_id)
    assert await store.get_run(run.run_id) is None
    await manager.flusher.flush()
    assert await store.get_run(run.run_id) is None  # and no later flush brings it back


async def test_deleting_a_thread(manager: RunManager, store: SqliteStore) -> None:
    thread = await manager.create_thread()
    _, first = await manager.change_thread(
        thread.thread_id, ThreadChange("send", agent="echo", content="one")
    )
    assert first is not None
    await ended(first)
    del manager.runs[first.run_id]  # evicted: only on disk
    _, busy = await manager.change_thread(
        thread.thread_id, ThreadChange("send", agent="hold", content="two")
    )
    assert busy is not None
    await held(busy)
    frames: list[ThreadChanged] = []
    manager.watch_thread(thread.thread_id, frames.append)
    with pytest.raises(RunInProgressError):
        await manager.delete_thread(thread.thread_id)
    manager.stop(busy)
    await ended(busy)
    await manager.delete_thread(thread.thread_id)
    assert frames[-1].change == "deleted" and frames[-1].thread_id == thread.thread_id
    assert busy.deleted and busy.run_id not in manager.runs
    for run_id in (first.run_id, busy.run_id):
        with pytest.raises(NotFoundError):
            await manager.get(run_id)
    with pytest.raises(NotFoundError):
        await manager.get_thread(thread.thread_id)
    with pytest.raises(NotFoundError):
        await manager.delete_thread(thread.thread_id)
    # The watch ended: nothing more reaches the listener.
    count = len(frames)
    manager.unwatch_thread(thread.thread_id, frames.append)
    assert len(frames) == count
    assert await store.check() == []


async def test_a_thread_whose_run_is_live_but_not_active_is_busy(manager: RunManager) -> None:
    run = await ended(await manager.start("counter", {"n": 1}))
    twin = await manager.get(run.run_id)
    twin._ended.clear()  # as a run between its end being staged and published
    with pytest.raises(RunInProgressError):
        await manager.delete_thread(run.thread_id)
    twin._ended.set()
    await manager.delete_thread(run.thread_id)


async def test_a_reader_that_finds_the_events_gone_waits_for_the_deletion(
    manager: RunManager, store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = await ended(await manager.start("counter", {"n": 20}))
    run.log.trim_before(run.last_index)  # only the last event in memory
    assert await store.delete_run(run.run_id)  # the commit, before the announcement
    readers = [asyncio.create_task(run.read_page(0, 10)) for _ in range(2)]
    await asyncio.sleep(0.05)
    assert not any(reader.done() for reader in readers)
    run.mark_deleted()
    async with asyncio.timeout(1):
        assert await asyncio.gather(*readers) == [[], []]
    # With no announcement (a deletion rolled back), the reader gives up after a while.
    other = await ended(await manager.start("counter", {"n": 20}))
    other.log.trim_before(other.last_index)
    assert await store.delete_run(other.run_id)
    monkeypatch.setattr(run_module, "DELETION_WAIT_S", 0.05)
    assert await other.read_page(0, 10) == []


async def test_forgetting_what_is_no_longer_there(manager: RunManager) -> None:
    # A deletion whose store finds nothing (deleted meanwhile by another node's hand).
    with pytest.raises(NotFoundError):
        await manager._erase_thread("thr_nope")
    # A run object that is no longer the one in memory, with no eviction pending.
    run = await ended(await manager.start("counter", {"n": 1}))
    manager._evictions.pop(run.run_id).cancel()
    del manager.runs[run.run_id]
    manager._forget_run(run)
    assert run.deleted and run.run_id in manager._deleted
