"""End to end over ``/ws`` (PROTOCOL.md §2, §3): a real server, real websockets clients."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from typing import Any

import httpx
import pytest

from tests.conftest import Server
from tests.transport.helpers import Conn, Frame, connect, fold, indexes, is_terminal

# -- delivery ---------------------------------------------------------------------------


async def test_two_watchers_each_get_every_event_once_in_order(server: Server) -> None:
    async with connect(server.ws_url) as a, connect(server.ws_url) as b:
        run = await a.start("counter", {"n": 30, "delay_s": 0.005})
        run_id = run["run_id"]
        await b.ok("subscribe", run_id=run_id)
        async with asyncio.timeout(10):
            seen_a, seen_b = await asyncio.gather(
                a.events_until_end(run_id), b.events_until_end(run_id)
            )
        for events in (seen_a, seen_b):
            assert indexes(events) == list(range(1, 33))
            assert events[0]["data"] == {"status": "running"}
            assert [e["data"]["n"] for e in events[1:-1]] == list(range(1, 31))
            assert events[-1]["data"] == {"status": "completed"}
        assert seen_a == seen_b
        await a.assert_quiet(run_id)
        await b.assert_quiet(run_id)


async def test_start_reply_precedes_every_frame_of_the_run(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        thread_id = (await http.post("/api/threads", json={})).json()["thread_id"]
    async with connect(server.ws_url) as conn:
        await conn.ok("watch_thread", thread_id=thread_id)
        await conn.send_raw(
            json.dumps(
                {
                    "op": "start",
                    "ref": 7,
                    "agent": "counter",
                    "input": {"n": 3},
                    "thread_id": thread_id,
                }
            )
        )
        first = await conn.recv()
        assert first["type"] == "reply" and first["ref"] == 7 and first["ok"], first
        run_id = first["result"]["run"]["run_id"]
        events = await conn.events_until_end(run_id)
        assert indexes(events) == [1, 2, 3, 4, 5]  # nothing missed: starts at i=1


async def test_start_without_subscribe_sends_no_events(server: Server) -> None:
    async with connect(server.ws_url) as conn:
        run = await conn.start("counter", {"n": 3}, subscribe=False)
        # Wait for the end by subscribing on another connection.
        async with connect(server.ws_url) as other:
            await other.ok("subscribe", run_id=run["run_id"])
            await other.events_until_end(run["run_id"])
        await conn.assert_quiet()


async def run_moves_past(server: Server, run_id: str, index: int) -> None:
    """Await (white-box) the run's log reaching ``index``: the client was away a while."""
    run = server.runtime.manager.runs[run_id]
    async with asyncio.timeout(5):
        while run.last_index < index:
            assert not run.ended, f"run ended at {run.last_index}, before {index}"
            await run.wait_after(run.last_index)


@pytest.mark.parametrize("abrupt", [False, True], ids=["close", "abort"])
async def test_reconnect_after_drop_gets_exactly_the_rest(server: Server, abrupt: bool) -> None:
    async with connect(server.ws_url) as first:
        run = await first.start("counter", {"n": 60, "delay_s": 0.01})
        run_id = run["run_id"]
        had = await first.events_until(run_id, lambda e: e["i"] >= 10)
        if abrupt:
            first.ws.transport.abort()
        else:
            await first.ws.close()
    cursor = had[-1]["i"]
    assert not is_terminal(had[-1])
    await run_moves_past(server, run_id, cursor + 5)
    async with connect(server.ws_url) as second:
        reply = await second.ok("subscribe", run_id=run_id, after=cursor)
        assert reply["run"]["run_id"] == run_id
        rest = await second.events_until_end(run_id)
        await second.assert_quiet(run_id)
    assert indexes(rest) == list(range(cursor + 1, 63))
    assert indexes(had + rest) == list(range(1, 63))
    assert rest[-1]["data"]["status"] == "completed"


