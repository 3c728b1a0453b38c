"""Records people keep, end to end (PROTOCOL.md §5, §6, §10): titles and metadata on
runs and threads, listing with cursors, ``aside``, ``edit`` saved without a run, and
deleting for good, over WebSocket ops and HTTP routes of a real server on a real SQLite
file. Runs are awaited through a subscription or the SSE stream, never by sleeping.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server
from tests.transport.helpers import Conn, Frame, connect, fold, open_conn, wait_status
from tests.transport.test_threads import (
    Api,
    HttpApi,
    WsApi,
    exchange,
    history_of,
    new_thread,
    read_thread,
    said,
    watch_until,
)

pytestmark = pytest.mark.timeout(60)

SECRETS = {"viewer": "viewer-secret-0123456789", "admin": "admin-secret-0123456789"}
TOKENS = tuple(f"{role}:{secret}" for role, secret in SECRETS.items())


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        yield client


@pytest.fixture(params=["ws", "http"])
async def api(
    request: pytest.FixtureRequest, server: Server, http: httpx.AsyncClient
) -> AsyncIterator[Api]:
    if request.param == "ws":
        async with connect(server.ws_url) as conn:
            yield WsApi(conn)
    else:
        yield HttpApi(http)


def error_of(response: httpx.Response, status: int, code: str) -> Frame:
    assert response.status_code == status, response.text
    error: Frame = response.json()["error"]
    assert error["code"] == code, error
    return error


async def ended(http: httpx.AsyncClient, run_id: str) -> None:
    await wait_status(http, run_id, {"completed", "failed", "stopped", "interrupted"}, 10)


# -- titles and metadata ------------------------------------------------------------------


async def test_a_thread_is_titled_at_creation_and_renamed_by_patch(
    server: Server, http: httpx.AsyncClient
) -> None:
    created = await http.post(
        "/api/threads", json={"title": "Plans", "metadata": {"project": "alpha", "n": 1}}
    )
    assert created.status_code == 201, created.text
    thread = created.json()
    assert (thread["title"], thread["metadata"], thread["revision"]) == (
        "Plans",
        {"project": "alpha", "n": 1},
        0,
    )
    thread_id = thread["thread_id"]
    async with connect(server.ws_url) as watcher:
        await watcher.ok("watch_thread", thread_id=thread_id)
        path = f"/api/threads/{thread_id}"
        renamed = await http.patch(path, json={"title": "Holiday plans", "expected_revision": 0})
        assert renamed.status_code == 200, renamed.text
        info = renamed.json()
        assert (info["title"], info["metadata"], info["revision"]) == (
            "Holiday plans",
            {"project": "alpha", "n": 1},
            1,
        )
        assert "turns" not in info
        # metadata is a JSON Merge Patch: null removes a key, objects merge.
        merged = await http.patch(path, json={"metadata": {"n": None, "tags": {"a": 1}}})
        assert merged.json()["metadata"] == {"project": "alpha", "tags": {"a": 1}}
        assert merged.json()["title"] == "Holiday plans"
        merged = await http.patch(path, json={"metadata": {"tags": {"b": 2}}, "title": None})
        assert merged.json()["metadata"] == {"project": "alpha", "tags": {"a": 1, "b": 2}}
        assert merged.json()["title"] is None and merged.json()["revision"] == 3
        # A stale revision is a conflict and changes nothing.
        stale = await http.patch(path, json={"title": "late", "expected_revision": 1})
        error = error_of(stale, 409, "conflict")
        assert (error["expected_revision"], error["actual_revision"]) == (1, 3)
        frames = await watch_until(watcher, thread_id, lambda f: f["revision"] == 3)
        assert [(f["change"], f["revision"]) for f in frames] == [
            ("updated", 1),
            ("updated", 2),
            ("updated", 3),
        ]
        await watcher.assert_quiet()
    read = await read_thread(http, thread_id)
    assert (read["title"], read["revision"]) == (None, 3)


async def test_metadata_over_16_kib_and_bad_fields_are_refused(http: httpx.AsyncClient) -> None:
    big = {"blob": "x" * (16 * 1024)}
    error = error_of(
        await http.post("/api/threads", json={"metadata": big}), 413, "payload_too_large"
    )
    assert error["field"] == "metadata"
    thread = (await http.post("/api/threads", json={"metadata": {"k": "v"}})).json()
    path = f"/api/threads/{thread['thread_id']}"
    half = {"a": "x" * (9 * 1024)}
    assert (await http.patch(path, json={"metadata": half})).status_code == 200
    # Each patch is small; what they merge into is not.
    error = error_of(
        await http.patch(path, json={"metadata": {"b": "y" * (9 * 1024)}}), 413, "payload_too_large"
    )
    assert error["field"] == "metadata"
    assert (await read_thread(http, thread["thread_id"]))["revision"] == 1
    for body, field in (
        ({"title": 5}, "title"),
        ({"title": "t" * 1001}, "title"),
        ({"metadata": [1]}, "metadata"),
        ({"metadata": "x"}, "metadata"),
        ({"colour": "red"}, "colour"),
        ({"expected_revision": -1}, "expected_revision"),
    ):
        error = error_of(await http.patch(path, json=body), 422, "bad_request")
        assert error["field"] == field, body
    error_of(await http.patch("/api/threads/thr_nope", json={"title": "x"}), 404, "not_found")
    run = {"agent": "counter", "input": {"n": 1}}
    error = error_of(
        await http.post("/api/runs", json={**run, "metadata": big}), 413, "payload_too_large"
    )
    assert error["field"] == "metadata"
    error = error_of(await http.post("/api/runs", json={**run, "title": 1}), 422, "bad_request")
    assert error["field"] == "title"


async def test_a_run_is_titled_at_start_over_both_transports_and_renamed_by_patch(
    server_factory: Any,
) -> None:
    server: Server = await server_factory(linger_s=0.05)
    async with (
        httpx.AsyncClient(base_url=server.http_url, timeout=10) as http,
        connect(server.ws_url) as conn,
    ):
        by_http = await http.post(
            "/api/runs",
            json={
                "agent": "counter",
                "input": {"n": 1},
                "title": "nightly",
                "metadata": {"a": "1"},
            },
        )
        assert by_http.status_code == 201, by_http.text
        run = by_http.json()
        assert (run["title"], run["metadata"]) == ("nightly", {"a": "1"})
        # A run started in a new thread names that thread too.
        assert (await read_thread(http, run["thread_id"]))["title"] == "nightly"
        by_ws = await conn.start(
            "counter", {"n": 1}, title="from a tab", metadata={"tab": "2"}, subscribe=False
        )
        assert (by_ws["title"], by_ws["metadata"]) == ("from a tab", {"tab": "2"})
        error = await conn.error(
            "start", agent="counter", input={}, metadata={"b": "x" * 20_000}, subscribe=False
        )
        assert (error["code"], error["field"]) == ("payload_too_large", "metadata")
        await ended(http, run["run_id"])
        path = f"/api/runs/{run['run_id']}"
        patched = await http.patch(path, json={"title": "nightly build", "metadata": {"b": "2"}})
        assert patched.status_code == 200, patched.text
        info = patched.json()
        assert (info["title"], info["metadata"]) == ("nightly build", {"a": "1", "b": "2"})
        assert info["status"] == "completed" and info["updated_at"] >= run["updated_at"]
        # A live run is renamed as well; its flushes keep the new name.
        live = await conn.start("ask", {}, subscribe=False)
        await wait_status(http, live["run_id"], {"requires_action"})
        patched = await http.patch(f"/api/runs/{live['run_id']}", json={"title": "asking"})
        assert patched.json()["title"] == "asking"
        await http.post(f"/api/runs/{live['run_id']}/stop")
        await ended(http, live["run_id"])
        error_of(await http.patch("/api/runs/run_nope", json={}), 404, "not_found")
        error = error_of(await http.patch(path, json={"title": []}), 422, "bad_request")
        assert error["field"] == "title"
    # Read back after a restart: the store kept them.
    await server_factory.stop(server)
    again: Server = await server_factory()
    async with httpx.AsyncClient(base_url=again.http_url, timeout=10) as http:
        info = (await http.get(path)).json()
        assert (info["title"], info["metadata"]) == ("nightly build", {"a": "1", "b": "2"})
        info = (await http.get(f"/api/runs/{live['run_id']}")).json()
        assert info["title"] == "asking"


async def test_a_thread_can_be_renamed_while_its_run_is_active(http: httpx.AsyncClient) -> None:
    thread_id = await new_thread(http)
    sent = await HttpApi(http).ok("send", thread_id, content="q", agent="ask")
    run_id = sent["run"]["run_id"]
    await wait_status(http, run_id, {"requires_action"})
    renamed = await http.patch(f"/api/threads/{thread_id}", json={"title": "busy"})
    assert renamed.status_code == 200 and renamed.json()["active_run_id"] == run_id
    await http.post(f"/api/runs/{run_id}/stop")
    await ended(http, run_id)


# -- listing ------------------------------------------------------------------------------


async def pages(http: httpx.AsyncClient, path: str, key: str, **params: Any) -> list[list[Frame]]:
    """Every page of a listing, following next_cursor to its end."""
    result: list[list[Frame]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await http.get(path, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {key, "next_cursor"}
        result.append(body[key])
        cursor = body["next_cursor"]
        if cursor is None:
            return result
        assert isinstance(cursor, str) and body[key], body


async def test_listing_threads_pages_newest_first_and_filters_by_metadata(
    http: httpx.AsyncClient,
) -> None:
    made = []
    for k in range(7):
        metadata = {"project": "alpha" if k % 2 else "beta", "k": str(k)}
        response = await http.post("/api/threads", json={"title": f"t{k}", "metadata": metadata})
        made.append(response.json()["thread_id"])
    newest_first = made[::-1]
    listed = await pages(http, "/api/threads", "threads", limit=3)
    assert [len(page) for page in listed] == [3, 3, 1]  # null on the last page, not after
    assert [t["thread_id"] for page in listed for t in page] == newest_first
    assert listed[0][0]["title"] == "t6" and listed[0][0]["metadata"]["k"] == "6"
    every = await pages(http, "/api/threads", "threads")
    assert [t["thread_id"] for t in every[0]] == newest_first and len(every) == 1
    alpha = await pages(http, "/api/threads", "threads", **{"metadata.project": "alpha"})
    assert [t["thread_id"] for t in alpha[0]] == [made[5], made[3], made[1]]
    both = await pages(
        http, "/api/threads", "threads", **{"metadata.project": "alpha", "metadata.k": "3"}
    )
    assert [t["thread_id"] for t in both[0]] == [made[3]]
    # A value is matched as a string: "3" is not 3, and a missing key matches nothing.
    await http.post("/api/threads", json={"metadata": {"k": 3}})
    three = await pages(http, "/api/threads", "threads", **{"metadata.k": "3"})
    assert [t["thread_id"] for t in three[0]] == [made[3]]
    none = await pages(http, "/api/threads", "threads", **{"metadata.nope": "x"})
    assert none == [[]]
    for params, field in (
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "WzEsMl0"}, "cursor"),  # [1,2]: not (time, id)
        ({"limit": "0"}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"metadata.": "x"}, "metadata."),
    ):
        error = error_of(await http.get("/api/threads", params=params), 422, "bad_request")
        assert error["field"] == field, params


async def test_paging_visits_every_item_once_while_items_are_created(
    http: httpx.AsyncClient,
) -> None:
    before = [(await http.post("/api/threads", json={})).json()["thread_id"] for _ in range(25)]
    seen: list[str] = []
    cursor = None
    created_meanwhile = []
    while True:
        params: dict[str, Any] = {"limit": 4, **({"cursor": cursor} if cursor else {})}
        body = (await http.get("/api/threads", params=params)).json()
        seen += [t["thread_id"] for t in body["threads"]]
        # New threads arrive between every two pages: newer than the cursor, not shown.
        for _ in range(2):
            created_meanwhile.append((await http.post("/api/threads", json={})).json())
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == before[::-1]
    assert len(set(seen)) == len(seen)


async def test_listing_runs_by_status_agent_thread_and_metadata_with_cursors(
    http: httpx.AsyncClient,
) -> None:
    thread_id = await new_thread(http)
    runs = []
    for k in range(5):
        body = {"agent": "counter", "input": {"n": 1}, "metadata": {"batch": str(k % 2)}}
        if k < 3:
            body["thread_id"] = thread_id
        run = (await http.post("/api/runs", json=body)).json()
        await ended(http, run["run_id"])
        runs.append(run["run_id"])
    waiting = (await http.post("/api/runs", json={"agent": "ask", "input": {}})).json()
    await wait_status(http, waiting["run_id"], {"requires_action"})

    async def ids(**params: Any) -> list[str]:
        listed = await pages(http, "/api/runs", "runs", **params)
        return [run["run_id"] for page in listed for run in page]

    assert await ids(limit=2) == [waiting["run_id"], *runs[::-1]]
    assert await ids(thread_id=thread_id, limit=2) == runs[2::-1]
    assert await ids(status="completed", limit=2) == runs[::-1]
    assert await ids(status="requires_action") == [waiting["run_id"]]
    assert await ids(agent="ask") == [waiting["run_id"]]
    assert await ids(agent="counter", limit=3) == runs[::-1]
    assert await ids(**{"metadata.batch": "1"}) == [runs[3], runs[1]]
    assert await ids(thread_id=thread_id, **{"metadata.batch": "0"}, limit=1) == [
        runs[2],
        runs[0],
    ]
    assert await ids(status="failed") == []
    await http.post(f"/api/runs/{waiting['run_id']}/stop")
    await ended(http, waiting["run_id"])


async def test_listing_shows_only_what_a_token_reaches(server_factory: Any) -> None:
    server: Server = await server_factory(tokens=TOKENS)
    admin = {"Authorization": f"Bearer {SECRETS['admin']}"}
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10, headers=admin) as http:
        mine = (await http.post("/api/threads", json={"metadata": {"p": "x"}})).json()
        other = (await http.post("/api/threads", json={"metadata": {"p": "x"}})).json()
        run = (
            await http.post(
                "/api/runs",
                json={"agent": "counter", "input": {"n": 1}, "thread_id": mine["thread_id"]},
            )
        ).json()
        await ended(http, run["run_id"])
        thread_share = (await http.post(f"/api/threads/{mine['thread_id']}/share", json={})).json()[
            "token"
        ]
        run_share = (await http.post(f"/api/runs/{run['run_id']}/share", json={})).json()["token"]

        async def threads(token: str, **params: str) -> list[str]:
            response = await http.get(
                "/api/threads", params=params, headers={"Authorization": f"Bearer {token}"}
            )
            assert response.status_code == 200, response.text
            assert response.json()["next_cursor"] is None
            return [t["thread_id"] for t in response.json()["threads"]]

        assert await threads(SECRETS["viewer"]) == [other["thread_id"], mine["thread_id"]]
        assert await threads(thread_share) == [mine["thread_id"]]
        assert await threads(thread_share, **{"metadata.p": "x"}) == [mine["thread_id"]]
        assert await threads(thread_share, **{"metadata.p": "y"}) == []
        assert await threads(run_share) == []
        runs = await http.get(
            "/api/runs",
            params={"metadata.p": "x"},
            headers={"Authorization": f"Bearer {run_share}"},
        )
        assert runs.json() == {"runs": [], "next_cursor": None}
        runs = await http.get("/api/runs", headers={"Authorization": f"Bearer {run_share}"})
        assert [r["run_id"] for r in runs.json()["runs"]] == [run["run_id"]]
        # What a share reached is deleted: its listings are empty, its reads not found.
        assert (await http.delete(f"/api/threads/{mine['thread_id']}")).status_code == 200
        assert await threads(thread_share) == []
        runs = await http.get("/api/runs", headers={"Authorization": f"Bearer {run_share}"})
        assert runs.json() == {"runs": [], "next_cursor": None}
        read = await http.get(
            f"/api/runs/{run['run_id']}", headers={"Authorization": f"Bearer {run_share}"}
        )
        assert read.status_code == 404


# -- aside -------------------------------------------------------------------------------


async def test_aside_answers_off_the_active_path_and_the_head_stays(
    api: Api, server: Server, http: httpx.AsyncClient
) -> None:
    thread_id = await new_thread(http)
    await exchange(http, thread_id, "What is 2+2?")
    before = await read_thread(http, thread_id)
    async with connect(server.ws_url) as watcher:
        await watcher.ok("watch_thread", thread_id=thread_id)
        result = await api.ok(
            "aside", thread_id, content="Reflect on that", agent="echo", expected_revision=1
        )
        thread, run = result["thread"], result["run"]
        frames = await watch_until(watcher, thread_id, lambda f: f["change"] == "run_ended")
    assert thread["revision"] == 2 and thread["head"] == before["head"]
    assert thread["turns"] == before["turns"]  # the active path did not change
    events = await api.wait_end(run["run_id"])
    # The agent saw the active path plus the aside's question.
    assert history_of(events) == [
        ("user", "What is 2+2?"),
        ("assistant", "What is 2+2?"),
        ("user", "Reflect on that"),
    ]
    every = await read_thread(http, thread_id, all=True)
    question, answer = every["turns"][-2:]
    assert (question["role"], question["content"], question["parent_id"]) == (
        "user",
        "Reflect on that",
        before["head"],
    )
    assert (answer["role"], answer["parent_id"], answer["run_id"]) == (
        "assistant",
        question["turn_id"],
        run["run_id"],
    )
    assert answer["content"] == "Reflect on that" and answer["status"] == "completed"
    after = await read_thread(http, thread_id)
    assert after["head"] == before["head"] and after["revision"] == 2
    assert said(after["turns"]) == said(before["turns"])
    assert [f["change"] for f in frames] == ["updated", "run_started", "run_ended"]
    assert frames[0]["revision"] == 2 and frames[0]["run"]["run_id"] == run["run_id"]


async def test_an_aside_run_is_the_threads_active_run(api: Api, http: httpx.AsyncClient) -> None:
    thread_id = await new_thread(http)
    await exchange(http, thread_id, "hello")
    aside = await api.ok("aside", thread_id, content="critique", agent="ask")
    run_id = aside["run"]["run_id"]
    assert aside["thread"]["active_run_id"] == run_id
    error = await api.error("send", thread_id, 409, content="next", agent="echo")
    assert (error["code"], error["active_run_id"]) == ("run_in_progress", run_id)
    error = await api.error("aside", thread_id, 409, content="again", agent="echo")
    assert error["code"] == "run_in_progress"
    # Enqueued behind it, a send waits its turn and then joins the active path.
    queued = await api.ok("send", thread_id, content="next", agent="echo", multitask="enqueue")
    await http.post(f"/api/runs/{run_id}/stop")
    await api.wait_end(queued["run"]["run_id"])
    thread = await read_thread(http, thread_id)
    assert said(thread["turns"]) == [
        ("user", "hello"),
        ("assistant", "hello"),
        ("user", "next"),
        ("assistant", "next"),
    ]
    assert thread["active_run_id"] is None
    # Rolling back an aside takes nothing off the active path: the head stays.
    aside = await api.ok("aside", thread_id, content="more", agent="ask")
    rolled = await api.ok("rewind", thread_id, turn_id=thread["head"], multitask="rollback")
    assert rolled["thread"]["head"] == thread["head"]
    assert (await read_thread(http, thread_id))["active_run_id"] is None


# -- edit saved without a run -------------------------------------------------------------


async def test_an_edit_saved_without_a_run(api: Api, http: httpx.AsyncClient) -> None:
    thread_id = await new_thread(http)
    first = await exchange(http, thread_id, "first draft")
    question = first["thread"]["turns"][0]
    runs_before = (await http.get("/api/runs", params={"thread_id": thread_id})).json()["runs"]
    saved = await api.ok(
        "edit", thread_id, turn_id=question["turn_id"], content="second draft", run=False
    )
    assert saved["run"] is None
    thread = saved["thread"]
    assert thread["revision"] == 2 and thread["active_run_id"] is None
    (edited,) = thread["turns"]
    assert thread["head"] == edited["turn_id"]
    assert (edited["role"], edited["content"], edited["parent_id"], edited["run_id"]) == (
        "user",
        "second draft",
        question["parent_id"],
        None,
    )
    assert edited["turn_id"] != question["turn_id"]
    runs_after = (await http.get("/api/runs", params={"thread_id": thread_id})).json()["runs"]
    assert runs_after == runs_before  # nothing started
    # The saved question is answered by the next operation that runs: regenerate.
    every = await read_thread(http, thread_id, all=True)
    assert [t["content"] for t in every["turns"] if t["role"] == "user"] == [
        "first draft",
        "second draft",
    ]
    error = await api.error(
        "edit",
        thread_id,
        422,
        turn_id=first["thread"]["turns"][1]["turn_id"],
        content="x",
        run=False,
    )
    assert error["code"] == "bad_request"
    error = await api.error(
        "edit",
        thread_id,
        422,
        turn_id=edited["turn_id"],
        content="x",
        run=False,
        multitask="enqueue",
    )
    assert error["field"] == "multitask"
    error = await api.error("edit", thread_id, 422, turn_id=edited["turn_id"], content="x", run=0)
    assert error["field"] == "run"


# -- deleting for good --------------------------------------------------------------------


def text_anywhere(db: Path, needles: list[str]) -> list[str]:
    """Every (table, column) of the SQLite file, read through a connection (so the WAL is
    included), and the raw bytes of the file and its WAL, where a needle occurs."""
    found = []
    connection = sqlite3.connect(db)
    try:
        tables = [
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        for table in tables:
            for row in connection.execute(f"SELECT * FROM {table}"):
                for cell in row:
                    for needle in needles:
                        if isinstance(cell, str | bytes) and needle in str(cell):
                            found.append(f"{table}: {needle}")
    finally:
        connection.close()
    for path in (db, db.with_name(db.name + "-wal")):
        if path.exists():
            raw = path.read_bytes()
            found += [f"{path.name} bytes: {n}" for n in needles if n.encode() in raw]
    return found


async def db_command(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "db",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode()


async def test_deleting_a_run(server_factory: Any, tmp_path: Path) -> None:
    db = tmp_path / "delete.db"
    server: Server = await server_factory(db=db, linger_s=0.05)
    secret = "Zebra-secret-text-0451"
    async with (
        httpx.AsyncClient(base_url=server.http_url, timeout=10) as http,
        connect(server.ws_url) as conn,
    ):
        # (A title would name the new thread too, which stays: the metadata is the run's.)
        live = await conn.start("echo", {"text": secret}, title="echo", metadata={"m": secret})
        run_id = live["run_id"]
        await conn.events_until_end(run_id)
        await http.post(f"/api/runs/{run_id}/share", json={})  # a share of it goes too
        asking = await conn.start("ask", {}, subscribe=False)
        await wait_status(http, asking["run_id"], {"requires_action"})
        error = error_of(await http.delete(f"/api/runs/{asking['run_id']}"), 409, "run_in_progress")
        assert error["active_run_id"] == asking["run_id"]
        assert text_anywhere(db, [run_id])  # it is there before

        response = await http.delete(f"/api/runs/{run_id}")
        assert (response.status_code, response.json()) == (200, {"deleted": True})
        for path in ("", "/snapshot", "/events"):
            error_of(await http.get(f"/api/runs/{run_id}{path}"), 404, "not_found")
        error_of(await http.patch(f"/api/runs/{run_id}", json={"title": "x"}), 404, "not_found")
        error_of(await http.delete(f"/api/runs/{run_id}"), 404, "not_found")
        error_of(await http.post(f"/api/runs/{run_id}/stop"), 404, "not_found")
        assert (await conn.error("subscribe", run_id=run_id))["code"] == "not_found"
        listed = (await http.get("/api/runs")).json()["runs"]
        assert run_id not in {run["run_id"] for run in listed}
        await http.post(f"/api/runs/{asking['run_id']}/stop")
        await ended(http, asking["run_id"])
        assert text_anywhere(db, [run_id, secret]) == []
    await server_factory.stop(server)
    assert text_anywhere(db, [run_id, secret]) == []
    code, output = await db_command("check", "--db", str(db))
    assert code == 0, output


async def test_deleting_a_run_of_a_thread_keeps_its_turns_text(
    http: httpx.AsyncClient, server: Server
) -> None:
    thread_id = await new_thread(http)
    result = await exchange(http, thread_id, "keep my words")
    run_id = result["run"]["run_id"]
    asked = await HttpApi(http).ok("send", thread_id, content="then stop", agent="ask")
    await wait_status(http, asked["run"]["run_id"], {"requires_action"})
    async with connect(server.ws_url) as watcher:
        await watcher.ok("watch_thread", thread_id=thread_id)
        error = error_of(await http.delete(f"/api/threads/{thread_id}"), 409, "run_in_progress")
        assert error["active_run_id"] == asked["run"]["run_id"]
        await http.post(f"/api/runs/{asked['run']['run_id']}/stop")
        await ended(http, asked["run"]["run_id"])
        assert (await http.delete(f"/api/runs/{run_id}")).status_code == 200
        assert (await http.delete(f"/api/runs/{asked['run']['run_id']}")).status_code == 200
        await watcher.ok("ping")
        # Deleting a run is not a revision of its thread.
        assert [
            f for f in watcher.pending if f["type"] == "thread" and f["change"] == "updated"
        ] == []
    thread = await read_thread(http, thread_id)
    assert said(thread["turns"]) == [
        ("user", "keep my words"),
        ("assistant", "keep my words"),
        ("user", "then stop"),
        ("assistant", ""),
    ]
    assert [t["run_id"] for t in thread["turns"]] == [None, None, None, None]
    assert [t["status"] for t in thread["turns"]] == [
        "completed",
        "completed",
        "completed",
        "stopped",
    ]
    # The thread goes on: a regenerate answers its last question again.
    again = await HttpApi(http).ok("regenerate", thread_id, agent="echo")
    await ended(http, again["run"]["run_id"])
    assert (await read_thread(http, thread_id))["turns"][-1]["content"] == "then stop"


async def test_deleting_a_thread_erases_it_and_tells_its_watchers(
    server_factory: Any, tmp_path: Path
) -> None:
    db = tmp_path / "threads.db"
    server: Server = await server_factory(db=db)
    secret = "Quokka-private-words-9931"
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        thread_id = (
            await http.post("/api/threads", json={"title": secret, "metadata": {"s": secret}})
        ).json()["thread_id"]
        first = await exchange(http, thread_id, f"{secret} one")
        aside = await HttpApi(http).ok("aside", thread_id, content=f"{secret} two", agent="echo")
        await ended(http, aside["run"]["run_id"])
        await http.post(f"/api/threads/{thread_id}/share", json={})
        run_ids = [first["run"]["run_id"], aside["run"]["run_id"]]
        turn_ids = [t["turn_id"] for t in (await read_thread(http, thread_id, all=True))["turns"]]
        keep = await exchange(http, await new_thread(http), "another thread")
        async with connect(server.ws_url) as watcher, connect(server.ws_url) as other:
            await watcher.ok("watch_thread", thread_id=thread_id)
            await other.ok("watch_thread", thread_id=thread_id)
            response = await http.delete(f"/api/threads/{thread_id}")
            assert (response.status_code, response.json()) == (200, {"deleted": True})
            for conn in (watcher, other):
                frame = await conn.next_frame(lambda f: f["type"] == "thread")
                assert (frame["thread_id"], frame["change"]) == (thread_id, "deleted")
                await conn.assert_quiet()
            # The watch ended: unwatching is a no-op, watching again is not found.
            await watcher.ok("unwatch_thread", thread_id=thread_id)
            assert (await other.error("watch_thread", thread_id=thread_id))["code"] == "not_found"
            for run_id in run_ids:
                assert (await watcher.error("subscribe", run_id=run_id))["code"] == "not_found"
        error_of(await http.get(f"/api/threads/{thread_id}"), 404, "not_found")
        error_of(await http.delete(f"/api/threads/{thread_id}"), 404, "not_found")
        error_of(await http.patch(f"/api/threads/{thread_id}", json={}), 404, "not_found")
        error = error_of(
            await http.post(f"/api/threads/{thread_id}/messages", json={"content": "x"}),
            404,
            "not_found",
        )
        assert error["code"] == "not_found"
        for run_id in run_ids:
            error_of(await http.get(f"/api/runs/{run_id}"), 404, "not_found")
        listed = (await http.get("/api/threads")).json()["threads"]
        assert thread_id not in {t["thread_id"] for t in listed}
        assert text_anywhere(db, [thread_id, secret, *run_ids, *turn_ids]) == []
        assert (await http.get(f"/api/runs/{keep['run']['run_id']}")).status_code == 200
    await server_factory.stop(server)
    assert text_anywhere(db, [thread_id, secret, *run_ids, *turn_ids]) == []
    code, output = await db_command("check", "--db", str(db))
    assert code == 0, output


async def test_vacuum_reclaims_the_space_of_what_was_deleted(
    server_factory: Any, tmp_path: Path
) -> None:
    db = tmp_path / "vacuum.db"
    server: Server = await server_factory(db=db)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        run = (
            await http.post("/api/runs", json={"agent": "counter", "input": {"n": 20_000}})
        ).json()
        await ended(http, run["run_id"])
        assert (await http.delete(f"/api/runs/{run['run_id']}")).status_code == 200
    await server_factory.stop(server)
    code, output = await db_command("vacuum", "--db", str(db))
    assert code == 0, output
    sizes = [int(word.replace(",", "")) for word in output.split() if word[:1].isdigit()]
    before, after = sizes
    assert after < before / 2, output
    code, output = await db_command("check", "--db", str(db))
    assert code == 0, output
    code, output = await db_command("vacuum", "--db", str(tmp_path / "none.db"))
    assert code == 2 and "no database" in output


async def test_a_viewer_and_an_operator_may_not_delete(server_factory: Any) -> None:
    tokens = (*TOKENS, "operator:operator-secret-0123456789")
    server: Server = await server_factory(tokens=tokens)
    admin = {"Authorization": f"Bearer {SECRETS['admin']}"}
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10, headers=admin) as http:
        thread_id = await new_thread(http)
        run = (await http.post("/api/runs", json={"agent": "counter", "input": {"n": 1}})).json()
        await ended(http, run["run_id"])
        for secret in (SECRETS["viewer"], "operator-secret-0123456789"):
            who = {"Authorization": f"Bearer {secret}"}
            for path in (f"/api/threads/{thread_id}", f"/api/runs/{run['run_id']}"):
                error_of(await http.delete(path, headers=who), 403, "forbidden")
        assert (await http.get(f"/api/threads/{thread_id}")).status_code == 200
        assert (await http.get(f"/api/runs/{run['run_id']}")).status_code == 200
        conn: Conn = await open_conn(server.ws_url, additional_headers=admin)
        try:
            assert (await conn.ok("subscribe", run_id=run["run_id"]))["run"]["title"] is None
        finally:
            await conn.ws.close()


async def test_a_deleted_runs_state_is_gone_from_a_snapshot_read_before(
    http: httpx.AsyncClient,
) -> None:
    run = (await http.post("/api/runs", json={"agent": "echo", "input": {"text": "hi"}})).json()
    events = await wait_status(http, run["run_id"], {"completed"})
    assert fold(events)["message"]["content"] == "hi"
    assert (await http.delete(f"/api/runs/{run['run_id']}")).status_code == 200
    error_of(await http.get(f"/api/runs/{run['run_id']}/snapshot"), 404, "not_found")
