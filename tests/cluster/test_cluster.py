"""A cluster of three real ``runcast serve`` nodes (PROTOCOL §9 "Several nodes").

Each test starts nodes A, B and C as separate processes (``spawn_server``) on loopback,
sharing a PostgreSQL database of their own (``CREATE DATABASE`` with a random name,
dropped ``WITH (FORCE)`` at teardown) and a Redis key prefix of their own (random; every
``PREFIX:*`` key is deleted at teardown). Clients are real ``websockets`` connections
(subprotocol ``runcast``) and httpx.

What is checked is the client contract across nodes: a run started on one node is read
from any other with every event exactly once and in order; a cursor resumes on another
node; stop, respond and presence reach across nodes; one active run per thread holds
when two nodes race; a node killed with SIGKILL has its runs ended ``interrupted``
(``node_lost``) by another within the lease plus 2 s, with nothing a reader received
taken back; Redis connections dropped mid-run lose nothing; thread watches see changes
made on other nodes.

Nothing sleeps to wait: waits are for frames, each bounded; where a test must wait on
another process it polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis.asyncio as aioredis
import websockets
from websockets.asyncio.client import ClientConnection

from app.core import snapshot
from tests.cluster.nodes import REDIS_URL, fresh_database, fresh_prefix
from tests.conftest import Spawned, spawn_server, stop_spawned

LEASE_S = 2.0
TAKEOVER_BOUND_S = LEASE_S + 2.0  # PROTOCOL §9: a dead node's runs end within lease + 2 s
WAIT_S = 10.0  # the bound on any wait for a frame that should come promptly
NODES = ("A", "B", "C")
TERMINAL = frozenset({"completed", "failed", "stopped", "interrupted"})

Frame = dict[str, Any]


# -- the cluster ----------------------------------------------------------------------------


@dataclass
class Cluster:
    """Three nodes on one database and one Redis prefix; ``redis`` is the test's own
    client of that Redis."""

    nodes: dict[str, Spawned]
    db_url: str
    broker_url: str
    prefix: str
    redis: aioredis.Redis

    def __getitem__(self, name: str) -> Spawned:
        return self.nodes[name]


def _start_node(db_url: str, broker_url: str, name: str) -> Spawned:
    return spawn_server(
        db_url,  # type: ignore[arg-type]  # spawn_server passes it on as str(db)
        "--broker",
        broker_url,
        "--node-id",
        name,
        "--lease",
        str(LEASE_S),
        "--flush-interval",
        "0.05",
    )


def _stop_node(node: Spawned) -> None:
    stop_spawned(node)


@contextlib.asynccontextmanager
async def running_cluster(redis_url: str = REDIS_URL) -> AsyncIterator[Cluster]:
    """Nodes A, B and C on a fresh database and a fresh key prefix of ``redis_url``; all
    stopped, the database dropped and the prefix's keys deleted afterwards."""
    async with fresh_database() as db_url, fresh_prefix(redis_url) as broker_url:
        prefix = broker_url.rpartition("prefix=")[2]
        r = aioredis.Redis.from_url(redis_url, decode_responses=True)
        nodes: dict[str, Spawned] = {}
        try:
            # The three start together (and migrate the new database together).
            started = await asyncio.gather(
                *(asyncio.to_thread(_start_node, db_url, broker_url, n) for n in NODES),
                return_exceptions=True,
            )
            for n, node in zip(NODES, started, strict=True):
                if isinstance(node, Spawned):
                    nodes[n] = node
            for node in started:
                if isinstance(node, BaseException):
                    raise node
            yield Cluster(nodes, db_url, broker_url, prefix, r)
        finally:
            for n, node in nodes.items():
                await asyncio.to_thread(_stop_node, node)
                # Shown with the test's report when it fails: the evidence.
                print(f"----- node {n} (exit {node.process.returncode}) -----")
                print(node.text[-30_000:])
            await r.aclose()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster() as running:
        yield running


# -- a client -------------------------------------------------------------------------------