async def test_reconnect_with_snapshot_gets_the_fold_at_its_cursor(server: Server) -> None:
    async with connect(server.ws_url) as first:
        run = await first.start("demo", {"tokens": 40, "speed": 100})
        run_id = run["run_id"]
        # Past the thinking, the tool call and its result, into the text.
        had = await first.events_until(run_id, lambda e: e["type"] == "text")
        await first.ws.close()
    cursor = had[-1]["i"]
    await run_moves_past(server, run_id, cursor + 5)
    async with connect(server.ws_url) as second:
        await second.ok("subscribe", run_id=run_id, after=cursor, snapshot=True)
        frame = await second.next_frame(lambda f: f["type"] in ("snapshot", "events"))
        assert frame["type"] == "snapshot", frame
        assert frame["run_id"] == run_id and frame["index"] == cursor
        assert frame["epoch"] == run["epoch"]
        state = fold(had)
        assert state["message"]["tools"] and state["message"]["thinking"]
        assert frame["state"] == state
        rest = await second.events_until_end(run_id)
    assert indexes(rest) == list(range(cursor + 1, rest[-1]["i"] + 1))
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        at = (await http.get(f"/api/runs/{run_id}/snapshot", params={"at": cursor})).json()
        full = (await http.get(f"/api/runs/{run_id}/events")).json()["events"]
    assert at["state"] == frame["state"] and at["index"] == cursor
    assert had + rest == full


# -- subscribe cursors ------------------------------------------------------------------


async def wait_requires_action(conn: Conn, run_id: str) -> list[Frame]:
    return await conn.events_until(
        run_id, lambda e: e["type"] == "status" and e["data"]["status"] == "requires_action"
    )


async def test_subscribe_latest_gets_only_what_comes_next(server: Server) -> None:
    async with connect(server.ws_url) as a, connect(server.ws_url) as b:
        run_id = (await a.start("ask", {}))["run_id"]
        had = await wait_requires_action(a, run_id)
        last = had[-1]["i"]
        result = await b.ok("subscribe", run_id=run_id, after="latest", snapshot=True)
        assert result["run"]["last_index"] == last
        assert result["run"]["status"] == "requires_action"
        snap = await b.next_frame(lambda f: f["type"] in ("snapshot", "events"))
        assert snap["type"] == "snapshot" and snap["index"] == last
        assert snap["state"] == fold(had)
        request_id = snap["state"]["pending_input"]["request_id"]
        await b.ok("respond", run_id=run_id, request_id=request_id, value="hi")
        rest = await b.events_until_end(run_id)
        assert indexes(rest) == list(range(last + 1, rest[-1]["i"] + 1))
        assert rest[0]["type"] == "input_received"


async def test_subscribe_after_past_last_index_is_out_of_range(server: Server) -> None:
    async with connect(server.ws_url) as conn:
        run_id = (await conn.start("counter", {"n": 2}))["run_id"]
        events = await conn.events_until_end(run_id)
        error = await conn.error("subscribe", run_id=run_id, after=len(events) + 1)
        assert error["code"] == "cursor_out_of_range"
        assert error["last_index"] == len(events)
        await conn.assert_quiet(run_id)


async def test_subscribe_to_ended_run_at_its_end_gets_the_reply_only(server: Server) -> None:
    async with connect(server.ws_url) as conn:
        run_id = (await conn.start("counter", {"n": 2}))["run_id"]
        events = await conn.events_until_end(run_id)
    async with connect(server.ws_url) as late:
        result = await late.ok("subscribe", run_id=run_id, after=len(events))
        assert result["run"]["status"] == "completed"
        assert result["run"]["last_index"] == len(events)
        await late.assert_quiet()
        assert not late.pending, late.pending
        # From 0 it gets the whole log, then the subscription ends by itself.
        await late.ok("subscribe", run_id=run_id)
        assert await late.events_until_end(run_id) == events
        await late.assert_quiet()


