"""The Python client against a real server: requests, watch, resume, stop, restart,
tokens; and against a fake one for the refusals a real server makes only on a bad day."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from app.client import (
    Client,
    ClientError,
    ConnectionLostError,
    JsonObject,
    RefusedError,
    Watch,
    http_url_of,
    watch,
)
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


# -- access (PROTOCOL.md §7, §8) ---------------------------------------------------------

ADMIN = "admin-secret-0123456789"
VIEWER = "viewer-secret-0123456789"
TOKENS = (f"admin:{ADMIN}", f"viewer:{VIEWER}")


async def test_a_token_is_accepted_on_the_handshake_and_by_watches(server_factory: Any) -> None:
    server: Server = await server_factory(tokens=TOKENS)
    async with asyncio.timeout(10), Client(server.ws_url, token=ADMIN) as client:
        assert client.welcome["type"] == "welcome"
        run = await client.start("counter", {"n": 20})
        events = await collect(client.watch(run["run_id"]))  # the client's token, by default
    assert_exactly_once(events)
    assert events[-1]["data"]["status"] == "completed"


async def test_a_missing_or_unknown_token_is_refused_with_a_clear_error(
    server_factory: Any,
) -> None:
    server: Server = await server_factory(tokens=TOKENS)
    async with asyncio.timeout(10):
        for token in (None, "not-a-token-of-this-server"):
            with pytest.raises(RefusedError) as caught:
                async with Client(server.ws_url, token=token):
                    pass
            assert caught.value.code == "unauthorized"
            # An HTTP 401, or a close 1008 right after the accept: the same to the caller.
            assert caught.value.status == 401 or caught.value.close_code == 1008
        async with Client(server.ws_url, token=ADMIN) as client:
            run = await client.start("counter", {"n": 3})
        with pytest.raises(RefusedError) as caught:
            await collect(watch(server.ws_url, run["run_id"]))  # no token: not retried
        assert caught.value.code == "unauthorized"


async def test_a_viewer_token_reads_but_may_not_start(server_factory: Any) -> None:
    server: Server = await server_factory(tokens=TOKENS)
    async with asyncio.timeout(10):
        async with Client(server.ws_url, token=ADMIN) as admin:
            run = await admin.start("counter", {"n": 5})
        async with Client(server.ws_url, token=VIEWER) as viewer:
            with pytest.raises(ClientError) as caught:
                await viewer.start("counter", {"n": 1})
            assert caught.value.code == "forbidden" and not isinstance(caught.value, RefusedError)
            assert await viewer.ping() > 0  # a forbidden op leaves the connection open
            events = await collect(viewer.watch(run["run_id"]))
    assert_exactly_once(events)


async def test_revoking_a_share_ends_its_watch_with_4401_and_no_reconnect(
    server_factory: Any,
) -> None:
    server: Server = await server_factory(tokens=TOKENS)
    admin_auth = {"Authorization": f"Bearer {ADMIN}"}
    async with (
        asyncio.timeout(20),
        Client(server.ws_url, token=ADMIN) as client,
        httpx.AsyncClient(base_url=server.http_url, headers=admin_auth) as http,
    ):
        run = await client.start("counter", {"n": 10**6, "delay_s": 0.01})
        response = await http.post(
            f"/api/runs/{run['run_id']}/share", json={"role": "viewer", "expires_in": 600}
        )
        assert response.status_code == 201, response.text
        share = response.json()
        assert share["url"].endswith(f"/#/runs/{run['run_id']}?token={share['token']}")

        async def revoke(_: JsonObject) -> None:
            answer = await http.delete(f"/api/shares/{share['share_id']}")
            assert answer.status_code == 200, answer.text

        w = watch(server.ws_url, run["run_id"], token=share["token"], backoff_s=0.01)
        events: list[JsonObject] = []
        with pytest.raises(RefusedError) as caught:
            async with w:
                async for event in w:
                    events.append(event)
                    if event["i"] == 5:
                        await revoke(event)
        assert caught.value.code == "unauthorized" and caught.value.close_code == 4401
        assert w.reconnects == 0 and len(events) >= 5
        # The revoked token opens nothing any more.
        with pytest.raises(RefusedError):
            async with Client(server.ws_url, token=share["token"]):
                pass
        await client.stop(run["run_id"])


# A fake server, for the refusals of §7 whatever the real server's choice among them.

Handler = Callable[[ServerConnection], Awaitable[None]]
WELCOME = json.dumps({"type": "welcome", "protocol": 1, "server": "fake", "connection_id": "c"})


@asynccontextmanager
async def fake_server(
    handler: Handler, refuse: Callable[[Request], Response | None] | None = None
) -> AsyncIterator[tuple[str, list[Request]]]:
    """A WebSocket server on a free port: ``refuse(request)`` may answer the handshake
    with an HTTP response; ``handler`` runs each accepted connection. Yields its URL and
    the handshake requests it received."""
    requests: list[Request] = []

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        requests.append(request)
        return refuse(request) if refuse is not None else None

    async with serve(handler, "127.0.0.1", 0, process_request=process_request) as ws_server:
        port = next(iter(ws_server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws", requests


async def _serve_welcome_then_close(ws: ServerConnection, code: int, reason: str) -> None:
    await ws.send(WELCOME)
    await ws.close(code, reason)


def _refuse_without(token: str, status: int = 401) -> Callable[[Request], Response | None]:
    def refuse(request: Request) -> Response | None:
        if request.headers.get("Authorization") == f"Bearer {token}":
            return None
        error: JsonObject = {"code": "unauthorized", "message": "a token is needed"}
        if status == 403:
            error = {"code": "forbidden", "message": "origin not allowed"}
        if status == 429:
            error = {"code": "rate_limited", "message": "slow down", "retry_after": 0.05}
        body = {"error": error}
        headers = Headers({"Content-Type": "application/json"})
        return Response(status, "refused", headers, json.dumps(body).encode())

    return refuse


async def _welcome_only(ws: ServerConnection) -> None:
    await ws.send(WELCOME)
    await ws.wait_closed()


async def test_fake_the_token_rides_as_a_bearer_header() -> None:
    async with asyncio.timeout(10), fake_server(_welcome_only, _refuse_without("s3")) as fake:
        url, requests = fake
        async with Client(url, token="s3") as client:
            assert client.welcome["server"] == "fake"
        assert requests[-1].headers["Authorization"] == "Bearer s3"
        for status, code in ((401, "unauthorized"), (403, "forbidden")):
            async with fake_server(_welcome_only, _refuse_without("s3", status)) as (url2, _):
                with pytest.raises(RefusedError) as caught:
                    async with Client(url2, token="wrong"):
                        pass
                assert caught.value.code == code and caught.value.status == status
                assert caught.value.close_code is None
                assert caught.value.message in ("a token is needed", "origin not allowed")


async def test_fake_a_close_1008_after_the_accept_is_a_refusal() -> None:
    async def refuse_after_accept(ws: ServerConnection) -> None:
        await ws.close(1008, "unauthorized: a token is needed")

    async with asyncio.timeout(10), fake_server(refuse_after_accept) as (url, requests):
        with pytest.raises(RefusedError) as caught:
            async with Client(url):
                pass
        assert caught.value.code == "unauthorized" and caught.value.close_code == 1008
        assert caught.value.message == "unauthorized: a token is needed"
        with pytest.raises(RefusedError):
            await collect(watch(url, "run_x", backoff_s=0.01))
        assert len(requests) == 2  # one handshake each: a refusal is not retried


async def test_fake_a_watch_is_not_resumed_after_4401_but_is_after_1011() -> None:
    connections = 0

    async def serve_run(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        await ws.send(WELCOME)
        op = json.loads(await ws.recv())
        info = {"run_id": op["run_id"], "epoch": "e1", "status": "running", "last_index": 0}
        await ws.send(
            json.dumps({"type": "reply", "ref": op["ref"], "ok": True, "result": {"run": info}})
        )
        after = op["after"]
        events = [{"i": i, "type": "tick", "data": {}, "ts": 0.0} for i in (after + 1, after + 2)]
        await ws.send(
            json.dumps({"type": "events", "run_id": op["run_id"], "epoch": "e1", "events": events})
        )
        # The first connection goes as a dead peer does (1011), the second as a revoked token.
        await ws.close(
            1011 if connections == 1 else 4401, "token revoked" if connections > 1 else ""
        )

    async with asyncio.timeout(10), fake_server(serve_run) as (url, _):
        w = watch(url, "run_x", token="s3", backoff_s=0.01)
        got: list[int] = []
        with pytest.raises(RefusedError) as caught:
            async with w:
                async for event in w:
                    got.append(event["i"])
    assert got == [1, 2, 3, 4]
    assert caught.value.code == "unauthorized" and caught.value.close_code == 4401
    assert w.reconnects == 1 and connections == 2


async def test_fake_requests_after_a_4401_raise_the_refusal() -> None:
    async def revoke_soon(ws: ServerConnection) -> None:
        await ws.send(WELCOME)
        await ws.recv()  # the ping: never answered
        await ws.close(4401, "token revoked")

    async with asyncio.timeout(10), fake_server(revoke_soon) as (url, _):
        async with Client(url, token="s3") as client:
            with pytest.raises(RefusedError) as caught:
                await client.ping()
            assert caught.value.close_code == 4401
            with pytest.raises(RefusedError):
                await client.ping()
            assert client.refused is caught.value


async def test_fake_a_rate_limited_handshake_is_retried_after_retry_after() -> None:
    refusals = 2

    def refuse(request: Request) -> Response | None:
        nonlocal refusals
        if refusals == 0:
            return None
        refusals -= 1
        return _refuse_without("never", 429)(request)

    async def ended_run(ws: ServerConnection) -> None:
        await ws.send(WELCOME)
        op = json.loads(await ws.recv())
        info = {"run_id": op["run_id"], "epoch": "e1", "status": "completed", "last_index": 0}
        await ws.send(
            json.dumps({"type": "reply", "ref": op["ref"], "ok": True, "result": {"run": info}})
        )
        await ws.wait_closed()

    async with asyncio.timeout(10), fake_server(ended_run, refuse) as (url, requests):
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await collect(watch(url, "run_x", backoff_s=0.001)) == []
        assert len(requests) == 3 and loop.time() - started >= 0.1  # 2 x retry_after


# -- listing (HTTP) and a deleted run -------------------------------------------------------


async def test_listing_runs_and_threads_page_by_page(server: Server) -> None:
    async with (
        asyncio.timeout(20),
        httpx.AsyncClient(base_url=server.http_url) as http,
        Client(server.ws_url) as client,
    ):
        assert client.http_url == server.http_url
        threads = []
        for k in range(5):
            body = {"title": f"t{k}", "metadata": {"team": "red" if k % 2 else "blue"}}
            threads.append((await http.post("/api/threads", json=body)).json()["thread_id"])
        page = await client.list_threads(limit=2)
        assert [t["thread_id"] for t in page["threads"]] == threads[:2:-1]
        nxt = await client.list_threads(limit=2, cursor=page["next_cursor"])
        assert [t["thread_id"] for t in nxt["threads"]] == threads[2:0:-1]
        assert [t["thread_id"] async for t in client.threads(limit=2)] == threads[::-1]
        red = [t["thread_id"] async for t in client.threads(metadata={"team": "red"})]
        assert red == [threads[3], threads[1]]
        runs = []
        for _ in range(3):
            run = await client.start("counter", {"n": 1}, thread_id=threads[0])
            async with client.watch(run["run_id"]) as events:
                async for _ in events:
                    pass
            runs.append(run["run_id"])
        listed = [r["run_id"] async for r in client.runs(thread_id=threads[0], limit=1)]
        assert listed == runs[::-1]
        page = await client.list_runs(status="completed", agent="counter", limit=10)
        assert [r["run_id"] for r in page["runs"]] == runs[::-1] and page["next_cursor"] is None
        assert (await client.list_runs(metadata={"x": "y"}))["runs"] == []
        with pytest.raises(ClientError) as caught:
            await client.list_runs(cursor="nope")
        assert caught.value.code == "bad_request" and caught.value.details["field"] == "cursor"
    # Listing needs no open WebSocket; an unreachable server is a lost connection.
    with pytest.raises(ConnectionLostError):
        await Client("ws://127.0.0.1:9/ws", open_timeout_s=2).list_threads()


async def test_listing_sends_the_token(server_factory: Any) -> None:
    server = await server_factory(tokens=("viewer:viewer-secret-0123456789",))
    async with asyncio.timeout(10):
        with pytest.raises(ClientError) as caught:
            await Client(server.ws_url).list_runs()
        assert caught.value.code == "unauthorized"
        page = await Client(server.ws_url, token="viewer-secret-0123456789").list_threads()
        assert page == {"threads": [], "next_cursor": None}


def test_the_http_url_of_a_websocket_url() -> None:
    assert http_url_of("ws://127.0.0.1:8000/ws") == "http://127.0.0.1:8000"
    assert http_url_of("wss://example.com/runcast/ws") == "https://example.com/runcast"
    assert Client("ws://h/ws", http_url="http://other:1").http_url == "http://other:1"


async def test_fake_a_watch_of_a_run_deleted_under_it_ends_with_not_found() -> None:
    async def serve_then_delete(ws: ServerConnection) -> None:
        await ws.send(WELCOME)
        op = json.loads(await ws.recv())
        info = {"run_id": op["run_id"], "epoch": "e1", "status": "completed", "last_index": 5}
        await ws.send(
            json.dumps({"type": "reply", "ref": op["ref"], "ok": True, "result": {"run": info}})
        )
        events = [{"i": 1, "type": "tick", "data": {}, "ts": 0.0}]
        await ws.send(
            json.dumps({"type": "events", "run_id": op["run_id"], "epoch": "e1", "events": events})
        )
        await ws.send(json.dumps({"type": "deleted", "run_id": op["run_id"]}))
        await ws.wait_closed()

    async with asyncio.timeout(10), fake_server(serve_then_delete) as (url, _):
        got: list[int] = []
        with pytest.raises(ClientError) as caught:
            async with watch(url, "run_x") as w:
                async for event in w:
                    got.append(event["i"])
    assert got == [1] and caught.value.code == "not_found"