class Client:
    """A WebSocket connection to one node that reads every frame in the background:
    each run's events (and the epochs of their frames), presence counts, thread frames,
    resets; replies go to the op that is waiting for them."""

    def __init__(self, ws: ClientConnection, welcome: Frame, node: str) -> None:
        self.ws = ws
        self.welcome = welcome
        self.node = node
        self.frames: list[Frame] = []  # every frame after the welcome, in order
        self.events: dict[str, list[Frame]] = {}
        self.epochs: dict[str, list[str]] = {}  # the epoch of each events frame
        self.watchers: dict[str, int] = {}  # the newest count of each run
        self.threads: list[Frame] = []
        self.resets: list[Frame] = []
        self.snapshots: dict[str, list[Frame]] = {}
        self.close_code: int | None = None
        self._replies: dict[int, asyncio.Future[Frame]] = {}
        self._ref = 0
        self._progress = asyncio.Event()

    @property
    def connection_id(self) -> str:
        return str(self.welcome["connection_id"])

    async def read_until_closed(self) -> None:
        try:
            async for raw in self.ws:
                frame: Frame = json.loads(raw)
                self.frames.append(frame)
                kind = frame["type"]
                if kind == "events":
                    self.events.setdefault(frame["run_id"], []).extend(frame["events"])
                    self.epochs.setdefault(frame["run_id"], []).append(frame["epoch"])
                elif kind == "reply":
                    run = (frame.get("result") or {}).get("run") if frame["ok"] else None
                    if isinstance(run, dict) and "watchers" in run:
                        # In frame order: a presence frame after the reply is newer.
                        self.watchers[run["run_id"]] = run["watchers"]
                    waiter = self._replies.pop(frame["ref"], None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(frame)
                elif kind == "presence":
                    self.watchers[frame["run_id"]] = frame["watchers"]
                elif kind == "thread":
                    self.threads.append(frame)
                elif kind == "reset":
                    self.resets.append(frame)
                elif kind == "snapshot":
                    self.snapshots.setdefault(frame["run_id"], []).append(frame)
                self._progress.set()
            self.close_code = self.ws.close_code or 1000
        except websockets.ConnectionClosed as closed:
            self.close_code = closed.rcvd.code if closed.rcvd is not None else 1006
        finally:
            if self.close_code is None:
                self.close_code = 1006
            for waiter in self._replies.values():
                if not waiter.done():
                    waiter.set_exception(AssertionError(f"node {self.node}: connection closed"))
            self._progress.set()

    async def request(self, op: str, timeout_s: float = WAIT_S, **fields: Any) -> Frame:
        """Send one op; returns its whole reply frame."""
        self._ref += 1
        ref = self._ref
        waiter = self._replies[ref] = asyncio.get_running_loop().create_future()
        await self.ws.send(json.dumps({"op": op, "ref": ref, **fields}))
        try:
            async with asyncio.timeout(timeout_s):
                reply: Frame = await waiter
                return reply
        except TimeoutError:
            raise AssertionError(f"node {self.node}: no reply to {op} in {timeout_s} s") from None

    async def call(self, op: str, timeout_s: float = WAIT_S, **fields: Any) -> Frame:
        """Send one op; returns its result (the reply must be ok)."""
        reply = await self.request(op, timeout_s, **fields)
        assert reply["ok"], f"node {self.node}: {op} {fields} -> {reply}"
        result: Frame = reply["result"]
        return result

    async def until(
        self, condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S
    ) -> None:
        """Wait, on arriving frames, until ``condition()`` holds (at most ``timeout_s``)."""
        try:
            async with asyncio.timeout(timeout_s):
                while not condition():
                    assert self.close_code is None, f"node {self.node}: closed while {what}"
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            tail = json.dumps(self.frames[-5:])[-3000:]
            raise AssertionError(
                f"node {self.node}: not {what} after {timeout_s} s; last frames: {tail}"
            ) from None

    def last_index(self, run_id: str) -> int:
        events = self.events.get(run_id)
        return events[-1]["i"] if events else 0

    def ended(self, run_id: str) -> bool:
        events = self.events.get(run_id)
        return events is not None and bool(events) and is_terminal(events[-1])

    async def until_index(self, run_id: str, index: int) -> None:
        await self.until(lambda: self.last_index(run_id) >= index, f"at index {index}")

    async def until_watchers(self, run_id: str, count: int) -> None:
        await self.until(lambda: self.watchers.get(run_id) == count, f"seeing {count} watchers")

    async def until_ended(self, run_id: str, timeout_s: float = WAIT_S) -> list[Frame]:
        await self.until(lambda: self.ended(run_id), f"at the end of {run_id}", timeout_s)
        return self.events[run_id]


@contextlib.asynccontextmanager
async def connect(node: Spawned, name: str) -> AsyncIterator[Client]:
    async with websockets.connect(
        node.ws_url,
        subprotocols=["runcast"],  # type: ignore[list-item]
        open_timeout=10,
        close_timeout=2,
        max_queue=None,
        max_size=None,
    ) as ws:
        assert ws.subprotocol == "runcast"
        async with asyncio.timeout(10):
            welcome: Frame = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        client = Client(ws, welcome, name)
        reader = asyncio.create_task(client.read_until_closed())
        try:
            yield client
        finally:
            if not reader.done():
                reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


@contextlib.asynccontextmanager
async def clients(cluster: Cluster, *names: str) -> AsyncIterator[list[Client]]:
    """One connection to each named node (a name may repeat)."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(connect(cluster[n], n)) for n in names]


def http(node: Spawned) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=node.http_url, timeout=10)


# -- checks ---------------------------------------------------------------------------------


def is_terminal(event: Frame) -> bool:
    return event["type"] == "status" and event["data"].get("status") in TERMINAL


def fold(events: list[Frame]) -> Frame:
    """The snapshot state after ``events`` (PROTOCOL §2), by app/core's reducer."""
    state = snapshot.initial_state()
    for event in events:
        snapshot.apply(state, event["type"], event["data"])
    return state


def assert_whole_log(events: list[Frame], status: str | None = None) -> None:
    """1..last, each once, in order, one terminal status event, the last."""
    indices = [e["i"] for e in events]
    assert indices == list(range(1, len(events) + 1)), f"gap or duplicate: {indices}"
    terminals = [e for e in events if is_terminal(e)]
    assert terminals == [events[-1]], f"terminal events: {terminals}"
    if status is not None:
        assert events[-1]["data"]["status"] == status, events[-1]


async def log_on_disk(node: Spawned, run_id: str) -> tuple[Frame, list[Frame]]:
    """(head, every event) of a run's log read over HTTP from ``node``."""
    events: list[Frame] = []
    async with http(node) as client:
        while True:
            response = await client.get(
                f"/api/runs/{run_id}/events", params={"after": len(events), "limit": 1000}
            )
            assert response.status_code == 200, response.text
            page = response.json()
            events.extend(page["events"])
            if not page["events"] or len(events) >= page["last_index"]:
                return page, events


async def new_thread(node: Spawned) -> str:
    async with http(node) as client:
        response = await client.post("/api/threads", json={})
        assert response.status_code == 201, response.text
        return str(response.json()["thread_id"])


# -- 1. watched from every node -------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_a_run_started_on_a_is_read_whole_on_b_and_c(cluster: Cluster) -> None:
    """A counter started on A, watched from B and C from after=0 while it runs: each of
    A, B and C receives 1..last exactly once, in order, the same events (timestamps
    included), ending with `completed`; the log on disk is the same."""
    n = 100
    async with clients(cluster, "A", "B", "C") as (a, b, c):
        run = (await a.call("start", agent="counter", input={"n": n, "delay_s": 0.01}))["run"]
        run_id, epoch = run["run_id"], run["epoch"]
        for watcher in (b, c):
            info = (await watcher.call("subscribe", run_id=run_id, after=0))["run"]
            assert info["epoch"] == epoch
        got = {w.node: await w.until_ended(run_id) for w in (a, b, c)}
        for name, events in got.items():
            assert_whole_log(events, "completed")
            assert len(events) == n + 2, (name, len(events))  # running, n ticks, completed
            assert [e["data"]["n"] for e in events[1:-1]] == list(range(1, n + 1)), name
            assert set((a, b, c)[NODES.index(name)].epochs[run_id]) == {epoch}, name
        assert got["B"] == got["A"] and got["C"] == got["A"]
        assert not (a.resets or b.resets or c.resets)
    head, on_disk = await log_on_disk(cluster["C"], run_id)
    assert (head["status"], head["epoch"]) == ("completed", epoch)
    assert on_disk == got["A"]


# -- 2. resume on another node --------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_a_cursor_from_b_resumes_on_c_with_no_gap_and_no_duplicate(
    cluster: Cluster,
) -> None:
    """Subscribe on B, read some events, drop the connection; subscribe on C with
    after = the last index seen and its epoch, while the run is still going: the union
    is exactly 1..last, and it is the log."""
    async with clients(cluster, "A") as (a,):
        run = (
            await a.call(
                "start", agent="counter", input={"n": 80, "delay_s": 0.02}, subscribe=False
            )
        )["run"]
        run_id = run["run_id"]
        async with connect(cluster["B"], "B") as b:
            await b.call("subscribe", run_id=run_id, after=0)
            await b.until_index(run_id, 10)
        first = list(b.events[run_id])
        epochs = set(b.epochs[run_id])
        assert len(epochs) == 1
        [epoch] = epochs
        assert not is_terminal(first[-1])
        cursor = first[-1]["i"]
        async with connect(cluster["C"], "C") as c:
            info = (await c.call("subscribe", run_id=run_id, after=cursor, epoch=epoch))["run"]
            assert info["epoch"] == epoch
            assert info["status"] == "running", info  # resumed mid-run
            rest = await c.until_ended(run_id)
            assert set(c.epochs[run_id]) == {epoch}
            assert not c.resets
        assert rest[0]["i"] == cursor + 1, (cursor, rest[0])
        union = first + rest
        assert_whole_log(union, "completed")
    _, on_disk = await log_on_disk(cluster["B"], run_id)
    assert union == on_disk


