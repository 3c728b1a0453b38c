"""Fuzz every door of a real server (PROTOCOL.md §2, §5, §7, §8): ``/ws`` frames and
every HTTP route of the app's route table, with fixed tables of nasty input and with
hypothesis.

The nasty input: random bytes, invalid UTF-8, JSON nested 100,000 deep (and 300 deep:
parsed by orjson, which encodes at most 255 levels), numbers past every range
(``10**400``, ``-1e999``, 2**64), huge strings, lone surrogates (escaped in JSON), NUL,
right-to-left marks, and a value of every wrong type in every field of every op and body.

What must hold: no 5xx and no ``internal`` error, ever; every WebSocket frame gets one
reply (``bad_request``, ``payload_too_large``, ...) echoing the ref it can read, and the
connection stays open (a ``ping`` afterwards succeeds); a wrong type is ``bad_request``
naming its field; the server still answers ``GET /api/health``. Each test counts the
inputs it tried, prints the count and puts it in its assertion message; it collects every
problem before failing, so one run shows them all.

The server runs with the rate limits lifted so that every input reaches a handler (the
limiter's own answers are valid outcomes, covered by app/bench/chaos.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import urllib.parse
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import websockets
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from starlette.routing import Mount, Route, WebSocketRoute

from app.bench.chaos import Frame, Stats, Tab
from app.transport.app import create_app
from tests.conftest import Server

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")

UNLIMITED: dict[str, Any] = {"rate": 1e9, "rate_burst": 10**9, "flush_interval_s": 0.05}
HTTP_TIMEOUT_S = 10.0
HYPOTHESIS = settings(
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)

DEEP_OPEN = "[" * 100_000
DEEP_CLOSED = "[" * 100_000 + "]" * 100_000
DEEP_300 = "[" * 300 + "]" * 300  # orjson reads up to 1,024 levels, writes up to 254
DEEP_OBJECT_300 = "{" + '"a":{' * 300 + "}" * 301
HUGE_STRING = json.dumps("x" * 900_000)  # under the 1 MiB frame limit

# JSON value texts; some are not JSON at all, on purpose.
NASTY_VALUES = [
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1.5",
    "-0.0",
    "1e308",
    "1e999",
    "-1e999",
    "1" + "0" * 400,
    "-" + "9" * 400,
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    '""',
    '"x"',
    '"latest"',
    json.dumps("x" * 201),
    '"\\u0000"',
    '"\\ud800"',
    '"\\udc00\\ud800"',
    '"\\u202e\\u200f\\u2066 rtl"',
    '"\\ufeff\\uffff"',
    json.dumps("\U0001f600" * 50, ensure_ascii=False),
    "[]",
    "[null]",
    "{}",
    '{"": {"": null}}',
    DEEP_300,
    DEEP_OBJECT_300,
    DEEP_CLOSED,
]

# Nasty but valid: each must be answered ok.
NASTY_VALID_FRAMES = [
    '{"op": "ping", "ref": ' + HUGE_STRING + "}",
    '{"op": "ping", "ref": "\\u0000\\u202e\\ufeff"}',
    '{"op": "ping", "ref": -0.0}',
    '{"op": "ping", "ref": 1e308}',
    '{"op": "ping", "ref": 18446744073709551615}',
    '{"op": "ping", "ref": -9223372036854775808}',
    '{"op": "ping", "ref": ""}',
    ' \t\r\n{"op": "ping", "ref": "ws"}\n ',
]

# Raw frames, whole: each must be refused.
NASTY_FRAMES: list[str | bytes] = [
    "",
    " ",
    "{",
    "}",
    "null",
    "0",
    "1e999",
    '"\\ud800"',
    "[]",
    "{}",
    '{"op": null}',
    '{"op": ""}',
    '{"op": "PING"}',
    '{"op": "ping", "op": "stop"}',
    '{"op": "ping"} trailing',
    '{"op": "ping"}\x00',
    "\ufeff" + '{"op": "ping", "ref": "bom"}',
    '{"op": "ping", "ref": "\\ud800"}',
    '{"op": "ping", "ref": "\u202e\u0000"}',
    '{"op": "ping", "ref": ' + "1" + "0" * 400 + "}",
    '{"op": "ping", "ref": 1e999}',
    '{"op": "ping", "ref": ' + DEEP_300 + "}",
    DEEP_OPEN,
    DEEP_CLOSED,
    '{"op": "ping", "x": ' + DEEP_OPEN,
    # Over the frame limit (1 MiB) and under twice it: answered payload_too_large (twice
    # over, the connection is closed with 1009: tests/transport/test_leanws.py).
    '{"op": "ping", "pad": "' + "x" * (1024 * 1024 + 1024) + '"}',
    b"\x00" * 64,
    b"\xff\xfe\xfd",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    bytes(range(256)),
    '{"op": "ping", "ref": 1}'.encode("utf-16"),
]

MULTITASKS = ("reject", "interrupt", "enqueue", "rollback")


def acceptable(kind: str, value: Any) -> bool:
    """Whether ``value`` has a type (and range) that a field of ``kind`` takes."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_id = isinstance(value, str) and 1 <= len(value) <= 200
    return {
        "id": is_id,
        "id?": value is None or is_id,
        "bool": isinstance(value, bool),
        "after": (is_int and value >= 0) or value == "latest",
        "str?": value is None or isinstance(value, str),
        "object": isinstance(value, dict),
        "multitask": value in MULTITASKS,
        "any": True,
        "content": isinstance(value, str) and len(value) <= 1_000_000,
        "revision": value is None or (is_int and value >= 0),
        "ref": value is None
        or (isinstance(value, str | int | float) and not isinstance(value, bool)),
    }[kind]


