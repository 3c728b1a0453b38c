"""End to end at the edge (PROTOCOL.md §7, §8): origins and hosts, CORS, rate and size
limits, connections per address, the write timeout, the page's headers, secrets kept out
of logs, and ``runcast serve`` refusing an open server on a public address."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from uvicorn.logging import AccessFormatter

from app.transport.edge import is_loopback_host
from tests.conftest import Server
from tests.transport.helpers import open_conn, refused_handshake

ADMIN = "admin-secret-0123456789"
TOKENS = (f"admin:{ADMIN}",)
BEARER = {"Authorization": f"Bearer {ADMIN}"}
EVIL = "http://evil.example"


async def connected_socket(port: int, receive_buffer: int | None = None) -> socket.socket:
    """A TCP socket connected to 127.0.0.1:``port``, for a client that names another host
    (or wants a small receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    async with asyncio.timeout(5):
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Await a server-side condition nothing signals (white-box), bounded."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 (nothing signals it)
            await asyncio.sleep(0.01)


@pytest.fixture
async def client() -> AsyncIterator[Callable[[Server], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(server: Server, **kw: Any) -> httpx.AsyncClient:
        made = httpx.AsyncClient(base_url=server.http_url, timeout=10, **kw)
        clients.append(made)
        return made

    try:
        yield make
    finally:
        for made in clients:
            await made.aclose()


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


# -- origins and hosts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LOCALHOST:8000", True),
        ("app.localhost:1", True),
        ("127.0.0.1:8000", True),
        ("127.9.9.9", True),
        ("[::1]:8000", True),
        ("", False),
        ("localhost.evil.example", False),
        ("127.0.0.1.evil.example", False),
        ("0.0.0.0:8000", False),
        ("[::ffff:10.0.0.1]", False),
        ("[", False),
        ("[::1", False),
        ("a b", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize("mode", ["open", "token"])
async def test_a_foreign_origin_is_refused_and_the_own_one_allowed(
    server_factory: Any, client: Any, tmp_path: Path, mode: str
) -> None:
    tokens = TOKENS if mode == "token" else ()
    server: Server = await server_factory(db=tmp_path / f"{mode}.db", tokens=tokens)
    headers = BEARER if mode == "token" else {}
    own = f"http://127.0.0.1:{server.port}"
    http = client(server, headers=headers)
    async with asyncio.timeout(15):
        # Cross-site WebSocket hijacking: refused before any welcome.
        status = await refused_handshake(server.ws_url, origin=EVIL, additional_headers=headers)
        assert status == 403
        for origin in (
            EVIL,
            "null",
            f"{own}.evil.example",
            "http://[",
            f"https://127.0.0.1:{server.port + 1}",
        ):
            response = await http.post("/api/threads", json={}, headers={"Origin": origin})
            assert error_of(response, 403, "forbidden")["field"] == "origin", origin
        # A GET is not refused for its origin, and gets no CORS headers.
        response = await http.get("/api/health", headers={"Origin": EVIL})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers
        # The server's own origin (the page it serves) is allowed.
        response = await http.post("/api/threads", json={}, headers={"Origin": own})
        assert response.status_code == 201, response.text
        conn = await open_conn(server.ws_url, origin=own, additional_headers=headers)
        await conn.ok("ping")
        await conn.ws.close()
        # No Origin at all (a program): not affected.
        assert (await http.post("/api/threads", json={})).status_code == 201


async def test_an_allowed_origin_gets_cors_on_the_api(server_factory: Any, client: Any) -> None:
    app_origin = "http://app.example:3000"
    server: Server = await server_factory(tokens=TOKENS, allow_origins=(app_origin,))
    http = client(server)
    async with asyncio.timeout(15):
        response = await http.post(
            "/api/threads", json={}, headers={"Origin": app_origin, **BEARER}
        )
        assert response.status_code == 201
        assert response.headers["access-control-allow-origin"] == app_origin
        assert "Origin" in response.headers["vary"]
        # Its errors are readable by the page too.
        response = await http.get("/api/runs", headers={"Origin": app_origin})
        error_of(response, 401, "unauthorized")
        assert response.headers["access-control-allow-origin"] == app_origin
        # The preflight a browser sends before a POST with Authorization.
        response = await http.options(
            "/api/runs",
            headers={
                "Origin": app_origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert response.status_code in (200, 204)
        assert response.headers["access-control-allow-origin"] == app_origin
        assert "POST" in response.headers["access-control-allow-methods"]
        allowed_headers = response.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed_headers and "content-type" in allowed_headers
        # A foreign origin's preflight gets no CORS answer; no CORS outside /api.
        response = await http.options(
            "/api/runs", headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"}
        )
        assert "access-control-allow-origin" not in response.headers
        response = await http.get("/", headers={"Origin": app_origin})
        assert "access-control-allow-origin" not in response.headers
        conn = await open_conn(server.ws_url, origin=app_origin, additional_headers=BEARER)
        await conn.ok("ping")
        await conn.ws.close()


async def test_an_open_server_answers_only_to_a_loopback_host(
    server_factory: Any, client: Any, tmp_path: Path
) -> None:
    server: Server = await server_factory()
    http = client(server)
    port = server.port
    async with asyncio.timeout(15):
        for host in (
            "attacker.example",
            f"attacker.example:{port}",
            "127.0.0.1.evil.example",
            "10.0.0.1",
        ):
            for method, path in (("GET", "/api/health"), ("GET", "/"), ("POST", "/api/threads")):
                response = await http.request(method, path, json={}, headers={"Host": host})
                assert error_of(response, 403, "forbidden")["field"] == "host", (host, path)
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost"):
            response = await http.get("/api/health", headers={"Host": host})
            assert response.status_code == 200, host
            assert response.json()["auth"] == "open"
        # The handshake, sent to this server with the attacker's name in Host.
        sock = await connected_socket(port)
        status = await refused_handshake(f"ws://attacker.example:{port}/ws", sock=sock)
        assert status == 403
        conn = await open_conn(f"ws://localhost:{port}/ws", sock=await connected_socket(port))
        await conn.ok("ping")
        await conn.ws.close()
    # With a token the Host does not matter (the token is the defence); nor with --insecure.
    for settings in ({"tokens": TOKENS}, {"insecure": True}):
        other: Server = await server_factory(
            db=tmp_path / f"{len(settings)}{settings}.db", **settings
        )
        response = await client(other).get(
            "/api/health", headers={"Host": "attacker.example", **BEARER}
        )
        assert response.status_code == 200, settings


async def test_the_page_carries_a_strict_content_security_policy(
    server_factory: Any, client: Any
) -> None:
    server: Server = await server_factory(tokens=TOKENS)
    async with asyncio.timeout(10):
        response = await client(server).get("/")
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "default-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"


# -- limits ------------------------------------------------------------------------------


async def test_ops_and_requests_past_the_rate_are_rate_limited(
    server_factory: Any, client: Any
) -> None:
    server: Server = await server_factory(rate=1.0, rate_burst=3)
    http = client(server)
    async with asyncio.timeout(15):
        conn = await open_conn(server.ws_url)
        for ref in range(8):
            await conn.send_raw(json.dumps({"op": "ping", "ref": ref}))
        replies = [await conn.reply() for _ in range(8)]
        assert [r["ref"] for r in replies] == list(range(8))
        assert [r["ok"] for r in replies[:3]] == [True] * 3
        limited = [r for r in replies if not r["ok"]]
        assert len(limited) >= 4  # a token may refill while they arrive
        for reply in limited:
            assert reply["error"]["code"] == "rate_limited"
            assert 0 < reply["error"]["retry_after"] <= 1.0
        # The connection lives: once the bucket refills (no event to await), an op passes.
        await asyncio.sleep(limited[-1]["error"]["retry_after"] + 0.05)
        assert (await conn.ok("ping"))["t"] > 0
        await conn.ws.close()
        # HTTP: a bucket per address.
        statuses = [(await http.get("/api/health")).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        response = await http.get("/api/health")
        error = error_of(response, 429, "rate_limited")
        assert 0 < error["retry_after"] <= 1.0
        assert int(response.headers["retry-after"]) >= 1


async def test_connections_per_address(server_factory: Any) -> None:
    server: Server = await server_factory(max_connections_per_address=2)
    sessions = server.runtime.sessions
    async with asyncio.timeout(15):
        first = await open_conn(server.ws_url)
        second = await open_conn(server.ws_url)
        assert await refused_handshake(server.ws_url) in (1008, 429)
        await first.ws.close()
        await until(lambda: len(sessions) == 1)
        third = await open_conn(server.ws_url)
        await third.ok("ping")
        await second.ok("ping")
        assert await refused_handshake(server.ws_url) in (1008, 429)
        await second.ws.close()
        await third.ws.close()


async def test_subscriptions_and_thread_watches_per_connection(
    server_factory: Any, client: Any
) -> None:
    server: Server = await server_factory(max_subscriptions=2, max_thread_watches=1)
    http = client(server)
    async with asyncio.timeout(15):
        conn = await open_conn(server.ws_url)
        # Ask runs wait for input: live subscriptions that do not end by themselves.
        first = await conn.start("ask", {})
        await conn.start("ask", {})
        error = await conn.error("start", agent="ask", input={})
        assert error["code"] == "too_many_subscriptions"
        runs = (await http.get("/api/runs")).json()["runs"]
        assert len(runs) == 2  # the refused start started nothing
        third = (await http.post("/api/runs", json={"agent": "ask", "input": {}})).json()
        error = await conn.error("subscribe", run_id=third["run_id"])
        assert error["code"] == "too_many_subscriptions"
        await conn.ok("subscribe", run_id=first["run_id"])  # a replacement fits
        await conn.ok("unsubscribe", run_id=first["run_id"])
        await conn.ok("subscribe", run_id=third["run_id"])
        threads = [(await http.post("/api/threads", json={})).json()["thread_id"] for _ in range(2)]
        await conn.ok("watch_thread", thread_id=threads[0])
        await conn.ok("watch_thread", thread_id=threads[0])  # the same again fits
        error = await conn.error("watch_thread", thread_id=threads[1])
        assert error["code"] == "too_many_subscriptions"
        await conn.ok("unwatch_thread", thread_id=threads[0])
        await conn.ok("watch_thread", thread_id=threads[1])
        await conn.ws.close()


async def test_frames_bodies_and_inputs_past_their_size(server_factory: Any, client: Any) -> None:
    server: Server = await server_factory(max_frame_bytes=2048, max_input_bytes=100)
    http = client(server)
    async with asyncio.timeout(15):
        conn = await open_conn(server.ws_url)
        await conn.send_raw(json.dumps({"op": "ping", "ref": 1, "pad": "x" * 3000}))
        reply = await conn.reply()
        assert reply["ok"] is False and reply["ref"] is None
        assert reply["error"]["code"] == "payload_too_large"
        await conn.ok("ping")  # the connection lives
        error = await conn.error("start", agent="echo", input={"text": "x" * 200})
        assert (error["code"], error["field"]) == ("payload_too_large", "input")
        assert (await conn.start("echo", {"text": "small"}))["agent"] == "echo"
        await conn.ws.close()
        response = await http.post("/api/threads", json={"metadata": {"pad": "x" * 3000}})
        error_of(response, 413, "payload_too_large")
        response = await http.post(
            "/api/runs", json={"agent": "echo", "input": {"text": "x" * 200}}
        )
        assert error_of(response, 413, "payload_too_large")["field"] == "input"


async def test_a_client_that_stops_reading_is_let_go(
    server_factory: Any, client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.transport.ws")
    server: Server = await server_factory(write_timeout_s=0.5)
    sessions = server.runtime.sessions
    # A reader that takes a frame or two and then nothing: a small receive buffer, no
    # compression (ticks compress so well that the kernel would swallow the whole run).
    async with asyncio.timeout(20):
        sock = await connected_socket(server.port, receive_buffer=4096)
        slow = await websockets.connect(
            server.ws_url, sock=sock, max_queue=1, max_size=None, compression=None
        )
        try:
            assert json.loads(await slow.recv())["type"] == "welcome"
            await slow.send(
                json.dumps({"op": "start", "ref": 1, "agent": "counter", "input": {"n": 100_000}})
            )
            reply = json.loads(await slow.recv())
            run_id = reply["result"]["run"]["run_id"]
            assert len(sessions) == 1
            # The server closes it (4408; the client, not reading, may never see the frame).
            await until(lambda: not sessions, timeout_s=10)
            assert any("(4408)" in record.getMessage() for record in caplog.records)
            run = (await client(server).get(f"/api/runs/{run_id}")).json()
            assert run["watchers"] == 0
            # Nothing else waited on it.
            other = await open_conn(server.ws_url)
            await other.ok("ping")
            await other.ws.close()
            assert (await client(server).get("/api/health")).json()["ok"] is True
        finally:
            slow.transport.abort()


# -- secrets never logged -----------------------------------------------------------------


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[], None]]:
    """``capture()``, called once the server runs (its config resets uvicorn's logging):
    every record of uvicorn's loggers (which do not propagate to the root) and runcast's,
    at every level, into ``caplog``."""
    names = ("uvicorn", "uvicorn.access", "uvicorn.error", "app")
    handled: list[logging.Logger] = []

    def capture() -> None:
        for name in names:
            caplog.set_level(logging.DEBUG, logger=name)
        for name in ("uvicorn", "uvicorn.access"):
            log = logging.getLogger(name)
            log.addHandler(caplog.handler)
            handled.append(log)

    try:
        yield capture
    finally:
        for log in handled:
            log.removeHandler(caplog.handler)


async def test_a_token_never_reaches_a_log(
    server_factory: Any,
    client: Any,
    all_logs: Callable[[], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = "Sup3rSecretAdminToken-0123456789"
    wrong = "Wr0ngSecretToken-0123456789"
    server: Server = await server_factory(tokens=(f"admin:{secret}",))
    all_logs()
    http = client(server)
    url = server.ws_url
    async with asyncio.timeout(20):
        assert (await http.get("/api/runs", params={"token": secret})).status_code == 200
        assert (await http.get("/api/runs", params={"a": "1", "token": wrong})).status_code == 401
        assert (await http.get("/api/health", params={"token": secret})).status_code == 200
        response = await http.post("/api/threads", params={"token": secret}, json={})
        assert response.status_code == 401
        response = await http.post(
            "/api/threads", json={}, headers={"Authorization": f"Bearer {secret}", "Origin": EVIL}
        )
        assert response.status_code == 403
        conn = await open_conn(f"{url}?token={secret}")
        await conn.ok("ping")
        await conn.ws.close()
        conn = await open_conn(url, subprotocols=["runcast", f"runcast.bearer.{secret}"])
        await conn.ws.close()
        assert await refused_handshake(f"{url}?token={wrong}") == 1008
        assert await refused_handshake(f"{url}?token={secret}", origin=EVIL) == 403
        conn = await open_conn(url, additional_headers={"Authorization": f"Bearer {secret}"})
        await conn.ws.close()
        await until(lambda: not server.runtime.sessions)
    messages = [record.getMessage() for record in caplog.records]
    leaked = [m for m in messages if secret in m or wrong in m or "Secret" in m]
    assert not leaked, leaked
    # The requests were logged, with their tokens redacted, in lines uvicorn's own access
    # formatter can still write.
    access = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s')
    lines = [access.format(r) for r in caplog.records if r.name == "uvicorn.access"]
    assert any('"GET /api/runs?token=… HTTP/1.1" 200' in line for line in lines), lines
    assert any('"GET /api/runs?a=1&token=… HTTP/1.1" 401' in line for line in lines), lines
    assert any('"POST /api/threads?token=… HTTP/1.1" 401' in line for line in lines), lines
    assert not any("Secret" in line for line in lines), lines
    assert any('"WebSocket /ws?token=…" [accepted]' in m for m in messages), messages
    assert any('"WebSocket /ws?token=…" 403' in m for m in messages), messages


# -- runcast serve ----------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RUNCAST_")}
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        timeout=20,
        env={**environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        check=False,
    )


def test_an_open_server_refuses_a_public_address(tmp_path: Path) -> None:
    done = run_cli("serve", "--host", "0.0.0.0", "--port", "0", "--db", str(tmp_path / "r.db"))
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert lines[0].startswith("runcast: refusing to listen on 0.0.0.0"), done.stderr
    assert len(lines) == 2 and lines[1].startswith("hint:"), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "r.db").exists()


@pytest.mark.parametrize(
    ("file_text", "env", "expected"),
    [
        ("superuser S3cretValue-0123456789\n", None, "runcast: invalid tokens: token file line 1:"),
        ("# tokens\nS3cretValue-0123456789\n", None, "runcast: invalid tokens: token file line 2:"),
        ("admin short\n", None, "runcast: invalid tokens: token file line 1:"),
        (None, None, "runcast: cannot read the token file"),
        (
            "",
            {"RUNCAST_TOKENS": "viewer:S3cret"},
            "runcast: invalid tokens: RUNCAST_TOKENS entry 1:",
        ),
    ],
)
def test_bad_tokens_are_one_clear_line(
    tmp_path: Path, file_text: str | None, env: dict[str, str] | None, expected: str
) -> None:
    token_file = tmp_path / "tokens.txt"
    if file_text is not None:
        token_file.write_text(file_text)
    done = run_cli(
        "serve",
        "--port",
        "0",
        "--db",
        str(tmp_path / "r.db"),
        "--token-file",
        str(token_file),
        env=env,
    )
    assert done.returncode != 0
    assert done.stderr.startswith(expected), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "S3cret" not in done.stderr and "short" not in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


async def test_insecure_lets_an_open_server_listen_on_a_public_address(tmp_path: Path) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RUNCAST_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--db",
        str(tmp_path / "r.db"),
        "--insecure",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    output: list[str] = []
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await process.stdout.readline()).decode()
                assert line, "exited before listening:\n" + "".join(output)
                output.append(line)
                if "listening on http://0.0.0.0:" in line:
                    port = int(line.rsplit(":", 1)[1])
                    break
            async with httpx.AsyncClient(timeout=10) as http:
                health = (await http.get(f"http://127.0.0.1:{port}/api/health")).json()
            assert health["auth"] == "open"
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(20):
            await process.communicate()
    assert "Traceback" not in "".join(output)