@pytest.mark.timeout(40)
async def test_snapshots_served_by_other_nodes_agree_with_the_log(cluster: Cluster) -> None:
    """PROTOCOL §2: the snapshot at index n is the fold of events 1..n. Thirty `demo`
    runs streaming on A; C subscribes to each at once (after "latest", with a snapshot)
    while they stream: every snapshot C serves is the fold of the log up to its index, and
    so is the RunInfo's status."""
    runs = 30
    async with clients(cluster, "A", "C") as (a, c):
        started = await asyncio.gather(
            *(
                a.call(
                    "start",
                    agent="demo",
                    input={"tokens": 3000, "speed": 3000},
                    subscribe=False,
                )
                for _ in range(runs)
            )
        )
        run_ids = [r["run"]["run_id"] for r in started]
        # Each has streamed some (on disk and in Redis) before C first hears of it.
        async with http(cluster["A"]) as client:
            deadline = time.monotonic() + WAIT_S
            for run_id in run_ids:
                while (await client.get(f"/api/runs/{run_id}")).json()["last_index"] < 5:
                    assert time.monotonic() < deadline, "the runs did not start streaming"
                    await asyncio.sleep(0.02)
        infos = await asyncio.gather(
            *(
                c.call("subscribe", run_id=run_id, after="latest", snapshot=True, presence=False)
                for run_id in run_ids
            )
        )
        await c.until(lambda: all(r in c.snapshots for r in run_ids), "sent every snapshot")
        for run_id in run_ids:
            await c.call("unsubscribe", run_id=run_id)
            await a.call("stop", run_id=run_id)
        wrong = []
        for run_id, info in zip(run_ids, infos, strict=True):
            [frame] = c.snapshots[run_id]
            _, log = await log_on_disk(cluster["A"], run_id)
            expected = fold(log[: frame["index"]])
            if frame["state"] != expected or info["run"]["status"] != "running":
                wrong.append(
                    {
                        "run_id": run_id,
                        "index": frame["index"],
                        "served": frame["state"]["status"],
                        "info_status": info["run"]["status"],
                        "served_text": len(frame["state"]["message"]["content"]),
                        "log_text": len(expected["message"]["content"]),
                    }
                )
        assert not wrong, f"{len(wrong)} of {runs} snapshots from C disagree with the log: {wrong}"


