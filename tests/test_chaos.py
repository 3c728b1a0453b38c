"""``runcast bench chaos`` (app/bench/chaos.py) at a small size: clients that drop, resume,
stop, answer, burst and send bad frames against a server process that is SIGKILLed and
restarted once; every invariant holds and the report says so."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from app.bench.chaos import Stats, Tab, fetch_log, is_terminal
from tests.conftest import Server

pytestmark = pytest.mark.timeout(60)


def test_chaos_holds_every_invariant() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "bench", "chaos", "--clients", "8", "--seconds", "6"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = done.stdout
    assert "duplicates: 0," in report, report
    assert "invariants: ok" in report, report
    assert "kills: 1 " in report, report
    drops = re.search(r"faults injected: (\d+) drops", report)
    assert drops is not None and int(drops.group(1)) > 0, report
    lost = re.search(r"events lost: (\d+) beyond the crash window", report)
    assert lost is not None and lost.group(1) == "0", report
    crashed = re.search(r"crash: (\d+) live runs interrupted", report)
    resets = re.search(r"(\d+) resets", report)
    assert crashed is not None and int(crashed.group(1)) > 0, report
    assert resets is not None and int(resets.group(1)) > 0, report


def test_chaos_refuses_bad_sizes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "bench", "chaos", "--clients", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2, done.stderr


# -- the Tab checker: a resume that replaces a live subscription ---------------------------


def _event(i: int, last: int) -> dict[str, Any]:
    if i == last:
        return {"i": i, "type": "status", "data": {"status": "completed"}, "ts": 0.0}
    return {"i": i, "type": "text", "data": {"text": str(i)}, "ts": 0.0}


def _events(run_id: str, indexes: range | list[int], last: int) -> str:
    events = [_event(i, last) for i in indexes]
    return json.dumps({"type": "events", "run_id": run_id, "epoch": "e1", "events": events})


def _reply(ref: Any, status: str, last: int) -> str:
    run = {"run_id": "run_x", "thread_id": "thr_x", "agent": "counter", "status": status}
    run.update(epoch="e1", last_index=last, created_at=0.0, updated_at=0.0, watchers=1)
    return json.dumps({"type": "reply", "ref": ref, "ok": True, "result": {"run": run}})


@pytest.mark.parametrize(
    ("after_reply", "violation"),
    [
        ([range(2, 6)], None),  # PROTOCOL.md §2: every event after 1 again, once
        ([range(2, 6), [5]], "events of run_x, which it is not subscribed to"),
        ([range(2, 6), [6]], "events of run_x, which it is not subscribed to"),
        ([range(3, 6)], "gap: event 3 after 1"),
        ([[4], range(2, 6)], "gap: event 4 after 1"),  # the replaced one after the reply
        ([range(2, 4), [3]], "event 3 again"),
    ],
    ids=["protocol", "terminal-twice", "after-terminal", "gap", "stale-after-reply", "dup"],
)
async def test_tab_resume_replacing_a_live_subscription(
    after_reply: list[range | list[int]], violation: str | None
) -> None:
    """The subscription being replaced sends up to its terminal event between the
    ``subscribe`` (after 1) and its reply: not a violation, the replacing one sends 2..5
    again. What the server sends after the reply is checked as ever."""

    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "welcome", "protocol": 1, "connection_id": "c"}))
        async for raw in ws:
            frame = json.loads(raw)
            if frame["op"] == "start":
                await ws.send(_reply(frame["ref"], "running", 0))
                await ws.send(_events("run_x", range(1, 4), 5))
            elif frame["op"] == "subscribe":
                await ws.send(_events("run_x", range(4, 6), 5))  # the old subscription
                await ws.send(_reply(frame["ref"], "completed", 5))
                for indexes in after_reply:
                    await ws.send(_events("run_x", indexes, 5))
            else:
                await ws.send(json.dumps({"type": "reply", "ref": frame["ref"], "ok": True}))

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        stats = Stats()
        tab = Tab("t", stats)
        await tab.connect(f"ws://127.0.0.1:{port}")
        await tab.start("counter", {"n": 4})
        stream = tab.streams["run_x"]
        assert await tab.wait_for(lambda: stream.cursor == 3, 5)
        reply = await tab.subscribe("run_x", 1, epoch="e1", resume=stream)
        assert reply["ok"]
        await tab.request("ping")  # every frame sent before its reply has been read
        await tab.close()
    if violation is None:
        assert stats.violations == []
        assert [e["i"] for e in stream.events] == [1, 2, 3, 4, 5]
        assert stream.ended and stream.cursor == 5 and not stream.live
    else:
        assert any(violation in text for text in stats.violations), stats.violations


async def test_tab_resume_of_a_live_run_on_a_real_server(server: Server) -> None:
    """The flaky stateful case, made deterministic: the cursor read, the run ends on the
    old subscription, then the subscribe after that cursor on the same connection."""
    stats = Stats()
    tab = Tab("t0", stats)
    await tab.connect(server.ws_url)
    try:
        reply = await tab.start("demo", {"tokens": 5, "speed": 5000.0})
        run_id = reply["result"]["run"]["run_id"]
        stream = tab.streams[run_id]
        held_cursor = stream.cursor
        assert held_cursor is not None
        assert await tab.wait_for(lambda: stream.ended, 10)
        reply = await tab.subscribe(run_id, held_cursor, epoch=stream.epoch, resume=stream)
        assert reply["ok"] and reply["result"]["run"]["status"] == "completed"
        assert await tab.wait_for(lambda: stream.ended, 10)
        verifier = Tab("verifier", stats)
        await verifier.connect(server.ws_url)
        _, log = await fetch_log(verifier, run_id)
        await verifier.close()
    finally:
        await tab.close()
    assert stats.violations == []
    assert stream.events == log and is_terminal(log[-1])
