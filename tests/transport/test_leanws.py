"""The WebSocket protocol ``runcast serve`` gives uvicorn (app/transport/leanws.py), on
the wire, against servers configured as ``runcast serve`` configures its own
(``websocket_options``): what a client library would never send (fragments around a
ping, an unmasked frame, invalid UTF-8, a message over the limit), a client that never
answers a ping, the closing handshake both ways, the handshakes it refuses, and a client
that stops reading."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import websockets

from app.cli import websocket_options
from app.config import Settings
from app.transport.app import create_app
from app.transport.leanws import LeanWebSocketProtocol, _Server
from tests.conftest import Server, stop_server
from tests.transport.helpers import open_conn

pytestmark = pytest.mark.timeout(60)

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

Start = Callable[..., Awaitable[Server]]


@pytest.fixture
async def lean(tmp_path: Path) -> AsyncIterator[Start]:
    """Start servers whose uvicorn runs the lean protocol: ``await lean(**settings)``."""
    running: list[tuple[uvicorn.Server, asyncio.Task[None], Any]] = []

    async def start(**overrides: Any) -> Server:
        settings = Settings(db=tmp_path / "runcast.db", port=0, flush_interval_s=0.05, **overrides)
        app = create_app(settings)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        config = uvicorn.Config(
            app, log_level="warning", lifespan="on", **websocket_options(settings)
        )
        assert config.ws is LeanWebSocketProtocol
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        task = asyncio.create_task(server.serve(sockets=[sock]))
        runtime = app.state.runtime
        async with asyncio.timeout(10):
            await runtime.ready.wait()
        running.append((server, task, runtime))
        return Server("127.0.0.1", sock.getsockname()[1], settings, runtime)

    try:
        yield start
    finally:
        for server, task, runtime in running:
            await stop_server(server, task, runtime)


class Raw:
    """A WebSocket client written out frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls, port: int, *, lines: list[str] | None = None, method: str = "GET", path: str = "/ws"
    ) -> tuple[Raw, bytes, bytes]:
        """Connect and send a handshake (``lines``: its headers instead of the usual);
        returns the client, the response's head and the key it sent."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16))
        if lines is None:
            lines = [
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key.decode()}",
                "Sec-WebSocket-Version: 13",
                "Sec-WebSocket-Protocol: runcast",
            ]
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *lines, "", ""]
        writer.write("\r\n".join(head).encode())
        async with asyncio.timeout(5):
            response = await reader.readuntil(b"\r\n\r\n")
        return cls(reader, writer), response, key

    def send(
        self, opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, rsv: int = 0
    ) -> None:
        first = (0x80 if fin else 0) | rsv | opcode
        size = len(payload)
        masked = 0x80 if mask else 0
        if size < 126:
            head = bytes((first, masked | size))
        elif size < 65536:
            head = bytes((first, masked | 126)) + struct.pack("!H", size)
        else:
            head = bytes((first, masked | 127)) + struct.pack("!Q", size)
        if mask:
            key = os.urandom(4)
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            head += key
        self.writer.write(head + payload)

    def send_op(self, **op: Any) -> None:
        self.send(TEXT, json.dumps(op).encode())

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload)."""
        async with asyncio.timeout(5):
            first, second = await self.reader.readexactly(2)
            assert not second & 0x80, "a server frame is never masked"
            assert first & 0x80, "the server does not fragment"
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
            return first & 0x0F, await self.reader.readexactly(size)

    async def message(self) -> dict[str, Any]:
        opcode, payload = await self.frame()
        assert opcode == TEXT, (opcode, payload)
        message: dict[str, Any] = json.loads(payload)
        return message

    async def closed_with(self) -> int:
        """Read up to the server's close frame; its code, once the server has closed the
        TCP connection too."""
        while True:
            opcode, payload = await self.frame()
            if opcode == CLOSE:
                break
        async with asyncio.timeout(5):
            assert await self.reader.read() == b""  # closed after the close frame
        self.close()
        code: int = struct.unpack("!H", payload[:2])[0]
        return code

    def close(self) -> None:
        self.writer.close()


async def test_the_handshake_is_answered_with_its_key_and_the_subprotocol(lean: Start) -> None:
    server = await lean()
    raw, response, key = await Raw.open(server.port)
    head = response.decode().lower()
    assert head.startswith("http/1.1 101 ")
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode().lower()
    assert f"sec-websocket-accept: {accept}\r\n" in head
    assert "sec-websocket-protocol: runcast\r\n" in head
    assert (await raw.message())["type"] == "welcome"
    raw.close()