# -- 3. stop from another node --------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_stop_from_c_ends_a_run_of_a_stopped_for_watchers_on_a_and_b(
    cluster: Cluster,
) -> None:
    async with clients(cluster, "A", "B", "C") as (a, b, c):
        run = (await a.call("start", agent="counter", input={"n": 10**6, "delay_s": 0.02}))["run"]
        run_id = run["run_id"]
        await b.call("subscribe", run_id=run_id, after=0)
        await b.until_index(run_id, 3)
        result = await c.call("stop", run_id=run_id)
        assert result == {"stopping": True, "status": "running"}, result
        for watcher in (a, b):
            events = await watcher.until_ended(run_id)
            assert_whole_log(events, "stopped")
            assert events[-1]["data"].get("by") == c.connection_id, events[-1]
        assert a.events[run_id] == b.events[run_id]
        # Stopping it again, from any node, is no error: it has ended.
        again = await b.call("stop", run_id=run_id)
        assert again == {"stopping": False, "status": "stopped"}, again
    async with http(cluster["C"]) as client:
        info = (await client.get(f"/api/runs/{run_id}")).json()
    assert info["status"] == "stopped", info


# -- 4. respond from another node -----------------------------------------------------------


@pytest.mark.timeout(40)
async def test_an_answer_from_b_reaches_an_ask_run_on_a(cluster: Cluster) -> None:
    """An `ask` run started (and watched) on A; the answer comes from a connection to B
    that never subscribed: the run gets the value, says it, and completes."""
    async with clients(cluster, "A", "B") as (a, b):
        run = (await a.call("start", agent="ask", input={"prompt": "Name?"}))["run"]
        run_id = run["run_id"]

        def asked() -> bool:
            return any(e["type"] == "input_required" for e in a.events.get(run_id, []))

        await a.until(asked, "asked for input")
        [question] = [e for e in a.events[run_id] if e["type"] == "input_required"]
        request_id = question["data"]["request_id"]
        await b.call("respond", run_id=run_id, request_id=request_id, value="Ada")
        events = await a.until_ended(run_id)
        assert_whole_log(events, "completed")
        kinds = [(e["type"], e["data"]) for e in events]
        assert ("input_received", {"request_id": request_id, "value": "Ada"}) in kinds, kinds
        assert ("text", {"text": "You said: Ada"}) in kinds, kinds
        after_answer = kinds[
            kinds.index(("input_received", {"request_id": request_id, "value": "Ada"})) :
        ]
        assert after_answer[1] == ("status", {"status": "running"}), kinds
        # Answering again, from B, is refused: the run waits for nothing.
        late = await b.request("respond", run_id=run_id, request_id=request_id, value="Bob")
        assert not late["ok"] and late["error"]["code"] == "not_waiting", late
    async with clients(cluster, "C") as (c,):
        await c.call("subscribe", run_id=run_id, after=0)
        assert await c.until_ended(run_id) == events