async def test_subscribe_with_another_epoch_gets_a_reset_then_a_snapshot(server: Server) -> None:
    async with connect(server.ws_url) as a, connect(server.ws_url) as b:
        run = await a.start("ask", {})
        run_id = run["run_id"]
        had = await wait_requires_action(a, run_id)
        last = had[-1]["i"]
        # The matching epoch is the current one: the cursor is checked as usual.
        error = await b.error("subscribe", run_id=run_id, after=last + 1, epoch=run["epoch"])
        assert error["code"] == "cursor_out_of_range" and error["last_index"] == last
        await b.ok("subscribe", run_id=run_id, after=last + 10, epoch="stale-epoch")
        reset = await b.next_frame(lambda f: f["type"] != "presence")
        assert reset == {"type": "reset", "run_id": run_id, "epoch": run["epoch"]}
        snap = await b.next_frame(lambda f: f["type"] != "presence")
        assert snap["type"] == "snapshot" and snap["index"] == last
        assert snap["state"] == fold(had)
        request_id = snap["state"]["pending_input"]["request_id"]
        await a.ok("respond", run_id=run_id, request_id=request_id, value="x")
        rest = await b.events_until_end(run_id)
        assert rest[0]["i"] == last + 1
        assert rest == await a.events_until_end(run_id)


async def test_late_subscriber_of_an_evicted_run_reads_it_back(server_factory: Any) -> None:
    server = await server_factory(linger_s=0)
    async with connect(server.ws_url) as conn:
        run_id = (await conn.start("demo", {"tokens": 5, "speed": 1000}))["run_id"]
        live = await conn.events_until_end(run_id)
        await conn.ok("ping")
        assert run_id not in server.runtime.manager.runs  # only SQLite has it now
        result = await conn.ok("subscribe", run_id=run_id, after=4, snapshot=True)
        assert result["run"]["status"] == "completed"
        assert result["run"]["last_index"] == len(live)
        snap = await conn.next_frame(lambda f: f["type"] == "snapshot")
        assert snap["index"] == 4 and snap["state"] == fold(live[:4])
        assert await conn.events_until_end(run_id) == live[4:]
        await conn.assert_quiet()


async def test_resubscribe_replaces_the_earlier_subscription(server: Server) -> None:
    async with connect(server.ws_url) as conn:
        run_id = (await conn.start("counter", {"n": 40, "delay_s": 0.01}))["run_id"]
        await conn.events_until(run_id, lambda e: e["i"] >= 5)
        result = await conn.ok("subscribe", run_id=run_id, after=0, presence=False)
        assert result["run"]["watchers"] == 1
        conn.take("events", run_id)  # what came before the reply was the old subscription
        events = await conn.events_until_end(run_id)
        assert indexes(events) == list(range(1, 43))
        await conn.assert_quiet(run_id)
        assert server.runtime.manager.runs[run_id].watchers == 0


async def test_unsubscribe_stops_the_events(server: Server) -> None:
    async with connect(server.ws_url) as conn:
        run_id = (await conn.start("counter", {"n": 200, "delay_s": 0.01}))["run_id"]
        await conn.events_until(run_id, lambda e: e["i"] >= 2)
        assert await conn.ok("unsubscribe", run_id=run_id) == {}
        conn.take("events", run_id)
        assert server.runtime.manager.runs[run_id].watchers == 0
        await conn.ok("stop", run_id=run_id)
        async with asyncio.timeout(2):
            await server.runtime.manager.runs[run_id].wait_ended()
        await conn.assert_quiet(run_id)
        # Unsubscribing from something not subscribed is harmless.
        assert await conn.ok("unsubscribe", run_id=run_id) == {}


# -- stop ---------------------------------------------------------------------------------