OP_FIELDS: dict[str, dict[str, str]] = {
    "subscribe": {
        "run_id": "id",
        "after": "after",
        "epoch": "str?",
        "snapshot": "bool",
        "presence": "bool",
    },
    "unsubscribe": {"run_id": "id"},
    "start": {
        "agent": "id",
        "input": "object",
        "thread_id": "id?",
        "multitask": "multitask",
        "subscribe": "bool",
    },
    "stop": {"run_id": "id"},
    "respond": {"run_id": "id", "request_id": "id", "value": "any"},
    "watch_thread": {"thread_id": "id"},
    "unwatch_thread": {"thread_id": "id"},
    "send": {
        "thread_id": "id",
        "content": "content",
        "agent": "id?",
        "multitask": "multitask",
        "expected_revision": "revision",
    },
    "rewind": {"thread_id": "id", "turn_id": "id?", "expected_revision": "revision"},
    "edit": {
        "thread_id": "id",
        "turn_id": "id",
        "content": "content",
        "agent": "id?",
        "expected_revision": "revision",
    },
    "regenerate": {"thread_id": "id", "agent": "id?", "expected_revision": "revision"},
    "undo": {"thread_id": "id", "expected_revision": "revision"},
    "ping": {},
}

THREAD_BODIES: dict[str, tuple[Frame, dict[str, str]]] = {
    "messages": (
        {"content": "fuzz", "agent": "echo"},
        {
            "content": "content",
            "agent": "id?",
            "multitask": "multitask",
            "expected_revision": "revision",
        },
    ),
    "rewind": ({"turn_id": None}, {"turn_id": "id?", "expected_revision": "revision"}),
    "edit": (
        {"turn_id": "TURN", "content": "fuzz", "agent": "echo"},
        {"turn_id": "id", "content": "content", "agent": "id?"},
    ),
    "regenerate": ({"agent": "echo"}, {"agent": "id?", "expected_revision": "revision"}),
    "undo": ({}, {"expected_revision": "revision"}),
}


@dataclass
class Ids:
    """Real things to aim at: an ended run, an idle thread with turns, a user turn."""

    run: str
    run_last: int
    thread: str
    turn: str


@dataclass
class Findings:
    """Inputs tried and problems seen (each with its exact input)."""

    what: str
    tried: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 60:
            self.problems.append(text)

    def report(self) -> str:
        return f"{self.what}: {self.tried} inputs tried, {len(self.problems)} problems"

    def check(self) -> None:
        print(f"\n{self.report()}")
        assert not self.problems, self.report() + ":\n" + "\n".join(self.problems)


def show(data: str | bytes, limit: int = 160) -> str:
    """A short, exact-enough rendering of an input for a problem line."""
    text = repr(data)
    if len(text) > limit:
        text = f"{text[: limit - 40]}...{text[-30:]} ({len(data)} long)"
    return text


