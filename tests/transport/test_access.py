"""End to end access (PROTOCOL.md §8): every route and every op walked with every kind
of token, tokens in each place a client may put one, and share links.

The role table is walked over the app's own route table (``create_app(...).routes``) and
``wire.OPS``: a route or an op with no entry here fails the walk, so a new one cannot be
added without saying who may use it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Mount, Route, WebSocketRoute
from websockets.exceptions import ConnectionClosed

from app.access.policy import Role
from app.config import Settings
from app.transport import wire
from app.transport.app import create_app
from tests.conftest import Server
from tests.transport.helpers import (
    TERMINAL,
    Conn,
    Frame,
    open_conn,
    refused_handshake,
    wait_status,
)

SECRETS = {
    "viewer": "viewer-secret-0123456789",
    "operator": "operator-secret-0123456789",
    "admin": "admin-secret-0123456789",
}
TOKENS = tuple(f"{role}:{secret}" for role, secret in SECRETS.items())
BAD = "not-a-token-0123456789"
# Generous limits: the walk makes a few hundred requests from one address.
SETTINGS: dict[str, Any] = {"tokens": TOKENS, "rate": 100_000.0, "rate_burst": 100_000}

# Who asks: no token, a bad one, each role, and a share of each kind (operator shares, so
# that what refuses them is their scope, not their role).
WHO = ("none", "bad", "viewer", "operator", "admin", "run share", "thread share")
ROLE = {
    "viewer": Role.VIEWER,
    "operator": Role.OPERATOR,
    "admin": Role.ADMIN,
    "run share": Role.OPERATOR,
    "thread share": Role.OPERATOR,
}
# What a share reaches (§8): a run share that run only; a thread share the thread, its
# turns and its runs. Server tokens reach everything.
REACH = {
    "run share": {"the run"},
    "thread share": {"the run", "a run of the thread", "the thread"},
}


def allowed(who: str, need: Role, resource: str) -> bool:
    """The protocol's answer, written from its text (not from app/access)."""
    role = ROLE[who]
    if role < need:
        return False
    if resource == "own share":
        return True
    if resource == "another's share":
        return role is Role.ADMIN
    if resource in ("the server (read)", "nothing"):
        return True  # listing, filtered to what the token reaches; an unknown route
    if who in REACH:
        return resource in REACH[who]
    return True


# -- the world every walk runs in ----------------------------------------------------------


@dataclass
class World:
    server: Server
    http: httpx.AsyncClient
    admin_http: httpx.AsyncClient  # the admin's token on every request (SSE helpers)
    tokens: dict[str, str | None]
    thread_id: str  # T: its finished run is "the run"; no run is active in it between cases
    run_id: str
    waiting_id: str  # an ask run waiting for input, in a thread of its own
    other_thread_id: str
    other_run_id: str

    def headers(self, who: str) -> dict[str, str]:
        token = self.tokens[who]
        return {} if token is None else {"Authorization": f"Bearer {token}"}

    async def call(
        self, who: str, method: str, path: str, body: Any = None, **kw: Any
    ) -> httpx.Response:
        async with asyncio.timeout(10):
            return await self.http.request(method, path, json=body, headers=self.headers(who), **kw)

    async def admin(self, method: str, path: str, body: Any = None, status: int = 200) -> Frame:
        response = await self.call("admin", method, path, body)
        assert response.status_code == status, (method, path, response.text)
        result: Frame = response.json()
        return result

    async def run_ended(self, run_id: str) -> None:
        await wait_status(self.admin_http, run_id, TERMINAL, timeout_s=10)

    async def input_required(self, run_id: str) -> str:
        """The request_id of the ask run's pending input."""
        events = await wait_status(self.admin_http, run_id, {"requires_action"})
        request = next(e for e in reversed(events) if e["type"] == "input_required")
        request_id: str = request["data"]["request_id"]
        return request_id

    async def ask_in_thread(self) -> tuple[str, str]:
        """A new ask run in T, waiting: its run_id and request_id."""
        run = await self.admin(
            "POST", "/api/runs", {"agent": "ask", "input": {}, "thread_id": self.thread_id}, 201
        )
        return run["run_id"], await self.input_required(run["run_id"])

    async def stop_and_end(self, run_id: str) -> None:
        await self.admin("POST", f"/api/runs/{run_id}/stop")
        await self.run_ended(run_id)

    async def with_turns(self) -> str:
        """Give T a user turn answered by an assistant turn at its head; the user turn."""
        body = {"content": "hello", "agent": "echo"}
        changed = await self.admin("POST", f"/api/threads/{self.thread_id}/messages", body)
        await self.run_ended(changed["run"]["run_id"])
        turns = changed["thread"]["turns"]
        user: str = next(t["turn_id"] for t in reversed(turns) if t["role"] == "user")
        return user

    async def share(self, who: str, kind: str, target: str, role: str = "operator") -> Frame:
        response = await self.call(who, "POST", f"/api/{kind}s/{target}/share", {"role": role})
        assert response.status_code == 201, response.text
        made: Frame = response.json()
        return made