# -- 5. one active run per thread -----------------------------------------------------------


@pytest.mark.timeout(40)
async def test_two_nodes_racing_to_start_in_one_thread_one_wins(cluster: Cluster) -> None:
    """Five times: a new thread, then A and B start a run in it at the same moment
    (multitask reject): exactly one succeeds, the other gets `run_in_progress` naming the
    winner; C, starting a third, is refused too, naming the same winner."""
    async with clients(cluster, "A", "B", "C") as (a, b, c):
        for attempt in range(5):
            thread_id = await new_thread(cluster["C"])
            fields: Frame = {
                "agent": "counter",
                "input": {"n": 10**6, "delay_s": 0.05},
                "thread_id": thread_id,
                "multitask": "reject",
                "subscribe": False,
            }
            replies = await asyncio.gather(
                a.request("start", **fields), b.request("start", **fields)
            )
            won = [r for r in replies if r["ok"]]
            lost = [r for r in replies if not r["ok"]]
            assert len(won) == 1 and len(lost) == 1, (attempt, replies)
            winner = won[0]["result"]["run"]["run_id"]
            error = lost[0]["error"]
            assert error["code"] == "run_in_progress", (attempt, error)
            assert error.get("active_run_id") == winner, (attempt, error)
            third = await c.request("start", **fields)
            assert not third["ok"] and third["error"]["code"] == "run_in_progress", third
            assert third["error"].get("active_run_id") == winner, third
            await c.call("stop", run_id=winner)


