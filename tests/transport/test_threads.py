"""Threads and turns end to end (PROTOCOL.md §3 multitask, §6): send, rewind, edit,
regenerate and undo over WebSocket ops and over the HTTP routes, revisions and conflicts,
branches, the multitask strategies as a watching tab sees them, and restarts.

A real server, real ``websockets`` and ``httpx`` clients. Runs are awaited through a
subscription or the SSE stream, never by sleeping. The ``echo`` agent answers with the
last user turn of its history and reports that history in its state, so what an agent
received is checked from the run's own events.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from app.engine.manager import ThreadChange
from tests.conftest import Server
from tests.transport.helpers import TERMINAL, Conn, Frame, connect, fold, wait_status

pytestmark = pytest.mark.timeout(30)

KINDS = ("send", "rewind", "edit", "regenerate", "undo")


# -- two clients of the same operations ---------------------------------------------------


class Api:
    """The thread operations through one transport: ``ok`` returns ``{"thread", "run"}``,
    ``error`` the error object (over HTTP, after checking the status)."""

    name: str

    async def ok(self, kind: str, thread_id: str, **fields: Any) -> Frame:
        raise NotImplementedError

    async def error(self, kind: str, thread_id: str, status: int, **fields: Any) -> Frame:
        raise NotImplementedError

    async def wait_end(self, run_id: str) -> list[Frame]:
        """Every event of the run up to its terminal status (awaited, not polled)."""
        raise NotImplementedError


class WsApi(Api):
    name = "ws"

    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    async def ok(self, kind: str, thread_id: str, **fields: Any) -> Frame:
        result = await self.conn.ok(kind, thread_id=thread_id, **fields)
        assert set(result) == {"thread", "run"}, result
        return result

    async def error(self, kind: str, thread_id: str, status: int, **fields: Any) -> Frame:
        return await self.conn.error(kind, thread_id=thread_id, **fields)

    async def wait_end(self, run_id: str) -> list[Frame]:
        await self.conn.ok("subscribe", run_id=run_id)
        async with asyncio.timeout(10):
            return await self.conn.events_until_end(run_id)


class HttpApi(Api):
    name = "http"

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def post(self, kind: str, thread_id: str, **fields: Any) -> httpx.Response:
        action = "messages" if kind == "send" else kind
        return await self.http.post(f"/api/threads/{thread_id}/{action}", json=fields)

    async def ok(self, kind: str, thread_id: str, **fields: Any) -> Frame:
        response = await self.post(kind, thread_id, **fields)
        assert response.status_code == 200, response.text
        result: Frame = response.json()
        assert set(result) == {"thread", "run"}, result
        return result

    async def error(self, kind: str, thread_id: str, status: int, **fields: Any) -> Frame:
        response = await self.post(kind, thread_id, **fields)
        assert response.status_code == status, response.text
        error: Frame = response.json()["error"]
        return error

    async def wait_end(self, run_id: str) -> list[Frame]:
        return await wait_status(self.http, run_id, set(TERMINAL), timeout_s=10)


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


# -- helpers ------------------------------------------------------------------------------


async def new_thread(http: httpx.AsyncClient) -> str:
    response = await http.post("/api/threads", json={})
    assert response.status_code == 201, response.text
    thread_id: str = response.json()["thread_id"]
    return thread_id


async def read_thread(http: httpx.AsyncClient, thread_id: str, *, all: bool = False) -> Frame:
    params = {"all": "true"} if all else None
    response = await http.get(f"/api/threads/{thread_id}", params=params)
    assert response.status_code == 200, response.text
    thread: Frame = response.json()
    return thread


async def exchange(
    http: httpx.AsyncClient, thread_id: str, content: str, agent: str = "echo"
) -> Frame:
    """Send ``content`` over HTTP and wait for its run to end; returns the reply."""
    api = HttpApi(http)
    result = await api.ok("send", thread_id, content=content, agent=agent)
    await api.wait_end(result["run"]["run_id"])
    return result


async def snapshot_state(http: httpx.AsyncClient, run_id: str) -> Frame:
    response = await http.get(f"/api/runs/{run_id}/snapshot")
    assert response.status_code == 200, response.text
    state: Frame = response.json()["state"]
    return state


async def thread_runs(http: httpx.AsyncClient, thread_id: str) -> list[Frame]:
    response = await http.get("/api/runs", params={"thread_id": thread_id})
    assert response.status_code == 200, response.text
    runs: list[Frame] = response.json()["runs"]
    return runs


def said(turns: list[Frame]) -> list[tuple[str, str]]:
    """(role, content) of each turn."""
    return [(t["role"], t["content"]) for t in turns]


def assert_chain(turns: list[Frame]) -> None:
    """An active path: the first turn is a root, each next turn a child of the one before,
    user turns written by nobody, assistant turns by a run."""
    assert turns[0]["parent_id"] is None, turns
    for parent, child in itertools.pairwise(turns):
        assert child["parent_id"] == parent["turn_id"], turns
    for turn in turns:
        if turn["role"] == "user":
            assert turn["run_id"] is None and turn["status"] == "completed", turn
        else:
            assert turn["role"] == "assistant" and turn["run_id"], turn


def history_of(events: list[Frame]) -> list[tuple[str, str]]:
    """The history the echo agent reported (its ``state`` event), as (role, content)."""
    return [(h["role"], h["content"]) for h in fold(events)["data"]["history"]]


def answer_of(events: list[Frame]) -> str:
    content: str = fold(events)["message"]["content"]
    return content


def change(name: str, run_id: str | None = None) -> Callable[[Frame], bool]:
    return lambda f: f["change"] == name and (run_id is None or f["run"]["run_id"] == run_id)


async def watch_until(conn: Conn, thread_id: str, stop: Callable[[Frame], bool]) -> list[Frame]:
    """The thread frames of ``thread_id`` up to and including the first that ``stop``
    matches."""
    frames: list[Frame] = []
    async with asyncio.timeout(10):
        while not frames or not stop(frames[-1]):
            frame = await conn.next_frame(
                lambda f: f["type"] == "thread" and f["thread_id"] == thread_id
            )
            frames.append(frame)
    return frames


def story(frames: list[Frame]) -> list[tuple[Any, ...]]:
    """What a watcher saw, compactly: ("updated", revision) or (change, run_id, status)."""
    told: list[tuple[Any, ...]] = []
    for frame in frames:
        assert isinstance(frame["revision"], int), frame
        if frame["change"] == "updated":
            told.append(("updated", frame["revision"]))
        else:
            told.append((frame["change"], frame["run"]["run_id"], frame["run"]["status"]))
    return told


async def text_events(conn: Conn, run_id: str, n: int) -> list[Frame]:
    """Events of a subscribed run until at least ``n`` of them are ``text``."""
    events: list[Frame] = []
    while sum(e["type"] == "text" for e in events) < n:
        events += await conn.events_until(run_id, lambda e: True)
    return events


async def until_input_required(conn: Conn, run_id: str) -> Frame:
    """Subscribe to an ``ask`` run and return its ``input_required`` data."""
    await conn.ok("subscribe", run_id=run_id)
    events = await conn.events_until(run_id, lambda e: e["type"] == "input_required")
    data: Frame = next(e for e in events if e["type"] == "input_required")["data"]
    return data


def fields_for(kind: str, turns: list[Frame]) -> dict[str, Any]:
    """Valid fields of ``kind`` for a thread whose active path is ``turns``."""
    user = next(t for t in reversed(turns) if t["role"] == "user")
    return {
        "send": {"content": "more", "agent": "echo"},
        "rewind": {"turn_id": user["turn_id"]},
        "edit": {"turn_id": user["turn_id"], "content": "edited", "agent": "echo"},
        "regenerate": {"agent": "echo"},
        "undo": {},
    }[kind]


# -- each operation, over both transports -------------------------------------------------


async def test_send(api: Api, http: httpx.AsyncClient) -> None:
    thread_id = await new_thread(http)
    result = await api.ok("send", thread_id, content="hello", agent="echo", expected_revision=0)
    thread, run = result["thread"], result["run"]
    assert thread["thread_id"] == thread_id and thread["revision"] == 1
    question, answer = thread["turns"]
    assert_chain(thread["turns"])
    assert question["role"] == "user" and question["content"] == "hello"
    assert answer["role"] == "assistant" and answer["run_id"] == run["run_id"]
    assert thread["head"] == answer["turn_id"]
    assert answer["status"] in {"queued", "running", "completed"}
    assert run["agent"] == "echo" and run["thread_id"] == thread_id
    assert run["status"] in {"queued", "running", "completed"}

    events = await api.wait_end(run["run_id"])
    assert events[-1]["data"] == {"status": "completed"}
    assert history_of(events) == [("user", "hello")]
    assert answer_of(events) == "hello"
    read = await read_thread(http, thread_id)
    # The run writing its turn and ending do not change the revision.
    assert read["revision"] == 1 and read["head"] == answer["turn_id"]
    assert read["active_run_id"] is None
    assert read["turns"] == [question, {**answer, "content": "hello", "status": "completed"}]

    # Without expected_revision the send applies at whatever revision the thread is.
    result = await api.ok("send", thread_id, content="again", agent="echo")
    thread, run = result["thread"], result["run"]
    assert thread["revision"] == 2
    assert_chain(thread["turns"])
    assert said(thread["turns"][:3]) == [
        ("user", "hello"),
        ("assistant", "hello"),
        ("user", "again"),
    ]
    assert thread["turns"][:2] == read["turns"]
    assert thread["turns"][3]["run_id"] == run["run_id"]
    assert thread["active_run_id"] in (run["run_id"], None)  # the run may have ended already
    events = await api.wait_end(run["run_id"])
    assert history_of(events) == [("user", "hello"), ("assistant", "hello"), ("user", "again")]
    read = await read_thread(http, thread_id)
    assert read["revision"] == 2 and read["head"] == thread["turns"][3]["turn_id"]
    assert said(read["turns"]) == [
        ("user", "hello"),
        ("assistant", "hello"),
        ("user", "again"),
        ("assistant", "again"),
    ]


async def test_send_without_agent_runs_the_default_agent(http: httpx.AsyncClient) -> None:
    thread_id = await new_thread(http)
    result = await HttpApi(http).ok("send", thread_id, content="hi")
    run_id = result["run"]["run_id"]
    assert result["run"]["agent"] == "demo"
    assert (await http.post(f"/api/runs/{run_id}/stop")).status_code == 200
    events = await wait_status(http, run_id, set(TERMINAL))
    assert events[-1]["data"]["status"] == "stopped"


async def test_rewind(api: Api, http: httpx.AsyncClient) -> None:
    thread_id = await new_thread(http)
    await exchange(http, thread_id, "one")
    await exchange(http, thread_id, "two")
    before = await read_thread(http, thread_id)
    every = await read_thread(http, thread_id, all=True)
    assert before["revision"] == 2 and len(before["turns"]) == 4
    first_answer = before["turns"][1]

    result = await api.ok("rewind", thread_id, turn_id=first_answer["turn_id"], expected_revision=2)
    assert result["run"] is None
    thread = result["thread"]
    assert thread["revision"] == 3 and thread["head"] == first_answer["turn_id"]
    assert thread["turns"] == before["turns"][:2]
    # The later turns stay in the tree as a branch.
    assert (await read_thread(http, thread_id, all=True))["turns"] == every["turns"]

    result = await api.ok("rewind", thread_id, turn_id=None, expected_revision=3)
    assert result["run"] is None
    assert result["thread"]["revision"] == 4
    assert result["thread"]["head"] is None and result["thread"]["turns"] == []

    error = await api.error("rewind", thread_id, 404, turn_id="turn_nope")
    assert error["code"] == "not_found"
    read = await read_thread(http, thread_id)
    assert read["revision"] == 4 and read["turns"] == []
    assert (await read_thread(http, thread_id, all=True))["turns"] == every["turns"]


async def test_edit_of_a_middle_user_turn(api: Api, http: httpx.AsyncClient) -> None:
    thread_id = await new_thread(http)
    for content in ("one", "two", "three"):
        await exchange(http, thread_id, content)
    before = await read_thread(http, thread_id)
    every = await read_thread(http, thread_id, all=True)
    assert before["revision"] == 3
    middle = before["turns"][2]
    assert middle["role"] == "user" and middle["content"] == "two"

    result = await api.ok(
        "edit",
        thread_id,
        turn_id=middle["turn_id"],
        content="TWO",
        agent="echo",
        expected_revision=3,
    )
    thread, run = result["thread"], result["run"]
    assert thread["revision"] == 4
    turns = thread["turns"]
    assert_chain(turns)
    assert turns[:2] == before["turns"][:2]
    edited, answer = turns[2:]
    # A sibling of the edited turn, not the turn itself.
    assert edited["parent_id"] == middle["parent_id"]
    assert edited["turn_id"] not in {t["turn_id"] for t in every["turns"]}
    assert edited["role"] == "user" and edited["content"] == "TWO"
    assert answer["run_id"] == run["run_id"] and thread["head"] == answer["turn_id"]

    events = await api.wait_end(run["run_id"])
    # The path up to and including the edited turn; not the run's own assistant turn.
    assert history_of(events) == [("user", "one"), ("assistant", "one"), ("user", "TWO")]
    assert answer_of(events) == "TWO"
    read = await read_thread(http, thread_id)
    assert read["revision"] == 4
    assert said(read["turns"]) == [
        ("user", "one"),
        ("assistant", "one"),
        ("user", "TWO"),
        ("assistant", "TWO"),
    ]
    tree = (await read_thread(http, thread_id, all=True))["turns"]
    assert len(tree) == 8
    assert [t for t in tree if t["turn_id"] in {u["turn_id"] for u in every["turns"]}] == every[
        "turns"
    ]

    # Only a user turn can be edited; an unknown one is not found. Nothing changes.
    error = await api.error(
        "edit", thread_id, 422, turn_id=answer["turn_id"], content="x", agent="echo"
    )
    assert error["code"] == "bad_request" and error["field"] == "turn_id"
    error = await api.error("edit", thread_id, 404, turn_id="turn_nope", content="x")
    assert error["code"] == "not_found"
    assert await read_thread(http, thread_id) == read
    assert (await read_thread(http, thread_id, all=True))["turns"] == tree


async def test_regenerate(api: Api, http: httpx.AsyncClient) -> None:
    thread_id = await new_thread(http)
    await exchange(http, thread_id, "hello")
    before = await read_thread(http, thread_id)
    question, first = before["turns"]

    result = await api.ok("regenerate", thread_id, agent="echo", expected_revision=1)
    thread, run = result["thread"], result["run"]
    assert thread["revision"] == 2
    assert thread["turns"][0] == question
    again = thread["turns"][1]
    assert again["role"] == "assistant" and again["parent_id"] == question["turn_id"]
    assert again["turn_id"] != first["turn_id"] and again["run_id"] == run["run_id"]
    assert run["run_id"] != first["run_id"] and thread["head"] == again["turn_id"]

    events = await api.wait_end(run["run_id"])
    assert history_of(events) == [("user", "hello")]
    assert answer_of(events) == "hello"
    tree = (await read_thread(http, thread_id, all=True))["turns"]
    assert [t["turn_id"] for t in tree] == [q["turn_id"] for q in (question, first, again)]


async def test_regenerate_twice_gives_three_sibling_answers(
    api: Api, http: httpx.AsyncClient
) -> None:
    thread_id = await new_thread(http)
    await exchange(http, thread_id, "one")
    await exchange(http, thread_id, "hello")
    question = (await read_thread(http, thread_id))["turns"][2]
    for revision in (3, 4):
        result = await api.ok("regenerate", thread_id, agent="echo", expected_revision=revision - 1)
        assert result["thread"]["revision"] == revision
        await api.wait_end(result["run"]["run_id"])

    tree = (await read_thread(http, thread_id, all=True))["turns"]
    answers = [t for t in tree if t["parent_id"] == question["turn_id"]]
    assert len(answers) == 3
    assert all(a["role"] == "assistant" and a["content"] == "hello" for a in answers)
    assert all(a["status"] == "completed" for a in answers)
    run_ids = [a["run_id"] for a in answers]
    assert len(set(run_ids)) == 3
    for run_id in run_ids:
        state = await snapshot_state(http, run_id)
        assert state["data"]["history"] == [
            {"role": "user", "content": "one"},
            {"role": "assistant", "content": "one"},
            {"role": "user", "content": "hello"},
        ]
    read = await read_thread(http, thread_id)
    assert read["head"] == answers[-1]["turn_id"]
    assert read["turns"][:3] == tree[:3] and read["turns"][3] == answers[-1]


async def test_undo_twice_then_nothing_to_undo(api: Api, http: httpx.AsyncClient) -> None:
    thread_id = await new_thread(http)
    await exchange(http, thread_id, "one")
    await exchange(http, thread_id, "two")
    before = await read_thread(http, thread_id)
    every = await read_thread(http, thread_id, all=True)

    result = await api.ok("undo", thread_id, expected_revision=2)
    assert result["run"] is None
    assert result["thread"]["revision"] == 3
    assert result["thread"]["head"] == before["turns"][1]["turn_id"]
    assert result["thread"]["turns"] == before["turns"][:2]

    result = await api.ok("undo", thread_id)
    assert result["run"] is None
    assert result["thread"]["revision"] == 4
    assert result["thread"]["head"] is None and result["thread"]["turns"] == []

    # Nothing left to undo or regenerate: 422, and nothing changes.
    error = await api.error("undo", thread_id, 422)
    assert error["code"] == "bad_request"
    error = await api.error("regenerate", thread_id, 422, agent="echo")
    assert error["code"] == "bad_request"
    read = await read_thread(http, thread_id)
    assert read["revision"] == 4 and read["turns"] == []
    assert (await read_thread(http, thread_id, all=True))["turns"] == every["turns"]
    assert len(await thread_runs(http, thread_id)) == 2


async def test_regenerate_with_no_assistant_turn(api: Api, http: httpx.AsyncClient) -> None:
    thread_id = await new_thread(http)
    error = await api.error("regenerate", thread_id, 422, agent="echo")
    assert error["code"] == "bad_request"
    error = await api.error("undo", thread_id, 422)
    assert error["code"] == "bad_request"
    # A path that ends with a user turn and has no assistant turn before it.
    await exchange(http, thread_id, "one")
    question = (await read_thread(http, thread_id))["turns"][0]
    await api.ok("rewind", thread_id, turn_id=question["turn_id"], expected_revision=1)
    error = await api.error("regenerate", thread_id, 422, agent="echo", expected_revision=2)
    assert error["code"] == "bad_request"
    read = await read_thread(http, thread_id)
    assert read["revision"] == 2 and read["head"] == question["turn_id"]
    assert len(await thread_runs(http, thread_id)) == 1


async def test_unknown_thread_and_enqueue_of_an_operation_without_a_run(
    api: Api, http: httpx.AsyncClient
) -> None:
    error = await api.error("send", "thr_nope", 404, content="x", agent="echo")
    assert error["code"] == "not_found"
    error = await api.error("undo", "thr_nope", 404)
    assert error["code"] == "not_found"
    thread_id = await new_thread(http)
    await exchange(http, thread_id, "one")
    before = await read_thread(http, thread_id)
    for kind in ("rewind", "undo"):
        fields = fields_for(kind, before["turns"])
        error = await api.error(kind, thread_id, 422, multitask="enqueue", **fields)
        assert error["code"] == "bad_request" and error["field"] == "multitask"
    assert await read_thread(http, thread_id) == before


# -- conflicts: a stale expected_revision changes nothing ---------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stale_expected_revision_is_a_conflict(
    kind: str, api: Api, http: httpx.AsyncClient
) -> None:
    thread_id = await new_thread(http)
    await exchange(http, thread_id, "one")
    path = await read_thread(http, thread_id)
    tree = await read_thread(http, thread_id, all=True)
    runs = await thread_runs(http, thread_id)
    assert path["revision"] == 1
    fields = fields_for(kind, path["turns"])

    for stale in (0, 2, 7):
        error = await api.error(kind, thread_id, 409, expected_revision=stale, **fields)
        assert error["code"] == "conflict", error
        assert error["expected_revision"] == stale and error["actual_revision"] == 1
        assert await read_thread(http, thread_id) == path
        assert await read_thread(http, thread_id, all=True) == tree
        assert await thread_runs(http, thread_id) == runs

    # The same operation at the right revision applies, once.
    result = await api.ok(kind, thread_id, expected_revision=1, **fields)
    assert result["thread"]["revision"] == 2
    if result["run"] is not None:
        await api.wait_end(result["run"]["run_id"])


# -- branches ------------------------------------------------------------------------------


async def test_rewind_then_send_makes_a_branch_that_all_shows(
    server: Server, http: httpx.AsyncClient
) -> None:
    thread_id = await new_thread(http)
    await exchange(http, thread_id, "a")
    await exchange(http, thread_id, "b")
    u1, a1, u2, a2 = (await read_thread(http, thread_id))["turns"]

    async with connect(server.ws_url) as conn:
        ws = WsApi(conn)
        result = await ws.ok("rewind", thread_id, turn_id=a1["turn_id"], expected_revision=2)
        assert result["thread"]["turns"] == [u1, a1]
    result = await exchange(http, thread_id, "c")
    assert result["thread"]["revision"] == 4
    path = (await read_thread(http, thread_id))["turns"]
    assert_chain(path)
    assert path[:2] == [u1, a1]
    u3, a3 = path[2:]
    assert said(path[2:]) == [("user", "c"), ("assistant", "c")]

    tree = (await read_thread(http, thread_id, all=True))["turns"]
    by_id = {t["turn_id"]: t for t in tree}
    assert len(tree) == 6
    assert by_id.keys() == {t["turn_id"] for t in (u1, a1, u2, a2, u3, a3)}
    # Both branches hang off the same assistant turn, each with its parents.
    assert by_id[u2["turn_id"]] == u2 and by_id[a2["turn_id"]] == a2
    assert u2["parent_id"] == u3["parent_id"] == a1["turn_id"]
    assert a2["parent_id"] == u2["turn_id"] and a3["parent_id"] == u3["turn_id"]

    # Switching to the other branch makes it the active path; sending continues it.
    async with connect(server.ws_url) as conn:
        ws = WsApi(conn)
        result = await ws.ok("rewind", thread_id, turn_id=a2["turn_id"], expected_revision=4)
        assert result["thread"]["turns"] == [u1, a1, u2, a2]
        assert result["thread"]["head"] == a2["turn_id"]
        result = await ws.ok("send", thread_id, content="d", agent="echo", expected_revision=5)
        events = await ws.wait_end(result["run"]["run_id"])
        assert history_of(events) == [
            ("user", "a"),
            ("assistant", "a"),
            ("user", "b"),
            ("assistant", "b"),
            ("user", "d"),
        ]
        result = await ws.ok("rewind", thread_id, turn_id=a3["turn_id"], expected_revision=6)
        assert result["thread"]["turns"] == [u1, a1, u3, a3]
        result = await ws.ok("rewind", thread_id, turn_id=None, expected_revision=7)
        assert result["thread"]["turns"] == [] and result["thread"]["head"] is None
        error = await ws.error("rewind", thread_id, 404, turn_id="turn_nope")
        assert error["code"] == "not_found"
    read = await read_thread(http, thread_id)
    assert read["revision"] == 8 and read["turns"] == []
    assert len((await read_thread(http, thread_id, all=True))["turns"]) == 8


# -- multitask strategies, as a watching tab sees them -------------------------------------


async def test_reject_refuses_every_change_while_a_run_is_active(
    server: Server, http: httpx.AsyncClient
) -> None:
    thread_id = await new_thread(http)
    async with connect(server.ws_url) as watcher, connect(server.ws_url) as tab:
        watched = await watcher.ok("watch_thread", thread_id=thread_id)
        assert watched["thread"]["revision"] == 0 and watched["thread"]["turns"] == []
        result = await tab.ok("send", thread_id=thread_id, content="q", agent="ask")
        run_id = result["run"]["run_id"]
        await until_input_required(tab, run_id)
        path = await read_thread(http, thread_id)
        tree = await read_thread(http, thread_id, all=True)
        assert path["active_run_id"] == run_id
        assert path["turns"][1]["status"] == "requires_action"

        ws, over_http = WsApi(tab), HttpApi(http)
        for kind in KINDS:
            fields = fields_for(kind, path["turns"])
            for client in (ws, over_http):
                for multitask in ({}, {"multitask": "reject"}):
                    error = await client.error(kind, thread_id, 409, **fields, **multitask)
                    assert error["code"] == "run_in_progress", (kind, client.name, error)
                    assert error["active_run_id"] == run_id
        assert await read_thread(http, thread_id) == path
        assert await read_thread(http, thread_id, all=True) == tree
        assert len(await thread_runs(http, thread_id)) == 1

        await tab.ok("stop", run_id=run_id)
        events = await tab.events_until_end(run_id)
        assert events[-1]["data"]["status"] == "stopped"
        frames = await watch_until(watcher, thread_id, change("run_ended"))
        assert story(frames) == [
            ("updated", 1),
            ("run_started", run_id, "running"),
            ("run_ended", run_id, "stopped"),
        ]
    read = await read_thread(http, thread_id)
    assert read["revision"] == 1 and read["active_run_id"] is None
    assert said(read["turns"]) == [("user", "q"), ("assistant", "")]
    assert read["turns"][1]["status"] == "stopped"


async def test_interrupt_stops_the_active_run_keeps_its_partial_turn_and_answers(
    server: Server, http: httpx.AsyncClient
) -> None:
    thread_id = await new_thread(http)
    async with connect(server.ws_url) as watcher, connect(server.ws_url) as tab:
        await watcher.ok("watch_thread", thread_id=thread_id)
        result = await tab.ok("send", thread_id=thread_id, content="tell me", agent="demo")
        first = result["run"]["run_id"]
        await tab.ok("subscribe", run_id=first)
        seen = await text_events(tab, first, 3)

        result = await tab.ok(
            "send",
            thread_id=thread_id,
            content="second",
            agent="echo",
            multitask="interrupt",
            expected_revision=1,
        )
        # The answer comes once the change took effect: the first run ended, the new
        # one started with its turns on the active path.
        second = result["run"]["run_id"]
        thread = result["thread"]
        assert thread["revision"] == 2
        assert_chain(thread["turns"])
        _, a1, u2, a2 = thread["turns"]
        assert a1["run_id"] == first and a1["status"] == "stopped"
        assert u2["content"] == "second" and a2["run_id"] == second

        events = seen + await tab.events_until_end(first)
        assert events[-1]["data"] == {"status": "stopped", "by": "interrupt"}
        partial = answer_of(events)
        assert partial and a1["content"] == partial
        assert (await snapshot_state(http, first))["message"]["content"] == partial

        await tab.ok("subscribe", run_id=second)
        events = await tab.events_until_end(second)
        assert events[-1]["data"] == {"status": "completed"}
        assert history_of(events) == [
            ("user", "tell me"),
            ("assistant", partial),
            ("user", "second"),
        ]
        frames = await watch_until(watcher, thread_id, change("run_ended", second))
        assert story(frames) == [
            ("updated", 1),
            ("run_started", first, "running"),
            ("updated", 2),
            ("run_ended", first, "stopped"),
            ("run_started", second, "running"),
            ("run_ended", second, "completed"),
        ]
    read = await read_thread(http, thread_id)
    assert read["revision"] == 2
    assert said(read["turns"]) == [
        ("user", "tell me"),
        ("assistant", partial),
        ("user", "second"),
        ("assistant", "second"),
    ]
    assert [t["status"] for t in read["turns"]] == [
        "completed",
        "stopped",
        "completed",
        "completed",
    ]


async def test_enqueue_queues_runs_in_order_and_a_queued_run_can_be_stopped(
    server: Server, http: httpx.AsyncClient
) -> None:
    thread_id = await new_thread(http)
    async with connect(server.ws_url) as watcher, connect(server.ws_url) as tab:
        await watcher.ok("watch_thread", thread_id=thread_id)
        result = await tab.ok("send", thread_id=thread_id, content="q", agent="ask")
        asking = result["run"]["run_id"]
        pending = await until_input_required(tab, asking)
        path = await read_thread(http, thread_id)
        frames = await watch_until(watcher, thread_id, change("run_started", asking))
        assert story(frames) == [("updated", 1), ("run_started", asking, "running")]

        queued: list[str] = []
        for revision, content in ((2, "A"), (3, "B"), (4, "C")):
            result = await tab.ok(
                "send",
                thread_id=thread_id,
                content=content,
                agent="echo",
                multitask="enqueue",
                expected_revision=revision - 1,
            )
            run = result["run"]
            assert run["status"] == "queued", run
            queued.append(run["run_id"])
            thread = result["thread"]
            # Applied when answered (the revision), but its user turn joins the active
            # path only when its run starts.
            assert thread["revision"] == revision
            assert thread["turns"] == path["turns"] and thread["active_run_id"] == asking
            frame = await watcher.next_frame(lambda f: f["type"] == "thread")
            assert frame["change"] == "updated" and frame["revision"] == revision
            assert frame["run"]["run_id"] == run["run_id"]
            assert frame["run"]["status"] == "queued"
        a, b, c = queued
        assert (await http.get(f"/api/runs/{a}")).json()["status"] == "queued"

        # A queued run can be stopped: it ends without ever running.
        stopped = (await http.post(f"/api/runs/{c}/stop")).json()
        assert stopped == {"stopping": True, "status": "queued"}
        events = await HttpApi(http).wait_end(c)
        assert [e["data"]["status"] for e in events] == ["stopped"]

        await tab.ok("respond", run_id=asking, request_id=pending["request_id"], value="yes")
        await tab.events_until_end(asking)
        await tab.ok("subscribe", run_id=a)
        await tab.ok("subscribe", run_id=b)
        events_a = await tab.events_until_end(a)
        events_b = await tab.events_until_end(b)
        assert history_of(events_a) == [
            ("user", "q"),
            ("assistant", "You said: yes"),
            ("user", "A"),
        ]
        assert history_of(events_b) == [
            ("user", "q"),
            ("assistant", "You said: yes"),
            ("user", "A"),
            ("assistant", "A"),
            ("user", "B"),
        ]
        frames = await watch_until(watcher, thread_id, change("run_ended", b))
        # One after another, in the order they were queued; the stopped one never runs.
        assert story(frames) == [
            ("run_ended", c, "stopped"),
            ("run_ended", asking, "completed"),
            ("run_started", a, "running"),
            ("run_ended", a, "completed"),
            ("run_started", b, "running"),
            ("run_ended", b, "completed"),
        ]
    read = await read_thread(http, thread_id)
    assert read["revision"] == 4 and read["active_run_id"] is None
    assert_chain(read["turns"])
    assert said(read["turns"]) == [
        ("user", "q"),
        ("assistant", "You said: yes"),
        ("user", "A"),
        ("assistant", "A"),
        ("user", "B"),
        ("assistant", "B"),
    ]
    assert [t["run_id"] for t in read["turns"][1::2]] == [asking, a, b]
    assert len((await read_thread(http, thread_id, all=True))["turns"]) == 6
    assert (await http.get(f"/api/runs/{c}")).json()["status"] == "stopped"


async def test_rollback_stops_the_active_run_and_takes_its_turns_off_the_path(
    server: Server, http: httpx.AsyncClient
) -> None:
    thread_id = await new_thread(http)
    await exchange(http, thread_id, "first")
    async with connect(server.ws_url) as watcher, connect(server.ws_url) as tab:
        await watcher.ok("watch_thread", thread_id=thread_id)
        result = await tab.ok("send", thread_id=thread_id, content="q", agent="ask")
        asking = result["run"]["run_id"]
        await until_input_required(tab, asking)
        u0, a0, u1, a1 = (await read_thread(http, thread_id))["turns"]

        result = await tab.ok(
            "send",
            thread_id=thread_id,
            content="r",
            agent="echo",
            multitask="rollback",
            expected_revision=2,
        )
        answer = result["run"]["run_id"]
        thread = result["thread"]
        assert thread["revision"] == 3
        assert_chain(thread["turns"])
        assert thread["turns"][:2] == [u0, a0]
        u2, a2 = thread["turns"][2:]
        assert u2["parent_id"] == a0["turn_id"] and u2["content"] == "r"
        assert a2["run_id"] == answer

        events = await tab.events_until_end(asking)
        assert events[-1]["data"] == {"status": "stopped", "by": "rollback"}
        await tab.ok("subscribe", run_id=answer)
        events = await tab.events_until_end(answer)
        assert history_of(events) == [("user", "first"), ("assistant", "first"), ("user", "r")]
        frames = await watch_until(watcher, thread_id, change("run_ended", answer))
        assert story(frames) == [
            ("updated", 2),
            ("run_started", asking, "running"),
            ("updated", 3),
            ("run_ended", asking, "stopped"),
            ("run_started", answer, "running"),
            ("run_ended", answer, "completed"),
        ]
    read = await read_thread(http, thread_id)
    assert said(read["turns"]) == [
        ("user", "first"),
        ("assistant", "first"),
        ("user", "r"),
        ("assistant", "r"),
    ]
    # Off the active path, still in the tree.
    tree = {t["turn_id"]: t for t in (await read_thread(http, thread_id, all=True))["turns"]}
    assert len(tree) == 6
    assert tree[u1["turn_id"]] == u1 and u1["parent_id"] == a0["turn_id"]
    assert tree[a1["turn_id"]]["status"] == "stopped"
    assert tree[a1["turn_id"]]["parent_id"] == u1["turn_id"]


# -- watch_thread ---------------------------------------------------------------------------


async def test_watch_thread_reports_each_revision_once_and_every_run(
    server: Server, http: httpx.AsyncClient
) -> None:
    thread_id = await new_thread(http)
    async with connect(server.ws_url) as watcher, connect(server.ws_url) as tab:
        watched = await watcher.ok("watch_thread", thread_id=thread_id)
        assert watched["thread"]["revision"] == 0 and watched["thread"]["turns"] == []
        ws = WsApi(tab)
        runs: list[str] = []

        async def run_op(kind: str, **fields: Any) -> None:
            result = await ws.ok(kind, thread_id, **fields)
            if result["run"] is not None:
                runs.append(result["run"]["run_id"])
                await ws.wait_end(result["run"]["run_id"])

        await run_op("send", content="one", agent="echo")  # 1
        await run_op("rewind", turn_id=None)  # 2
        await run_op("send", content="two", agent="echo")  # 3
        await run_op("regenerate", agent="echo")  # 4
        question = (await read_thread(http, thread_id))["turns"][0]
        await run_op("edit", turn_id=question["turn_id"], content="TWO", agent="echo")  # 5
        await run_op("undo")  # 6
        # Refused operations change nothing and report nothing.
        await ws.error("undo", thread_id, 409, expected_revision=1)
        await ws.error("undo", thread_id, 422)
        await run_op("rewind", turn_id=question["turn_id"])  # 7

        frames = await watch_until(
            watcher, thread_id, lambda f: f["change"] == "updated" and f["revision"] == 7
        )
        updates = [f["revision"] for f in frames if f["change"] == "updated"]
        assert updates == [1, 2, 3, 4, 5, 6, 7]
        lifecycle = [f for f in frames if f["change"] != "updated"]
        expected: list[tuple[Any, ...]] = []
        for run_id in runs:
            expected += [("run_started", run_id, "running"), ("run_ended", run_id, "completed")]
        assert story(lifecycle) == expected
        for frame in lifecycle:
            assert frame["run"]["thread_id"] == thread_id
        # Each run frame carries the revision the thread is at.
        ended = [f for f in frames if f["change"] == "run_ended"]
        assert [f["revision"] for f in ended] == [1, 3, 4, 5]

        # Another tab joining now gets the thread with its active path.
        async with connect(server.ws_url) as late:
            watched = await late.ok("watch_thread", thread_id=thread_id)
            read = await read_thread(http, thread_id)
            assert watched["thread"] == read
            assert read["revision"] == 7 and read["head"] == question["turn_id"]
        await watcher.assert_quiet()
        assert not watcher.take("thread")


async def test_two_tabs_racing_the_same_edit_one_wins(
    server: Server, http: httpx.AsyncClient
) -> None:
    thread_id = await new_thread(http)
    await exchange(http, thread_id, "one")
    async with connect(server.ws_url) as a, connect(server.ws_url) as b:
        for conn in (a, b):
            assert (await conn.ok("watch_thread", thread_id=thread_id))["thread"]["revision"] == 1
        for revision in (1, 2, 3):
            question = (await read_thread(http, thread_id))["turns"][0]

            def edit(
                conn: Conn, name: str, revision: int = revision, question: Frame = question
            ) -> Any:
                return conn.op(
                    "edit",
                    thread_id=thread_id,
                    turn_id=question["turn_id"],
                    content=f"{revision} by {name}",
                    agent="echo",
                    expected_revision=revision,
                )

            replies = await asyncio.gather(edit(a, "a"), edit(b, "b"))
            won = [r for r in replies if r["ok"]]
            lost = [r for r in replies if not r["ok"]]
            assert len(won) == 1 and len(lost) == 1, replies
            error = lost[0]["error"]
            assert error["code"] == "conflict"
            assert error["expected_revision"] == revision
            assert error["actual_revision"] == revision + 1
            result = won[0]["result"]
            assert result["thread"]["revision"] == revision + 1
            winner = result["run"]["run_id"]
            content = result["thread"]["turns"][0]["content"]
            await HttpApi(http).wait_end(winner)
            for conn in (a, b):
                frames = await watch_until(conn, thread_id, change("run_ended", winner))
                assert story(frames) == [
                    ("updated", revision + 1),
                    ("run_started", winner, "running"),
                    ("run_ended", winner, "completed"),
                ]
            tree = (await read_thread(http, thread_id, all=True))["turns"]
            edits = [t for t in tree if t["content"].startswith(f"{revision} by ")]
            assert [t["content"] for t in edits] == [content, content]  # user + answer

    # The same race over HTTP.
    question = (await read_thread(http, thread_id))["turns"][0]
    api = HttpApi(http)
    responses = await asyncio.gather(
        *(
            api.post(
                "edit",
                thread_id,
                turn_id=question["turn_id"],
                content=name,
                agent="echo",
                expected_revision=4,
            )
            for name in ("x", "y")
        )
    )
    assert sorted(r.status_code for r in responses) == [200, 409]
    lost_response = next(r for r in responses if r.status_code == 409)
    assert lost_response.json()["error"]["actual_revision"] == 5
    won_response = next(r for r in responses if r.status_code == 200)
    await api.wait_end(won_response.json()["run"]["run_id"])
    assert (await read_thread(http, thread_id))["revision"] == 5


# -- partial answers and restarts ----------------------------------------------------------


async def test_a_stopped_runs_partial_answer_is_its_turns_content(
    server: Server, http: httpx.AsyncClient
) -> None:
    thread_id = await new_thread(http)
    async with connect(server.ws_url) as tab:
        result = await tab.ok("send", thread_id=thread_id, content="go on")
        run_id = result["run"]["run_id"]
        assert result["run"]["agent"] == "demo"
        await tab.ok("subscribe", run_id=run_id)
        seen = await text_events(tab, run_id, 3)
        stopped = await tab.ok("stop", run_id=run_id)
        assert stopped["stopping"] is True
        events = seen + await tab.events_until_end(run_id)
    assert events[-1]["data"]["status"] == "stopped"
    partial = answer_of(events)
    texts = [e for e in events if e["type"] == "text"]
    assert len(texts) >= 3 and partial == "".join(e["data"]["text"] for e in texts)
    assert (await snapshot_state(http, run_id))["message"]["content"] == partial
    read = await read_thread(http, thread_id)
    answer = read["turns"][1]
    assert answer["run_id"] == run_id
    assert answer["content"] == partial and answer["status"] == "stopped"
    assert read["revision"] == 1 and read["active_run_id"] is None


async def test_turns_survive_a_restart(server_factory: Any) -> None:
    first = await server_factory()
    async with httpx.AsyncClient(base_url=first.http_url, timeout=10) as http:
        thread_id = await new_thread(http)
        await exchange(http, thread_id, "a")
        await exchange(http, thread_id, "b")
        a1 = (await read_thread(http, thread_id))["turns"][1]
        await HttpApi(http).ok("rewind", thread_id, turn_id=a1["turn_id"])
        await exchange(http, thread_id, "c")
        async with connect(first.ws_url) as tab:
            result = await tab.ok("send", thread_id=thread_id, content="long", agent="demo")
            run_id = result["run"]["run_id"]
            await tab.ok("subscribe", run_id=run_id)
            await text_events(tab, run_id, 2)
            await tab.ok("stop", run_id=run_id)
            await tab.events_until_end(run_id)
        path = await read_thread(http, thread_id)
        tree = await read_thread(http, thread_id, all=True)
        # A run still waiting when the server shuts down.
        waiting_thread = await new_thread(http)
        waiting = await HttpApi(http).ok("send", waiting_thread, content="w", agent="ask")
    assert path["revision"] == 5 and len(path["turns"]) == 6 and len(tree["turns"]) == 8
    assert path["turns"][-1]["status"] == "stopped" and path["turns"][-1]["content"]
    await server_factory.stop(first)

    second = await server_factory()
    async with httpx.AsyncClient(base_url=second.http_url, timeout=10) as http:
        assert await read_thread(http, thread_id) == path
        assert await read_thread(http, thread_id, all=True) == tree
        turns = (await read_thread(http, waiting_thread))["turns"]
        assert said(turns) == [("user", "w"), ("assistant", "")]
        assert turns[1]["run_id"] == waiting["run"]["run_id"]
        assert turns[1]["status"] == "interrupted"
        # And the thread goes on from where it was.
        result = await exchange(http, thread_id, "d")
        assert result["thread"]["revision"] == 6
        assert result["thread"]["turns"][:6] == path["turns"]


# -- races between a change and the end of the active run ------------------------------------
#
# Over the wire a test cannot make the active run end at the exact moment a change is
# being decided, so these drive the server's own manager (server.runtime.manager) in the
# same event loop: the run's end and the change are set off in the same tick.


@pytest.mark.one_node
@pytest.mark.parametrize("multitask", ["enqueue", "interrupt", "rollback"])
async def test_a_change_made_as_the_active_run_ends_still_runs(
    multitask: str, server: Server, http: httpx.AsyncClient
) -> None:
    manager = server.runtime.manager
    thread_id = await new_thread(http)
    async with connect(server.ws_url) as tab:
        result = await tab.ok("send", thread_id=thread_id, content="q", agent="ask")
        asking = result["run"]["run_id"]
        pending = await until_input_required(tab, asking)
        live = manager.runs[asking]
        # The answer ends the active run while the change below is being decided.
        manager.respond(live, pending["request_id"], "x")
        _, run = await manager.change_thread(
            thread_id, ThreadChange("send", agent="echo", content="C", multitask=multitask)
        )
        assert run is not None
        events = await HttpApi(http).wait_end(run.run_id)
        assert events[-1]["data"] == {"status": "completed"}
    read = await read_thread(http, thread_id)
    assert read["active_run_id"] is None and read["revision"] == 2
    assert_chain(read["turns"])
    assert said(read["turns"][-2:]) == [("user", "C"), ("assistant", "C")]
    answer = (await snapshot_state(http, asking))["message"]["content"]
    tree = (await read_thread(http, thread_id, all=True))["turns"]
    assert said(tree) == [("user", "q"), ("assistant", answer), ("user", "C"), ("assistant", "C")]
    if multitask == "rollback" and len(read["turns"]) == 2:
        # Decided while the asking run was still active: its turns left the path.
        assert tree[2]["parent_id"] is None
    else:
        assert read["turns"] == tree


@pytest.mark.one_node
@pytest.mark.parametrize("multitask", ["interrupt", "rollback"])
async def test_a_queued_run_stopped_as_its_turn_comes_writes_no_turns(
    multitask: str, server: Server, http: httpx.AsyncClient
) -> None:
    manager = server.runtime.manager
    thread_id = await new_thread(http)
    async with connect(server.ws_url) as tab:
        result = await tab.ok("send", thread_id=thread_id, content="q", agent="ask")
        asking = result["run"]["run_id"]
        pending = await until_input_required(tab, asking)
        result = await tab.ok(
            "send", thread_id=thread_id, content="B", agent="echo", multitask="enqueue"
        )
        queued = result["run"]["run_id"]
        live = manager.runs[asking]
        manager.respond(live, pending["request_id"], "x")
        await live.wait_ended()
        # The queued run has just become the active one; it is stopped before it starts.
        _, run = await manager.change_thread(
            thread_id, ThreadChange("send", agent="echo", content="C", multitask=multitask)
        )
        assert run is not None
        await HttpApi(http).wait_end(run.run_id)
    events = await HttpApi(http).wait_end(queued)
    assert [e["data"]["status"] for e in events] == ["stopped"]  # it never ran
    read = await read_thread(http, thread_id)
    assert said(read["turns"]) == [
        ("user", "q"),
        ("assistant", "You said: x"),
        ("user", "C"),
        ("assistant", "C"),
    ]
    tree = (await read_thread(http, thread_id, all=True))["turns"]
    assert queued not in {t["run_id"] for t in tree}
    assert "B" not in {t["content"] for t in tree}


async def test_many_threads_changed_at_once(server: Server, http: httpx.AsyncClient) -> None:
    """Thread writes and the flusher's run writes share one database connection: changes
    of many threads at once, while their runs end and are written, all succeed."""
    threads = [await new_thread(http) for _ in range(12)]
    api = HttpApi(http)
    for round in range(3):
        results = await asyncio.gather(
            *(api.ok("send", t, content=f"{round}", agent="echo") for t in threads)
        )
        await asyncio.gather(*(api.wait_end(r["run"]["run_id"]) for r in results))
    for thread_id in threads:
        read = await read_thread(http, thread_id)
        assert read["revision"] == 3
        assert [c for _, c in said(read["turns"])] == ["0", "0", "1", "1", "2", "2"]