@pytest.fixture
async def world(server_factory: Any) -> AsyncIterator[World]:
    server: Server = await server_factory(**SETTINGS)
    admin = {"Authorization": f"Bearer {SECRETS['admin']}"}
    async with (
        httpx.AsyncClient(base_url=server.http_url, timeout=10) as http,
        httpx.AsyncClient(base_url=server.http_url, timeout=10, headers=admin) as admin_http,
    ):
        tokens: dict[str, str | None] = {"none": None, "bad": BAD, **SECRETS}
        w = World(server, http, admin_http, tokens, "", "", "", "", "")
        w.thread_id = (await w.admin("POST", "/api/threads", {}, 201))["thread_id"]
        w.other_thread_id = (await w.admin("POST", "/api/threads", {}, 201))["thread_id"]
        for thread_id, name in ((w.thread_id, "run_id"), (w.other_thread_id, "other_run_id")):
            body = {"agent": "counter", "input": {"n": 2}, "thread_id": thread_id}
            run = await w.admin("POST", "/api/runs", body, 201)
            setattr(w, name, run["run_id"])
            await w.run_ended(run["run_id"])
        waiting = await w.admin("POST", "/api/runs", {"agent": "ask", "input": {}}, 201)
        w.waiting_id = waiting["run_id"]
        await w.input_required(w.waiting_id)
        tokens["run share"] = (await w.share("admin", "run", w.run_id))["token"]
        tokens["thread share"] = (await w.share("admin", "thread", w.thread_id))["token"]
        yield w


# -- HTTP: the role table ---------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """One request of the walk: what it touches and what success looks like."""

    method: str
    path: str
    resource: str
    ok: int
    body: Any = None
    code: str | None = None  # the error code that is success here (after the gate)
    then: Callable[[httpx.Response], Awaitable[None]] | None = None


Build = Callable[[World, str], Awaitable[list[Ask]]]


def scoped(who: str) -> bool:
    return who in REACH


async def _health(w: World, who: str) -> list[Ask]:
    return [Ask("GET", "/api/health", "public", 200)]


async def _page(w: World, who: str) -> list[Ask]:
    return [Ask("GET", "/", "public", 200), Ask("GET", "/index.html", "public", 200)]


async def _metrics(w: World, who: str) -> list[Ask]:
    # Server-wide counts: any server token, never a share (it reaches its run or thread).
    return [Ask("GET", "/metrics", "the server's metrics", 200)]


def _server_read(path: str) -> Build:
    async def build(w: World, who: str) -> list[Ask]:
        return [Ask("GET", path, "the server (read)", 200)]

    return build


async def _start(w: World, who: str) -> list[Ask]:
    counter = {"agent": "counter", "input": {"n": 1}}

    async def ended(response: httpx.Response) -> None:
        if response.status_code == 201:  # T is idle again for the next case
            await w.run_ended(response.json()["run_id"])

    asks = [
        Ask("POST", "/api/runs", "the server", 201, counter),  # in a new thread
        Ask(
            "POST",
            "/api/runs",
            "the thread",
            201,
            {**counter, "thread_id": w.thread_id},
            then=ended,
        ),
    ]
    if scoped(who):
        asks.append(
            Ask(
                "POST",
                "/api/runs",
                "another thread",
                201,
                {**counter, "thread_id": w.other_thread_id},
            )
        )
    return asks


async def _on_runs(
    w: World, who: str, suffix: str, method: str, ok: int, body: Any = None
) -> list[Ask]:
    asks = [Ask(method, f"/api/runs/{w.run_id}{suffix}", "the run", ok, body)]
    if scoped(who):
        asks.append(Ask(method, f"/api/runs/{w.other_run_id}{suffix}", "another run", ok, body))
        asks.append(Ask(method, f"/api/runs/{w.waiting_id}{suffix}", "another run", ok, body))
    return asks


def _run_route(suffix: str, method: str = "GET", ok: int = 200, body: Any = None) -> Build:
    async def build(w: World, who: str) -> list[Ask]:
        return await _on_runs(w, who, suffix, method, ok, body)

    return build


async def _respond(w: World, who: str) -> list[Ask]:
    run_id, request_id = await w.ask_in_thread()

    async def answered(response: httpx.Response) -> None:
        if response.status_code == 200:
            await w.run_ended(run_id)  # answered: it completes
        else:
            await w.stop_and_end(run_id)

    asks = [
        Ask(
            "POST",
            f"/api/runs/{run_id}/respond",
            "a run of the thread",
            200,
            {"request_id": request_id, "value": "yes"},
            then=answered,
        ),
        # A finished run: the gate lets the request by, the run is not waiting.
        Ask(
            "POST",
            f"/api/runs/{w.run_id}/respond",
            "the run",
            409,
            {"request_id": "req_nope"},
            code="not_waiting",
        ),
    ]
    if scoped(who):
        asks.append(
            Ask(
                "POST",
                f"/api/runs/{w.waiting_id}/respond",
                "another run",
                409,
                {"request_id": "req_nope"},
                code="not_waiting",
            )
        )
    return asks