async def test_each_handshake_carries_the_date_of_its_own_second(lean: Start) -> None:
    """uvicorn renews its Date header every second (a new list each time): a handshake
    answers with the current one, not the first connection's."""
    server = await lean()

    async def date() -> str:
        raw, response, _ = await Raw.open(server.port)
        raw.close()
        [line] = [x for x in response.decode().split("\r\n") if x.lower().startswith("date:")]
        return line

    first = await date()
    await asyncio.sleep(2.1)  # the clock itself is what is waited for: two renewals
    assert await date() != first


async def test_fragments_make_one_message_and_a_ping_between_them_is_answered(
    lean: Start,
) -> None:
    server = await lean()
    raw, _, _ = await Raw.open(server.port)
    await raw.message()  # welcome
    text = json.dumps({"op": "ping", "ref": 7}).encode()
    raw.send(TEXT, text[:5], fin=False)
    raw.send(PING, b"are you there")
    raw.send(0x0, text[5:10], fin=False)
    raw.send(0x0, text[10:])
    assert await raw.frame() == (PONG, b"are you there")
    reply = await raw.message()
    assert reply["ref"] == 7 and reply["ok"] is True
    raw.send(BINARY, json.dumps({"op": "ping", "ref": 8}).encode())  # binary: as text
    assert (await raw.message())["ref"] == 8
    raw.close()


@pytest.mark.parametrize(
    ("what", "code"),
    [
        ("unmasked", 1002),
        ("reserved bit", 1002),
        ("continuation first", 1002),
        ("text during a fragmented message", 1002),
        ("unknown opcode", 1002),
        ("invalid UTF-8", 1007),
        ("over the size limit", 1009),
        ("over the size limit in fragments", 1009),
    ],
)
async def test_a_frame_that_breaks_the_protocol_closes_the_connection(
    lean: Start, what: str, code: int
) -> None:
    server = await lean(max_frame_bytes=1024)  # ws_max_size: 2,048
    raw, _, _ = await Raw.open(server.port)
    await raw.message()  # welcome
    ping = json.dumps({"op": "ping", "ref": 1}).encode()
    if what == "unmasked":
        raw.send(TEXT, ping, mask=False)
    elif what == "reserved bit":
        raw.send(TEXT, ping, rsv=0x40)
    elif what == "continuation first":
        raw.send(0x0, ping)
    elif what == "text during a fragmented message":
        raw.send(TEXT, ping[:3], fin=False)
        raw.send(TEXT, ping[3:])
    elif what == "unknown opcode":
        raw.send(0x3, ping)
    elif what == "invalid UTF-8":
        raw.send(TEXT, b'{"op": "ping", "ref": "\xed\xa0\x80"}')
    elif what == "over the size limit":
        raw.send(TEXT, b" " * 3000)
    else:
        raw.send(TEXT, b" " * 1500, fin=False)
        raw.send(0x0, b" " * 1500)
    assert await raw.closed_with() == code
    sessions = server.runtime.sessions
    async with asyncio.timeout(5):
        while sessions:  # noqa: ASYNC110 (nothing signals it)
            await asyncio.sleep(0.01)


async def test_a_client_that_never_answers_a_ping_is_closed_with_1011(lean: Start) -> None:
    server = await lean(ping_interval_s=0.2)
    raw, _, _ = await Raw.open(server.port)
    await raw.message()  # welcome
    opcode, _ = await raw.frame()
    assert opcode == PING
    assert await raw.closed_with() == 1011  # within the ping timeout


async def test_a_client_that_answers_pings_stays(lean: Start) -> None:
    server = await lean(ping_interval_s=0.1)
    raw, _, _ = await Raw.open(server.port)
    await raw.message()  # welcome
    for _ in range(4):
        opcode, payload = await raw.frame()
        assert opcode == PING
        raw.send(PONG, payload)
    raw.send_op(op="ping", ref=2)
    while (await raw.frame())[0] == PING:
        pass  # the reply is the first frame that is not a ping
    raw.close()