class Bridge:
    """Runs a coroutine on the test's event loop from hypothesis's thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AssertionError(f"an input took more than {timeout_s} s") from None


# -- setup ---------------------------------------------------------------------------------


async def make_ids(tab: Tab) -> Ids:
    """An ended echo run and a thread with one question and its answer."""
    reply = await tab.start("echo", {"text": "fuzz target"})
    assert reply["ok"], reply
    run_id = reply["result"]["run"]["run_id"]
    stream = tab.streams[run_id]
    assert await tab.wait_for(lambda: stream.ended, 10)
    thread_id = reply["result"]["run"]["thread_id"]
    sent = await tab.request("send", thread_id=thread_id, content="question", agent="echo")
    assert sent["ok"], sent
    answer = sent["result"]["run"]["run_id"]
    await tab.subscribe(answer, 0)
    assert await tab.wait_for(lambda: tab.streams[answer].ended, 10)
    turn = next(t for t in sent["result"]["thread"]["turns"] if t["role"] == "user")
    return Ids(run_id, stream.cursor or 0, thread_id, turn["turn_id"])


async def waiting_ask(tab: Tab) -> tuple[str, str]:
    """A fresh ``ask`` run waiting for input: its run_id and request_id."""
    reply = await tab.start("ask", {"prompt": "fuzz?"})
    assert reply["ok"], reply
    run_id = reply["result"]["run"]["run_id"]
    stream = tab.streams[run_id]
    assert await tab.wait_for(lambda: stream.request_id is not None, 10)
    assert stream.request_id is not None
    return run_id, stream.request_id


# -- WebSocket -----------------------------------------------------------------------------


def frame_text(fields: list[tuple[str, str]]) -> str:
    """A JSON object from (key, raw JSON value text) pairs, as it is (a value may be
    anything, not JSON included)."""
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields) + "}"


def base_fields(op: str, ids: Ids) -> dict[str, Any]:
    return {
        "subscribe": {"run_id": ids.run, "after": ids.run_last},
        "unsubscribe": {"run_id": ids.run},
        "start": {"agent": "echo", "input": {"text": "fuzz"}, "subscribe": False},
        "stop": {"run_id": ids.run},
        "respond": {"run_id": ids.run, "request_id": "req_fuzz", "value": 1},
        "watch_thread": {"thread_id": ids.thread},
        "unwatch_thread": {"thread_id": ids.thread},
        "send": {"thread_id": ids.thread, "content": "fuzz", "agent": "echo"},
        "rewind": {"thread_id": ids.thread, "turn_id": None},
        "edit": {"thread_id": ids.thread, "turn_id": ids.turn, "content": "f", "agent": "echo"},
        "regenerate": {"thread_id": ids.thread, "agent": "echo"},
        "undo": {"thread_id": ids.thread},
        "ping": {},
    }[op]


def parsed(raw: str) -> tuple[bool, Any]:
    try:
        return True, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False, None


async def ws_try(
    tab: Tab,
    url: str,
    found: Findings,
    data: str | bytes,
    *,
    field: str | None = None,
    text: bool | None = None,
) -> Frame | None:
    """Send one frame; its reply must be no ``internal`` error; a ``ping`` must follow.
    ``field``: the reply must be ``bad_request`` naming it. Returns the reply."""
    found.tried += 1
    violations = len(tab.stats.violations)
    reply: Frame | None = None
    try:
        reply = await tab.send_raw(data, text=text)
        await tab.ping()
    except Exception as exc:
        found.problem(f"{show(data)}: {type(exc).__name__} {exc} (close {tab.close_code})")
    for violation in tab.stats.violations[violations:]:
        found.problem(f"{show(data)}: {violation}")
    if reply is not None and field is not None:
        error = reply.get("error") or {}
        if reply.get("ok") or error.get("code") != "bad_request" or error.get("field") != field:
            found.problem(f"{show(data)}: expected bad_request on {field}, got {show(str(reply))}")
    if not tab.connected:
        await tab.connect(url)
    return reply


async def test_ws_nasty_frames_and_every_wrong_type_of_every_field(server_factory: Any) -> None:
    server: Server = await server_factory(**UNLIMITED)
    found = Findings("ws table")
    # The fuzzing tab subscribes only through raw frames: it does not track streams.
    tab = Tab("fuzz", Stats(), lenient=True)
    setup = Tab("setup", Stats())
    await tab.connect(server.ws_url)
    await setup.connect(server.ws_url)
    ids = await make_ids(setup)
    async with asyncio.timeout(45):
        for data in NASTY_FRAMES:
            reply = await ws_try(tab, server.ws_url, found, data)
            if reply is not None and reply.get("ok"):
                found.problem(f"{show(data)}: accepted: {show(str(reply))}")
        for data in NASTY_VALID_FRAMES:
            reply = await ws_try(tab, server.ws_url, found, data)
            if reply is not None and not reply.get("ok"):
                found.problem(f"{show(data)}: refused: {show(str(reply))}")
        for op, kinds in OP_FIELDS.items():
            base = base_fields(op, ids)
            # The op itself, then each field (and ref), with each nasty value.
            for name, kind in [("op", "op"), ("ref", "ref"), *kinds.items()]:
                for raw in NASTY_VALUES:
                    fields = {
                        "op": json.dumps(op),
                        "ref": "7",
                        **{k: json.dumps(v) for k, v in base.items()},
                    }
                    request_id = None
                    if op == "respond" and name == "value":
                        run_id, request_id = await waiting_ask(setup)
                        fields.update(run_id=json.dumps(run_id), request_id=json.dumps(request_id))
                    fields[name] = raw
                    data = frame_text(list(fields.items()))
                    ok, value = parsed(raw)
                    expect = None
                    if ok and (name == "op" or not acceptable(kind, value)):
                        expect = name
                    await ws_try(tab, server.ws_url, found, data, field=expect)
                    if request_id is not None:
                        await setup.request("stop", run_id=json.loads(fields["run_id"]))
            # A huge string where a string goes.
            for name in [n for n, k in kinds.items() if k in ("content", "str?", "any")]:
                fields = {"op": json.dumps(op), **{k: json.dumps(v) for k, v in base.items()}}
                fields[name] = HUGE_STRING
                await ws_try(tab, server.ws_url, found, frame_text(list(fields.items())))
        # Invalid UTF-8 in a *text* frame: RFC 6455 §8.1 has the server fail the
        # connection (1007); anything else but a reply is a problem.
        for raw in (b"\xff", b'{"op": "ping", "ref": "\xed\xa0\x80"}', b"\xc3"):
            found.tried += 1
            ws = await websockets.connect(server.ws_url, max_size=None)
            try:
                await ws.recv()  # welcome
                await ws.send(raw, text=True)
                try:
                    async with asyncio.timeout(5):
                        answer = json.loads(await ws.recv())
                    if answer.get("type") != "reply" or answer.get("ok"):
                        found.problem(f"text frame {raw!r}: {answer}")
                except websockets.ConnectionClosed as closed:
                    code = closed.rcvd.code if closed.rcvd else None
                    if code != 1007:
                        found.problem(f"text frame {raw!r}: closed with {code}, not 1007")
                except TimeoutError:
                    found.problem(f"text frame {raw!r}: no reply and no close within 5 s")
            finally:
                await ws.close()
    await assert_healthy(server, tab)
    await tab.close()
    await setup.close()
    found.check()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def op_frames(draw: st.DrawFn) -> str | bytes:
    """A frame: an op with random fields (known names, random values), or junk."""
    kind = draw(st.sampled_from(["op", "op", "op", "bytes", "text", "nasty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(st.text(max_size=300))
    op = draw(st.sampled_from([*OP_FIELDS, "frobnicate"]))
    names = sorted({*OP_FIELDS.get(op, {}), "ref", "extra"})
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names)))
    fields: list[tuple[str, str]] = [("op", json.dumps(op))]
    for name in chosen:
        if kind == "nasty":
            raw = draw(st.sampled_from(NASTY_VALUES))
        else:
            raw = json.dumps(draw(json_values))
        fields.append((name, raw))
    return frame_text(fields)


async def test_ws_hypothesis_frames(server_factory: Any) -> None:
    server: Server = await server_factory(**UNLIMITED)
    found = Findings("ws hypothesis")
    tab = Tab("hypo", Stats(), lenient=True)
    await tab.connect(server.ws_url)
    bridge = Bridge(asyncio.get_running_loop())

    @settings(HYPOTHESIS, max_examples=400)
    @given(frame=op_frames(), binary=st.booleans())
    def fuzz(frame: str | bytes, binary: bool) -> None:
        data = frame.encode() if binary and isinstance(frame, str) else frame
        bridge.run(ws_try(tab, server.ws_url, found, data))

    await asyncio.to_thread(fuzz)
    await assert_healthy(server, tab)
    await tab.close()
    found.check()


async def assert_healthy(server: Server, tab: Tab) -> None:
    """The server still answers ``GET /api/health`` and a ``ping`` on a new connection."""
    async with http_client(server) as http:
        health = await http.get("/api/health")
    assert health.status_code == 200 and health.json()["ok"] is True, health.text
    if not tab.connected:
        await tab.connect(server.ws_url)
    assert (await tab.ping())["ok"]


# -- HTTP ----------------------------------------------------------------------------------


NASTY_SEGMENTS = [
    "%00",
    "%ff",
    "%ED%A0%80",  # a lone surrogate, UTF-8-encoded
    "%C0%AF",
    "..",
    "%2e%2e",
    "%2F",
    "x" * 3000,
    "%E2%80%AE%E2%80%8F",
    "%F0%9F%98%80",
    "%20",
    "-1",
    "1e999",
    "%25",
    "%0d%0aX-Injected:%20yes",
]
NASTY_QUERY_VALUES = [
    "",
    "-1",
    "0",
    "1e999",
    "1.5",
    "9" * 30,
    "9" * 5000,
    "\u00b2",  # a digit to str.isdigit(), not to int()
    "\u0661\u0662",  # Arabic-Indic digits
    "NaN",
    "\x00",
    "\ud800",
    "true",
    "latest",
]
QUERY_NAMES = ["after", "limit", "at", "status", "thread_id", "all", "cursor", "metadata.k", "x"]
NASTY_HEADER_VALUES = [b"\xb2", b"-1", b"9" * 30, b"1.5", b"x", "\u0661".encode(), b"0" * 5000]
NASTY_BODIES: list[bytes] = [
    b"",
    b"{",
    b"null",
    b"[]",
    b"0",
    b'"x"',
    b"{}",
    b'{"a": 1}',
    DEEP_OPEN.encode(),
    DEEP_CLOSED.encode(),
    b'{"agent": 1e999}',
    b'{"agent": "\\ud800"}',
    b'{"content": "\\u0000"}',
    b"\xff\xfe\x00",
    '{"content": "x"}'.encode("utf-16"),
    b'{"metadata": ' + DEEP_300.encode() + b"}",
    b'{"metadata": ' + DEEP_OBJECT_300.encode() + b"}",
    b'{"title": "t", "metadata": {"k": ' + DEEP_OBJECT_300.encode() + b"}}",
    b'{"value": ' + DEEP_300.encode() + b"}",
    b'{"input": {"text": ' + DEEP_300.encode() + b"}}",
    b'{"x": "' + b"x" * (2 * 1024 * 1024) + b'"}',
]


@dataclass(eq=False)
class Door:
    """One HTTP route: its path template, methods, and the body fields it reads."""

    path: str
    methods: list[str]
    params: list[str]


def walk_routes(server: Server) -> tuple[list[Door], list[str]]:
    """Every HTTP route of the app's route table, and the WebSocket paths."""
    app = create_app(server.settings)
    doors: list[Door] = []
    sockets: list[str] = []
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            sockets.append(route.path)
        elif isinstance(route, Route):
            methods = sorted(route.methods or {"GET"})
            doors.append(Door(route.path, methods, list(route.param_convertors)))
        elif isinstance(route, Mount):
            doors.append(Door(route.path + "/{rest}", ["GET", "HEAD"], ["rest"]))
    assert any(d.path == "/api/health" for d in doors), doors
    return doors, sockets