async def _threads(w: World, who: str) -> list[Ask]:
    return [Ask("POST", "/api/threads", "the server", 201, {})]


def _thread_route(suffix: str, method: str, ok: int, body: Any = None) -> Build:
    async def build(w: World, who: str) -> list[Ask]:
        asks = [Ask(method, f"/api/threads/{w.thread_id}{suffix}", "the thread", ok, body)]
        if scoped(who):
            asks.append(
                Ask(method, f"/api/threads/{w.other_thread_id}{suffix}", "another thread", ok, body)
            )
        return asks

    return build


async def _delete_run(w: World, who: str) -> list[Ask]:
    """An ended run of its own to delete (admin only), so the world's runs stay."""
    run = await w.admin("POST", "/api/runs", {"agent": "counter", "input": {"n": 1}}, 201)
    await w.run_ended(run["run_id"])
    return [Ask("DELETE", f"/api/runs/{run['run_id']}", "the run", 200)]


async def _delete_thread(w: World, who: str) -> list[Ask]:
    """A thread of its own to delete (admin only)."""
    thread = await w.admin("POST", "/api/threads", {}, 201)
    return [Ask("DELETE", f"/api/threads/{thread['thread_id']}", "the thread", 200)]


async def _revoke(w: World, who: str) -> list[Ask]:
    if ROLE.get(who, Role.VIEWER) >= Role.OPERATOR:
        kind, target = ("thread", w.thread_id) if who == "thread share" else ("run", w.run_id)
        own = (await w.share(who, kind, target))["share_id"]
    else:
        own = (await w.share("admin", "run", w.run_id))["share_id"]
    by = "operator" if who == "admin" else "admin"
    other = (await w.share(by, "run", w.run_id))["share_id"]
    return [
        Ask("DELETE", f"/api/shares/{own}", "own share", 200),
        Ask("DELETE", f"/api/shares/{other}", "another's share", 200),
    ]


def _no_route(method: str) -> Build:
    async def build(w: World, who: str) -> list[Ask]:
        body = None if method in ("GET", "DELETE") else {}
        return [Ask(method, "/api/no/such/route", "nothing", 404, body, code="not_found")]

    return build


def http_table() -> dict[tuple[str, str], tuple[Role | None, Build]]:
    """(method, route path) -> (least role, None for public; the requests to make)."""
    return {
        ("GET", "/api/health"): (None, _health),
        ("GET", "/api/agents"): (Role.VIEWER, _server_read("/api/agents")),
        ("GET", "/api/openapi.json"): (Role.VIEWER, _server_read("/api/openapi.json")),
        ("GET", "/api/asyncapi.json"): (Role.VIEWER, _server_read("/api/asyncapi.json")),
        ("GET", "/metrics"): (Role.VIEWER, _metrics),
        ("GET", "/api/runs"): (Role.VIEWER, _server_read("/api/runs")),
        ("POST", "/api/runs"): (Role.OPERATOR, _start),
        ("GET", "/api/runs/{run_id}"): (Role.VIEWER, _run_route("")),
        ("PATCH", "/api/runs/{run_id}"): (
            Role.OPERATOR,
            _run_route("", "PATCH", 200, {"title": "renamed"}),
        ),
        ("DELETE", "/api/runs/{run_id}"): (Role.ADMIN, _delete_run),
        ("GET", "/api/runs/{run_id}/snapshot"): (Role.VIEWER, _run_route("/snapshot")),
        ("GET", "/api/runs/{run_id}/events"): (Role.VIEWER, _run_route("/events")),
        ("POST", "/api/runs/{run_id}/stop"): (Role.OPERATOR, _run_route("/stop", "POST", 200)),
        ("POST", "/api/runs/{run_id}/respond"): (Role.OPERATOR, _respond),
        ("POST", "/api/runs/{run_id}/share"): (
            Role.OPERATOR,
            _run_route("/share", "POST", 201, {}),
        ),
        ("POST", "/api/threads"): (Role.OPERATOR, _threads),
        ("GET", "/api/threads"): (Role.VIEWER, _server_read("/api/threads")),
        ("GET", "/api/threads/{thread_id}"): (Role.VIEWER, _thread_route("", "GET", 200)),
        ("PATCH", "/api/threads/{thread_id}"): (
            Role.OPERATOR,
            _thread_route("", "PATCH", 200, {"title": "renamed"}),
        ),
        ("DELETE", "/api/threads/{thread_id}"): (Role.ADMIN, _delete_thread),
        ("POST", "/api/threads/{thread_id}/share"): (
            Role.OPERATOR,
            _thread_route("/share", "POST", 201, {}),
        ),
        ("POST", "/api/threads/{thread_id}/{action}"): (
            Role.OPERATOR,
            _thread_route("/rewind", "POST", 200, {"turn_id": None}),
        ),
        ("DELETE", "/api/shares/{share_id}"): (Role.OPERATOR, _revoke),
        **{
            (method, "/api/{rest:path}"): (Role.VIEWER, _no_route(method))
            for method in ("GET", "POST", "PUT", "DELETE", "PATCH")
        },
        ("GET", "/ (static files)"): (None, _page),
    }


