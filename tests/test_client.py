"""The Python client against a real server: requests, watch, resume, stop, restart."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from app.client import Client, ClientError, ConnectionLostError, JsonObject, Watch, watch
from tests.conftest import Server, Spawned


def assert_exactly_once(events: list[JsonObject], first: int = 1) -> None:
    """Indices first..last with no gap or duplicate, and only the last one terminal."""
    assert [e["i"] for e in events] == list(range(first, first + len(events)))
    statuses = [e["data"]["status"] for e in events if e["type"] == "status"]
    assert all(s in ("queued", "running", "requires_action") for s in statuses[:-1])


async def collect(w: Watch, until: Any = None, then: Any = None) -> list[JsonObject]:
    """Every event of ``w``; calls ``then(event)`` once, on the first event that matches."""
    events: list[JsonObject] = []
    async with w:
        async for event in w:
            events.append(event)
            if until is not None and then is not None and until(event):
                result = then(event)
                if asyncio.iscoroutine(result):
                    await result
                until = None
    return events


# -- requests ---------------------------------------------------------------------------


async def test_welcome_ping_and_bad_request(server: Server) -> None:
    async with asyncio.timeout(10), Client(server.ws_url) as client:
        assert client.welcome["type"] == "welcome" and client.welcome["protocol"] == 1
        assert await client.ping() > 0
        with pytest.raises(ClientError) as caught:
            await client.request("start", agent="counter", input="not an object")
        assert caught.value.code == "bad_request" and caught.value.details["field"] == "input"
        with pytest.raises(ClientError) as caught:
            await client.start("no-such-agent", {})
        assert caught.value.code == "unknown_agent"
        assert await client.ping() > 0  # the connection lives on


async def test_concurrent_requests_get_their_own_replies(server: Server) -> None:
    async with asyncio.timeout(10), Client(server.ws_url) as client:
        runs = await asyncio.gather(*(client.start("counter", {"n": k}) for k in range(20)))
        assert len({run["run_id"] for run in runs}) == 20
        infos = await asyncio.gather(*(client.stop(run["run_id"]) for run in runs))
        assert all(set(info) == {"stopping", "status"} for info in infos)


async def test_second_start_in_a_thread_is_run_in_progress(server: Server) -> None:
    async with asyncio.timeout(10), Client(server.ws_url) as client:
        first = await client.start("counter", {"n": 10**6, "delay_s": 0.01})
        with pytest.raises(ClientError) as caught:
            await client.start("counter", {"n": 1}, thread_id=first["thread_id"])
        assert caught.value.code == "run_in_progress"
        assert caught.value.details["active_run_id"] == first["run_id"]
        assert (await client.stop(first["run_id"]))["stopping"] is True


async def test_start_subscribe_delivers_frames_to_listeners(server: Server) -> None:
    async with asyncio.timeout(10), Client(server.ws_url) as client:
        events: list[JsonObject] = []
        done = asyncio.Event()

        def listener(frame: JsonObject) -> None:
            if frame["type"] == "events":
                events.extend(frame["events"])
                if events[-1]["type"] == "status" and events[-1]["data"]["status"] == "completed":
                    done.set()

        remove = client.add_listener(listener)
        run = await client.start("counter", {"n": 30}, subscribe=True)
        await done.wait()
        remove()
    assert_exactly_once(events)
    assert len(events) == 32 and all(e["type"] == "tick" for e in events[1:-1])
    assert run["status"] in ("queued", "running")


async def test_requests_fail_with_connection_lost_once_closed(server: Server) -> None:
    client = Client(server.ws_url)
    async with asyncio.timeout(10):
        async with client:
            pass
        with pytest.raises(ConnectionLostError):
            await client.ping()


# -- watch ------------------------------------------------------------------------------


async def test_watch_yields_every_event_once_and_ends(server: Server) -> None:
    async with asyncio.timeout(30), Client(server.ws_url) as client:
        run = await client.start("counter", {"n": 2000, "delay_s": 0.0005})
        events = await collect(client.watch(run["run_id"]))
    assert_exactly_once(events)
    assert len(events) == 2002
    assert events[-1]["data"]["status"] == "completed"
    assert [e["data"]["n"] for e in events[1:-1]] == list(range(1, 2001))


async def test_watch_resumes_exactly_once_across_drops(server: Server) -> None:
    drop_at = {150, 600, 601, 1100, 1700}
    async with (
        asyncio.timeout(30),
        Client(server.ws_url) as client,
        httpx.AsyncClient(base_url=server.http_url) as http,
    ):
        run = await client.start("counter", {"n": 2000, "delay_s": 0.0005})
        w = client.watch(run["run_id"], backoff_s=0.01)
        events: list[JsonObject] = []
        statuses_at_drop: list[str] = []
        async with w:
            async for event in w:
                events.append(event)
                if event["i"] in drop_at:
                    w.drop()
                    statuses_at_drop.append(await _status(http, run["run_id"]))
    assert_exactly_once(events)
    assert len(events) == 2002 and events[-1]["data"]["status"] == "completed"
    assert w.reconnects == len(drop_at) and w.resets == 0 and w.cursor == 2002
    assert "running" in statuses_at_drop  # at least one drop hit the run while it was live


async def _status(http: httpx.AsyncClient, run_id: str) -> str:
    status: str = (await http.get(f"/api/runs/{run_id}")).json()["status"]
    return status


async def test_cancelling_a_wait_for_the_next_event_loses_nothing(server: Server) -> None:
    async with asyncio.timeout(20), Client(server.ws_url) as client:
        run = await client.start("counter", {"n": 30, "delay_s": 0.03})
        events: list[JsonObject] = []
        timeouts = 0
        async with client.watch(run["run_id"]) as w:
            events.append(await anext(w))  # connected: from here on only recv is cancelled
            while True:
                try:
                    async with asyncio.timeout(0.01):
                        events.append(await anext(w))
                except TimeoutError:
                    timeouts += 1
                except StopAsyncIteration:
                    break
    assert_exactly_once(events)
    assert len(events) == 32 and timeouts > 10 and w.reconnects == 0


async def test_watch_from_a_cursor_with_snapshot(server: Server) -> None:
    async with asyncio.timeout(10), Client(server.ws_url) as client:
        run = await client.start("demo", {"tokens": 5, "speed": 1000})
        full = await collect(client.watch(run["run_id"]))
        w = client.watch(run["run_id"], after=4, snapshot=True)
        tail = await collect(w)
    assert tail == full[4:]
    assert w.snapshot is not None and w.snapshot["index"] == 4
    assert w.snapshot["state"]["message"]["thinking"] != ""


async def test_watch_of_an_ended_run_at_its_end_yields_nothing(server: Server) -> None:
    async with asyncio.timeout(10), Client(server.ws_url) as client:
        run = await client.start("counter", {"n": 3})
        events = await collect(client.watch(run["run_id"]))
        w = client.watch(run["run_id"], after=len(events), snapshot=True)
        assert await collect(w) == []
    assert w.snapshot is not None and w.snapshot["state"]["status"] == "completed"


async def test_watch_errors(server: Server) -> None:
    async with asyncio.timeout(10), Client(server.ws_url) as client:
        with pytest.raises(ClientError) as caught:
            await collect(client.watch("run_nope"))
        assert caught.value.code == "not_found"
        run = await client.start("counter", {"n": 3})
        await collect(client.watch(run["run_id"]))
        with pytest.raises(ClientError) as caught:
            await collect(client.watch(run["run_id"], after=99))
        assert caught.value.code == "cursor_out_of_range"
        assert caught.value.details["last_index"] == 5


async def test_watch_gives_up_after_bounded_attempts(server: Server) -> None:
    async with asyncio.timeout(10), Client(server.ws_url) as client:
        run = await client.start("counter", {"n": 3})
    url = server.ws_url.rsplit(":", 1)[0] + ":1/ws"  # nothing listens on port 1
    w = watch(url, run["run_id"], max_attempts=3, backoff_s=0.01)
    async with asyncio.timeout(10):
        with pytest.raises(ConnectionLostError):
            await collect(w)


async def test_stop_from_a_second_client_ends_the_watch(server: Server) -> None:
    async with asyncio.timeout(20), Client(server.ws_url) as a, Client(server.ws_url) as b:
        run = await a.start("counter", {"n": 10**6, "delay_s": 0.001})
        stopped: list[JsonObject] = []

        async def stop(_: JsonObject) -> None:
            stopped.append(await b.stop(run["run_id"]))

        events = await collect(a.watch(run["run_id"]), until=lambda e: e["i"] >= 20, then=stop)
        again = await b.stop(run["run_id"])
    assert stopped == [{"stopping": True, "status": "running"}]
    assert again == {"stopping": False, "status": "stopped"}
    assert_exactly_once(events)
    assert events[-1]["data"]["status"] == "stopped"


async def test_ask_answered_by_a_second_client(server: Server) -> None:
    async with asyncio.timeout(20), Client(server.ws_url) as a, Client(server.ws_url) as b:
        run = await a.start("ask", {"prompt": "name?"})

        async def answer(event: JsonObject) -> None:
            await b.respond(run["run_id"], event["data"]["request_id"], "forty-two")

        events = await collect(
            a.watch(run["run_id"]), until=lambda e: e["type"] == "input_required", then=answer
        )
        with pytest.raises(ClientError) as caught:
            await b.respond(run["run_id"], "req_stale", "again")
        assert caught.value.code == "not_waiting"
    assert_exactly_once(events)
    types = [e["type"] for e in events]
    assert types.index("input_required") < types.index("input_received") < types.index("text")
    text = "".join(e["data"]["text"] for e in events if e["type"] == "text")
    assert "forty-two" in text
    assert events[-1]["data"]["status"] == "completed"


# -- restarts ---------------------------------------------------------------------------


async def test_watch_across_a_clean_restart(server_factory: Any) -> None:
    first: Server = await server_factory()
    reached = asyncio.Event()
    async with asyncio.timeout(30):
        async with Client(first.ws_url) as client:
            run = await client.start("counter", {"n": 10**6, "delay_s": 0.001})
        w = watch(first.ws_url, run["run_id"])
        async with asyncio.TaskGroup() as group:
            watching = group.create_task(
                collect(w, until=lambda e: e["i"] >= 50, then=lambda _: reached.set())
            )
            await reached.wait()
            await server_factory.stop(first)
        events = watching.result()
        assert_exactly_once(events)
        assert events[-1]["data"] == {"status": "interrupted", "reason": "shutdown"}

        second: Server = await server_factory()
        resumed = watch(second.ws_url, run["run_id"], after=w.cursor, epoch=w.epoch)
        assert await collect(resumed) == []
        assert resumed.resets == 0 and resumed.epoch == w.epoch
        # The shutdown flushed every event: a fresh watch sees the same log.
        assert await collect(watch(second.ws_url, run["run_id"])) == events


async def test_watch_survives_a_crash_and_restart(spawn: Any) -> None:
    first: Spawned = spawn()
    reached = asyncio.Event()
    async with asyncio.timeout(40):
        async with Client(first.ws_url) as client:
            run = await client.start("counter", {"n": 10**6, "delay_s": 0.001})
        w = watch(first.ws_url, run["run_id"], max_attempts=None, backoff_s=0.02, max_backoff_s=0.2)
        async with asyncio.TaskGroup() as group:
            watching = group.create_task(
                collect(w, until=lambda e: e["i"] >= 100, then=lambda _: reached.set())
            )
            await reached.wait()
            old_epoch = w.epoch
            first.process.kill()  # SIGKILL: no shutdown, events after the last flush are lost
            await asyncio.to_thread(first.process.wait)
            second: Spawned = await asyncio.to_thread(spawn)
            w.url = second.ws_url
        events = watching.result()
    assert_exactly_once(events)
    assert len(events) >= 100 and events[-1]["type"] == "tick"
    assert w.reconnects == 1 and w.resets == 1 and w.epoch != old_epoch
    assert w.snapshot is not None and w.snapshot["epoch"] == w.epoch
    assert w.snapshot["state"]["status"] == "interrupted"
    assert w.info is not None and w.cursor == w.snapshot["index"] == w.info["last_index"]
