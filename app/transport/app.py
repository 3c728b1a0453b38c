"""The ASGI application: routes, the WebSocket endpoint, static files, and the runtime
whose lifespan opens the store and shuts everything down in order."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import fields
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from app.access.policy import Principal
from app.access.shares import Shares
from app.access.tokens import Authenticator, parse_server_tokens
from app.agents.builtin import register_builtins
from app.agents.registry import Registry, default_registry
from app.config import Settings
from app.engine.manager import EngineSettings, RunManager
from app.errors import RuncastError
from app.store.sqlite import SqliteStore
from app.transport import http
from app.transport.edge import Edge, redact_logs
from app.transport.ws import Session

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent.parent / "static"

_FALLBACK_PAGE = "<!doctype html><title>runcast</title><p>runcast is up.</p>"

# How often open connections are checked for a share that expired or was revoked.
ACCESS_CHECK_INTERVAL_S = 1.0


class Runtime:
    """What the app holds while it runs: settings, the manager, the open sessions."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.store = SqliteStore(settings.db)
        self.manager = RunManager(
            self.store,
            registry,
            # Every engine setting has a field of the same name in Settings.
            EngineSettings(
                **{field.name: getattr(settings, field.name) for field in fields(EngineSettings)}
            ),
        )
        self.sessions: set[Session] = set()
        self._shut_down = False
        self.ready = asyncio.Event()
        # Server tokens are read now, so that a bad token file stops the start at once.
        file_text = settings.token_file.read_text() if settings.token_file else None
        self._server_tokens = parse_server_tokens(settings.tokens, file_text)
        # Until open() reads the share secret, nothing is served; this one refuses shares.
        self.authenticator = Authenticator(self._server_tokens, secrets.token_bytes(32))
        self.shares = Shares(self.store, self.authenticator)
        self._access_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self.manager.open()
        secret = self.settings.secret or await self.store.share_secret(secrets.token_hex(32))
        revoked = await self.store.revoked_shares(time.time())
        self.authenticator = Authenticator(self._server_tokens, secret.encode(), revoked)
        self.shares = Shares(self.store, self.authenticator)
        self._access_task = asyncio.create_task(self._check_access(), name="access check")
        self.ready.set()
        mode = "open (no token)" if self.authenticator.open_mode else "token"
        logger.info("store open at %s; access %s", self.settings.db, mode)

    def authenticate(self, token: str | None) -> Principal | None:
        return self.authenticator.authenticate(token, time.time())

    async def close_revoked(self) -> None:
        """Close, with 4401, every connection whose share expired or was revoked."""
        now = time.time()
        gone = [
            session
            for session in self.sessions
            if not self.authenticator.still_valid(session.principal, now)
        ]
        for session in gone:
            logger.info("connection_id=%s: its token expired or was revoked", session.connection_id)
        if gone:
            await asyncio.gather(*(session.close(4401, timeout_s=0) for session in gone))

    async def _check_access(self) -> None:
        while True:
            await asyncio.sleep(ACCESS_CHECK_INTERVAL_S)
            await self.close_revoked()

    async def shutdown(self) -> None:
        """Refuse new runs, end live runs as interrupted, deliver their terminal events,
        flush, close every socket with 1001. Idempotent; the store is closed by ``close``.
        """
        if self._shut_down:
            return
        self._shut_down = True
        began = time.monotonic()
        if self._access_task is not None:
            self._access_task.cancel()
            await asyncio.gather(self._access_task, return_exceptions=True)
        await self.manager.close()
        # One grace for the whole shutdown: what the runs' ending left of it is what the
        # connections get to deliver their last frames; a client that stopped reading is
        # then cut off (its pump cancelled, its close frame given up on).
        left_s = max(0.5, self.settings.shutdown_grace_s - (time.monotonic() - began))
        logger.info("shutdown: closing %d connections", len(self.sessions))
        if self.sessions:
            await asyncio.gather(
                *(session.close(1001, timeout_s=left_s) for session in list(self.sessions))
            )

    async def close(self) -> None:
        await self.shutdown()
        await self.store.close()
        logger.info("shutdown: store closed")


def load_agent_modules(registry: Registry, modules: tuple[str, ...]) -> None:
    """Import each module; a module registers its agents on the default registry, or
    exposes ``register(registry)``."""
    for name in modules:
        module = importlib.import_module(name)
        register = getattr(module, "register", None)
        if callable(register) and register is not default_registry.register:
            register(registry)


def create_app(settings: Settings, registry: Registry | None = None) -> Starlette:
    """Build the ASGI app for ``settings``; the store opens in its lifespan."""
    if registry is None:
        registry = default_registry
        if "demo" not in registry:
            register_builtins(registry)
        load_agent_modules(registry, settings.agents)
    runtime = Runtime(settings, registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.open()
        try:
            yield
        finally:
            await runtime.close()

    async def websocket_endpoint(websocket: WebSocket) -> None:
        session = Session(
            websocket, runtime.manager, websocket.scope["runcast.principal"], settings
        )
        runtime.sessions.add(session)
        try:
            await session.serve()
        finally:
            runtime.sessions.discard(session)

    static_dir = settings.static_dir or STATIC_DIR
    routes: list[Route | WebSocketRoute | Mount] = [
        *http.routes,
        WebSocketRoute("/ws", websocket_endpoint),
    ]
    if static_dir.is_dir():
        routes.append(Mount("/", StaticFiles(directory=static_dir, html=True), name="static"))
    else:

        async def fallback_page(request: Request) -> HTMLResponse:
            return HTMLResponse(_FALLBACK_PAGE)

        routes.append(Route("/", fallback_page))
    redact_logs()
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            RuncastError: http.handle_runcast_error,
            HTTPException: http.handle_http_exception,
            Exception: http.handle_unexpected,
        },
    )
    app.state.runtime = runtime
    app.add_middleware(
        Edge,
        authenticate=runtime.authenticate,
        open_mode=lambda: runtime.authenticator.open_mode,
        check_host=not settings.insecure,
        allow_origins=settings.allow_origins,
        rate=settings.rate,
        rate_burst=settings.rate_burst,
        max_connections_per_address=settings.max_connections_per_address,
    )
    return app