async def test_the_closing_handshake_either_way(lean: Start) -> None:
    server = await lean()
    sessions = server.runtime.sessions
    # The client closes: the server answers with its code, and closes.
    raw, _, _ = await Raw.open(server.port)
    await raw.message()  # welcome
    raw.send(CLOSE, struct.pack("!H", 4000) + b"bye")
    assert await raw.closed_with() == 4000
    # The server closes (a revoked share's 4401): the connection ends when the client
    # answers.
    raw, _, _ = await Raw.open(server.port)
    await raw.message()  # welcome
    async with asyncio.timeout(5):
        while not sessions:  # noqa: ASYNC110 (nothing signals it)
            await asyncio.sleep(0.01)
    closing = asyncio.create_task(next(iter(sessions)).close(4401, timeout_s=0))
    opcode, payload = await raw.frame()
    assert (opcode, payload[:2]) == (CLOSE, struct.pack("!H", 4401))
    raw.send(CLOSE, payload[:2])
    async with asyncio.timeout(5):
        assert await raw.reader.read() == b""
        await closing
    raw.close()
    # websockets, as a client library does it.
    conn = await open_conn(server.ws_url)
    await conn.ok("ping")
    await conn.ws.close()
    assert conn.ws.close_code == 1000


@pytest.mark.parametrize(
    ("lines", "method", "path", "status"),
    [
        (
            ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13"],
            "GET",
            "/ws",
            400,
        ),
        (
            [
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: c2hvcnQ=",
                "Sec-WebSocket-Version: 13",
            ],
            "GET",
            "/ws",
            400,
        ),
        (
            [
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 8",
            ],
            "GET",
            "/ws",
            426,
        ),
        (
            [
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
                "Content-Length: 0",
            ],
            "POST",
            "/ws",
            400,
        ),
        # The app's refusals: a path with no WebSocket route (closed before it is
        # accepted: 403), and a foreign origin (the edge's JSON answer).
        (
            [
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
            ],
            "GET",
            "/api/runs",
            403,
        ),
        (
            [
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
                "Origin: http://evil.example",
            ],
            "GET",
            "/ws",
            403,
        ),
    ],
    ids=["no key", "short key", "version 8", "POST", "no route", "foreign origin"],
)
async def test_a_handshake_it_does_not_take_is_answered_over_http(
    lean: Start, lines: list[str], method: str, path: str, status: int
) -> None:
    server = await lean()
    raw, response, _ = await Raw.open(server.port, lines=lines, method=method, path=path)
    head = response.decode().lower()
    assert head.startswith(f"http/1.1 {status} "), head
    assert "connection: close\r\n" in head
    if status == 426:
        assert "sec-websocket-version: 13\r\n" in head
    length = int(head.split("content-length: ")[1].split("\r\n")[0])
    body = await raw.reader.readexactly(length)
    if "Origin: http://evil.example" in lines:
        assert json.loads(body)["error"]["code"] == "forbidden"
    async with asyncio.timeout(5):
        assert await raw.reader.read() == b""
    raw.close()
    assert not server.runtime.sessions


async def test_a_client_that_stops_reading_is_let_go_with_4408(lean: Start) -> None:
    server = await lean(write_timeout_s=0.5)
    sessions = server.runtime.sessions
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    async with asyncio.timeout(20):
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        slow = await websockets.connect(
            server.ws_url, sock=sock, max_queue=1, max_size=None, compression=None
        )
        assert json.loads(await slow.recv())["type"] == "welcome"
        start = {"op": "start", "ref": 1, "agent": "counter", "input": {"n": 100_000}}
        await slow.send(json.dumps(start))
        await slow.recv()
        while sessions:  # noqa: ASYNC110 (nothing signals it)
            await asyncio.sleep(0.01)
        # Nothing else waited on it.
        other = await open_conn(server.ws_url)
        await other.ok("ping")
        await other.ws.close()
        slow.transport.abort()


async def test_the_text_sent_last_is_framed_once_for_every_connection() -> None:
    server = _Server.__new__(_Server)
    server.last_text, server.last_frame = None, b""
    server.loop = asyncio.get_running_loop()
    text = json.dumps({"type": "events", "events": [{"i": i} for i in range(2_000)]})
    frame = server.text_frame(text)
    assert frame[0] == 0x80 | TEXT and frame[1] == 126  # final, text, a 16-bit length
    assert frame[4:] == text.encode() and struct.unpack("!H", frame[2:4])[0] == len(frame) - 4
    assert server.text_frame(text) is frame  # the same object: framed once
    other = server.text_frame("ü")  # then another text gets a frame of its own
    assert other == bytes((0x80 | TEXT, 2)) + "ü".encode()
    copy = text[:1] + text[1:]  # equal, another object: framed again, the same bytes
    assert copy is not text and server.text_frame(copy) == frame
    await asyncio.sleep(0)  # the loop's next turn: nothing is kept
    assert server.last_text is None and server.last_frame == b""
