"""Command line: ``runcast serve``. Parses flags into Settings and runs uvicorn; no logic
of its own beyond the order of shutdown on SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from app import __version__, bench, terminal
from app.access.tokens import parse_server_tokens
from app.config import Settings
from app.errors import StoreError
from app.store.sqlite import SqliteStore
from app.transport.app import Runtime, create_app

logger = logging.getLogger("app")


_LIMIT_FLAGS: tuple[tuple[str, str, type, str], ...] = (
    ("--max-frame-bytes", "max_frame_bytes", int, "largest frame or body (1 MiB)"),
    ("--max-subscriptions", "max_subscriptions", int, "subscriptions per connection (256)"),
    ("--max-thread-watches", "max_thread_watches", int, "thread watches per connection (64)"),
    (
        "--max-connections-per-address",
        "max_connections_per_address",
        int,
        "WebSocket connections per client address; 0: no limit (1000)",
    ),
    ("--rate", "rate", float, "ops a second per connection, requests per address (100)"),
    ("--rate-burst", "rate_burst", int, "how many ops or requests may come at once (1000)"),
    ("--max-live-runs", "max_live_runs", int, "live runs on the server (1000)"),
    ("--max-event-bytes", "max_event_bytes", int, "largest event an agent may emit (1 MiB)"),
    ("--max-input-bytes", "max_input_bytes", int, "largest agent input (256 KiB)"),
    ("--ping-interval", "ping_interval_s", float, "seconds between pings; no pong: 1011 (20)"),
    ("--write-timeout", "write_timeout_s", float, "seconds a send may stall; then 4408 (30)"),
)


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
    access = serve.add_argument_group("access (without a token the server is open: loopback only)")
    access.add_argument(
        "--token-file",
        metavar="FILE",
        help="server tokens, one 'ROLE SECRET' a line; roles viewer, operator, admin "
        "(RUNCAST_TOKENS='ROLE:SECRET,...' adds more)",
    )
    access.add_argument(
        "--allow-origin",
        dest="allow_origins",
        action="append",
        metavar="ORIGIN",
        help="a browser origin allowed besides the server's own, exact; repeatable "
        "(RUNCAST_ALLOW_ORIGINS, comma-separated)",
    )
    access.add_argument(
        "--secret", help="signs share links (RUNCAST_SECRET; default: one kept in the database)"
    )
    access.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow an open server (no token) on a non-loopback address",
    )
    limits = serve.add_argument_group("limits")
    for flag, dest, kind, text in _LIMIT_FLAGS:
        limits.add_argument(flag, dest=dest, type=kind, metavar="N", help=text)
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    check = db_commands.add_parser(
        "check", help="integrity: SQLite's own check, contiguous logs, terminal events"
    )
    check.add_argument("--db", help="SQLite file (RUNCAST_DB, ./runcast.db)")
    bench_parser = commands.add_parser("bench", help="measure a server (see app/bench/)")
    bench.add_arguments(bench_parser)
    terminal.add_commands(commands)
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
        # A frame a little over the limit is read and answered payload_too_large; a frame
        # twice over closes the connection (1009). Reading pauses while a frame waits for
        # the session, so a connection buffers at most a few frames.
        ws_max_size=2 * settings.max_frame_bytes,
        ws_max_queue=4,
        ws_ping_interval=settings.ping_interval_s,
        ws_ping_timeout=settings.ping_interval_s,
        # Events are small JSON frames: compressing them costs server CPU on every send and
        # a zlib state per connection (hundreds of KB); clients get them uncompressed.
        ws_per_message_deflate=False,
        lifespan="on",
        # runcast's own shutdown (below) has ended runs and closed sockets, each within
        # the grace, before uvicorn's begins: what uvicorn waits for is only a connection
        # whose unsent data a client will never read.
        timeout_graceful_shutdown=1,
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


def check_access(settings: Settings) -> str | None:
    """Why ``settings`` must not start a server (a bad token file, an open server on a
    public address), as the lines to print; None when they may."""
    try:
        file_text = settings.token_file.read_text() if settings.token_file else None
        tokens = parse_server_tokens(settings.tokens, file_text)
    except OSError as exc:
        return f"runcast: cannot read the token file {settings.token_file}: {exc.strerror}"
    except ValueError as exc:
        return f"runcast: invalid tokens: {exc}"
    if tokens or settings.insecure or _is_loopback(settings.host):
        return None
    return (
        f"runcast: refusing to listen on {settings.host} with no token: anyone who reaches it "
        "could start, read and stop runs\n"
        "hint: give --token-file FILE or RUNCAST_TOKENS=ROLE:SECRET, or add --insecure"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    if args.command in terminal.COMMANDS:
        return terminal.main(args)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "db":
        return check_database(Settings.from_env({"db": args.db}).db)
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "command"}
    for name in ("agents", "allow_origins"):
        if flags.get(name):
            flags[name] = tuple(flags[name])
    try:
        settings = Settings.from_env(flags)
    except ValueError as exc:
        print(f"runcast: invalid settings: {exc}", file=sys.stderr)
        return 2
    refusal = check_access(settings)
    if refusal is not None:
        print(refusal, file=sys.stderr)
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