@pytest.mark.timeout(40)
async def test_every_node_names_the_active_run_of_a_thread(cluster: Cluster) -> None:
    """ThreadInfo's `active_run_id` is the thread's active run (PROTOCOL §10), whichever
    node is asked: A, which runs it, and B and C, which do not."""
    thread_id = await new_thread(cluster["A"])
    async with clients(cluster, "A") as (a,):
        run = (
            await a.call(
                "start",
                agent="counter",
                input={"n": 10**6, "delay_s": 0.05},
                thread_id=thread_id,
                subscribe=False,
            )
        )["run"]
        shown = {}
        for name in NODES:
            async with http(cluster[name]) as client:
                response = await client.get(f"/api/threads/{thread_id}")
                assert response.status_code == 200, response.text
                shown[name] = response.json()["active_run_id"]
        await a.call("stop", run_id=run["run_id"])
    assert shown == {name: run["run_id"] for name in NODES}, shown


# -- 6. a node dies -------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_sigkill_of_a_ends_its_run_node_lost_within_the_lease_plus_2_s(
    cluster: Cluster,
) -> None:
    """A counter runs on A, watched from B and C. SIGKILL A: both watchers receive
    `interrupted` (`node_lost`) within lease + 2 s of the kill; what they received before
    is still the log (a fresh subscribe on B from 0 with that epoch gets the same events,
    no reset, plus the terminal one)."""
    async with clients(cluster, "A") as (a,):
        run = (
            await a.call(
                "start", agent="counter", input={"n": 10**6, "delay_s": 0.02}, subscribe=False
            )
        )["run"]
    run_id, epoch = run["run_id"], run["epoch"]
    async with clients(cluster, "B", "C") as (b, c):
        for watcher in (b, c):
            await watcher.call("subscribe", run_id=run_id, after=0)
        for watcher in (b, c):
            await watcher.until_index(run_id, 20)

        cluster["A"].process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()

        async def ended_after(watcher: Client) -> float:
            await watcher.until_ended(run_id, timeout_s=TAKEOVER_BOUND_S + 10)
            return time.monotonic() - killed_at

        took = await asyncio.gather(ended_after(b), ended_after(c))
        print(f"node_lost reached B after {took[0]:.2f} s and C after {took[1]:.2f} s")
        assert await asyncio.to_thread(cluster["A"].wait, 10) == -signal.SIGKILL
        for name, watcher, took_s in (("B", b, took[0]), ("C", c, took[1])):
            events = watcher.events[run_id]
            assert_whole_log(events, "interrupted")
            assert events[-1]["data"].get("reason") == "node_lost", (name, events[-1])
            assert took_s <= TAKEOVER_BOUND_S, f"{name}: node_lost after {took_s:.2f} s"
            assert set(watcher.epochs[run_id]) == {epoch}, (name, watcher.epochs[run_id])
            assert not watcher.resets, (name, watcher.resets)
        assert b.events[run_id] == c.events[run_id]
        seen = b.events[run_id]

    # Nothing either watcher received was taken back: same events, same epoch.
    async with clients(cluster, "B") as (fresh,):
        info = (await fresh.call("subscribe", run_id=run_id, after=0, epoch=epoch))["run"]
        assert (info["status"], info["epoch"], info["last_index"]) == (
            "interrupted",
            epoch,
            len(seen),
        ), info
        assert await fresh.until_ended(run_id) == seen
        assert not fresh.resets
        assert set(fresh.epochs[run_id]) == {epoch}
    head, on_disk = await log_on_disk(cluster["C"], run_id)
    assert head["epoch"] == epoch and on_disk == seen