async def test_stop_from_another_connection_reaches_every_subscriber(server: Server) -> None:
    async with (
        connect(server.ws_url) as starter,
        connect(server.ws_url) as watcher,
        connect(server.ws_url) as stopper,
    ):
        run_id = (await starter.start("counter", {"n": 10_000, "delay_s": 0.01}))["run_id"]
        await watcher.ok("subscribe", run_id=run_id)
        await starter.events_until(run_id, lambda e: e["i"] >= 3)
        await watcher.events_until(run_id, lambda e: e["i"] >= 3)
        result = await stopper.ok("stop", run_id=run_id)
        assert result["stopping"] is True
        async with asyncio.timeout(1.0):
            ends = await asyncio.gather(
                starter.events_until_end(run_id), watcher.events_until_end(run_id)
            )
        for events in ends:
            assert events[-1]["data"]["status"] == "stopped"
            assert events[-1]["data"]["by"] == stopper.connection_id
        assert ends[0][-1] == ends[1][-1]
        again = await stopper.ok("stop", run_id=run_id)
        assert again == {"stopping": False, "status": "stopped"}
        await starter.assert_quiet(run_id)
        await watcher.assert_quiet(run_id)


async def test_stop_unknown_run_is_not_found(server: Server) -> None:
    async with connect(server.ws_url) as conn:
        error = await conn.error("stop", run_id="run_does_not_exist")
        assert error["code"] == "not_found"


async def test_stop_while_waiting_for_input(server: Server) -> None:
    async with connect(server.ws_url) as a, connect(server.ws_url) as b:
        run_id = (await a.start("ask", {}))["run_id"]
        had = await wait_requires_action(a, run_id)
        assert (await b.ok("stop", run_id=run_id))["stopping"] is True
        async with asyncio.timeout(1.0):
            rest = await a.events_until_end(run_id)
        assert rest[-1]["data"]["status"] == "stopped"
        request_id = had[-2]["data"]["request_id"]
        error = await b.error("respond", run_id=run_id, request_id=request_id, value=1)
        assert error["code"] == "not_waiting"


# -- multitask ----------------------------------------------------------------------------


async def test_second_start_in_a_busy_thread(server: Server) -> None:
    async with connect(server.ws_url) as a, connect(server.ws_url) as b:
        run = await a.start("ask", {})
        thread_id = run["thread_id"]
        error = await b.error("start", agent="counter", input={"n": 1}, thread_id=thread_id)
        assert error["code"] == "run_in_progress"
        assert error["active_run_id"] == run["run_id"]
        error = await b.error(
            "start", agent="counter", input={"n": 1}, thread_id=thread_id, multitask="bogus"
        )
        assert error["code"] == "bad_request" and error["field"] == "multitask"
        # The active run was left alone, and the thread is free again once it ends.
        await b.ok("stop", run_id=run["run_id"])
        await a.events_until_end(run["run_id"])
        again = await b.start("counter", {"n": 1}, thread_id=thread_id)
        assert again["thread_id"] == thread_id
        assert (await b.events_until_end(again["run_id"]))[-1]["data"]["status"] == "completed"


# -- input --------------------------------------------------------------------------------


async def test_ask_waits_until_another_connection_responds(server: Server) -> None:
    async with (
        connect(server.ws_url) as asker,
        connect(server.ws_url) as answerer,
        httpx.AsyncClient(base_url=server.http_url) as http,
    ):
        run_id = (await asker.start("ask", {"prompt": "colour?"}))["run_id"]
        had = await wait_requires_action(asker, run_id)
        snap = (await http.get(f"/api/runs/{run_id}/snapshot")).json()
        pending = snap["state"]["pending_input"]
        assert snap["state"]["status"] == "requires_action"
        assert pending["prompt"] == "colour?" and pending["request_id"]
        assert (await http.get(f"/api/runs/{run_id}")).json()["status"] == "requires_action"
        # It stays there: nothing more happens until someone answers.
        await asker.assert_quiet(run_id)
        error = await answerer.error(
            "respond", run_id=run_id, request_id="req_wrong", value="purple-42"
        )
        assert error["code"] == "not_waiting"
        await asker.assert_quiet(run_id)
        result = await answerer.ok(
            "respond", run_id=run_id, request_id=pending["request_id"], value="purple-42"
        )
        assert result == {}
        rest = await asker.events_until_end(run_id)
        assert rest[0] == {
            **rest[0],
            "type": "input_received",
            "data": {"request_id": pending["request_id"], "value": "purple-42"},
        }
        assert rest[1]["data"] == {"status": "running"}
        assert rest[-1]["data"]["status"] == "completed"
        state = fold(had + rest)
        assert "purple-42" in state["message"]["content"]
        assert state["pending_input"] is None
        final = (await http.get(f"/api/runs/{run_id}/snapshot")).json()["state"]
        assert final == state
        error = await answerer.error(
            "respond", run_id=run_id, request_id=pending["request_id"], value="again"
        )
        assert error["code"] == "not_waiting"


