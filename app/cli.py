"""Command line: ``runcast serve``. Parses flags into Settings and runs uvicorn; no logic
of its own beyond the order of shutdown on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from app import __version__, bench
from app.config import Settings
from app.errors import StoreError
from app.store.sqlite import SqliteStore
from app.transport.app import Runtime, create_app

logger = logging.getLogger("app")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="runcast", description=__doc__)
    parser.add_argument("--version", action="version", version=f"runcast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the server (flags override RUNCAST_* env)")
    serve.add_argument("--host", help="address to listen on (RUNCAST_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port, 0 for any free one (RUNCAST_PORT, 8000)")
    serve.add_argument("--db", help="SQLite file (RUNCAST_DB, ./runcast.db)")
    serve.add_argument(
        "--flush-interval",
        dest="flush_interval_s",
        type=float,
        help="seconds between group commits (RUNCAST_FLUSH_INTERVAL, 0.2)",
    )
    serve.add_argument(
        "--agents",
        action="append",
        metavar="MODULE",
        help="import MODULE to register agents; repeatable (RUNCAST_AGENTS, comma-separated)",
    )
    serve.add_argument("--log-level", help="debug, info, warning, error (RUNCAST_LOG_LEVEL)")
    serve.add_argument("--static-dir", help="directory served at / (RUNCAST_STATIC_DIR)")
    serve.add_argument(
        "--linger",
        dest="linger_s",
        type=float,
        help="seconds an ended run stays in memory (RUNCAST_LINGER, 30)",
    )
    serve.add_argument(
        "--tail-events",
        type=int,
        help="events of a run kept in memory; older ones page from disk "
        "(RUNCAST_TAIL_EVENTS, 10000)",
    )
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    check = db_commands.add_parser(
        "check", help="integrity: SQLite's own check, contiguous logs, terminal events"
    )
    check.add_argument("--db", help="SQLite file (RUNCAST_DB, ./runcast.db)")
    bench_parser = commands.add_parser("bench", help="measure a server (see app/bench.py)")
    bench.add_arguments(bench_parser)
    return parser


class _Server(uvicorn.Server):
    """uvicorn, with SIGINT/SIGTERM turned into runcast's own ordered shutdown first."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.exit_requested = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.exit_requested.is_set():  # a second signal: stop waiting
            self.force_exit = True
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self.exit_requested.set)


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    runtime: Runtime = app.state.runtime
    # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it Nagle holds an events frame sent right after a reply for a delayed ACK.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        ws_max_size=max(16 * 1024 * 1024, 4 * settings.max_frame_bytes),
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        # Events are small JSON frames: compressing them costs server CPU on every send and
        # a zlib state per connection (hundreds of KB); clients get them uncompressed.
        ws_per_message_deflate=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
    # The socket listens already, so a client that connects before uvicorn accepts waits in
    # the backlog; the line below is printed once the store is open and runs recovered.
    ready = asyncio.create_task(runtime.ready.wait(), name="ready")
    await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if runtime.ready.is_set():
        shown = f"[{host}]" if ":" in host else host
        print(f"runcast {__version__} listening on http://{shown}:{port}", flush=True)
    exit_requested = asyncio.create_task(server.exit_requested.wait(), name="exit signal")
    await asyncio.wait({serving, exit_requested}, return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():
        logger.info("shutdown requested: ending runs, flushing, closing connections")
        await runtime.shutdown()
        server.should_exit = True
    exit_requested.cancel()
    await asyncio.wait({exit_requested})
    await serving


def check_database(path: Path) -> int:
    """``runcast db check``: print every problem; exit 0 when there is none."""
    if not path.exists():
        print(f"runcast: no database at {path}", file=sys.stderr)
        return 2

    async def run_check() -> list[str]:
        store = SqliteStore(path)
        await store.open()
        try:
            return await store.check()
        finally:
            await store.close()

    try:
        problems = asyncio.run(run_check())
    except StoreError as exc:
        print(f"runcast: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    print(f"{path}: {'ok' if not problems else f'{len(problems)} problems'}")
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "db":
        return check_database(Settings.from_env({"db": args.db}).db)
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "command"}
    if flags.get("agents"):
        flags["agents"] = tuple(flags["agents"])
    try:
        settings = Settings.from_env(flags)
    except ValueError as exc:
        print(f"runcast: invalid settings: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "serve":
        try:
            asyncio.run(serve(settings))
        except OSError as exc:
            print(
                f"runcast: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr
            )
            return 1
    return 0