def http_client(server: Server) -> httpx.AsyncClient:
    """A client that opens a connection per request: on a kept-alive connection each
    answer waits ~40 ms for a delayed ACK (the test server's listening socket is made
    without IPPROTO_TCP, so asyncio sets no TCP_NODELAY on it; ``runcast serve`` does)."""
    return httpx.AsyncClient(
        base_url=server.http_url,
        timeout=HTTP_TIMEOUT_S,
        limits=httpx.Limits(max_keepalive_connections=0),
    )


def fill(path: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        path = path.replace("{" + name + "}", value).replace("{" + name + ":path}", value)
    return path


def real_values(ids: Ids) -> dict[str, str]:
    return {
        "run_id": ids.run,
        "thread_id": ids.thread,
        "action": "messages",
        "rest": "index.html",
        "share_id": "shr_fuzz",
        "turn_id": ids.turn,
    }


async def http_try(
    http: httpx.AsyncClient,
    found: Findings,
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str | bytes] | None = None,
    params: list[tuple[str, str]] | None = None,
    field: str | None = None,
) -> httpx.Response | None:
    """One request: never a 5xx, never ``internal``, always within HTTP_TIMEOUT_S;
    ``field``: a 422 ``bad_request`` naming it. An event stream is read to its end."""
    what = f"{method} {show(url, 120)}"
    if params:
        what += f" ?{show(str(params), 120)}"
    if body is not None:
        what += f" body {show(body, 120)}"
    if headers:
        what += f" headers {show(str(headers), 120)}"
    request_headers: dict[str, Any] = {"content-type": "application/json", **(headers or {})}
    try:
        request = http.build_request(
            method, url, content=body, headers=request_headers, params=params
        )
    except (httpx.InvalidURL, UnicodeEncodeError, ValueError):
        return None  # not a request a client can send
    found.tried += 1
    try:
        async with asyncio.timeout(HTTP_TIMEOUT_S):
            response = await http.send(request, stream=True)
            try:
                content = await response.aread()
            finally:
                await response.aclose()
    except TimeoutError:
        found.problem(f"{what}: no complete answer within {HTTP_TIMEOUT_S} s")
        return None
    except httpx.HTTPError as exc:
        found.problem(f"{what}: {type(exc).__name__}: {exc}")
        return None
    error: dict[str, Any] = {}
    json_body = response.headers.get("content-type", "").startswith("application/json")
    if json_body and method != "HEAD":
        try:
            error = orjson.loads(content).get("error") or {}
        except (orjson.JSONDecodeError, AttributeError):
            found.problem(f"{what}: {response.status_code} with a body that is not JSON")
    if response.status_code >= 500 or error.get("code") == "internal":
        found.problem(f"{what}: {response.status_code} {show(content, 200)}")
    elif field is not None and response.status_code != 404:
        if response.status_code != 422 or error.get("field") != field:
            found.problem(
                f"{what}: expected 422 bad_request on {field}, "
                f"got {response.status_code} {show(content, 200)}"
            )
    if b"root:x:0:0" in content:
        found.problem(f"{what}: served a file from outside the static directory")
    return response