# -- presence -----------------------------------------------------------------------------


def watchers_are(run_id: str, n: int) -> Any:
    return lambda f: f["type"] == "presence" and f["run_id"] == run_id and f["watchers"] == n


async def test_presence_counts_joins_and_leaves(server: Server) -> None:
    async with connect(server.ws_url) as a, connect(server.ws_url) as b:
        run_id = (await a.start("ask", {}))["run_id"]
        assert (await b.ok("subscribe", run_id=run_id))["run"]["watchers"] == 2
        await a.next_frame(watchers_are(run_id, 2))
        async with connect(server.ws_url) as quiet:
            result = await quiet.ok("subscribe", run_id=run_id, presence=False)
            assert result["run"]["watchers"] == 3
            await a.next_frame(watchers_are(run_id, 3))
            await b.next_frame(watchers_are(run_id, 3))
            await b.ok("unsubscribe", run_id=run_id)
            await a.next_frame(watchers_are(run_id, 2))
            await quiet.ok("ping")
            assert not quiet.take("presence"), "presence: false still got presence frames"
        await a.next_frame(watchers_are(run_id, 1))  # the quiet one left: still counted
        await b.ok("ping")
        assert not b.take("presence", run_id), "presence after unsubscribe"
        await a.ok("stop", run_id=run_id)
        await a.events_until_end(run_id)


async def test_presence_bursts_are_coalesced(server: Server) -> None:
    joiners = 30
    async with connect(server.ws_url) as watcher:
        run_id = (await watcher.start("ask", {}))["run_id"]
        await wait_requires_action(watcher, run_id)
        arrivals: list[tuple[float, int]] = []

        async def presence_until(n: int) -> None:
            while not arrivals or arrivals[-1][1] != n:
                frame = await watcher.next_frame(lambda f: f["type"] == "presence")
                arrivals.append((time.monotonic(), frame["watchers"]))

        async def join(stack: list[tuple[Conn, int]], ready: asyncio.Event) -> None:
            async with connect(server.ws_url) as conn:
                result = await conn.ok("subscribe", run_id=run_id)
                stack.append((conn, result["run"]["watchers"]))
                await ready.wait()

        conns: list[tuple[Conn, int]] = []
        release = asyncio.Event()
        async with asyncio.timeout(10), asyncio.TaskGroup() as group:
            for _ in range(joiners):
                group.create_task(join(conns, release))
            await presence_until(joiners + 1)
            joined = list(arrivals)
            # Every joiner converges on the same count, from its reply or a frame.
            for conn, count in conns:
                if count != joiners + 1:
                    await conn.next_frame(watchers_are(run_id, joiners + 1), timeout_s=2)
                assert len(conn.take("presence")) <= 5
            release.set()
            await presence_until(1)
        left = arrivals[len(joined) :]
        assert len(joined) <= 5, joined
        assert len(left) <= 5, left
        times = [t for t, _ in arrivals]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(gap >= 0.2 for gap in gaps), gaps
        await watcher.ok("stop", run_id=run_id)
        await watcher.events_until_end(run_id)