@pytest.mark.timeout(40)
async def test_runs_ended_node_lost_keep_a_snapshot_that_is_the_fold_of_their_log(
    cluster: Cluster,
) -> None:
    """Ten `demo` runs stream text on A; SIGKILL A. Once another node has ended them
    (`node_lost`), the snapshot any node serves of each is the fold of its log
    (PROTOCOL §2), the text included: the takeover adds the events the stream held past
    the disk to the state once, no more."""
    runs = 10
    async with clients(cluster, "A") as (a,):
        started = await asyncio.gather(
            *(
                a.call(
                    "start", agent="demo", input={"tokens": 5000, "speed": 2000}, subscribe=False
                )
                for _ in range(runs)
            )
        )
        run_ids = [r["run"]["run_id"] for r in started]
        async with http(cluster["A"]) as client:
            deadline = time.monotonic() + WAIT_S
            for run_id in run_ids:
                while (await client.get(f"/api/runs/{run_id}")).json()["last_index"] < 100:
                    assert time.monotonic() < deadline, "the runs did not stream"
                    await asyncio.sleep(0.02)
        cluster["A"].process.send_signal(signal.SIGKILL)
    assert await asyncio.to_thread(cluster["A"].wait, 10) == -signal.SIGKILL
    async with http(cluster["B"]) as client:
        deadline = time.monotonic() + TAKEOVER_BOUND_S + 5
        for run_id in run_ids:
            while (await client.get(f"/api/runs/{run_id}")).json()["status"] != "interrupted":
                assert time.monotonic() < deadline, f"{run_id} was not ended"
                await asyncio.sleep(0.05)
    wrong = []
    async with http(cluster["C"]) as client:
        for run_id in run_ids:
            _, log = await log_on_disk(cluster["C"], run_id)
            assert_whole_log(log, "interrupted")
            assert log[-1]["data"].get("reason") == "node_lost"
            served = (await client.get(f"/api/runs/{run_id}/snapshot")).json()
            expected = fold(log)
            if served["index"] != len(log) or served["state"] != expected:
                wrong.append(
                    {
                        "run_id": run_id,
                        "index": served["index"],
                        "last": len(log),
                        "served_text": len(served["state"]["message"]["content"]),
                        "log_text": len(expected["message"]["content"]),
                    }
                )
    assert not wrong, f"{len(wrong)} of {runs} snapshots disagree with the log: {wrong}"


# -- 7. presence ----------------------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_presence_counts_the_watchers_of_every_node(cluster: Cluster) -> None:
    async with clients(cluster, "A", "B", "C") as (a, b, c):
        run = (await a.call("start", agent="counter", input={"n": 10**6, "delay_s": 0.05}))["run"]
        run_id = run["run_id"]
        await b.call("subscribe", run_id=run_id, after="latest")
        await c.call("subscribe", run_id=run_id, after="latest")
        for watcher in (a, b, c):
            await watcher.until_watchers(run_id, 3)
        # One leaves (C): A and B see 2.
        await c.call("unsubscribe", run_id=run_id)
        for watcher in (a, b):
            await watcher.until_watchers(run_id, 2)
        await b.call("stop", run_id=run_id)
        await a.until_ended(run_id)


# -- 8. Redis connections dropped -----------------------------------------------------------


def _redis_client_ports(pid: int, redis_port: int) -> set[int]:
    """The local ports of ``pid``'s TCP connections to ``redis_port`` (from /proc)."""
    inodes: set[str] = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == redis_port:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


async def node_redis_clients(cluster: Cluster) -> dict[str, list[Frame]]:
    """Node name -> its connections to Redis, as ``CLIENT LIST`` shows them."""
    redis_port = urlsplit(REDIS_URL).port or 6379
    owner: dict[int, str] = {}
    for name, node in cluster.nodes.items():
        if node.process.poll() is None:
            for port in _redis_client_ports(node.process.pid, redis_port):
                owner[port] = name
    found: dict[str, list[Frame]] = {name: [] for name in cluster.nodes}
    for client in await cluster.redis.client_list():
        holder = owner.get(int(client["addr"].rsplit(":", 1)[1]))
        if holder is not None:
            found[holder].append(client)
    return found


def _kind(client: Frame) -> str:
    return "pubsub" if "P" in client["flags"] else "normal"


