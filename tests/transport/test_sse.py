"""End to end over Server-Sent Events (PROTOCOL.md §5): ``GET /api/runs/{id}/events``
with ``Accept: text/event-stream``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import httpx
import pytest

from tests.conftest import Server
from tests.transport.helpers import Frame, is_terminal, read_sse, sse_events

SSE = {"Accept": "text/event-stream"}


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        yield client


async def start(http: httpx.AsyncClient, agent: str, input: Frame) -> str:
    response = await http.post("/api/runs", json={"agent": agent, "input": input})
    assert response.status_code == 201, response.text
    run_id: str = response.json()["run_id"]
    return run_id


def check_stream(stream: list[Frame], first: int) -> None:
    """``id`` is ``i``, ``event`` is ``type``, indexes run on from ``first`` with no gap,
    and the stream ends with the terminal event (and only there)."""
    assert stream, "empty stream"
    for position, item in enumerate(stream):
        event = item["data"]
        assert item["id"] == str(event["i"]) == str(first + position)
        assert item["event"] == event["type"]
        assert set(event) == {"i", "type", "data", "ts"}
    assert is_terminal(stream[-1]["data"])
    assert not any(is_terminal(item["data"]) for item in stream[:-1])


async def test_stream_from_the_start_to_the_end(http: httpx.AsyncClient) -> None:
    run_id = await start(http, "counter", {"n": 25, "delay_s": 0.005})
    async with asyncio.timeout(10):
        stream = await read_sse(http, run_id)  # returns only once the server ends it
    check_stream(stream, 1)
    assert len(stream) == 27
    assert stream[-1]["data"]["data"] == {"status": "completed"}
    page = (await http.get(f"/api/runs/{run_id}/events")).json()
    assert [item["data"] for item in stream] == page["events"]


async def test_resume_with_last_event_id_gets_exactly_the_rest(http: httpx.AsyncClient) -> None:
    run_id = await start(http, "counter", {"n": 60, "delay_s": 0.01})
    had: list[Frame] = []
    async with asyncio.timeout(10):
        async with aclosing(sse_events(http, run_id)) as reader:
            async for item in reader:
                had.append(item)
                if item["data"]["i"] >= 8:
                    break  # the reader drops mid-run
        assert not is_terminal(had[-1]["data"])
        last_id = had[-1]["id"]
        assert last_id is not None
        rest = await read_sse(http, run_id, {"Last-Event-ID": last_id})
    check_stream(rest, int(last_id) + 1)
    check_stream(had + rest, 1)
    assert len(had + rest) == 62


async def test_two_readers_of_a_live_run_get_identical_streams(http: httpx.AsyncClient) -> None:
    run_id = await start(http, "demo", {"tokens": 30, "speed": 300})
    async with asyncio.timeout(10):
        one, two = await asyncio.gather(read_sse(http, run_id), read_sse(http, run_id))
    check_stream(one, 1)
    assert one == two
    assert one[-1]["data"]["data"]["status"] == "completed"


async def test_stop_ends_the_stream(http: httpx.AsyncClient) -> None:
    run_id = await start(http, "counter", {"n": 10_000, "delay_s": 0.01})
    stream: list[Frame] = []
    async with asyncio.timeout(5):
        async for item in sse_events(http, run_id):
            stream.append(item)
            if item["data"]["i"] == 3:
                assert (await http.post(f"/api/runs/{run_id}/stop")).json()["stopping"]
    check_stream(stream, 1)
    assert stream[-1]["data"]["data"] == {"status": "stopped", "by": "http"}


async def test_cursors_of_an_ended_run(http: httpx.AsyncClient) -> None:
    run_id = await start(http, "counter", {"n": 3})
    async with asyncio.timeout(10):
        whole = await read_sse(http, run_id)
        check_stream(whole, 1)
        after = await read_sse(http, run_id, params={"after": 2})
        assert after == whole[2:]
        # Last-Event-ID (the browser's reconnect) wins over the query.
        resumed = await read_sse(http, run_id, {"Last-Event-ID": "3"}, {"after": 1})
        assert resumed == whole[3:]
        assert await read_sse(http, run_id, {"Last-Event-ID": str(len(whole))}) == []
    past = await http.get(
        f"/api/runs/{run_id}/events", headers={**SSE, "Last-Event-ID": str(len(whole) + 1)}
    )
    assert past.status_code == 422
    assert past.json()["error"]["code"] == "cursor_out_of_range"
    assert past.json()["error"]["last_index"] == len(whole)
    bad = await http.get(f"/api/runs/{run_id}/events", headers={**SSE, "Last-Event-ID": "x"})
    assert bad.status_code == 422
    assert bad.json()["error"] == {**bad.json()["error"], "code": "bad_request"}
    assert bad.json()["error"]["field"] == "Last-Event-ID"
    missing = await http.get("/api/runs/run_nope/events", headers=SSE)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