async def test_a_storm_of_joins_costs_each_watcher_a_bounded_number_of_presence_frames(
    server: Server,
) -> None:
    # C connections join one run with presence on. Each may get at most one presence
    # frame per 250 ms (plus the first), however many joins happen meanwhile: C joins
    # cost O(C) frames in all, not O(C^2).
    joiners = 150
    async with connect(server.ws_url) as starter:
        run_id = (await starter.start("ask", {}))["run_id"]
        await wait_requires_action(starter, run_id)
        seen: list[tuple[Conn, int]] = [(starter, 1)]
        async with contextlib.AsyncExitStack() as stack, asyncio.timeout(30):
            began = time.monotonic()
            for _ in range(joiners):
                conn = await stack.enter_async_context(connect(server.ws_url))
                result = await conn.ok("subscribe", run_id=run_id)
                seen.append((conn, result["run"]["watchers"]))
            # Every connection converges on the final count, from its reply or a frame.
            frames = []
            for conn, count in seen:
                if count != joiners + 1:
                    await conn.next_frame(watchers_are(run_id, joiners + 1), timeout_s=5)
                frames.append(int(count != joiners + 1))
            elapsed_s = time.monotonic() - began
            for index, (conn, _) in enumerate(seen):
                await conn.ok("ping")
                frames[index] += len(conn.take("presence", run_id))
            everyone = [conn for conn, _ in seen]
            per_watcher_bound = elapsed_s / 0.25 + 2
            assert max(frames) <= per_watcher_bound, (max(frames), elapsed_s)
            assert sum(frames) <= len(everyone) * per_watcher_bound
            # And far from one frame per join for everyone (C^2 / 2 = 11,000 here).
            assert sum(frames) < joiners * joiners / 4, sum(frames)
        await starter.ok("stop", run_id=run_id)
        await starter.events_until_end(run_id)


# -- thread watching ----------------------------------------------------------------------


