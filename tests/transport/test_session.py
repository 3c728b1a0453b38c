"""A WebSocket Session against a fake socket (tests/fakes.py style: a fake, no mock), for
the faults a real client cannot provoke on demand: a reply that cannot be sent, a send
that never completes. The manager and its SQLite store are real."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.websockets import WebSocketDisconnect

from app.access.policy import OPEN
from app.agents.builtin import register_builtins
from app.agents.registry import Registry
from app.config import Settings
from app.engine.manager import EngineSettings, RunManager
from app.store.sqlite import SqliteStore
from app.transport.ws import Session

pytestmark = pytest.mark.timeout(30)


class FakeSocket:
    """What Session uses of starlette's WebSocket. ``inbox`` feeds ``receive``; a send
    whose text contains ``fail_on`` raises as a vanished client's would; one that contains
    ``stall_on`` never completes (a client that stopped reading)."""

    def __init__(self, fail_on: str | None = None, stall_on: str | None = None) -> None:
        self.scope: dict[str, Any] = {"subprotocols": []}
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.closed_with: int | None = None
        self.fail_on = fail_on
        self.stall_on = stall_on
        self.stalled = asyncio.Event()  # set when a send begins to stall

    async def accept(self, subprotocol: str | None = None) -> None:
        pass

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    async def send_text(self, text: str) -> None:
        if self.fail_on is not None and self.fail_on in text:
            raise WebSocketDisconnect(1006)
        if self.stall_on is not None and self.stall_on in text:
            self.stalled.set()
            await asyncio.Event().wait()
        self.sent.append(json.loads(text))

    async def close(self, code: int = 1000) -> None:
        self.closed_with = code
        await self.inbox.put({"type": "websocket.disconnect", "code": code})

    def send_op(self, **frame: Any) -> None:
        self.inbox.put_nowait({"type": "websocket.receive", "text": json.dumps(frame)})


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[RunManager]:
    registry = Registry()
    register_builtins(registry)
    store = SqliteStore(tmp_path / "runcast.db")
    manager = RunManager(store, registry, EngineSettings(shutdown_grace_s=0.5))
    await manager.open()
    try:
        yield manager
    finally:
        await manager.close()
        await store.close()


def session(socket: FakeSocket, manager: RunManager, **settings: Any) -> Session:
    return Session(socket, manager, OPEN, Settings(**settings))  # type: ignore[arg-type]


async def test_a_subscribe_whose_reply_cannot_be_sent_is_not_counted(
    manager: RunManager,
) -> None:
    run = await manager.start("ask", {})
    socket = FakeSocket(fail_on='"type":"reply"')
    socket.send_op(op="subscribe", run_id=run.run_id, ref=1)
    async with asyncio.timeout(5):
        await session(socket, manager).serve()
    # The subscription was attached before the reply failed; it must not count forever.
    assert run.watchers == 0
    manager.stop(run)
    await run.wait_ended()


async def test_a_send_that_makes_no_progress_closes_the_connection_with_4408(
    manager: RunManager,
) -> None:
    run = await manager.start("counter", {"n": 1_000_000})
    socket = FakeSocket(stall_on='"type":"events"')
    socket.send_op(op="subscribe", run_id=run.run_id, ref=1)
    async with asyncio.timeout(5):
        await session(socket, manager, write_timeout_s=0.2).serve()
    assert socket.closed_with == 4408
    assert run.watchers == 0
    assert manager.stop(run)["stopping"] is True
    await run.wait_ended()


async def test_closing_a_session_whose_pump_is_stuck_returns(manager: RunManager) -> None:
    run = await manager.start("counter", {"n": 1_000_000})
    socket = FakeSocket(stall_on='"type":"events"')
    socket.send_op(op="subscribe", run_id=run.run_id, ref=1)
    conn = session(socket, manager)  # the write timeout (30 s) is far away
    serving = asyncio.create_task(conn.serve())
    async with asyncio.timeout(5):
        await socket.stalled.wait()
        assert run.watchers == 1
        await conn.close(1001, timeout_s=0.2)
        await serving
    assert run.watchers == 0
    manager.stop(run)
    await run.wait_ended()
