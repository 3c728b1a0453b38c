"""The Python client of runcast (PROTOCOL.md §2 and §4).

Two objects, each owning one WebSocket:

- ``Client``: ops and their replies. One reader task (owned by the client, cancelled
  and awaited on exit) routes each ``reply`` to the request that sent its ``ref`` and
  every other frame to the listeners added with ``add_listener``.
- ``Watch``: an async iterator over one run's events that reconnects on its own. It has
  its own connection, separate from the client's, so that dropping and re-subscribing
  it touches nothing else. It yields every event after its cursor exactly once, in
  order, and stops after the run's terminal ``status`` event::

      async with Client(url, token=TOKEN) as client:   # token: PROTOCOL.md §8
          run = await client.start("counter", {"n": 100})
          async with client.watch(run["run_id"]) as events:
              async for event in events:
                  ...

Listing goes over HTTP (``GET /api/runs``, ``GET /api/threads``, PROTOCOL.md §5), at the
same server as the WebSocket: a page with ``list_runs``/``list_threads``, or every item,
page by page, newest first::

      async for thread in client.threads(metadata={"project": "alpha"}):
          ...

Errors::

    ClientError                 code from PROTOCOL.md §7 (a reply with ok: false)
     ├── RefusedError           "unauthorized" | "forbidden" | "rate_limited": the handshake
     │                          was refused (HTTP 401/403/429, or a close 1008 before the
     │                          welcome), or the token of an open connection expired or was
     │                          revoked (close 4401); never retried, except rate_limited
     ├── ConnectionLostError    "connection_lost": the socket closed, or reconnecting gave up
     ├── GapError               "gap": events out of order or an epoch change without a reset
     └── (code "protocol")      the server did not greet with a runcast welcome frame
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final, Self

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

logger = logging.getLogger(__name__)

JsonObject = dict[str, Any]
Listener = Callable[[JsonObject], None]

TERMINAL_STATUSES: Final = frozenset({"completed", "failed", "stopped", "interrupted"})
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024  # a frame holds at most 1,000 events
_RETRYABLE = (OSError, TimeoutError, ConnectionClosed, InvalidHandshake)
CLOSE_POLICY: Final = 1008  # the handshake was refused by policy (PROTOCOL.md §7)
CLOSE_TOKEN_GONE: Final = 4401  # the connection's token expired or was revoked
_REFUSED_STATUS: Final = {401: "unauthorized", 403: "forbidden", 429: "rate_limited"}
_REFUSED_CODES: Final = ("unauthorized", "forbidden", "rate_limited")


class ClientError(Exception):
    """An error a runcast server replied with, or one the client detected.

    ``code`` is what programs match on; ``details`` holds the error's extra keys
    (``active_run_id``, ``last_index``, ``field``, ...).
    """

    def __init__(self, code: str, message: str, details: JsonObject | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: JsonObject = details or {}

    @classmethod
    def from_reply(cls, error: JsonObject) -> ClientError:
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
        return cls(str(error.get("code")), str(error.get("message")), details)


class ConnectionLostError(ClientError):
    """The connection closed before a reply, or a watch ran out of reconnect attempts."""

    def __init__(self, message: str) -> None:
        super().__init__("connection_lost", message)


class RefusedError(ClientError):
    """The server would not let this client in, or no longer does.

    ``code`` is ``unauthorized`` (no token, an unknown one, or one that expired or was
    revoked: ask for another), ``forbidden`` (the token's role or scope, or the origin,
    does not allow it) or ``rate_limited`` (``retry_after`` seconds, when the server said).
    ``status`` is the HTTP status of a refused handshake, ``close_code`` the WebSocket close
    code (1008 for a handshake refused after accepting it, 4401 for a revoked token); the
    other is None.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        close_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        details = {"status": status, "close_code": close_code, "retry_after": retry_after}
        super().__init__(code, message, {k: v for k, v in details.items() if v is not None})
        self.status = status
        self.close_code = close_code
        self.retry_after = retry_after

    @classmethod
    def from_status(cls, url: str, exc: InvalidStatus) -> RefusedError | None:
        """The refusal an HTTP answer to the handshake means, or None when it is no refusal
        (a 404, a 5xx: worth retrying or reporting as they are)."""
        response = exc.response
        code = _REFUSED_STATUS.get(response.status_code)
        if code is None:
            return None
        error: JsonObject = {}
        try:
            body = json.loads(response.body or b"")
            if isinstance(body, dict) and isinstance(body.get("error"), dict):
                error = body["error"]
        except ValueError:
            pass
        retry_after = _seconds(error.get("retry_after", response.headers.get("Retry-After")))
        message = str(error.get("message") or f"{url} refused the connection")
        code = str(error.get("code") or code)
        return cls(code, message, status=response.status_code, retry_after=retry_after)

    @classmethod
    def from_close(cls, url: str, exc: ConnectionClosed) -> RefusedError | None:
        """The refusal a close frame means (1008 or 4401), or None for any other close."""
        close = exc.rcvd
        if close is None or close.code not in (CLOSE_POLICY, CLOSE_TOKEN_GONE):
            return None
        reason = close.reason
        named = reason.split(":", 1)[0].strip().lower()  # a 1008 reason is "code: message"
        if close.code == CLOSE_POLICY and named in _REFUSED_CODES:
            code = named
        else:
            code = "unauthorized"
        message = reason or f"{url} closed the connection ({close.code})"
        return cls(code, message, close_code=close.code)


