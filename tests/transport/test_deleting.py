"""A run deleted while it is being delivered (PROTOCOL.md §10): a WebSocket subscription
that is still sending gets ``{"type": "deleted", "run_id"}`` as its last frame, and an
SSE stream ends with ``event: deleted``. A subscription is caught mid-delivery with a fake
socket whose events sends are held (a real client cannot hold them on demand); the
manager and its SQLite store are real."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from app.agents.builtin import register_builtins
from app.agents.registry import Registry
from app.engine.manager import EngineSettings, RunManager
from app.engine.run import LiveRun
from app.store.sqlite import SqliteStore
from app.transport.sse import event_stream
from tests.transport.test_session import FakeSocket, session

pytestmark = pytest.mark.timeout(30)


class HeldSocket(FakeSocket):
    """A fake socket whose ``events`` frames wait for ``release`` (``held`` is set when
    one waits); ``replied(ref)`` awaits the reply to an op."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.held = asyncio.Event()
        self.replies: dict[Any, asyncio.Event] = {}

    async def send_text(self, text: str) -> None:
        if '"type":"events"' in text and not self.release.is_set():
            self.held.set()
            await self.release.wait()
        await super().send_text(text)
        ref = self.sent[-1].get("ref")
        self.replies.setdefault(ref, asyncio.Event()).set()

    async def replied(self, ref: Any) -> None:
        await self.replies.setdefault(ref, asyncio.Event()).wait()


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[RunManager]:
    registry = Registry()
    register_builtins(registry)
    store = SqliteStore(tmp_path / "runcast.db")
    manager = RunManager(store, registry, EngineSettings(shutdown_grace_s=0.5, tail_events=500))
    await manager.open()
    try:
        yield manager
    finally:
        await manager.close()
        await store.close()


async def ended_run(manager: RunManager, n: int) -> LiveRun:
    run = await manager.start("counter", {"n": n})
    async with asyncio.timeout(10):
        await run.wait_ended()
    return run


@pytest.mark.parametrize("evicted", [False, True])
async def test_a_subscription_being_delivered_ends_with_deleted(
    manager: RunManager, evicted: bool
) -> None:
    run = await ended_run(manager, 3_000)
    if evicted:  # read back from disk, its older events paged from there
        del manager.runs[run.run_id]
    socket = HeldSocket()
    conn = session(socket, manager)
    serving = asyncio.create_task(conn.serve())
    async with asyncio.timeout(10):
        socket.send_op(op="subscribe", run_id=run.run_id, after=0, ref=1)
        await socket.held.wait()  # the first events frame is on its way
        await manager.delete_run(run.run_id)
        socket.release.set()
        socket.send_op(op="ping", ref=2)
        await socket.replied(2)
        socket.send_op(op="subscribe", run_id=run.run_id, ref=3)
        await socket.replied(3)
        await socket.close()
        await serving
    replies = {f["ref"]: f for f in socket.sent if f["type"] == "reply"}
    assert replies[1]["ok"] is True and replies[2]["ok"] is True
    assert replies[3]["error"]["code"] == "not_found"
    of_run = [f for f in socket.sent if f["type"] != "reply" and f.get("run_id") == run.run_id]
    assert of_run[-1] == {"type": "deleted", "run_id": run.run_id}  # the last, once
    assert {f["type"] for f in of_run[:-1]} <= {"events", "presence"}
    events = [e for f in of_run if f["type"] == "events" for e in f["events"]]
    assert [e["i"] for e in events] == list(range(1, len(events) + 1))  # a prefix
    assert 0 < len(events) < run.last_index
    assert run.watchers == 0


async def test_an_sse_stream_of_a_deleted_run_ends_with_deleted(manager: RunManager) -> None:
    run = await ended_run(manager, 10)
    stream = event_stream(run, 0)
    chunks: list[str] = []
    async with asyncio.timeout(5):
        chunks.append(await anext(stream))  # retry
        chunks.append(await anext(stream))  # the events
        await manager.delete_run(run.run_id)
        chunks += [chunk async for chunk in stream]
    assert chunks[0].startswith("retry:")
    assert chunks[1].count("\nevent: ") + chunks[1].startswith("id:") >= 10
    last = chunks[-1]
    assert last.startswith("event: deleted\ndata: ")
    data: dict[str, Any] = json.loads(last.split("data: ", 1)[1])
    assert data == {"type": "deleted", "run_id": run.run_id}


async def test_an_sse_stream_that_finds_the_run_deleted_before_its_first_read(
    manager: RunManager,
) -> None:
    run = await ended_run(manager, 1)
    await manager.delete_run(run.run_id)
    chunks = [chunk async for chunk in event_stream(run, 0)]
    assert chunks[-1].startswith("event: deleted")