async def kill_redis_connections(cluster: Cluster) -> dict[str, dict[str, int]]:
    """``CLIENT KILL`` every connection the nodes hold to Redis, normal and pubsub alike
    (and no other client of this Redis: other tests may share it). First waits (polling,
    with a deadline) until every node is subscribed again to the cluster's channel after
    an earlier kill. Returns, per node, how many of each type were killed."""
    deadline = time.monotonic() + 5.0
    while True:
        found = await node_redis_clients(cluster)
        if all(any(_kind(c) == "pubsub" for c in cs) for cs in found.values()):
            break
        assert time.monotonic() < deadline, f"a node did not subscribe to Redis again: {found}"
        await asyncio.sleep(0.05)
    killed = {name: {"normal": 0, "pubsub": 0} for name in found}
    for name, listed in found.items():
        for client in listed:
            killed[name][_kind(client)] += int(
                await cluster.redis.client_kill_filter(_id=client["id"])
            )
    return killed


@pytest.mark.timeout(40)
async def test_dropped_redis_connections_lose_nothing(cluster: Cluster) -> None:
    """A run on A watched from B; every Redis connection of every node (commands, the
    blocking reader, the channel's subscription) is killed, twice, while it runs: the
    watcher on B still receives 1..last exactly once, and the run completes."""
    n = 200
    async with clients(cluster, "A", "B") as (a, b):
        run = (
            await a.call("start", agent="counter", input={"n": n, "delay_s": 0.01}, subscribe=False)
        )["run"]
        run_id = run["run_id"]
        await b.call("subscribe", run_id=run_id, after=0)
        kills = []
        for at in (30, 100):
            await b.until_index(run_id, at)
            killed = await kill_redis_connections(cluster)
            kills.append(killed)
            # The owner (publishing) and the reader (B) lost live connections each time,
            # and every node its subscription.
            assert killed["A"]["normal"] >= 1 and killed["B"]["normal"] >= 1, kills
            assert all(k["pubsub"] == 1 for k in killed.values()), kills
            assert b.last_index(run_id) < n, "the run ended before the kill"
        print(f"killed Redis connections: {kills}")
        events = await b.until_ended(run_id, timeout_s=20)
        assert_whole_log(events, "completed")
        assert len(events) == n + 2
        assert [e["data"]["n"] for e in events[1:-1]] == list(range(1, n + 1))
        assert not b.resets
    _, on_disk = await log_on_disk(cluster["C"], run_id)
    assert on_disk == events


# -- 9. thread watch ------------------------------------------------------------------------


@pytest.mark.timeout(40)
async def test_a_thread_watched_on_b_sees_changes_made_on_a(cluster: Cluster) -> None:
    thread_id = await new_thread(cluster["A"])
    async with clients(cluster, "A", "B") as (a, b):
        watched = (await b.call("watch_thread", thread_id=thread_id))["thread"]
        assert watched["thread_id"] == thread_id
        run = (
            await a.call(
                "start", agent="counter", input={"n": 5, "delay_s": 0.01}, thread_id=thread_id
            )
        )["run"]
        run_id = run["run_id"]
        await a.until_ended(run_id)

        def change(kind: str) -> list[Frame]:
            return [
                f
                for f in b.threads
                if f["thread_id"] == thread_id
                and f["change"] == kind
                and (f.get("run") or {}).get("run_id") == run_id
            ]

        await b.until(lambda: bool(change("run_started")), "told the run started")
        await b.until(lambda: bool(change("run_ended")), "told the run ended")
        assert change("run_ended")[0]["run"]["status"] == "completed"

        # A revision made on A (a PATCH) reaches B's watch too.
        async with http(cluster["A"]) as client:
            response = await client.patch(f"/api/threads/{thread_id}", json={"title": "renamed"})
            assert response.status_code == 200, response.text
            revision = response.json()["revision"]

        def updated() -> bool:
            return any(
                f["thread_id"] == thread_id
                and f["change"] == "updated"
                and f["revision"] == revision
                for f in b.threads
            )

        await b.until(updated, f"told of revision {revision}")