def app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    """Every (method, path) of the app create_app builds; ``WS`` for a WebSocket route."""
    app = create_app(Settings(db=tmp_path / "routes.db", tokens=TOKENS))
    found: set[tuple[str, str]] = set()
    for route in app.routes:
        if isinstance(route, Route):
            found.update((method, route.path) for method in route.methods or {"GET"})
        elif isinstance(route, WebSocketRoute):
            found.add(("WS", route.path))
        elif isinstance(route, Mount):
            assert route.path == "", route.path
            found.add(("GET", "/ (static files)"))
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")
    return {(m, p) for m, p in found if m != "HEAD"}


def check(response: httpx.Response, ask: Ask, expected: str) -> str | None:
    """None when ``response`` is what ``expected`` says, else what is wrong."""
    status = response.status_code
    body = response.json() if "json" in response.headers.get("content-type", "") else {}
    error = body.get("error", {}) if isinstance(body, dict) else {}
    if expected == "401":
        if status != 401 or error.get("code") != "unauthorized":
            return f"expected 401 unauthorized, got {status} {response.text[:200]}"
        if not response.headers.get("www-authenticate", "").startswith("Bearer"):
            return "a 401 without WWW-Authenticate: Bearer"
    elif expected == "403":
        if status != 403 or error.get("code") != "forbidden":
            return f"expected 403 forbidden, got {status} {response.text[:200]}"
    elif status != ask.ok or (ask.code is not None and error.get("code") != ask.code):
        return f"expected {ask.ok} {ask.code or ''}, got {status} {response.text[:200]}"
    return None


async def test_every_http_route_with_every_kind_of_token(world: World, tmp_path: Path) -> None:
    table = http_table()
    routes = app_routes(tmp_path)
    assert routes - set(table) <= {("WS", "/ws")}, f"routes with no entry: {routes - set(table)}"
    assert set(table) - routes == set(), f"entries with no route: {set(table) - routes}"
    wrong: list[str] = []
    async with asyncio.timeout(45):
        for (method, _path), (need, build) in table.items():
            for who in WHO:
                for ask in await build(world, who):
                    assert ask.method == method, (ask, method)
                    if need is None:
                        expected = "ok"
                    elif who in ("none", "bad"):
                        expected = "401"
                    else:
                        expected = "ok" if allowed(who, need, ask.resource) else "403"
                    response = await world.call(who, ask.method, ask.path, ask.body)
                    problem = check(response, ask, expected)
                    if problem:
                        wrong.append(f"{who} {ask.method} {ask.path} ({ask.resource}): {problem}")
                    if ask.then is not None:
                        await ask.then(response)
    assert not wrong, "\n".join(wrong)


async def test_health_needs_no_token_and_says_token_mode(world: World) -> None:
    for who in ("none", "bad", "viewer"):
        response = await world.call(who, "GET", "/api/health")
        assert response.status_code == 200
        body = response.json()
        assert body["ok"] is True and body["auth"] == "token"
        assert not any(secret in response.text for secret in SECRETS.values())


async def test_listing_shows_only_what_a_token_reaches(world: World) -> None:
    async def listed(who: str, **params: str) -> set[str]:
        response = await world.call(who, "GET", "/api/runs", params=params)
        assert response.status_code == 200, response.text
        return {run["run_id"] for run in response.json()["runs"]}

    everything = {world.run_id, world.other_run_id, world.waiting_id}
    for who in ("viewer", "operator", "admin"):
        assert await listed(who) == everything
    assert await listed("run share") == {world.run_id}
    assert await listed("run share", thread_id=world.other_thread_id) == set()
    assert await listed("run share", status="requires_action") == set()
    assert await listed("thread share") == {world.run_id}
    assert await listed("thread share", thread_id=world.other_thread_id) == set()
    run = await world.admin(
        "POST",
        "/api/runs",
        {"agent": "counter", "input": {"n": 1}, "thread_id": world.thread_id},
        201,
    )
    await world.run_ended(run["run_id"])
    assert await listed("thread share") == {world.run_id, run["run_id"]}
    assert await listed("run share") == {world.run_id}


# -- WebSocket: the role table -----------------------------------------------------------


