"""The edge: what every HTTP request and WebSocket handshake passes before any route.

One small ASGI layer, its settings in its constructor (PROTOCOL.md §8), in this order:

1. the Host check (open mode: a loopback name only, against DNS rebinding);
2. the Origin check (a browser's WebSocket handshake or non-GET request from an origin
   that is neither the server's own nor allowed is refused), and CORS for allowed ones;
3. the request rate per client address (HTTP) and connections per address (WebSocket);
4. the token: a Principal, put in the scope as ``runcast.principal`` for the routes, or
   a refusal (401 / close 1008) where one is needed: everywhere but the health check, the
   page, and ``/metrics`` when ``metrics_public``.

Refusals of a handshake: a foreign origin or host gets HTTP 403 and never an open socket;
a missing token or too many connections is accepted and closed at once with 1008 and a
reason, which a browser can read.

A WebSocket connection that passes goes straight to the endpoint the app gave for its path
(``websockets``: ``/ws``), not through starlette's exception middleware, router and
route: an idle connection then holds none of their frames and closures (some 4 KB a
connection), and each send passes through two wrapping coroutines fewer. What those
layers add to a WebSocket is the HTTP exception handlers, which answer requests, not
sessions (a session's error still reaches uvicorn, which logs it). A path the app gave
none for goes through the app as any request does.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from app.access.policy import Principal
from app.core.events import encode
from app.core.ratelimit import TokenBucket
from app.errors import (
    ForbiddenError,
    RateLimitedError,
    RuncastError,
    TooManyConnectionsError,
    UnauthorizedError,
)
from app.transport.metrics import Tally
from app.transport.wire import HTTP_STATUS

logger = logging.getLogger(__name__)

SUBPROTOCOL: Final = "runcast"
BEARER_SUBPROTOCOL: Final = "runcast.bearer."
PAGE_HEADERS: Final = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'"
    ),
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_MAX_BUCKETS: Final = 10_000

Authenticate = Callable[[str | None], Principal | None]
WebSocketEndpoint = Callable[[WebSocket], Awaitable[None]]


def is_loopback_host(host: str) -> bool:
    """True when a Host header (``name[:port]``) names this machine's loopback."""
    try:
        name = urlsplit(f"//{host}").hostname or ""
    except ValueError:  # not a host at all ("[", "a:b:c")
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def presented_token(scope: Scope, headers: Headers) -> str | None:
    """The token of a request: ``Authorization: Bearer``, the ``runcast.bearer.``
    subprotocol, or ``?token=`` (on a GET and on the WebSocket handshake)."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    if scope["type"] == "websocket":
        for offered in scope.get("subprotocols", ()):
            if offered.startswith(BEARER_SUBPROTOCOL):
                return str(offered[len(BEARER_SUBPROTOCOL) :])
    if scope["type"] == "websocket" or scope.get("method") in ("GET", "HEAD"):
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
            if key == "token":
                return str(value)
    return None


class Edge:
    """The checks of the module docstring, in front of the whole app."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        authenticate: Authenticate,
        open_mode: Callable[[], bool],
        check_host: bool,
        allow_origins: tuple[str, ...],
        rate: float,
        rate_burst: int,
        max_connections_per_address: int,
        metrics_public: bool = False,
        tally: Tally | None = None,
        clock: Callable[[], float] = time.monotonic,
        websockets: Mapping[str, WebSocketEndpoint] | None = None,
    ) -> None:
        self.app = app
        self.authenticate = authenticate
        self.open_mode = open_mode
        self.check_host = check_host
        self.allow_origins = frozenset(allow_origins)
        self.rate = rate
        self.rate_burst = rate_burst
        self.max_connections_per_address = max_connections_per_address
        self.metrics_public = metrics_public
        self.tally = tally or Tally()  # requests refused for their rate, for /metrics
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self.connections: dict[str, int] = {}
        self.websockets = dict(websockets or {})  # path -> endpoint (module docstring)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine itself: an open connection's stack holds one frame of the edge's.
        kind = scope["type"]
        if kind == "websocket":
            return self._websocket(scope, receive, send)
        if kind == "http":
            return self._http(scope, receive, send)
        return self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        method: str = scope["method"]
        path: str = scope["path"]
        origin = headers.get("origin")
        try:
            self._check_host(headers)
            if origin is not None and method not in _SAFE_METHODS:
                self._check_origin(origin, headers)
        except RuncastError as exc:
            await self._deny(scope, send, exc)
            return
        cors = origin if origin in self.allow_origins and path.startswith("/api") else None
        if method == "OPTIONS" and cors is not None:
            await _respond(send, 204, b"", _cors_headers(cors, preflight=True))
            return
        try:
            self._take(_address(scope))
            principal = self.authenticate(presented_token(scope, headers))
            if principal is None and not self._public(path, method):
                raise UnauthorizedError("a valid token is required (Authorization: Bearer)")
        except RuncastError as exc:
            await self._deny(scope, send, exc, cors)
            return
        scope["runcast.principal"] = principal
        await self.app(scope, receive, _with_headers(send, path, cors))

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A handshake, checked; then the connection, counted against its address while
        it lasts."""
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        try:
            self._check_host(headers)
            if origin is not None:
                self._check_origin(origin, headers)
        except RuncastError as exc:
            await self._deny_handshake(scope, send, exc)
            return
        address = _address(scope)
        limit = self.max_connections_per_address
        try:
            principal = self.authenticate(presented_token(scope, headers))
            if principal is None:  # no WebSocket is public
                raise UnauthorizedError("a valid token is required (Authorization: Bearer)")
            if limit and self.connections.get(address, 0) >= limit:
                raise TooManyConnectionsError(f"more than {limit} connections from one address")
        except RuncastError as exc:
            await self._close_handshake(scope, receive, send, exc)
            return
        del headers, origin  # this frame lasts as long as the connection
        scope["runcast.principal"] = principal
        self.connections[address] = self.connections.get(address, 0) + 1
        try:
            endpoint = self.websockets.get(scope["path"])
            if endpoint is None:
                await self.app(scope, receive, send)
            else:
                await endpoint(WebSocket(scope, receive, send))
        finally:
            left = self.connections[address] - 1
            if left:
                self.connections[address] = left
            else:
                del self.connections[address]

    def _check_host(self, headers: Headers) -> None:
        """Raises: ForbiddenError, for a host name that is not loopback's in open mode."""
        if self.check_host and self.open_mode():
            if not is_loopback_host(headers.get("host", "")):
                raise ForbiddenError(
                    "this server is open (no token) and answers only to a loopback host name",
                    field="host",
                )

    def _check_origin(self, origin: str, headers: Headers) -> None:
        """Raises: ForbiddenError, for an origin that is neither ours nor allowed."""
        if not self._origin_allowed(origin, headers):
            raise ForbiddenError(f"origin {origin} is not allowed", field="origin")

    def _origin_allowed(self, origin: str, headers: Headers) -> bool:
        if origin in self.allow_origins:
            return True
        # The server's own origin: the page it serves. Scheme aside, so that a proxy
        # terminating TLS in front of it changes nothing.
        own = headers.get("host", "").lower()
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:  # not an origin at all ("http://[")
            return False
        return bool(own) and netloc == own

    def _take(self, address: str) -> None:
        """Raises: RateLimitedError."""
        now = self.clock()
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= _MAX_BUCKETS:  # forget addresses that went quiet
                self._buckets = {a: b for a, b in self._buckets.items() if not b.full(now)}
            bucket = self._buckets[address] = TokenBucket(self.rate, self.rate_burst, now)
        wait_s = bucket.take(now)
        if wait_s:
            self.tally.rate_limited_requests += 1
            raise RateLimitedError(wait_s)

    def _public(self, path: str, method: str) -> bool:
        """What HTTP request needs no token: the health check, the page and its static
        files, and the metrics when ``metrics_public``."""
        if path == "/metrics" and self.metrics_public:
            return method in ("GET", "HEAD")
        return _public(path, method)

    @staticmethod
    async def _deny(scope: Scope, send: Send, error: RuncastError, cors: str | None = None) -> None:
        headers = _cors_headers(cors) if cors else []
        if isinstance(error, UnauthorizedError):
            headers.append((b"www-authenticate", b'Bearer realm="runcast"'))
        if isinstance(error, RateLimitedError):
            retry = str(max(1, round(error.details["retry_after"] + 0.5)))
            headers.append((b"retry-after", retry.encode()))
        body = encode({"error": error.to_dict()}).encode()
        await _respond(send, HTTP_STATUS.get(error.code, 500), body, headers)

    async def _deny_handshake(self, scope: Scope, send: Send, error: RuncastError) -> None:
        """Refuse a handshake with an HTTP status: the socket never opens."""
        if "websocket.http.response" in scope.get("extensions", {}):
            body = encode({"error": error.to_dict()}).encode()
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": HTTP_STATUS.get(error.code, 500),
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # the server answers 403
            await send({"type": "websocket.close", "code": 1008})

    @staticmethod
    async def _close_handshake(
        scope: Scope, receive: Receive, send: Send, error: RuncastError
    ) -> None:
        """Accept, then close at once with 1008 and ``code: message`` as the reason (a
        browser reads the close code, not an HTTP status)."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        accept: Message = {"type": "websocket.accept"}
        if SUBPROTOCOL in scope.get("subprotocols", ()):
            accept["subprotocol"] = SUBPROTOCOL
        await send(accept)
        reason = f"{error.code}: {error.message}".encode()[:120].decode(errors="ignore")
        await send({"type": "websocket.close", "code": 1008, "reason": reason})


def _public(path: str, method: str) -> bool:
    """What HTTP request needs no token: the health check, the page and its static files."""
    if method not in ("GET", "HEAD"):
        return False
    if path == "/api/health":
        return True
    return not (path.startswith("/api/") or path == "/api" or path == "/metrics")


def _address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _cors_headers(origin: str | None, *, preflight: bool = False) -> list[tuple[bytes, bytes]]:
    if origin is None:
        return []
    headers = [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"vary", b"Origin"),
        (b"access-control-expose-headers", b"Retry-After"),
    ]
    if preflight:
        headers += [
            (b"access-control-allow-methods", b"GET, POST, PATCH, DELETE"),
            (b"access-control-allow-headers", b"Authorization, Content-Type, Last-Event-ID"),
            (b"access-control-max-age", b"600"),
        ]
    return headers


async def _respond(send: Send, status: int, body: bytes, headers: list[Any]) -> None:
    if body:
        headers = [*headers, (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _with_headers(send: Send, path: str, cors: str | None) -> Send:
    """``send`` that adds CORS headers (an allowed origin, on /api) or the page's security
    headers (everything outside /api) to the response."""
    page = not path.startswith("/api")

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            headers.setdefault("x-content-type-options", "nosniff")
            if page:
                for name, value in PAGE_HEADERS.items():
                    headers.setdefault(name, value)
            for raw_name, raw_value in _cors_headers(cors):
                headers.append(raw_name.decode(), raw_value.decode("latin-1"))
        await send(message)

    return sending


# A query's token, a bearer subprotocol, an Authorization header (websockets logs request
# headers at debug level).
_TOKEN_IN_TEXT: Final = re.compile(
    r"(token=)[^&\s\"']+|(runcast\.bearer\.)[^\s,\"']+|(bearer\s+)[^\s,\"']+", re.IGNORECASE
)


class RedactTokens(logging.Filter):
    """Replaces ``token=SECRET`` (a query string in an access log line), a bearer
    subprotocol and an ``Authorization: Bearer`` header's secret with ``…``: a secret
    never reaches a log.

    The arguments are redacted one by one, keeping their shape: uvicorn's access formatter
    unpacks them (client, method, path, version, status) and fails on anything else.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _redact(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        if isinstance(record.msg, str):
            record.msg = _redact(record.msg)
        message = record.getMessage()
        if _redact(message) != message:  # a secret in an argument that is not a string
            record.msg = _redact(message)
            record.args = ()
        return True


def _redact(text: str) -> str:
    lowered = text.lower()
    if "token=" not in lowered and "bearer" not in lowered:
        return text
    return _TOKEN_IN_TEXT.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "…", text)


def redact_logs() -> None:
    """Install ``RedactTokens`` on uvicorn's loggers (once)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        log = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in log.filters):
            log.addFilter(RedactTokens())
