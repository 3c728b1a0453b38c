"""A real OpenAI-compatible upstream on 127.0.0.1, scripted per test.

It speaks HTTP/1.1 on a plain asyncio server (no framework, so that what goes over the
socket is exactly what the test wrote): ``POST /v1/chat/completions`` answers the next
scripted :class:`Reply`. A streamed reply is ``text/event-stream`` in chunked encoding,
one ``data: {chat.completion.chunk}`` event per chunk and ``data: [DONE]`` at the end,
byte for byte the format of api.openai.com (vLLM, Ollama and llama.cpp send the same).

A reply's ``steps`` are sent in order; besides a chunk (a dict), a step can be

- :class:`Hold`: stop sending and wait until the client closes the connection (a slow
  or stuck model). The time the close was seen is recorded, so a test can bound the
  time from ``stop`` to the connection closing, and check the rest was never sent.
- :class:`Cut`: close the socket in the middle of the chunked body (a stream cut).

``Reply(hang=True)`` never sends a status line (an upstream that accepts and hangs).
Every request is kept (``requests``: path, headers and JSON body) and every connection
too (``connections``: when it was opened and closed, and whether a reply was cut short by
the client); ``await upstream.until(predicate)`` waits for any of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

JsonObject = dict[str, Any]


@dataclass(frozen=True)
class Hold:
    """Send nothing more; wait for the client to close the connection."""


@dataclass(frozen=True)
class Cut:
    """Close the socket here, in the middle of the chunked body."""


Step = JsonObject | Hold | Cut


@dataclass
class Reply:
    """One scripted answer to one request."""

    steps: Sequence[Step] = ()
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    error: JsonObject | None = None  # the JSON body of a non-200 reply
    done: bool = True  # end a stream with ``data: [DONE]``
    hang: bool = False  # never answer at all


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: JsonObject


@dataclass
class Connection:
    opened_at: float
    closed_at: float | None = None
    # A reply the client closed the connection on before it was all sent.
    cut_short: bool = False


# -- chunks -------------------------------------------------------------------------------


def chunk(delta: JsonObject | None = None, *, finish: str | None = None) -> JsonObject:
    """A ``chat.completion.chunk`` with one choice."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1_763_773_200,
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }


def role() -> JsonObject:
    return chunk({"role": "assistant", "content": ""})


def content(text: str) -> JsonObject:
    return chunk({"content": text})


def reasoning(text: str, key: str = "reasoning_content") -> JsonObject:
    """A reasoning delta: ``reasoning_content`` (vLLM, DeepSeek) or ``reasoning``
    (Ollama, OpenRouter)."""
    return chunk({key: text})


def tool_delta(
    index: int, *, id: str | None = None, name: str | None = None, arguments: str = ""
) -> JsonObject:
    """One piece of a tool call; the first carries its id and name, the rest only
    more of the arguments' JSON text."""
    call: JsonObject = {"index": index, "function": {"arguments": arguments}}
    if id is not None:
        call["id"] = id
        call["type"] = "function"
    if name is not None:
        call["function"]["name"] = name
    return chunk({"tool_calls": [call]})


def finish(reason: str = "stop") -> JsonObject:
    return chunk({}, finish=reason)


def usage(prompt_tokens: int, completion_tokens: int) -> JsonObject:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1_763_773_200,
        "model": "test-model",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def answer(*texts: str, prompt_tokens: int = 5, completion_tokens: int = 3) -> Reply:
    """A whole streamed answer: role, content deltas, finish, usage, [DONE]."""
    return Reply(
        [
            role(),
            *(content(text) for text in texts),
            finish(),
            usage(prompt_tokens, completion_tokens),
        ]
    )


def error(status: int, message: str, **headers: str) -> Reply:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "code": None, "param": None}}
    return Reply(status=status, error=body, headers=headers)


# -- the server ---------------------------------------------------------------------------

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class FakeUpstream:
    """``async with FakeUpstream() as upstream:`` serves on 127.0.0.1 until the block ends;
    ``upstream.script(reply, ...)`` queues replies, answered in order."""

    def __init__(self, replies: Iterable[Reply] = ()) -> None:
        self.replies: deque[Reply] = deque(replies)
        self.requests: list[Request] = []
        self.connections: list[Connection] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds, checked after each request and close."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def __aenter__(self) -> FakeUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _changed_now(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        loop = asyncio.get_running_loop()
        connection = Connection(opened_at=loop.time())
        self.connections.append(connection)
        try:
            while await self._one_exchange(reader, writer, connection):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if connection.closed_at is None:
                connection.closed_at = loop.time()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._handlers.discard(task)
            await self._changed_now()

    async def _one_exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: Connection
    ) -> bool:
        """Read one request and answer it; False once the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # the client closed an idle keep-alive connection
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        _, path, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append(Request(path, headers, json.loads(body) if body else {}))
        await self._changed_now()
        if path != "/v1/chat/completions":
            await self._send_json(writer, 404, {"error": {"message": f"no route {path}"}}, {})
            return True
        reply = self.replies.popleft() if self.replies else error(500, "no reply scripted")
        if reply.hang:
            await self._hold(reader, connection)
            return False
        if reply.status != 200:
            await self._send_json(writer, reply.status, reply.error or {}, reply.headers)
            return True
        return await self._stream(reader, writer, reply, connection)

    async def _send_json(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: JsonObject,
        headers: Mapping[str, str],
    ) -> None:
        payload = json.dumps(body).encode()
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            "content-type: application/json",
            f"content-length: {len(payload)}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        await writer.drain()

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        reply: Reply,
        connection: Connection,
    ) -> bool:
        lines = [
            "HTTP/1.1 200 OK",
            "content-type: text/event-stream; charset=utf-8",
            "transfer-encoding: chunked",
            "cache-control: no-cache",
            *(f"{name}: {value}" for name, value in reply.headers.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        for step in reply.steps:
            if isinstance(step, Hold):
                await self._hold(reader, connection)
                return False
            if isinstance(step, Cut):
                writer.transport.abort()
                return False
            _send_chunk(writer, f"data: {json.dumps(step)}\n\n".encode())
            await writer.drain()
        if reply.done:
            _send_chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    async def _hold(self, reader: asyncio.StreamReader, connection: Connection) -> None:
        """Wait for the client to close the connection; record when it did."""
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        connection.closed_at = asyncio.get_running_loop().time()
        connection.cut_short = True


def _send_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