@dataclass(frozen=True)
class Op:
    fields: dict[str, Any]
    resource: str
    need: Role
    code: str | None = None  # the error code that is success here
    then: Callable[[Frame], Awaitable[None]] | None = None


async def ws_ops(w: World, op: str, who: str) -> list[Op]:
    """The frames of ``op`` to send as ``who``."""

    async def run_ends(reply: Frame) -> None:
        """T is idle again for the next case."""
        if reply["ok"] and reply["result"]["run"] is not None:
            await w.run_ended(reply["result"]["run"]["run_id"])

    if op in ("subscribe", "stop"):
        main = Op(
            {"run_id": w.run_id, "after": 0} if op == "subscribe" else {"run_id": w.run_id},
            "the run",
            Role.VIEWER if op == "subscribe" else Role.OPERATOR,
        )
        others = [
            Op({**main.fields, "run_id": w.other_run_id}, "another run", main.need),
            Op({**main.fields, "run_id": w.waiting_id}, "another run", main.need),
        ]
        return [main, *others] if scoped(who) else [main]
    if op == "unsubscribe":
        return [Op({"run_id": w.run_id}, "the server (read)", Role.VIEWER)]
    if op == "ping":
        return [Op({}, "the server (read)", Role.VIEWER)]
    if op == "unwatch_thread":
        return [Op({"thread_id": w.thread_id}, "the server (read)", Role.VIEWER)]
    if op == "start":
        start = {"agent": "counter", "input": {"n": 1}, "subscribe": False}
        ops = [
            Op(start, "the server", Role.OPERATOR),  # in a new thread
            Op({**start, "thread_id": w.thread_id}, "the thread", Role.OPERATOR, then=run_ends),
        ]
        if scoped(who):
            ops.append(
                Op({**start, "thread_id": w.other_thread_id}, "another thread", Role.OPERATOR)
            )
        return ops
    if op == "respond":
        run_id, request_id = await w.ask_in_thread()

        async def answered(reply: Frame) -> None:
            if reply["ok"]:
                await w.run_ended(run_id)
            else:
                await w.stop_and_end(run_id)

        ops = [
            Op(
                {"run_id": run_id, "request_id": request_id, "value": 1},
                "a run of the thread",
                Role.OPERATOR,
                then=answered,
            ),
            Op(
                {"run_id": w.run_id, "request_id": "req_nope"},
                "the run",
                Role.OPERATOR,
                "not_waiting",
            ),
        ]
        if scoped(who):
            ops.append(
                Op(
                    {"run_id": w.waiting_id, "request_id": "req_nope"},
                    "another run",
                    Role.OPERATOR,
                    "not_waiting",
                )
            )
        return ops
    if op == "watch_thread":
        main = Op({"thread_id": w.thread_id}, "the thread", Role.VIEWER)
        return (
            [main, Op({"thread_id": w.other_thread_id}, "another thread", Role.VIEWER)]
            if scoped(who)
            else [main]
        )
    # The thread operations of §6: each changes T and may start a run, awaited to its end.
    fields: dict[str, Any] = {"thread_id": w.thread_id}
    if op in ("edit", "regenerate", "undo"):
        user_turn = await w.with_turns()
        if op == "edit":
            fields |= {"turn_id": user_turn, "content": "edited", "agent": "echo"}
        if op == "regenerate":
            fields["agent"] = "echo"
    elif op in ("send", "aside"):
        fields |= {"content": "hi", "agent": "echo"}
    elif op == "rewind":
        fields["turn_id"] = None
    else:
        raise AssertionError(f"op {op!r} has no entry in the walk")
    ops = [Op(fields, "the thread", Role.OPERATOR, then=run_ends)]
    if scoped(who):
        ops.append(Op({**fields, "thread_id": w.other_thread_id}, "another thread", Role.OPERATOR))
    return ops


async def test_every_ws_op_with_every_kind_of_token(world: World) -> None:
    for who in ("none", "bad"):
        headers = world.headers(who)
        assert await refused_handshake(world.server.ws_url, additional_headers=headers) == 1008
    wrong: list[str] = []
    async with asyncio.timeout(45):
        for who in ("viewer", "operator", "admin", "run share", "thread share"):
            conn = await open_conn(world.server.ws_url, additional_headers=world.headers(who))
            try:
                for op in wire.OPS:
                    for case in await ws_ops(world, op, who):
                        reply = await conn.op(op, **case.fields)
                        ok = allowed(who, case.need, case.resource)
                        error = reply.get("error") or {}
                        if ok and case.code is not None:
                            good = not reply["ok"] and error.get("code") == case.code
                        elif ok:
                            good = reply["ok"] is True
                        else:
                            good = not reply["ok"] and error.get("code") == "forbidden"
                        if not good:
                            wrong.append(f"{who} {op} ({case.resource}): {reply}")
                        if case.then is not None:
                            await case.then(reply)
                await conn.ok("ping")  # every refusal left the connection open
            finally:
                await conn.ws.close()
    assert not wrong, "\n".join(wrong)


