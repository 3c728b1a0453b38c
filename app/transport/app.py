"""The ASGI application: routes, the WebSocket endpoint, static files, and the runtime
whose lifespan opens the store and shuts everything down in order."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.resources
import importlib.util
import logging
import os
import secrets
import sys
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import fields
from pathlib import Path
from types import ModuleType

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
from app.store import open_store
from app.store.base import Store
from app.transport import http
from app.transport.edge import Edge, redact_logs
from app.transport.metrics import Metrics, Tally, metrics_endpoint
from app.transport.ws import Session

logger = logging.getLogger(__name__)


def _find_static_dir() -> Path:
    """The page: app/static/ in an installed package (pyproject.toml ships the source
    tree's static/ there), else static/ at the top of the source tree."""
    installed = importlib.resources.files("app") / "static"
    if isinstance(installed, Path) and installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent.parent / "static"


STATIC_DIR = _find_static_dir()

_FALLBACK_PAGE = "<!doctype html><title>runcast</title><p>runcast is up.</p>"

# How often open connections are checked for a share that expired or was revoked.
ACCESS_CHECK_INTERVAL_S = 1.0


class Runtime:
    """What the app holds while it runs: settings, the manager, the open sessions, and
    what monitoring reads of them."""

    def __init__(self, settings: Settings, registry: Registry, store: Store | None = None) -> None:
        self.settings = settings
        self.registry = registry
        # ``store``: a store of its own (a PostgreSQL one) instead of the one settings.db names.
        self.store = store if store is not None else open_store(settings.db)
        # Every engine setting has a field of the same name in Settings.
        engine_settings = EngineSettings(
            **{field.name: getattr(settings, field.name) for field in fields(EngineSettings)}
        )
        self.manager: RunManager
        if settings.broker is not None:
            # A node of a cluster (PROTOCOL.md §9); Settings checked the store is shared.
            from app.cluster.broker import Broker
            from app.cluster.node import ClusterManager, default_node_id
            from app.store.postgres import PostgresStore

            assert isinstance(self.store, PostgresStore)
            broker = Broker(
                settings.broker, settings.node_id or default_node_id(), settings.lease_s
            )
            self.manager = ClusterManager(
                self.store, registry, engine_settings, broker, settings.lease_s
            )
        else:
            self.manager = RunManager(self.store, registry, engine_settings)
        self.sessions: set[Session] = set()
        self.tally = Tally()
        self.metrics = Metrics(self)
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
    """Import each agent module; it registers its agents on the default registry, or
    exposes ``register(registry)``.

    A module is a dotted name, looked up in the current directory first and then on
    ``sys.path`` (as uvicorn's ``--app-dir .``), or the path of a ``.py`` file, whose own
    directory is then looked in first. The directory stays on ``sys.path``, so that the
    module can import its neighbours, at once or later.

    Raises:
        ModuleNotFoundError: there is no such module or file.
        ImportError: the module raised while it was imported or registered its agents.
            Either error's message is one line that names the module (and, for a broken
            one, its file, line and error); ``name`` is the module as given, and the
            module's own exception is the ``__cause__``.
    """
    for spec in modules:
        module = _import_agent_module(spec)
        register = getattr(module, "register", None)
        # == and not ``is``: each attribute access makes a new bound method.
        if callable(register) and register != default_registry.register:
            try:
                register(registry)
            except Exception as exc:
                raise _broken_agent_module(spec, module.__file__, exc) from exc


def _import_agent_module(spec: str) -> ModuleType:
    by_path = spec.endswith(".py") or "/" in spec or os.sep in spec
    directory = Path(spec).expanduser().resolve().parent if by_path else Path.cwd()
    if not sys.path or sys.path[0] != str(directory):
        sys.path.insert(0, str(directory))
    importlib.invalidate_caches()  # a file written since the interpreter looked
    if by_path:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ModuleNotFoundError(
                f"cannot load agent module {spec}: no such file", name=spec, path=str(path)
            )
        found = importlib.util.spec_from_file_location(path.stem, path)
    else:
        try:
            found = importlib.util.find_spec(spec)
        except ModuleNotFoundError:  # a parent package is missing
            found = None
        except ValueError as exc:  # not a module name (".x", "")
            raise ModuleNotFoundError(f"cannot load agent module {spec!r}: {exc}") from exc
        except Exception as exc:  # a parent package failed to import
            raise _broken_agent_module(spec, None, exc) from exc
    if found is None or found.loader is None:
        raise ModuleNotFoundError(
            f"cannot load agent module {spec}: no module named {spec!r} in {Path.cwd()} "
            "or on the Python path",
            name=spec,
        )
    try:
        if not by_path:
            return importlib.import_module(spec)
        module = importlib.util.module_from_spec(found)
        sys.modules[found.name] = module
        try:
            found.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(found.name, None)
            raise
        return module
    except Exception as exc:
        raise _broken_agent_module(spec, found.origin, exc) from exc


def _broken_agent_module(spec: str, origin: str | None, exc: Exception) -> ImportError:
    """One line for ``exc``, raised by agent module ``spec`` (file ``origin``): the
    module's line it came through (else the deepest line that is not importlib's), and
    the error."""
    filename: str | None = origin
    line: int | None = None
    what = str(exc)
    if isinstance(exc, SyntaxError) and exc.filename:
        filename, line, what = exc.filename, exc.lineno, exc.msg or ""
    else:
        frames = [
            (frame.f_code.co_filename, number)
            for frame, number in traceback.walk_tb(exc.__traceback__)
            if not frame.f_code.co_filename.startswith("<")  # <frozen importlib._bootstrap>
        ]
        in_module = [frame for frame in frames if frame[0] == origin]
        if in_module or frames:
            filename, line = (in_module or frames)[-1]
    where = ""
    if filename:
        shown = Path(filename)
        with contextlib.suppress(ValueError):
            shown = shown.relative_to(Path.cwd())
        where = f"{shown}, line {line}: " if line else f"{shown}: "
    first = next(iter(what.strip().splitlines()), "")
    error = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return ImportError(f"cannot load agent module {spec}: {where}{error}", name=spec, path=origin)


def create_app(
    settings: Settings, registry: Registry | None = None, store: Store | None = None
) -> Starlette:
    """Build the ASGI app for ``settings`` (and ``store``, if given: else the one
    ``settings.db`` names); the store opens in its lifespan."""
    if registry is None:
        registry = default_registry
        if "demo" not in registry:
            register_builtins(registry)
        if settings.openai_base_url and settings.openai_model:  # the SDK loads in 0.7 s
            from app.agents.openai import register_openai

            register_openai(registry, settings)
        load_agent_modules(registry, settings.agents)
    runtime = Runtime(settings, registry, store)

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
            websocket.scope["runcast.principal"],
            settings,
            tally=runtime.tally,
        )
        runtime.sessions.add(session)
        try:
            await session.serve()
        finally:
            runtime.sessions.discard(session)

    static_dir = settings.static_dir or STATIC_DIR
    routes: list[Route | WebSocketRoute | Mount] = [
        *http.routes,
        Route("/metrics", metrics_endpoint),
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
        metrics_public=settings.metrics_public,
        tally=runtime.tally,
        # Straight to the endpoint, past the router (app/transport/edge.py): a route
        # middleware for /ws would not be called.
        websockets={"/ws": websocket_endpoint},
    )
    return app