def body_doors(path: str, ids: Ids) -> list[tuple[str, Frame, dict[str, str]]]:
    """(path, template body, field kinds) for the bodies a route reads."""
    if path == "/api/runs":
        kinds = {"agent": "id", "input": "object", "thread_id": "id?", "multitask": "multitask"}
        return [(path, {"agent": "echo", "input": {"text": "fuzz"}}, kinds)]
    if path == "/api/runs/{run_id}/respond":
        return [(path, {"request_id": "req_fuzz", "value": 1}, {"request_id": "id"})]
    if path == "/api/threads":
        return [(path, {"metadata": {}}, {"metadata": "object"})]
    if path == "/api/threads/{thread_id}/{action}":
        doors = []
        for action, (template, kinds) in THREAD_BODIES.items():
            body = {k: (ids.turn if v == "TURN" else v) for k, v in template.items()}
            doors.append((path.replace("{action}", action), body, kinds))
        return doors
    return [(path, {}, {})]


async def test_http_every_route_with_nasty_paths_queries_headers_and_bodies(
    server_factory: Any,
) -> None:
    server: Server = await server_factory(**UNLIMITED)
    found = Findings("http table")
    tab = Tab("setup", Stats(), lenient=True)
    await tab.connect(server.ws_url)
    ids = await make_ids(tab)
    doors, sockets = walk_routes(server)
    assert "/ws" in sockets
    real = real_values(ids)
    extra_methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    async with (
        asyncio.timeout(50),
        http_client(server) as http,
    ):
        for door in doors:
            writes = [m for m in door.methods if m in ("POST", "PUT", "PATCH")]
            reads = [m for m in door.methods if m == "GET"]
            # Every method on the real path (DELETE last: it may erase the target).
            for method in sorted(set(extra_methods) - {"DELETE"}):
                await http_try(http, found, method, fill(door.path, real), body=b"{}")
            # Each path parameter, nasty, the others real.
            for name in door.params:
                for segment in NASTY_SEGMENTS:
                    url = fill(door.path, {**real, name: segment})
                    for method in door.methods:
                        await http_try(http, found, method, url, body=b"{}")
            for method in reads:
                url = fill(door.path, real)
                for query in QUERY_NAMES:
                    for value in NASTY_QUERY_VALUES:
                        await http_try(http, found, method, url, params=[(query, value)])
                for header in NASTY_HEADER_VALUES:
                    sse = {"accept": "text/event-stream", "last-event-id": header}
                    await http_try(http, found, method, url, headers=sse)
                    await http_try(http, found, method, url, headers={"accept": header})
            for method in writes:
                for path, template, kinds in body_doors(door.path, ids):
                    url = fill(path, real)
                    for body in NASTY_BODIES:
                        await http_try(http, found, method, url, body=body)
                    for name, kind in kinds.items():
                        for raw in NASTY_VALUES:
                            fields = {k: json.dumps(v) for k, v in template.items()}
                            fields[name] = raw
                            ok, value = parsed(raw)
                            expect = name if ok and not acceptable(kind, value) else None
                            body = frame_text(list(fields.items())).encode()
                            await http_try(http, found, method, url, body=body, field=expect)
        # A respond whose value JSON reads but cannot write (300 levels), to a run
        # that waits: the value is appended to the log.
        for value in (DEEP_300, DEEP_OBJECT_300):
            run_id, request_id = await waiting_ask(tab)
            body = frame_text([("request_id", json.dumps(request_id)), ("value", value)])
            await http_try(http, found, "POST", f"/api/runs/{run_id}/respond", body=body.encode())
            await http.post(f"/api/runs/{run_id}/stop")
        # The WebSocket paths over plain HTTP, and a WebSocket handshake on every route.
        for path in sockets:
            for method in ("GET", "POST"):
                await http_try(http, found, method, path, body=b"{}")
        for door in doors:
            url = server.ws_url.removesuffix("/ws") + fill(door.path, real)
            found.tried += 1
            try:
                async with asyncio.timeout(HTTP_TIMEOUT_S):
                    ws = await websockets.connect(url)
                await ws.close()
                found.problem(f"WebSocket handshake on {door.path}: accepted")
            except websockets.InvalidStatus as refused:
                if refused.response.status_code >= 500:
                    found.problem(f"WebSocket handshake on {door.path}: {refused.response}")
            except (websockets.InvalidHandshake, OSError, TimeoutError) as exc:
                found.problem(f"WebSocket handshake on {door.path}: {type(exc).__name__} {exc}")
        for door in doors:
            if "DELETE" in door.methods:
                await http_try(http, found, "DELETE", fill(door.path, real))
    await assert_healthy(server, tab)
    await tab.close()
    found.check()