async def test_watch_thread_reports_runs_starting_and_ending(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        thread_id = (await http.post("/api/threads", json={})).json()["thread_id"]
    async with connect(server.ws_url) as tab, connect(server.ws_url) as other:
        result = await tab.ok("watch_thread", thread_id=thread_id)
        assert result["thread"]["thread_id"] == thread_id
        assert result["thread"]["active_run_id"] is None
        run = await other.start("counter", {"n": 3}, thread_id=thread_id)
        await other.events_until_end(run["run_id"])

        def change(name: str) -> Any:
            return lambda f: f["type"] == "thread" and f["change"] == name

        started = await tab.next_frame(change("run_started"))
        ended = await tab.next_frame(change("run_ended"))
        for frame in (started, ended):
            assert frame["thread_id"] == thread_id
            assert frame["run"]["run_id"] == run["run_id"]
            assert isinstance(frame["revision"], int)
        assert ended["run"]["status"] == "completed"
        assert ended["run"]["last_index"] == 5
        # A run in another thread is not reported.
        elsewhere = await other.start("counter", {"n": 1})
        await other.events_until_end(elsewhere["run_id"])
        assert await tab.ok("unwatch_thread", thread_id=thread_id) == {}
        run = await other.start("counter", {"n": 1}, thread_id=thread_id)
        await other.events_until_end(run["run_id"])
        await tab.ok("ping")
        assert not tab.take("thread"), "thread frames after unwatch_thread"
        error = await tab.error("watch_thread", thread_id="thr_does_not_exist")
        assert error["code"] == "not_found"


# -- bad input ----------------------------------------------------------------------------


async def bad(conn: Conn, frame: str | bytes) -> Frame:
    """Send ``frame``; its reply must be an error, and the connection must still serve."""
    await conn.send_raw(frame)
    reply = await conn.reply()
    assert reply["type"] == "reply" and reply["ok"] is False, reply
    assert "ref" in reply
    assert reply["error"]["message"]
    assert (await conn.ok("ping"))["t"] > 0
    return reply


@pytest.mark.parametrize(
    ("frame", "code", "field", "ref"),
    [
        ("{not json", "bad_request", None, None),
        ("[1, 2]", "bad_request", None, None),
        ('"ping"', "bad_request", None, None),
        ('{"ref": 1}', "bad_request", "op", 1),
        ('{"op": "frobnicate", "ref": "x"}', "bad_request", "op", "x"),
        ('{"op": 5, "ref": 2.5}', "bad_request", "op", 2.5),
        ('{"op": "subscribe", "ref": 3}', "bad_request", "run_id", 3),
        ('{"op": "subscribe", "run_id": 5, "ref": 4}', "bad_request", "run_id", 4),
        ('{"op": "subscribe", "run_id": "r", "after": "5", "ref": 5}', "bad_request", "after", 5),
        ('{"op": "subscribe", "run_id": "r", "after": -1, "ref": 6}', "bad_request", "after", 6),
        ('{"op": "start", "agent": "counter", "input": [], "ref": 7}', "bad_request", "input", 7),
        ('{"op": "ping", "extra": 1, "ref": 8}', "bad_request", "extra", 8),
        ('{"op": "ping", "ref": {"a": 1}}', "bad_request", "ref", None),
        ('{"op": "subscribe", "run_id": "run_nope", "ref": 9}', "not_found", None, 9),
        ('{"op": "start", "agent": "nope", "ref": 10}', "unknown_agent", "agent", 10),
        (
            '{"op": "start", "agent": "echo", "thread_id": "thr_nope", "ref": 14}',
            "not_found",
            None,
            14,
        ),
        ('{"op": "watch_thread", "thread_id": "thr_nope", "ref": 15}', "not_found", None, 15),
        (
            '{"op": "start", "agent": "counter", "input": {"n": "many"}, "ref": 11}',
            "bad_request",
            "input.n",
            11,
        ),
        (
            '{"op": "start", "agent": "counter", "input": {}, "ref": 12}',
            "bad_request",
            "input.n",
            12,
        ),
        (
            '{"op": "respond", "run_id": "run_nope", "request_id": "q", "ref": 13}',
            "not_found",
            None,
            13,
        ),
    ],
)
async def test_bad_frames_get_an_error_reply_and_the_connection_lives_on(
    server: Server, frame: str, code: str, field: str | None, ref: Any
) -> None:
    async with connect(server.ws_url) as conn:
        reply = await bad(conn, frame)
        assert reply["ref"] == ref
        assert reply["error"]["code"] == code, reply
        if field is not None:
            assert reply["error"]["field"] == field, reply


async def test_limits_frame_size_and_subscriptions(server_factory: Any) -> None:
    server = await server_factory(max_subscriptions=2, max_frame_bytes=2048)
    async with connect(server.ws_url) as conn:
        big = json.dumps({"op": "ping", "ref": 1, "pad": "x" * 3000})
        reply = await bad(conn, big)
        assert reply["error"]["code"] == "payload_too_large"
        assert reply["ref"] in (None, 1)
        # Just under the limit is read (and fails only for its unknown field).
        fits = json.dumps({"op": "ping", "ref": 2, "pad": "x" * 1900})
        assert (await bad(conn, fits))["error"]["field"] == "pad"

        one = await conn.start("ask", {})
        two = await conn.start("ask", {})
        three = await conn.start("ask", {}, subscribe=False)
        error = await conn.error("subscribe", run_id=three["run_id"])
        assert error["code"] == "too_many_subscriptions"
        # Re-subscribing to a run it holds is a replacement, not one more.
        await conn.ok("subscribe", run_id=one["run_id"], after="latest")
        # A start that would subscribe is held to the same limit, and starts nothing.
        runs_before = len(server.runtime.manager.runs)
        error = await conn.error("start", agent="counter", input={"n": 1})
        assert error["code"] == "too_many_subscriptions"
        assert len(server.runtime.manager.runs) == runs_before
        assert (await conn.ok("ping"))["t"] > 0
        # A subscription frees its slot when its run ends.
        await conn.ok("stop", run_id=two["run_id"])
        await conn.events_until_end(two["run_id"])
        await conn.ok("subscribe", run_id=three["run_id"])
        for run in (one, three):
            await conn.ok("stop", run_id=run["run_id"])
            await conn.events_until_end(run["run_id"])
