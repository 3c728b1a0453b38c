"""End to end over the HTTP API (PROTOCOL.md §5, §7): a real server, a real httpx client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import Server
from tests.transport.helpers import Frame, fold, indexes, wait_status

RUN_INFO_KEYS = {
    "run_id",
    "thread_id",
    "agent",
    "status",
    "epoch",
    "last_index",
    "created_at",
    "updated_at",
    "watchers",
    "title",
    "metadata",
}
THREAD_INFO_KEYS = {
    "thread_id",
    "revision",
    "head",
    "active_run_id",
    "title",
    "metadata",
    "created_at",
    "updated_at",
}


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        yield client


async def start(http: httpx.AsyncClient, agent: str, input: Frame, **fields: Any) -> Frame:
    response = await http.post("/api/runs", json={"agent": agent, "input": input, **fields})
    assert response.status_code == 201, response.text
    run: Frame = response.json()
    return run


async def run_to_end(http: httpx.AsyncClient, agent: str, input: Frame, **fields: Any) -> Frame:
    run = await start(http, agent, input, **fields)
    await wait_status(http, run["run_id"], {"completed", "failed", "stopped", "interrupted"})
    return run


def error_of(response: httpx.Response, status: int, code: str) -> Frame:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    error: Frame = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    return error


# -- routes -------------------------------------------------------------------------------


async def test_health(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/health")
    assert response.status_code == 200
    assert response.json()["ok"] is True


async def test_agents_list_the_builtins_with_input_schemas(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/agents")
    assert response.status_code == 200
    agents = {agent["name"]: agent for agent in response.json()["agents"]}
    assert {"counter", "demo", "ask", "echo"} <= set(agents)
    for agent in agents.values():
        assert isinstance(agent["description"], str)
        assert agent["input_schema"]["type"] == "object"
    counter = agents["counter"]["input_schema"]
    assert {"n", "delay_s", "start_delay_s"} <= set(counter["properties"])
    assert counter["required"] == ["n"]


async def test_create_and_read_a_run(http: httpx.AsyncClient) -> None:
    run = await start(http, "counter", {"n": 3})
    assert set(run) == RUN_INFO_KEYS
    assert run["agent"] == "counter" and run["status"] in ("queued", "running")
    await wait_status(http, run["run_id"], {"completed"})
    response = await http.get(f"/api/runs/{run['run_id']}")
    assert response.status_code == 200
    info = response.json()
    assert set(info) == RUN_INFO_KEYS
    assert info["status"] == "completed" and info["last_index"] == 5
    assert info["run_id"] == run["run_id"] and info["thread_id"] == run["thread_id"]
    assert info["epoch"] == run["epoch"] and info["created_at"] == run["created_at"]
    assert info["updated_at"] >= info["created_at"]


async def test_list_runs_filters(http: httpx.AsyncClient) -> None:
    thread_id = (await http.post("/api/threads", json={})).json()["thread_id"]
    first = await run_to_end(http, "counter", {"n": 1}, thread_id=thread_id)
    second = await run_to_end(http, "counter", {"n": 1}, thread_id=thread_id)
    elsewhere = await run_to_end(http, "counter", {"n": 1})
    waiting = await start(http, "ask", {})
    await wait_status(http, waiting["run_id"], {"requires_action"})

    async def listed(**params: Any) -> list[str]:
        response = await http.get("/api/runs", params=params)
        assert response.status_code == 200, response.text
        runs = response.json()["runs"]
        assert all(set(run) == RUN_INFO_KEYS for run in runs)
        return [run["run_id"] for run in runs]

    in_thread = await listed(thread_id=thread_id)
    assert sorted(in_thread) == sorted([first["run_id"], second["run_id"]])
    assert set(await listed()) == {
        first["run_id"],
        second["run_id"],
        elsewhere["run_id"],
        waiting["run_id"],
    }
    assert await listed(status="requires_action") == [waiting["run_id"]]
    assert waiting["run_id"] not in await listed(status="completed")
    assert sorted(await listed(status="completed", thread_id=thread_id)) == sorted(in_thread)
    assert await listed(status="failed") == []
    assert len(await listed(limit=1)) == 1
    assert len(await listed(limit=3)) == 3
    for bad in ("0", "-1", "many"):
        error = error_of(await http.get("/api/runs", params={"limit": bad}), 422, "bad_request")
        assert error["field"] == "limit"
    await http.post(f"/api/runs/{waiting['run_id']}/stop")


async def test_list_runs_by_status_sees_live_changes_before_they_are_flushed(
    server_factory: Any,
) -> None:
    # The flusher writes the run's row long after its status changes in memory.
    server = await server_factory(flush_interval_s=30)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        waiting = await start(http, "ask", {})
        await wait_status(http, waiting["run_id"], {"requires_action"})
        listed = (await http.get("/api/runs", params={"status": "requires_action"})).json()
        assert [run["run_id"] for run in listed["runs"]] == [waiting["run_id"]]
        listed = (await http.get("/api/runs", params={"status": "queued"})).json()
        assert listed["runs"] == []
        await http.post(f"/api/runs/{waiting['run_id']}/stop")


async def test_snapshot_at_every_index_is_the_fold(http: httpx.AsyncClient) -> None:
    run = await run_to_end(http, "demo", {"tokens": 8, "speed": 1000, "prompt": "hi"})
    run_id = run["run_id"]
    events = (await http.get(f"/api/runs/{run_id}/events")).json()["events"]
    assert indexes(events) == list(range(1, len(events) + 1))
    assert {"thinking", "tool_call", "tool_result", "usage", "text"} <= {e["type"] for e in events}
    for n in range(len(events) + 1):
        response = await http.get(f"/api/runs/{run_id}/snapshot", params={"at": n})
        assert response.status_code == 200, response.text
        snapshot = response.json()
        assert snapshot["run_id"] == run_id and snapshot["index"] == n
        assert snapshot["epoch"] == run["epoch"]
        assert snapshot["state"] == fold(events[:n]), n
    latest = (await http.get(f"/api/runs/{run_id}/snapshot")).json()
    assert latest["index"] == len(events)
    assert latest["state"] == fold(events)
    assert latest["state"]["status"] == "completed"
    response = await http.get(f"/api/runs/{run_id}/snapshot", params={"at": len(events) + 1})
    error = error_of(response, 422, "cursor_out_of_range")
    assert error["last_index"] == len(events) and error["field"] == "at"
    for bad in ("-1", "x"):
        response = await http.get(f"/api/runs/{run_id}/snapshot", params={"at": bad})
        assert error_of(response, 422, "bad_request")["field"] == "at"


async def test_events_pages(http: httpx.AsyncClient) -> None:
    run = await run_to_end(http, "counter", {"n": 20})
    run_id = run["run_id"]
    whole = (await http.get(f"/api/runs/{run_id}/events")).json()
    assert whole["last_index"] == 22 and whole["status"] == "completed"
    assert whole["epoch"] == run["epoch"]
    assert indexes(whole["events"]) == list(range(1, 23))
    for event in whole["events"]:
        assert set(event) == {"i", "type", "data", "ts"}
    paged: list[Frame] = []
    cursor = 0
    while cursor < whole["last_index"]:
        page = await http.get(f"/api/runs/{run_id}/events", params={"after": cursor, "limit": 7})
        assert page.status_code == 200
        events = page.json()["events"]
        assert 1 <= len(events) <= 7
        paged.extend(events)
        cursor = events[-1]["i"]
    assert paged == whole["events"]
    end = (await http.get(f"/api/runs/{run_id}/events", params={"after": 22})).json()
    assert end["events"] == [] and end["last_index"] == 22
    response = await http.get(f"/api/runs/{run_id}/events", params={"after": 23})
    assert error_of(response, 422, "cursor_out_of_range")["last_index"] == 22
    for params in ({"after": "-1"}, {"after": "x"}, {"limit": "0"}):
        response = await http.get(f"/api/runs/{run_id}/events", params=params)
        assert error_of(response, 422, "bad_request")["field"] == next(iter(params))


async def test_stop(http: httpx.AsyncClient) -> None:
    run = await start(http, "counter", {"n": 10_000, "delay_s": 0.01})
    run_id = run["run_id"]
    await wait_status(http, run_id, {"running"})
    response = await http.post(f"/api/runs/{run_id}/stop")
    assert response.status_code == 200
    assert response.json()["stopping"] is True
    events = await wait_status(http, run_id, {"stopped"})
    assert events[-1]["data"]["by"] == "http"
    response = await http.post(f"/api/runs/{run_id}/stop")
    assert response.status_code == 200
    assert response.json() == {"stopping": False, "status": "stopped"}
    error_of(await http.post("/api/runs/run_nope/stop"), 404, "not_found")


async def test_respond(http: httpx.AsyncClient) -> None:
    run = await start(http, "ask", {"prompt": "name?"})
    run_id = run["run_id"]
    await wait_status(http, run_id, {"requires_action"})
    pending = (await http.get(f"/api/runs/{run_id}/snapshot")).json()["state"]["pending_input"]
    assert pending["prompt"] == "name?"
    response = await http.post(
        f"/api/runs/{run_id}/respond", json={"request_id": "req_stale", "value": 1}
    )
    error_of(response, 409, "not_waiting")
    response = await http.post(f"/api/runs/{run_id}/respond", json={"value": 1})
    assert error_of(response, 422, "bad_request")["field"] == "request_id"
    response = await http.post(
        f"/api/runs/{run_id}/respond",
        json={"request_id": pending["request_id"], "value": {"name": "Ada"}},
    )
    assert response.status_code == 200 and response.json() == {}
    await wait_status(http, run_id, {"completed"})
    state = (await http.get(f"/api/runs/{run_id}/snapshot")).json()["state"]
    assert "Ada" in state["message"]["content"] and state["pending_input"] is None
    response = await http.post(
        f"/api/runs/{run_id}/respond", json={"request_id": pending["request_id"], "value": 2}
    )
    error_of(response, 409, "not_waiting")
    response = await http.post(
        "/api/runs/run_nope/respond", json={"request_id": pending["request_id"]}
    )
    error_of(response, 404, "not_found")


async def test_threads(http: httpx.AsyncClient) -> None:
    response = await http.post("/api/threads", json={"metadata": {"title": "t1"}})
    assert response.status_code == 201
    thread = response.json()
    assert set(thread) == THREAD_INFO_KEYS
    assert thread["metadata"] == {"title": "t1"} and thread["active_run_id"] is None
    response = await http.get(f"/api/threads/{thread['thread_id']}")
    assert response.status_code == 200
    read = response.json()
    assert {k: read[k] for k in THREAD_INFO_KEYS} == thread
    assert read["turns"] == []
    assert (await http.post("/api/threads", json={})).json()["metadata"] == {}
    empty = await http.post(
        "/api/threads", content=b"", headers={"content-type": "application/json"}
    )
    # An absent body is not an object: a bad request, like any other non-object.
    error_of(empty, 400, "bad_request")
    # The thread shows its active run while one is live.
    run = await start(http, "ask", {}, thread_id=thread["thread_id"])
    read = (await http.get(f"/api/threads/{thread['thread_id']}")).json()
    assert read["active_run_id"] == run["run_id"]
    await http.post(f"/api/runs/{run['run_id']}/stop")
    await wait_status(http, run["run_id"], {"stopped"})
    read = (await http.get(f"/api/threads/{thread['thread_id']}")).json()
    assert read["active_run_id"] is None
    response = await http.post(
        "/api/runs", json={"agent": "counter", "input": {"n": 1}, "thread_id": "thr_nope"}
    )
    error_of(response, 404, "not_found")


async def test_openapi_document_lists_the_routes(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert {
        "/api/health",
        "/api/agents",
        "/api/runs",
        "/api/runs/{run_id}",
        "/api/runs/{run_id}/snapshot",
        "/api/runs/{run_id}/events",
        "/api/runs/{run_id}/stop",
        "/api/runs/{run_id}/respond",
        "/api/threads",
        "/api/threads/{thread_id}",
    } <= set(document["paths"])
    assert set(document["paths"]["/api/runs"]) == {"get", "post"}


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b'"agent"', b"null", b"\xff\xfe"],
    ids=["not-json", "array", "string", "null", "not-utf8"],
)
async def test_body_not_a_json_object_is_400(http: httpx.AsyncClient, body: bytes) -> None:
    for path in ("/api/runs", "/api/threads"):
        response = await http.post(path, content=body, headers={"content-type": "application/json"})
        error = error_of(response, 400, "bad_request")
        assert "field" not in error


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"input": {"n": 1}}, "bad_request", "agent"),
        ({"agent": 5}, "bad_request", "agent"),
        ({"agent": "counter", "input": []}, "bad_request", "input"),
        ({"agent": "counter", "input": {"n": 1}, "multitask": "bogus"}, "bad_request", "multitask"),
        ({"agent": "counter", "input": {"n": 1}, "extra": True}, "bad_request", "extra"),
        ({"agent": "counter", "input": {"n": "many"}}, "bad_request", "input.n"),
        ({"agent": "counter", "input": {"n": 1, "delay_s": -1}}, "bad_request", "input.delay_s"),
        ({"agent": "nope", "input": {}}, "unknown_agent", "agent"),
    ],
)
async def test_bad_fields_are_422_naming_the_field(
    http: httpx.AsyncClient, body: Frame, code: str, field: str
) -> None:
    error = error_of(await http.post("/api/runs", json=body), 422, code)
    assert error["field"] == field


async def test_unknown_things_are_404(http: httpx.AsyncClient) -> None:
    for path in (
        "/api/runs/run_nope",
        "/api/runs/run_nope/snapshot",
        "/api/runs/run_nope/events",
        "/api/threads/thr_nope",
        "/api/nope",
        "/api/runs/run_nope/nope",
    ):
        error_of(await http.get(path), 404, "not_found")
    error_of(await http.post("/api/nope", json={}), 404, "not_found")


async def test_busy_thread_is_409_run_in_progress(http: httpx.AsyncClient) -> None:
    run = await start(http, "ask", {})
    body = {"agent": "counter", "input": {"n": 1}, "thread_id": run["thread_id"]}
    error = error_of(await http.post("/api/runs", json=body), 409, "run_in_progress")
    assert error["active_run_id"] == run["run_id"]
    response = await http.post("/api/runs", json={**body, "multitask": "sometimes"})
    assert error_of(response, 422, "bad_request")["field"] == "multitask"
    queued = await http.post("/api/runs", json={**body, "multitask": "enqueue"})
    assert queued.status_code == 201 and queued.json()["status"] == "queued"
    await http.post(f"/api/runs/{run['run_id']}/stop")


async def test_body_too_large_is_413(server_factory: Any) -> None:
    server = await server_factory(max_frame_bytes=2048)
    body = b'{"agent": "counter", "input": {"n": 1}, "pad": "' + b"x" * 3000 + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for start_at in range(0, len(body), 512):
            yield body[start_at : start_at + 512]
            await asyncio.sleep(0)

    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        # Declared with Content-Length, then streamed without one.
        for content in (body, chunks()):
            response = await http.post(
                "/api/runs", content=content, headers={"content-type": "application/json"}
            )
            error_of(response, 413, "payload_too_large")
        assert (await http.get("/api/runs")).json()["runs"] == []