async def test_http_hypothesis_requests(server_factory: Any) -> None:
    server: Server = await server_factory(**UNLIMITED)
    found = Findings("http hypothesis")
    tab = Tab("setup", Stats(), lenient=True)
    await tab.connect(server.ws_url)
    ids = await make_ids(tab)
    doors, _ = walk_routes(server)
    real = real_values(ids)
    bridge = Bridge(asyncio.get_running_loop())
    http = http_client(server)
    segment = st.sampled_from(list(real.values())) | st.text(min_size=1, max_size=40).map(
        lambda text: urllib.parse.quote(text, safe="")
    )
    body = (
        st.none()
        | st.binary(max_size=200)
        | json_values.map(lambda value: json.dumps(value).encode())
        | st.sampled_from(NASTY_BODIES[:-1])
    )

    @settings(HYPOTHESIS, max_examples=250)
    @given(
        door=st.sampled_from(doors),
        method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "HEAD", "OPTIONS"]),
        segments=st.dictionaries(st.sampled_from(sorted(real)), segment),
        params=st.lists(
            st.tuples(st.sampled_from(QUERY_NAMES) | st.text(max_size=10), st.text(max_size=20)),
            max_size=3,
        ),
        body=body,
        sse=st.booleans(),
    )
    def fuzz(
        door: Door,
        method: str,
        segments: dict[str, str],
        params: list[tuple[str, str]],
        body: bytes | None,
        sse: bool,
    ) -> None:
        url = fill(door.path, {**real, **segments})
        headers: dict[str, str | bytes] = {"accept": "text/event-stream"} if sse else {}
        bridge.run(http_try(http, found, method, url, body=body, headers=headers, params=params))

    try:
        await asyncio.to_thread(fuzz)
    finally:
        await http.aclose()
    await assert_healthy(server, tab)
    await tab.close()
    found.check()