# -- tokens in every place ---------------------------------------------------------------


async def test_a_token_in_each_place(world: World) -> None:
    url, secret = world.server.ws_url, SECRETS["viewer"]
    http = world.http
    async with asyncio.timeout(20):
        # Authorization: Bearer, on HTTP and on the handshake.
        response = await http.get("/api/runs", headers={"Authorization": f"Bearer {secret}"})
        assert response.status_code == 200
        conn = await open_conn(url, additional_headers={"Authorization": f"Bearer {secret}"})
        await conn.ok("ping")
        await conn.ws.close()
        # The subprotocol pair a browser offers: the server selects runcast.
        conn = await open_conn(url, subprotocols=["runcast", f"runcast.bearer.{secret}"])
        assert conn.ws.subprotocol == "runcast"
        assert (await conn.ok("subscribe", run_id=world.run_id))["run"]["run_id"] == world.run_id
        await conn.ws.close()
        bad = ["runcast", f"runcast.bearer.{BAD}"]
        assert await refused_handshake(url, subprotocols=bad) == 1008
        # ?token= on a GET (EventSource) and on /ws.
        response = await http.get(f"/api/runs/{world.run_id}", params={"token": secret})
        assert response.status_code == 200 and response.json()["run_id"] == world.run_id
        async with http.stream(
            "GET",
            f"/api/runs/{world.run_id}/events",
            params={"token": secret},
            headers={"Accept": "text/event-stream"},
        ) as stream:
            assert stream.status_code == 200
            text = (await stream.aread()).decode()
        assert '"status":"completed"' in text
        conn = await open_conn(f"{url}?token={secret}")
        await conn.ok("ping")
        await conn.ws.close()
        assert await refused_handshake(f"{url}?token={BAD}") == 1008
        # ?token= on a POST is no token at all.
        operator = SECRETS["operator"]
        response = await http.post("/api/threads", params={"token": operator}, json={})
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["error"]["code"] == "unauthorized"
        response = await http.post(
            "/api/threads", json={}, headers={"Authorization": f"Bearer {operator}"}
        )
        assert response.status_code == 201


# -- share links -------------------------------------------------------------------------


async def test_creating_a_share(world: World) -> None:
    async with asyncio.timeout(10):
        before = time.time()
        made = await world.share("operator", "run", world.run_id, role="viewer")
        response = await world.call("operator", "POST", f"/api/runs/{world.run_id}/share", {})
    assert response.status_code == 201
    default = response.json()
    assert set(default) == {"share_id", "token", "role", "expires_at", "url"}
    assert default["role"] == "viewer"
    assert before + 86_400 <= default["expires_at"] <= time.time() + 86_400
    assert default["url"] == f"/#/runs/{world.run_id}?token={default['token']}"
    assert made["role"] == "viewer"
    operator_share = await world.share("operator", "thread", world.thread_id, role="operator")
    assert operator_share["role"] == "operator"
    assert operator_share["url"] == f"/#/threads/{world.thread_id}?token={operator_share['token']}"

    async def share_status(who: str, body: Frame) -> tuple[int, Frame]:
        response = await world.call(who, "POST", f"/api/runs/{world.run_id}/share", body)
        return response.status_code, response.json()

    # A viewer may not share at all.
    status, body = await share_status("viewer", {})
    assert (status, body["error"]["code"]) == (403, "forbidden")
    # expires_in: 1 s to 30 days.
    for expires_in in (0, -5, 30 * 86_400 + 1, "60", 1.5):
        status, body = await share_status("admin", {"expires_in": expires_in})
        assert (status, body["error"]["code"], body["error"]["field"]) == (
            422,
            "bad_request",
            "expires_in",
        ), expires_in
    status, body = await share_status("admin", {"expires_in": 30 * 86_400})
    assert status == 201
    status, body = await share_status("admin", {"role": "wizard"})
    assert (status, body["error"]["field"]) == (422, "role")


async def test_a_share_never_grants_admin(world: World) -> None:
    # A share grants viewer or operator (§8); admin is not a share role at all, so asking
    # for it is a bad field, whoever asks. (A viewer cannot share: that is forbidden.)
    for who in ("operator", "admin", "thread share"):
        kind, target = (
            ("thread", world.thread_id) if who == "thread share" else ("run", world.run_id)
        )
        response = await world.call(who, "POST", f"/api/{kind}s/{target}/share", {"role": "admin"})
        error = response.json()["error"]
        assert (response.status_code, error["code"], error.get("field")) == (
            422,
            "bad_request",
            "role",
        )