def _seconds(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


class GapError(ClientError):
    """The server broke the delivery guarantee; reported, never skipped."""

    def __init__(self, message: str) -> None:
        super().__init__("gap", message)


async def _open(
    url: str, open_timeout_s: float, token: str | None = None
) -> tuple[ClientConnection, JsonObject]:
    """Connect (with ``token`` as a bearer token) and read the welcome frame; the
    connection is closed if that fails.

    Raises:
        RefusedError: the handshake was answered 401, 403 or 429, or closed with 1008 or
            4401 before the welcome frame.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        ws = await connect(
            url, open_timeout=open_timeout_s, max_size=MAX_MESSAGE_BYTES, additional_headers=headers
        )
    except InvalidStatus as exc:
        refused = RefusedError.from_status(url, exc)
        if refused is None:
            raise
        raise refused from exc
    try:
        async with asyncio.timeout(open_timeout_s):
            try:
                welcome = json.loads(await ws.recv())
            except ConnectionClosed as exc:
                refused = RefusedError.from_close(url, exc)
                if refused is None:
                    raise
                raise refused from exc
        if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
            raise ClientError("protocol", f"expected a welcome frame, got {welcome!r}")
    except BaseException:
        ws.transport.abort()
        raise
    return ws, welcome


def http_url_of(ws_url: str) -> str:
    """The HTTP base of the server at WebSocket ``ws_url``: ``ws://host:port/ws`` ->
    ``http://host:port`` (``wss`` -> ``https``; a path before ``/ws`` is kept)."""
    parts = urllib.parse.urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.removesuffix("/").removesuffix("/ws")
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def request_json(
    url: str,
    token: str | None,
    timeout_s: float,
    *,
    method: str = "GET",
    body: JsonObject | None = None,
) -> JsonObject:
    """One JSON request to ``url`` (blocking: run it in a thread from async code).

    Raises: ClientError (the server's error object), ConnectionLostError (no answer).
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Accept": "application/json"}
    )
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer: JsonObject = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read()).get("error")
        except (ValueError, AttributeError):
            error = None
        if not isinstance(error, dict):
            error = {"code": "internal", "message": f"HTTP {exc.code} from {url}"}
        raise ClientError.from_reply(error) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionLostError(f"no answer from {url}: {exc}") from exc


class Client:
    """One WebSocket to a runcast server: requests by ``ref``, other frames to listeners.

    ``token`` is sent as ``Authorization: Bearer TOKEN`` on the handshake (a server in
    token mode, PROTOCOL.md §8); its watches and listings use it too. A refused handshake
    raises ``RefusedError`` from ``async with``; when the server closes the connection
    because the token expired or was revoked (4401), pending and later requests raise it.
    Listings go to ``http_url`` (by default the WebSocket URL's own server) and need no
    open connection.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        open_timeout_s: float = 10.0,
        http_url: str | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.open_timeout_s = open_timeout_s
        self.http_url = http_url or http_url_of(url)
        self.refused: RefusedError | None = None  # why the server closed the connection
        self.welcome: JsonObject = {}
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._replies: dict[int, asyncio.Future[JsonObject]] = {}
        self._listeners: list[Listener] = []
        self._ref = 0

    async def __aenter__(self) -> Self:
        """Connect, read the welcome frame and start the reader.

        Raises: RefusedError (the handshake was refused).

        Cancellation: safe; a half-open connection is aborted.
        """
        self.refused = None
        self._ws, self.welcome = await _open(self.url, self.open_timeout_s, self.token)
        self._reader = asyncio.create_task(self._read(self._ws), name=f"client {self.url}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the socket, then cancel and await the reader; re-raises a listener's bug.

        Cancellation: the socket is aborted rather than closed, the reader still cancelled.
        """
        ws, reader = self._ws, self._reader
        self._ws = self._reader = None
        if ws is None or reader is None:
            return
        try:
            await ws.close()
        finally:
            ws.transport.abort()
            reader.cancel()
            await asyncio.wait({reader})
        error = None if reader.cancelled() else reader.exception()
        if error is not None:
            raise error

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(frame)`` for every frame that is not a reply; returns a remover.

        Listeners run in the reader task and must not block. Add one before the op that
        makes the frames you want (``start(subscribe=True)``, ``subscribe``, ...).
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def _read(self, ws: ClientConnection) -> None:
        cause: BaseException | None = None
        try:
            async for message in ws:
                frame = json.loads(message)
                if frame.get("type") == "reply":
                    ref = frame.get("ref")
                    future = self._replies.get(ref) if isinstance(ref, int) else None
                    if future is not None and not future.done():
                        future.set_result(frame)
                    continue
                for listener in list(self._listeners):
                    listener(frame)
        except ConnectionClosed as exc:
            cause = exc
            self.refused = RefusedError.from_close(self.url, exc)
        finally:
            for future in self._replies.values():
                if not future.done():
                    error = self.refused or ConnectionLostError(f"connection to {self.url} closed")
                    error.__cause__ = cause
                    future.set_exception(error)

    async def request(self, op: str, **fields: Any) -> JsonObject:
        """Send ``{"op": op, **fields}`` and return the reply's ``result``.

        Raises:
            ClientError: the reply had ``ok: false`` (its code, message and details).
            RefusedError: the server closed the connection: the token expired or was
                revoked (4401), or a policy refused it (1008).
            ConnectionLostError: the connection is closed or closed before the reply.

        Cancellation: safe; a reply that comes later is dropped.
        """
        if self._ws is None or self._reader is None or self._reader.done():
            if self.refused is not None:
                raise self.refused
            raise ConnectionLostError(f"not connected to {self.url}")
        self._ref += 1
        ref = self._ref
        future: asyncio.Future[JsonObject] = asyncio.get_running_loop().create_future()
        self._replies[ref] = future
        try:
            try:
                await self._ws.send(json.dumps({"op": op, "ref": ref, **fields}))
            except ConnectionClosed as exc:
                refused = RefusedError.from_close(self.url, exc)
                raise refused or ConnectionLostError(f"connection to {self.url} closed") from exc
            reply = await future
        finally:
            del self._replies[ref]
        if not reply.get("ok"):
            raise ClientError.from_reply(reply.get("error") or {})
        result: JsonObject = reply.get("result") or {}
        return result

    async def start(
        self,
        agent: str,
        input: JsonObject,
        *,
        thread_id: str | None = None,
        multitask: str = "reject",
        subscribe: bool = False,
    ) -> JsonObject:
        """Start a run and return its RunInfo. With ``subscribe``, its frames go to listeners.

        Raises: ClientError (``run_in_progress`` with ``active_run_id``, ``unknown_agent``).

        Cancellation: safe for the client; the run may have started all the same.
        """
        fields: JsonObject = {"agent": agent, "input": input, "multitask": multitask}
        if thread_id is not None:
            fields["thread_id"] = thread_id
        result = await self.request("start", subscribe=subscribe, **fields)
        run: JsonObject = result["run"]
        return run

    async def stop(self, run_id: str) -> JsonObject:
        """Ask a run to stop: ``{"stopping", "status"}``; an ended run is not an error.

        Cancellation: safe; the stop may have been applied all the same.
        """
        return await self.request("stop", run_id=run_id)

    async def respond(self, run_id: str, request_id: str, value: Any) -> None:
        """Answer a run's pending ``input_required``. Raises: ClientError ``not_waiting``.

        Cancellation: safe; the answer may have been applied all the same.
        """
        await self.request("respond", run_id=run_id, request_id=request_id, value=value)

    async def ping(self) -> float:
        """The server's clock (Unix seconds). Cancellation: safe."""
        return float((await self.request("ping"))["t"])

    async def _get(self, path: str, params: list[tuple[str, str]]) -> JsonObject:
        query = urllib.parse.urlencode(params)
        url = f"{self.http_url}{path}" + (f"?{query}" if query else "")
        return await asyncio.to_thread(request_json, url, self.token, self.open_timeout_s)

    async def list_runs(
        self,
        *,
        status: str | None = None,
        thread_id: str | None = None,
        agent: str | None = None,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> JsonObject:
        """One page of runs, newest first: ``{"runs": [RunInfo], "next_cursor"}``; pass
        ``next_cursor`` back as ``cursor`` for the next page (None: it was the last).
        ``metadata``: only runs whose metadata has each key with that string value.

        Raises: ClientError (``bad_request`` with ``field``, ``unauthorized``, ...),
        ConnectionLostError.

        Cancellation: safe; the request may finish in the background.
        """
        params = _params(
            status=status, thread_id=thread_id, agent=agent, limit=limit, cursor=cursor
        )
        return await self._get("/api/runs", params + _metadata_params(metadata))

    async def list_threads(
        self,
        *,
        metadata: Mapping[str, str] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> JsonObject:
        """One page of threads, newest first: ``{"threads": [ThreadInfo], "next_cursor"}``,
        as ``list_runs``. Cancellation: safe."""
        params = _params(limit=limit, cursor=cursor) + _metadata_params(metadata)
        return await self._get("/api/threads", params)

    async def runs(self, **filters: Any) -> AsyncIterator[JsonObject]:
        """Every run matching ``filters`` (those of ``list_runs``), newest first, page by
        page: each run once, even while runs are created (newer ones are not shown)."""
        cursor = None
        while True:
            page = await self.list_runs(**filters, cursor=cursor)
            for run in page["runs"]:
                yield run
            cursor = page["next_cursor"]
            if cursor is None:
                return

    async def threads(self, **filters: Any) -> AsyncIterator[JsonObject]:
        """Every thread matching ``filters`` (those of ``list_threads``), as ``runs``."""
        cursor = None
        while True:
            page = await self.list_threads(**filters, cursor=cursor)
            for thread in page["threads"]:
                yield thread
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def watch(self, run_id: str, after: int = 0, **options: Any) -> Watch:
        """A Watch of ``run_id`` on a connection of its own to this client's URL, with
        this client's token unless ``token=`` says otherwise."""
        options.setdefault("token", self.token)
        return Watch(self.url, run_id, after, **options)


def _params(**values: Any) -> list[tuple[str, str]]:
    return [(name, str(value)) for name, value in values.items() if value is not None]


def _metadata_params(metadata: Mapping[str, str] | None) -> list[tuple[str, str]]:
    return [(f"metadata.{key}", value) for key, value in (metadata or {}).items()]


def watch(url: str, run_id: str, after: int = 0, **options: Any) -> Watch:
    """A Watch of ``run_id`` at ``url``; see Watch for the options (``token=`` among them)."""
    return Watch(url, run_id, after, **options)


class Watch:
    """The events of one run after ``after``, exactly once and in order, across reconnects.

    When the connection drops, the watch reconnects (exponential backoff with jitter; at
    most ``max_attempts`` tries and ``max_outage_s`` seconds per outage) and subscribes
    again with ``after`` = its cursor and its epoch. On a ``reset`` (the run's epoch
    changed, PROTOCOL.md §4) it counts it in ``resets``, takes the new ``epoch`` and the
    snapshot that follows (``snapshot``, which moves ``cursor`` to the snapshot's index)
    and goes on with the events after it. Iteration stops after the terminal ``status``
    event, or at once when the run ended at or before the cursor (after a reset: see
    ``snapshot["state"]["status"]``). ``url`` may be changed while it runs (the server
    moved); the next reconnect uses it, and so does ``token``.

    With ``token``, each handshake sends ``Authorization: Bearer TOKEN``. A refusal is
    not an outage: a handshake answered 401 or 403 (or closed with 1008), and a close
    with 4401 (the token expired or was revoked), end the iteration at once with
    ``RefusedError`` instead of reconnecting; only ``rate_limited`` is retried, no sooner
    than its ``retry_after``.

    Attributes: ``cursor`` (the last index yielded), ``epoch``, ``snapshot`` (the last
    snapshot frame), ``resets``, ``reconnects``, ``info`` (RunInfo of the last subscribe).

    Close it with ``async with`` or ``aclose()`` when leaving the loop early; it closes
    itself when the iteration ends or fails.
    """

    def __init__(
        self,
        url: str,
        run_id: str,
        after: int = 0,
        *,
        epoch: str | None = None,
        snapshot: bool = False,
        max_attempts: int | None = 10,
        max_outage_s: float = 30.0,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        open_timeout_s: float = 10.0,
        token: str | None = None,
    ) -> None:
        self.url = url
        self.token = token
        self.run_id = run_id
        self.cursor = after
        self.epoch = epoch
        self.snapshot: JsonObject | None = None
        self.info: JsonObject | None = None
        self.resets = 0
        self.reconnects = 0
        self.max_attempts = max_attempts
        self.max_outage_s = max_outage_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.open_timeout_s = open_timeout_s
        self._want_snapshot = snapshot
        self._expect_snapshot = False
        self._ws: ClientConnection | None = None
        self._pending: deque[JsonObject] = deque()
        self._ended = False
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> JsonObject:
        """The next event; reconnects as needed.

        Raises:
            ClientError: the subscribe was refused (``not_found``, ``cursor_out_of_range``,
                ``forbidden``), or the run was deleted while it was watched
                (``not_found``).
            RefusedError: the server refused the connection, or closed it because the
                token expired or was revoked (4401).
            ConnectionLostError: reconnecting gave up.
            GapError: the server broke its delivery guarantee.

        Cancellation: safe; nothing is lost, and the next call goes on from the cursor.
        """
        try:
            while not self._pending:
                if self._ended or self._closed:
                    await self.aclose()
                    raise StopAsyncIteration
                frame = await self._next_frame()
                if frame is not None:
                    self._handle(frame)
        except Exception as exc:
            if not isinstance(exc, StopAsyncIteration):
                self._closed = True
                self.drop()
                self._ws = None
            raise
        event = self._pending.popleft()
        self.cursor = event["i"]
        if event["type"] == "status" and event["data"].get("status") in TERMINAL_STATUSES:
            self._ended = True
        return event

    async def aclose(self) -> None:
        """Close the connection; iteration stops. Cancellation: the socket is aborted."""
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                await ws.close()
            finally:
                ws.transport.abort()

    def drop(self) -> None:
        """Abort the current connection as a network failure would (for tests)."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def _next_frame(self) -> JsonObject | None:
        """The next frame, reconnecting first if needed; None when nothing more will come."""
        while True:
            if self._ws is None:
                await self._connect()
                if self._ended:  # the run ended at or before the cursor
                    return None
            assert self._ws is not None
            try:
                frame: JsonObject = json.loads(await self._ws.recv())
                return frame
            except ConnectionClosed as exc:
                self._ws.transport.abort()
                self._ws = None
                refused = RefusedError.from_close(self.url, exc)
                if refused is not None:
                    logger.info("run_id=%s watch refused (%s); not resuming", self.run_id, exc)
                    raise refused from exc
                logger.info("run_id=%s watch connection lost (%s); resuming", self.run_id, exc)
                self.reconnects += 1

    async def _connect(self) -> None:
        """Connect and subscribe after the cursor, retrying with backoff and jitter."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                await self._subscribe()
                return
            except (*_RETRYABLE, RefusedError) as exc:
                if isinstance(exc, RefusedError) and exc.code != "rate_limited":
                    raise
                attempt += 1
                delay_s = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                delay_s *= 0.5 + random.random() / 2
                if isinstance(exc, RefusedError) and exc.retry_after is not None:
                    delay_s = max(delay_s, exc.retry_after)
                out_of_attempts = self.max_attempts is not None and attempt >= self.max_attempts
                if out_of_attempts or time.monotonic() + delay_s - started > self.max_outage_s:
                    raise ConnectionLostError(
                        f"run_id={self.run_id}: gave up reconnecting to {self.url} "
                        f"after {attempt} attempts"
                    ) from exc
                logger.info("run_id=%s reconnect attempt %d failed: %r", self.run_id, attempt, exc)
                await asyncio.sleep(delay_s)

    async def _subscribe(self) -> None:
        ws, _ = await _open(self.url, self.open_timeout_s, self.token)
        try:
            op: JsonObject = {"op": "subscribe", "ref": 1, "run_id": self.run_id}
            op |= {"after": self.cursor, "snapshot": self._want_snapshot, "presence": False}
            if self.epoch is not None:
                op["epoch"] = self.epoch
            await ws.send(json.dumps(op))
            async with asyncio.timeout(self.open_timeout_s):
                try:
                    reply = json.loads(await ws.recv())
                except ConnectionClosed as exc:
                    refused = RefusedError.from_close(self.url, exc)
                    if refused is None:
                        raise
                    raise refused from exc
            assert reply.get("type") == "reply", reply  # nothing else is subscribed yet
            if not reply["ok"]:
                raise ClientError.from_reply(reply["error"])
        except BaseException:
            ws.transport.abort()
            raise
        self._ws = ws
        self.info = info = reply["result"]["run"]
        reset = self.epoch is not None and info["epoch"] != self.epoch
        self._expect_snapshot = reset or self._want_snapshot
        self._want_snapshot = False  # a snapshot is asked for once; a reset brings its own
        if self.epoch is None:
            self.epoch = info["epoch"]
        self._check_ended()

    def _check_ended(self) -> None:
        info = self.info
        if info is not None and not self._expect_snapshot and not self._pending:
            if info["status"] in TERMINAL_STATUSES and self.cursor >= info["last_index"]:
                self._ended = True

    def _handle(self, frame: JsonObject) -> None:
        """Fold one frame into the watch's state; events go to the pending queue."""
        kind = frame.get("type")
        if kind == "reset":
            self.resets += 1
            self.epoch = frame["epoch"]
            self._expect_snapshot = True
            logger.info("run_id=%s reset to epoch %s", self.run_id, self.epoch)
        elif kind == "snapshot":
            self.snapshot = frame
            self.cursor = frame["index"]
            self._expect_snapshot = False
            self._check_ended()
        elif kind == "deleted":
            raise ClientError("not_found", f"run {self.run_id} was deleted")
        elif kind == "events":
            if frame["epoch"] != self.epoch:
                raise GapError(f"events of epoch {frame['epoch']} while in {self.epoch}")
            expected = self.cursor + len(self._pending) + 1
            for event in frame["events"]:
                if event["i"] != expected:
                    raise GapError(f"run_id={self.run_id}: expected i={expected}, got {event['i']}")
                expected += 1
            self._pending.extend(frame["events"])
