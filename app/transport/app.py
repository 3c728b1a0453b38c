"""The ASGI application: routes, the WebSocket endpoint, static files, and the runtime
whose lifespan opens the store and shuts everything down in order."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
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

from app.agents.builtin import register_builtins
from app.agents.registry import Registry, default_registry
from app.config import Settings
from app.engine.manager import EngineSettings, RunManager
from app.errors import RuncastError
from app.store.sqlite import SqliteStore
from app.transport import http
from app.transport.ws import Session

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent.parent.parent / "static"

_FALLBACK_PAGE = "<!doctype html><title>runcast</title><p>runcast is up.</p>"


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

    async def open(self) -> None:
        await self.manager.open()
        self.ready.set()
        logger.info("store open at %s", self.settings.db)

    async def shutdown(self) -> None:
        """Refuse new runs, end live runs as interrupted, deliver their terminal events,
        flush, close every socket with 1001. Idempotent; the store is closed by ``close``.
        """
        if self._shut_down:
            return
        self._shut_down = True
        await self.manager.close()
        logger.info("shutdown: closing %d connections", len(self.sessions))
        if self.sessions:
            await asyncio.gather(*(session.close(1001) for session in list(self.sessions)))

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
            websocket,
            runtime.manager,
            max_frame_bytes=settings.max_frame_bytes,
            max_subscriptions=settings.max_subscriptions,
            max_thread_watches=settings.max_thread_watches,
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
    return app