async def test_a_run_share_reaches_that_run_only(world: World) -> None:
    made = await world.share("operator", "run", world.run_id, role="viewer")
    world.tokens["mine"] = made["token"]

    async def status(path: str, method: str = "GET", body: Any = None) -> int:
        return (await world.call("mine", method, path, body)).status_code

    assert await status(f"/api/runs/{world.run_id}") == 200
    assert await status(f"/api/runs/{world.run_id}/snapshot") == 200
    assert await status(f"/api/runs/{world.run_id}/events") == 200
    assert await status(f"/api/runs/{world.other_run_id}") == 403
    assert await status(f"/api/threads/{world.thread_id}") == 403
    assert await status(f"/api/runs/{world.run_id}/stop", "POST") == 403  # a viewer share
    assert await status(f"/api/runs/{world.run_id}/share", "POST", {}) == 403


async def test_an_operator_share_answers_its_run(world: World) -> None:
    made = await world.share("admin", "run", world.waiting_id)
    world.tokens["mine"] = made["token"]
    request_id = await world.input_required(world.waiting_id)
    async with asyncio.timeout(10):
        conn = await open_conn(world.server.ws_url, additional_headers=world.headers("mine"))
        try:
            await conn.ok("subscribe", run_id=world.waiting_id)
            await conn.ok("respond", run_id=world.waiting_id, request_id=request_id, value="hi")
            events = await conn.events_until_end(world.waiting_id)
        finally:
            await conn.ws.close()
    assert events[-1]["data"]["status"] == "completed"
    assert any(e["type"] == "text" and "hi" in e["data"]["text"] for e in events)


async def test_a_thread_share_reaches_the_thread_its_turns_and_runs(world: World) -> None:
    await world.with_turns()
    world.tokens["mine"] = (await world.share("admin", "thread", world.thread_id, "viewer"))[
        "token"
    ]
    response = await world.call("mine", "GET", f"/api/threads/{world.thread_id}")
    assert response.status_code == 200
    turns = response.json()["turns"]
    assert [t["role"] for t in turns][-2:] == ["user", "assistant"]
    for turn in turns:
        if turn.get("run_id"):
            run = await world.call("mine", "GET", f"/api/runs/{turn['run_id']}/snapshot")
            assert run.status_code == 200
    assert (await world.call("mine", "GET", f"/api/runs/{world.run_id}")).status_code == 200
    other = await world.call("mine", "GET", f"/api/threads/{world.other_thread_id}")
    assert other.status_code == 403
    assert (await world.call("mine", "GET", f"/api/runs/{world.other_run_id}")).status_code == 403
    rewind = await world.call(
        "mine", "POST", f"/api/threads/{world.thread_id}/rewind", {"turn_id": None}
    )
    assert rewind.status_code == 403  # a viewer share reads only


async def test_a_share_survives_a_restart_and_its_revocation_too(
    server_factory: Any, tmp_path: Path
) -> None:
    db = tmp_path / "restart.db"
    first: Server = await server_factory(db=db, **SETTINGS)
    admin = {"Authorization": f"Bearer {SECRETS['admin']}"}
    async with (
        asyncio.timeout(20),
        httpx.AsyncClient(base_url=first.http_url, headers=admin) as http,
    ):
        run = (await http.post("/api/runs", json={"agent": "counter", "input": {"n": 1}})).json()
        kept = (await http.post(f"/api/runs/{run['run_id']}/share", json={})).json()
        gone = (await http.post(f"/api/runs/{run['run_id']}/share", json={})).json()
        assert (await http.delete(f"/api/shares/{gone['share_id']}")).status_code == 200
    await server_factory.stop(first)
    second: Server = await server_factory(db=db, **SETTINGS)
    async with asyncio.timeout(10), httpx.AsyncClient(base_url=second.http_url) as http:
        path = f"/api/runs/{run['run_id']}"
        response = await http.get(path, headers={"Authorization": f"Bearer {kept['token']}"})
        assert response.status_code == 200
        assert response.json()["run_id"] == run["run_id"]
        response = await http.get(path, headers={"Authorization": f"Bearer {gone['token']}"})
        assert response.status_code == 401


async def wait_closed(conn: Conn, timeout_s: float) -> int:
    """Read until the server closes the connection; its close code."""
    async with asyncio.timeout(timeout_s):
        try:
            while True:
                await conn.ws.recv()
        except ConnectionClosed as exc:
            assert exc.rcvd is not None, exc
            return exc.rcvd.code


async def test_an_expired_share_is_refused_and_its_socket_closed(world: World) -> None:
    response = await world.call(
        "admin", "POST", f"/api/runs/{world.run_id}/share", {"expires_in": 1}
    )
    made = response.json()
    world.tokens["mine"] = made["token"]
    assert (await world.call("mine", "GET", f"/api/runs/{world.run_id}")).status_code == 200
    conn = await open_conn(world.server.ws_url, additional_headers=world.headers("mine"))
    await conn.ok("ping")
    # The server closes it once the share expired (1 s, plus its check every second).
    assert await wait_closed(conn, timeout_s=5) == 4401
    assert time.time() >= made["expires_at"]
    response = await world.call("mine", "GET", f"/api/runs/{world.run_id}")
    assert response.status_code == 401
    assert (
        await refused_handshake(world.server.ws_url, additional_headers=world.headers("mine"))
        == 1008
    )


