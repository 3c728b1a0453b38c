"""The WebSocket protocol ``runcast serve`` gives uvicorn (``ws=LeanWebSocketProtocol``):
the one of uvicorn's ``websockets-sansio`` in ASGI behaviour, holding a fraction of its
memory per connection, for a server that keeps tens of thousands of idle ones.

What uvicorn's ``websockets-sansio`` keeps per open connection, whatever it does: an
``asyncio.Queue`` (three deques of 760 bytes), an ``asyncio.Event``, the handshake's
request and response with their headers parsed twice over, a sans-I/O protocol object
with its parser generator and last frame, in an instance dict of some 40 attributes:
about 17 KB before the application holds anything. This one keeps a slotted object,
the ASGI scope (header names and common values shared between connections), the ASGI
task, and one timer (the next ping, or the pong's deadline): about 3 KB. Frames are
parsed from the bytes here (RFC 6455); a message waits for the application in a future,
or (when it is not waiting) in a deque made for it.

A runcast server with 15,000 idle subscribed connections, side by side (RSS per
connection; objects the garbage collector walks per connection; its CPU to send one
event to all of them): uvicorn's ``websockets`` 34.2 KB, 180, 490 ms; its
``websockets-sansio`` 26.6 KB, 115, 400 ms; its ``wsproto`` 23.4 KB, 102, 430 ms; this
one 11.3 KB, 69, 320 ms.

As uvicorn's ``websockets-sansio`` does:

- the handshake is answered when the application accepts (101, with uvicorn's default
  headers and the subprotocol it chose), refuses (403) or answers with an HTTP response
  of its own (the ``websocket.http.response`` extension);
- a message waits, reading paused, until the application receives it;
- a send waits while the transport's buffer is over its high-water mark;
- a ping every ``ws_ping_interval``; no pong within ``ws_ping_timeout``: closed 1011;
- a frame that breaks the protocol closes the connection with 1002, invalid UTF-8 in a
  text message with 1007, a message over ``ws_max_size`` with 1009;
- after the application's close frame, the connection is closed when the client's
  answers, or after 10 s;
- access log lines ``"WebSocket PATH" [accepted]`` / ``403`` / ``STATUS``.

Per-message compression is never negotiated (``runcast serve`` turns it off: compressing
small JSON frames costs CPU on every send and a zlib state per connection).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextvars
import email.utils
import http
import logging
import os
import struct
import sys
import weakref
from typing import Any, Final
from urllib.parse import unquote

from starlette.types import Message
from uvicorn.config import Config
from uvicorn.protocols.utils import (
    ClientDisconnected,
    get_client_addr,
    get_local_addr,
    get_path_with_query_string,
    get_remote_addr,
    is_ssl,
)
from uvicorn.server import ServerState
from websockets.utils import accept_key

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets without its C extension
    from websockets.utils import apply_mask

_CLOSE_TIMEOUT_S: Final = 10.0  # the client's answer to our close frame is waited for
_MAX_REQUEST_BYTES: Final = 65_536
# Close codes a peer may send (RFC 6455 §7.4; 1004-1006 and 1015 never on the wire).
_CLOSE_CODES: Final = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013})
_TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x1, 0x2, 0x8, 0x9, 0xA

# The handshake's headers stay in the scope while the connection lasts: names, and values
# of the headers that repeat from client to client and carry nothing secret, are shared
# (the values: at most 1,024, of at most 256 bytes, first come first kept).
_NAMES: Final = {
    name: name
    for name in (
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"authorization",
        b"cache-control",
        b"connection",
        b"cookie",
        b"host",
        b"origin",
        b"pragma",
        b"sec-websocket-extensions",
        b"sec-websocket-key",
        b"sec-websocket-protocol",
        b"sec-websocket-version",
        b"upgrade",
        b"user-agent",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-real-ip",
    )
}
_SHARED_VALUES: Final = frozenset(
    {
        b"accept",
        b"accept-encoding",
        b"accept-language",
        b"cache-control",
        b"connection",
        b"host",
        b"origin",
        b"pragma",
        b"sec-websocket-extensions",
        b"sec-websocket-version",
        b"upgrade",
        b"user-agent",
        b"x-forwarded-proto",
    }
)
_VALUES: dict[bytes, bytes] = {}
_MAX_VALUES: Final = 1024
_MAX_SHARED_VALUE: Final = 256

# Timers run in one shared, empty context: call_later would copy the current one for each.
_TIMERS: Final = contextvars.Context()

# States of a connection.
_CONNECTING: Final = 0  # the request is parsed, the application has not answered it
_OPEN: Final = 1
_CLOSING: Final = 2  # our close frame is sent; the client's is waited for
_CLOSED: Final = 3  # closed, or closing with nothing more to send or receive


class _Server:
    """What every connection of one uvicorn server shares."""

    __slots__ = (
        "app",
        "app_state",
        "asgi",
        "config",
        "connections",
        "last_frame",
        "last_local",
        "last_text",
        "logger",
        "loop",
        "max_size",
        "ping_interval",
        "ping_timeout",
        "root_path",
        "server_state",
        "tasks",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        if not config.loaded:
            config.load()
        self.config = config
        self.app = config.loaded_app
        self.app_state = app_state
        self.asgi = {"version": config.asgi_version, "spec_version": "2.4"}
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        # uvicorn replaces its default headers (their Date) every second: read at each
        # handshake, not kept.
        self.server_state = server_state
        self.logger = logging.getLogger("uvicorn.error")
        self.loop = loop
        self.max_size = config.ws_max_size
        interval = config.ws_ping_interval
        self.ping_interval = interval if interval is not None and interval > 0 else None
        self.ping_timeout = config.ws_ping_timeout
        self.root_path = config.root_path
        self.last_local: tuple[str, int | None] | None = None
        self.last_text: str | None = None
        self.last_frame = b""

    def text_frame(self, text: str) -> bytes:
        """``text`` as a WebSocket frame. The text object sent last is framed once for
        every connection it goes to: a run's watchers send the same events frame one
        after another (one text object, ``LiveRun.shared_text``), and encoding and
        framing a frame of 1,000 events (64 KB) again cost each of them 3.4 µs. (A str
        is immutable: the same object is the same frame.) The frame is kept until the
        event loop's next turn only, as the shared text is: an idle server holds none."""
        if text is self.last_text:
            return self.last_frame
        frame = _frame(_TEXT, text.encode())
        if self.last_text is None:
            self.loop.call_soon(self._forget_text)
        self.last_text, self.last_frame = text, frame
        return frame

    def _forget_text(self) -> None:
        self.last_text, self.last_frame = None, b""

    def local_address(self, transport: asyncio.Transport) -> tuple[str, int | None] | None:
        """The server's end of ``transport``: the same tuple for every connection to one
        listening address (a scope's ``server``)."""
        local = get_local_addr(transport)
        if local != self.last_local:
            self.last_local = local
        return self.last_local


_SERVERS: weakref.WeakKeyDictionary[ServerState, _Server] = weakref.WeakKeyDictionary()


class LeanWebSocketProtocol(asyncio.Protocol):
    """One WebSocket connection, for uvicorn (see the module's docstring)."""

    __slots__ = (
        "_accept_key",
        "_buffer",
        "_drain",
        "_fragments",
        "_fragments_size",
        "_fragments_text",
        "_handshake_complete",
        "_inbox",
        "_ping",
        "_ping_sent_at",
        "_read_paused",
        "_response",
        "_server",
        "_state",
        "_timer",
        "_waiter",
        "_write_paused",
        "scope",
        "transport",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        server = _SERVERS.get(server_state)
        if server is None or server.config is not config or server.app_state is not app_state:
            loop = _loop or asyncio.get_event_loop()
            server = _SERVERS[server_state] = _Server(config, server_state, app_state, loop)
        self._server = server
        self.transport: asyncio.Transport | None = None
        self.scope: dict[str, Any] | None = None
        self._state = _CONNECTING
        self._handshake_complete = False  # accepted, refused, or answered over HTTP
        self._accept_key: str | None = None
        # An HTTP response of the application's (status, headers, body so far).
        self._response: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        self._buffer: bytes | bytearray = b""
        self._fragments: list[bytes] | None = None
        self._fragments_size = 0
        self._fragments_text = False
        self._inbox: collections.deque[Message] | None = None
        self._waiter: asyncio.Future[Message] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._read_paused = False
        self._write_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._ping: bytes | None = None
        self._ping_sent_at = 0.0

    # -- asyncio ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._server.connections.add(self)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        opened = self._handshake_complete and self._response is None
        self._put({"type": "websocket.disconnect", "code": 1005 if opened else 1006})
        self._server.connections.discard(self)
        self._handshake_complete = True
        self._state = _CLOSED
        self._wake_writers()
        if exc is None and self.transport is not None:
            self.transport.close()

    def eof_received(self) -> None:
        pass

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_writers()

    def shutdown(self) -> None:
        """The server is shutting down (uvicorn calls this on every connection)."""
        self._stop_timer()
        transport = self.transport
        if transport is None:
            return
        if self._state == _OPEN:
            self._put({"type": "websocket.disconnect", "code": 1012})
            self._write_close(1012, "")
        elif not self._handshake_complete:
            self._write_response(500, [], b"Internal Server Error")
        self._state = _CLOSED
        transport.close()

    def data_received(self, data: bytes) -> None:
        if self._state == _CLOSED:  # refused, failed or closed: nothing more is read
            return
        if self.scope is None:
            self._receive_request(data)
        elif self._state == _CONNECTING:  # frames before the handshake's answer: held
            self._buffer = bytes(self._buffer) + data
            if len(self._buffer) > self._server.max_size + 14:
                self._abort()
        else:
            self._receive_frames(data)

    # -- the handshake ------------------------------------------------------------------

    def _receive_request(self, data: bytes) -> None:
        buffer = bytes(self._buffer) + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > _MAX_REQUEST_BYTES:
                self._refuse(431, "request headers too large")
            else:
                self._buffer = buffer
            return
        self._buffer = buffer[end + 4 :]
        lines = buffer[:end].split(b"\r\n")
        request_line = lines[0].split(b" ")
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                self._refuse(400, "invalid HTTP header line")
                return
            name = name.strip().lower()
            name = _NAMES.get(name, name)
            value = value.strip()
            if name in _SHARED_VALUES and len(value) <= _MAX_SHARED_VALUE:
                value = _VALUES.setdefault(value, value) if len(_VALUES) < _MAX_VALUES else value
            headers.append((name, value))
        if len(request_line) != 3 or request_line[2] != b"HTTP/1.1":
            self._refuse(400, "invalid HTTP request line")
            return
        method, target, _ = request_line
        if method != b"GET":
            got = method.decode(errors="replace")
            self._refuse(400, f"unsupported HTTP method; expected GET; got {got}")
            return
        why = _check_upgrade(headers)
        if why is not None:
            if why == "version":
                self._refuse(426, "unsupported Sec-WebSocket-Version", b"13")
            else:
                self._refuse(400, why)
            return
        keys = [value for name, value in headers if name == b"sec-websocket-key"]
        self._accept_key = accept_key(keys[0].decode())
        raw_path, _, query_string = target.partition(b"?")
        try:
            path = unquote(raw_path.decode("ascii"))
        except UnicodeDecodeError:
            self._refuse(400, "invalid request target")
            return
        subprotocols: list[str] = []
        for name, value in headers:
            if name == b"sec-websocket-protocol":
                subprotocols += [token.strip() for token in value.decode("latin-1").split(",")]
        server = self._server
        transport = self.transport
        assert transport is not None
        self.scope = {
            "type": "websocket",
            "asgi": server.asgi,
            "http_version": "1.1",
            "scheme": "wss" if is_ssl(transport) else "ws",
            "server": server.local_address(transport),
            "client": _remote_address(transport),
            "root_path": server.root_path,
            "path": server.root_path + path,
            "raw_path": server.root_path.encode("ascii") + raw_path,
            "query_string": query_string,
            "headers": headers,
            "subprotocols": subprotocols,
            "state": server.app_state.copy(),
            "extensions": {"websocket.http.response": {}},
        }
        self._put({"type": "websocket.connect"})
        task = server.loop.create_task(self._run_asgi())
        server.tasks.add(task)
        task.add_done_callback(server.tasks.discard)

    def _refuse(self, status: int, why: str, version: bytes | None = None) -> None:
        """Answer a request that is no WebSocket handshake, and close."""
        self._handshake_complete = True
        self._state = _CLOSED
        body = f"Failed to open a WebSocket connection: {why}.\n".encode()
        extra = [] if version is None else [(b"Sec-WebSocket-Version", version)]
        self._write_response(status, extra, body)
        assert self.transport is not None
        self.transport.close()

    async def _run_asgi(self) -> None:
        server = self._server
        try:
            result = await server.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            server.logger.exception("Exception in ASGI application\n")
            self._send_500()
        else:
            if not self._handshake_complete:
                server.logger.error("ASGI callable returned without completing handshake.")
                self._send_500()
            elif result is not None:
                server.logger.error("ASGI callable should return None, but returned '%s'.", result)
        if self._state != _CLOSING and self.transport is not None:
            self.transport.close()

    def _send_500(self) -> None:
        if not self._handshake_complete:
            self._handshake_complete = True
            self._state = _CLOSED
            self._write_response(500, [], b"Internal Server Error")

    # -- ASGI ---------------------------------------------------------------------------

    def receive(self) -> asyncio.Future[Message]:
        """The next ASGI message: a future (no coroutine waits for the client)."""
        future: asyncio.Future[Message] = self._server.loop.create_future()
        inbox = self._inbox
        if inbox:
            future.set_result(inbox.popleft())
            if not inbox:
                self._inbox = None
                if self._read_paused and self._state != _CLOSED and self.transport is not None:
                    self._read_paused = False
                    self.transport.resume_reading()
        else:
            self._waiter = future
        return future

    def _put(self, message: Message) -> bool:
        """Hand ``message`` to the application; False when it was not waiting for one
        (the message waits in the inbox)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():  # done: cancelled, the application stopped waiting
                waiter.set_result(message)
                return True
        if self._inbox is None:
            self._inbox = collections.deque()
        self._inbox.append(message)
        return False

    async def send(self, message: Message) -> None:
        if self._write_paused and self._state != _CLOSED:
            await self._drained()
        transport = self.transport
        if (self._state == _CLOSED and self._handshake_complete) or transport is None:
            raise ClientDisconnected
        kind = message["type"]
        if not self._handshake_complete:
            if kind == "websocket.accept":
                self._accept(message)
            elif kind == "websocket.close":
                self._put({"type": "websocket.disconnect", "code": 1006})
                self._log("403")
                self._handshake_complete = True
                self._state = _CLOSED
                self._write_response(403, [], b"")
                transport.close()
            elif kind == "websocket.http.response.start" and self._response is None:
                status = message["status"]
                if not 100 <= status < 600:
                    raise RuntimeError(f"Invalid HTTP status code '{status}' in response.")
                self._log(str(status))
                self._response = (status, list(message.get("headers", [])), b"")
                self._handshake_complete = True
            else:
                raise RuntimeError(
                    "Expected ASGI message 'websocket.accept', 'websocket.close' "
                    f"or 'websocket.http.response.start' but got '{kind}'."
                )
        elif self._response is not None:
            if kind != "websocket.http.response.body":
                raise RuntimeError(
                    f"Expected ASGI message 'websocket.http.response.body' but got '{kind}'."
                )
            status, headers, body = self._response
            body += message.get("body", b"")
            self._response = (status, headers, body)
            if not message.get("more_body", False) and self._state != _CLOSED:
                self._put({"type": "websocket.disconnect", "code": 1006})
                self._state = _CLOSED
                self._write_response(status, headers, body)
                transport.close()
        elif self._state == _OPEN:
            if kind == "websocket.send":
                data = message.get("bytes")
                if data is not None:
                    transport.write(_frame(_BINARY, data))
                else:
                    text = message.get("text")
                    if text is not None:
                        transport.write(self._server.text_frame(text))
            elif kind == "websocket.close":
                if not transport.is_closing():
                    code = message.get("code", 1000)
                    reason = message.get("reason", "") or ""
                    self._put({"type": "websocket.disconnect", "code": code, "reason": reason})
                    self._write_close(code, reason)
                    self._state = _CLOSING
                    self._stop_timer()
                    if self._read_paused:  # the client's close frame is read
                        self._read_paused = False
                        transport.resume_reading()
                    self._timer = self._server.loop.call_later(
                        _CLOSE_TIMEOUT_S, transport.close, context=_TIMERS
                    )
            else:
                raise RuntimeError(
                    "Expected ASGI message 'websocket.send' or 'websocket.close', "
                    f"but got '{kind}'."
                )
        elif self._state == _CLOSING:
            raise RuntimeError(
                f"Unexpected ASGI message '{kind}', after sending 'websocket.close'."
            )
        else:  # the client closed: nothing more goes to it
            raise ClientDisconnected

    async def _drained(self) -> None:
        drain = self._drain
        if drain is None:
            drain = self._drain = self._server.loop.create_future()
        await asyncio.shield(drain)

    def _wake_writers(self) -> None:
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)

    def _accept(self, message: Message) -> None:
        transport = self.transport
        assert transport is not None and self._accept_key is not None
        self._log("[accepted]")
        if transport.is_closing():  # the client is gone: sends raise ClientDisconnected
            self._handshake_complete = True
            self._state = _CLOSED
            return
        lines = [
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + self._accept_key.encode() + b"\r\n"
        ]
        for name, value in (
            *self._server.server_state.default_headers,
            *message.get("headers", []),
        ):
            lines.append(name.lower() + b": " + value + b"\r\n")
        subprotocol = message.get("subprotocol")
        if subprotocol:
            lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode() + b"\r\n")
        lines.append(b"\r\n")
        transport.write(b"".join(lines))
        self._accept_key = None
        self._handshake_complete = True
        self._state = _OPEN
        if self._server.ping_interval is not None:
            self._schedule_ping(self._server.ping_interval)
        if self._buffer:  # frames the client sent before the answer
            held, self._buffer = self._buffer, b""
            self._receive_frames(bytes(held))

    def _log(self, what: str) -> None:
        scope = self.scope
        assert scope is not None
        self._server.logger.info(
            '%s - "WebSocket %s" ' + what,
            get_client_addr(scope),  # type: ignore[arg-type]
            get_path_with_query_string(scope),  # type: ignore[arg-type]
        )

    # -- frames -------------------------------------------------------------------------

    def _receive_frames(self, data: bytes) -> None:
        buffer: bytes | bytearray
        if self._buffer:
            buffer = self._buffer
            if not isinstance(buffer, bytearray):
                buffer = bytearray(buffer)
            buffer += data
        else:
            buffer = data
        size = len(buffer)
        at = 0
        max_size = self._server.max_size
        while self._state in (_OPEN, _CLOSING) and size - at >= 2:
            first, second = buffer[at], buffer[at + 1]
            opcode = first & 0x0F
            length = second & 0x7F
            head = 2 if length < 126 else 4 if length == 126 else 10
            if size - at < head:
                break
            if head > 2:
                length = int.from_bytes(buffer[at + 2 : at + head], "big")
            if first & 0x70:
                self._fail(1002, "reserved bits must be 0")
                return
            if not second & 0x80:
                self._fail(1002, "incorrect masking")
                return
            if opcode >= 0x8:
                if opcode not in (_CLOSE, _PING, _PONG):
                    self._fail(1002, f"invalid opcode: {opcode}")
                    return
                if not first & 0x80 or length > 125:
                    self._fail(1002, "invalid control frame")
                    return
            elif opcode > _BINARY:
                self._fail(1002, f"invalid opcode: {opcode}")
                return
            elif max_size is not None and self._fragments_size + length > max_size:
                size_seen = self._fragments_size + length
                self._fail(1009, f"message of {size_seen} bytes over the limit of {max_size}")
                return
            end = at + head + 4 + length
            if size < end:
                break
            mask = bytes(buffer[at + head : at + head + 4])
            payload = apply_mask(buffer[at + head + 4 : end], mask)
            at = end
            self._on_frame(first, opcode, payload)
        if at >= size or self._state == _CLOSED:
            self._buffer = b""
        elif isinstance(buffer, bytearray):
            del buffer[:at]
            self._buffer = buffer
        else:
            self._buffer = buffer[at:]

    def _on_frame(self, first: int, opcode: int, payload: bytes) -> None:
        if opcode == _PING:
            if self._state == _OPEN and self.transport is not None:
                self.transport.write(_frame(_PONG, payload))
        elif opcode == _PONG:
            if self._ping is not None and payload == self._ping and self._state == _OPEN:
                server = self._server
                rtt = server.loop.time() - self._ping_sent_at
                self._ping = None
                self._stop_timer()
                if server.ping_interval is not None:
                    self._schedule_ping(max(0.0, server.ping_interval - rtt))
        elif opcode == _CLOSE:
            self._receive_close(payload)
        elif self._state == _CLOSING:
            pass  # the application closed: what the client still sends is dropped
        elif opcode == 0x0:
            if self._fragments is None:
                self._fail(1002, "unexpected continuation frame")
                return
            self._fragments.append(payload)
            self._fragments_size += len(payload)
            if first & 0x80:
                data = b"".join(self._fragments)
                text = self._fragments_text
                self._fragments = None
                self._fragments_size = 0
                self._message(text, data)
        elif self._fragments is not None:
            self._fail(1002, "expected a continuation frame")
        elif first & 0x80:
            self._message(opcode == _TEXT, payload)
        else:
            self._fragments = [payload]
            self._fragments_size = len(payload)
            self._fragments_text = opcode == _TEXT

    def _message(self, text: bool, data: bytes) -> None:
        message: Message
        if text:
            try:
                message = {"type": "websocket.receive", "text": data.decode()}
            except UnicodeDecodeError as exc:
                self._fail(1007, str(exc))
                return
        else:
            message = {"type": "websocket.receive", "bytes": data}
        if not self._put(message) and not self._read_paused and self.transport is not None:
            # Nothing more is read until the application has taken what waits.
            self._read_paused = True
            self.transport.pause_reading()

    def _receive_close(self, payload: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if len(payload) == 1:
            self._fail(1002, "close frame too short")
            return
        code = 1005
        reason = ""
        if payload:
            code = int.from_bytes(payload[:2], "big")
            if code not in _CLOSE_CODES and not 3000 <= code < 5000:
                self._fail(1002, f"invalid close code {code}")
                return
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError as exc:
                self._fail(1007, str(exc))
                return
        if self._state == _CLOSING:  # the client's answer to our close frame
            self._stop_timer()
            self._state = _CLOSED
            transport.close()
            return
        self._state = _CLOSED
        if not transport.is_closing():
            self._put({"type": "websocket.disconnect", "code": code, "reason": reason})
            transport.write(_frame(_CLOSE, payload))
            transport.close()

    def _fail(self, code: int, reason: str) -> None:
        """The client broke the protocol: close frame ``code``, and close."""
        self._stop_timer()
        self._fragments = None
        self._put({"type": "websocket.disconnect", "code": code, "reason": reason})
        if self._state in (_OPEN, _CLOSING):
            self._write_close(code, reason)
        self._state = _CLOSED
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        self._state = _CLOSED
        self._buffer = b""
        if self.transport is not None:
            self.transport.close()

    # -- writing ------------------------------------------------------------------------

    def _write_close(self, code: int, reason: str) -> None:
        assert self.transport is not None
        data = reason.encode()[:123].decode(errors="ignore").encode()
        self.transport.write(_frame(_CLOSE, struct.pack("!H", code) + data))

    def _write_response(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """An HTTP response in place of the handshake's, with uvicorn's defaults for the
        date, ``Connection: close``, the length and a plain-text type."""
        assert self.transport is not None
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        given = {name.lower() for name, _ in headers}
        lines = [f"HTTP/1.1 {status} {phrase}\r\n".encode()]
        lines += [name + b": " + value + b"\r\n" for name, value in headers]
        defaults = (
            (b"date", email.utils.formatdate(usegmt=True).encode()),
            (b"connection", b"close"),
            (b"content-length", str(len(body)).encode()),
            (b"content-type", b"text/plain; charset=utf-8"),
        )
        for name, value in defaults:
            if name not in given:
                lines.append(name + b": " + value + b"\r\n")
        lines += [b"\r\n", body]
        self.transport.write(b"".join(lines))

    # -- keepalive ----------------------------------------------------------------------

    def _schedule_ping(self, delay: float) -> None:
        self._timer = self._server.loop.call_later(delay, self._send_ping, context=_TIMERS)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._ping = None

    def _send_ping(self) -> None:
        self._timer = None
        transport = self.transport
        if self._state != _OPEN or transport is None or transport.is_closing():
            return
        server = self._server
        self._ping = os.urandom(4)
        self._ping_sent_at = server.loop.time()
        transport.write(_frame(_PING, self._ping))
        if server.ping_timeout is not None:
            self._timer = server.loop.call_later(
                server.ping_timeout, self._ping_timed_out, context=_TIMERS
            )
        elif server.ping_interval is not None:
            self._schedule_ping(server.ping_interval)

    def _ping_timed_out(self) -> None:
        self._timer = None
        if self._state == _OPEN and self.transport is not None:
            self._fail(1011, "keepalive ping timeout")


def _remote_address(transport: asyncio.Transport) -> tuple[str, int] | None:
    """The client's end of ``transport`` (a scope's ``client``), its host interned: the
    connections from one address share it."""
    remote = get_remote_addr(transport)
    return None if remote is None else (sys.intern(remote[0]), remote[1])


def _check_upgrade(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request's headers are not a WebSocket handshake (``"version"``: not version
    13), or None."""
    connection: list[bytes] = []
    upgrade: list[bytes] = []
    keys: list[bytes] = []
    versions: list[bytes] = []
    for name, value in headers:
        if name == b"connection":
            connection += [token.strip().lower() for token in value.split(b",")]
        elif name == b"upgrade":
            upgrade += [token.strip().lower() for token in value.split(b",")]
        elif name == b"sec-websocket-key":
            keys.append(value)
        elif name == b"sec-websocket-version":
            versions.append(value)
    if b"upgrade" not in connection:
        return "missing Connection: Upgrade header"
    if b"websocket" not in upgrade:
        return "missing Upgrade: websocket header"
    if len(keys) != 1:
        return "missing Sec-WebSocket-Key header" if not keys else "more than one key"
    try:
        valid = len(base64.b64decode(keys[0], validate=True)) == 16
    except ValueError:
        valid = False
    if not valid:
        return "invalid Sec-WebSocket-Key header"
    if versions != [b"13"]:
        return "version"
    return None


def _frame(opcode: int, payload: bytes) -> bytes:
    """A server frame (never masked), final."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, size) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, size) + payload