async def test_revoking_a_share(world: World) -> None:
    # Its creator may, an admin may (another operator: the test below); then its token
    # is refused and a socket admitted with it is closed with 4401.
    made = await world.share("operator", "run", world.run_id)
    world.tokens["mine"] = made["token"]
    async with asyncio.timeout(15):
        conn = await open_conn(world.server.ws_url, additional_headers=world.headers("mine"))
        await conn.ok("subscribe", run_id=world.run_id)
        # Neither another share (an operator one) nor a viewer may revoke it.
        response = await world.call("run share", "DELETE", f"/api/shares/{made['share_id']}")
        assert response.status_code == 403
        response = await world.call("viewer", "DELETE", f"/api/shares/{made['share_id']}")
        assert response.status_code == 403
        response = await world.call("operator", "DELETE", f"/api/shares/{made['share_id']}")
        assert (response.status_code, response.json()) == (200, {"revoked": True})
        assert await wait_closed(conn, timeout_s=5) == 4401
        response = await world.call("mine", "GET", f"/api/runs/{world.run_id}")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        by_admin = await world.share("operator", "thread", world.thread_id)
        response = await world.call("admin", "DELETE", f"/api/shares/{by_admin['share_id']}")
        assert response.status_code == 200
        world.tokens["mine"] = by_admin["token"]
        assert (
            await world.call("mine", "GET", f"/api/threads/{world.thread_id}")
        ).status_code == 401
        missing = await world.call("admin", "DELETE", "/api/shares/shr_nope")
        assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")


async def test_another_operator_may_not_revoke_a_share(server_factory: Any) -> None:
    second = "operator:second-operator-0123456789"
    server: Server = await server_factory(**{**SETTINGS, "tokens": (*TOKENS, second)})
    first_h = {"Authorization": f"Bearer {SECRETS['operator']}"}
    second_h = {"Authorization": "Bearer second-operator-0123456789"}
    async with asyncio.timeout(10), httpx.AsyncClient(base_url=server.http_url) as http:
        run = (
            await http.post(
                "/api/runs", json={"agent": "counter", "input": {"n": 1}}, headers=first_h
            )
        ).json()
        made = (
            await http.post(f"/api/runs/{run['run_id']}/share", json={}, headers=first_h)
        ).json()
        response = await http.delete(f"/api/shares/{made['share_id']}", headers=second_h)
        assert (response.status_code, response.json()["error"]["code"]) == (403, "forbidden")
        response = await http.get(
            f"/api/runs/{run['run_id']}", headers={"Authorization": f"Bearer {made['token']}"}
        )
        assert response.status_code == 200
        response = await http.delete(f"/api/shares/{made['share_id']}", headers=first_h)
        assert response.status_code == 200


async def test_revoking_a_share_ends_the_shares_made_with_it(world: World) -> None:
    parent = await world.share("admin", "thread", world.thread_id)
    world.tokens["parent"] = parent["token"]
    child = await world.share("parent", "run", world.run_id, role="viewer")
    world.tokens["child"] = child["token"]
    async with asyncio.timeout(10):
        conn = await open_conn(world.server.ws_url, additional_headers=world.headers("child"))
        await conn.ok("ping")
        response = await world.call("admin", "DELETE", f"/api/shares/{parent['share_id']}")
        assert response.status_code == 200
        assert await wait_closed(conn, timeout_s=5) == 4401
    assert (await world.call("child", "GET", f"/api/runs/{world.run_id}")).status_code == 401


async def test_revoking_a_share_ends_its_event_streams(world: World) -> None:
    # An SSE stream opened with a share ends within seconds of the share's revocation,
    # as a WebSocket admitted with it is closed with 4401.
    run = await world.admin(
        "POST", "/api/runs", {"agent": "counter", "input": {"n": 10**6, "delay_s": 0.05}}, 201
    )
    made = await world.share("operator", "run", run["run_id"], role="viewer")
    headers = {"Authorization": f"Bearer {made['token']}", "Accept": "text/event-stream"}
    async with asyncio.timeout(15):
        async with world.http.stream(
            "GET", f"/api/runs/{run['run_id']}/events", headers=headers
        ) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith("id: 3"):
                    break
            revoked = await world.call("admin", "DELETE", f"/api/shares/{made['share_id']}")
            assert revoked.status_code == 200
            ended_at = asyncio.get_running_loop().time()
            async for _ in lines:  # the stream ends: the loop finishes
                pass
            assert asyncio.get_running_loop().time() - ended_at < 5.0
    await world.stop_and_end(run["run_id"])
