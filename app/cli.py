"""Command line: ``runcast serve`` and ``runcast db``; ``bench`` and the client commands
(app/terminal.py) bring their own. Parses flags into Settings and runs uvicorn; no logic
of its own beyond the order of shutdown on SIGINT/SIGTERM and the checks that refuse a
start.

Every refusal to start is one line, ``runcast: <what>: <why>``, and at most one
``hint:`` line, with a non-zero exit status: 2 when what was asked is wrong (a flag, a
setting, the tokens, an agent module), 1 when the machine refuses (the address, the
database). Its traceback is printed only with ``--log-level debug``.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import ipaddress
import logging
import os
import shlex
import socket
import sys
import textwrap
import traceback
from collections.abc import Awaitable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import uvicorn
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import __version__, bench, terminal
from app.access.tokens import parse_server_tokens
from app.config import (
    ENV_PREFIX,
    GROUPS,
    Settings,
    default_text,
    is_database_url,
    is_list,
    option,
    variable,
    variables,
)
from app.errors import RuncastError, StoreError
from app.log_format import configure_logging
from app.store import open_store
from app.transport.app import Runtime, create_app
from app.transport.leanws import LeanWebSocketProtocol

logger = logging.getLogger("app")


DESCRIPTION = """\
runcast serves long-running agent runs in real time. Start a run, watch its events
stream over WebSocket, HTTP or Server-Sent Events from as many clients as you like,
resume after a dropped connection with no gap, stop it or answer it from any of them.
Runs are kept in a SQLite file and survive a restart.
"""

EPILOG = """\
examples:
  runcast serve                      serve http://127.0.0.1:8000, runs in ./runcast.db
  runcast serve --agents my_agents   also serve the agents defined in ./my_agents.py
  runcast db check                   check ./runcast.db
  runcast bench fanout               measure a server

Run 'runcast COMMAND --help' for a command's flags and examples.
"""

SERVE_DESCRIPTION = """\
Serve the WebSocket endpoint /ws, the HTTP API under /api (with Server-Sent Events) and
the page at /. Every flag is also a RUNCAST_* environment variable; a flag wins. With no
token the server is open to whoever reaches it, so it listens on loopback only. If it
cannot start, it says why in one line and exits non-zero (--log-level debug adds the
traceback).
"""

SERVE_EPILOG = """\
examples:
  runcast serve                                  on 127.0.0.1:8000 with ./runcast.db
  runcast serve --port 0 --db /tmp/try.db        any free port (printed), another file
  runcast serve --agents my_agents               also the agents of ./my_agents.py
  runcast serve --agents ~/agents/support.py     ... or of a file given by its path
  runcast serve --host 0.0.0.0 --token-file tokens
                                                 listen on every address, tokens required
  RUNCAST_FLUSH_INTERVAL=1 runcast serve         a setting from the environment
"""

DB_DESCRIPTION = "Look after the SQLite file a server keeps its runs and threads in."

DB_EPILOG = """\
example:
  runcast db check --db /var/lib/runcast/runcast.db
"""

CHECK_DESCRIPTION = """\
Check a database: SQLite's own integrity check, then runcast's: every run's event log
contiguous, every ended run with its terminal event. Prints each problem; exits 0 when
there is none, 1 when there are, 2 when the file cannot be read. Safe to run while a
server uses the file.
"""

CHECK_EPILOG = """\
examples:
  runcast db check                    ./runcast.db
  RUNCAST_DB=/srv/runs.db runcast db check
"""

BENCH_DESCRIPTION = """\
Measure a server: start one as a separate process (or drive --url) and run scenarios
against it: fanout, latency, start, resume, connections, persist. Every watcher checks
that it receives every event exactly once and in order; the bench fails otherwise.
"""

BENCH_EPILOG = """\
examples:
  runcast bench fanout --watchers 1,10 --events 5000
  runcast bench --reference --json bench.json      every scenario, about 4 minutes
  runcast bench chaos                              faults injected while clients check
"""


class RefusalError(Exception):
    """Why a command will not start: printed as ``runcast: <message>`` and at most one
    ``hint:`` line; the process exits with ``status``. The cause, if any, is chained."""

    def __init__(self, message: str, *, hint: str | None = None, status: int = 1) -> None:
        super().__init__(message)
        self.hint = hint
        self.status = status

    def lines(self) -> str:
        return f"runcast: {self}" + (f"\nhint: {self.hint}" if self.hint else "")


class _Parser(argparse.ArgumentParser):
    """argparse, with a wrong command line refused as runcast refuses the rest."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"runcast: {message}\nhint: see '{self.prog} --help'\n")


def _help(description: str, epilog: str) -> dict[str, Any]:
    return {
        "description": description,
        "epilog": epilog,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def _setting_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Setting name -> the flag that sets it, for refusals to name what the user typed."""
    return {
        action.dest: action.option_strings[0]
        for action in parser._actions
        if action.option_strings and action.dest in Settings.model_fields
    }


def _add_setting(parser: argparse._ActionsContainer, name: str) -> None:
    """Add the flag of setting ``name`` (app/config.py) to ``parser``: a list's is
    repeatable, an on/off setting's takes no value, a number's is parsed as one."""
    field = Settings.model_fields[name]
    flag = option(name).flag
    assert flag is not None, f"setting {name} has no flag"
    if field.annotation is bool:
        # default None, not False: a flag not given leaves the variable's value.
        parser.add_argument(flag, dest=name, action="store_true", default=None, help=_help_of(name))
        return
    kwargs: dict[str, Any] = {"action": "append" if is_list(name) else "store"}
    if field.annotation in (int, float):  # argparse refuses a value that is not a number
        kwargs["type"] = field.annotation
    parser.add_argument(
        flag, dest=name, metavar=option(name).metavar, help=_help_of(name), **kwargs
    )


def _help_of(name: str) -> str:
    """The help of setting ``name``: its description, its variable, its default."""
    text = (Settings.model_fields[name].description or "").replace("`", "")
    if is_list(name) and option(name).flag:
        text += "; repeatable"
    where = variable(name) + (", comma-separated" if is_list(name) else "")
    default = default_text(name)
    text += f" ({where}; default {default})" if default else f" ({where})"
    return text.replace("%", "%%")  # argparse formats help with %


def _group_description(group: str, description: str) -> str | None:
    """What ``runcast serve --help`` says above the flags of ``group``: ``description``,
    then each setting of the group that has no flag, with its variable."""
    paragraphs = [description] if description else []
    for name in Settings.model_fields:
        if option(name).group == group and option(name).flag is None:
            where = variable(name) + (" (comma-separated)" if is_list(name) else "")
            what = (Settings.model_fields[name].description or "").replace("`", "")
            default = default_text(name)
            paragraphs.append(f"{where}: {what}" + (f"; default {default}" if default else ""))
    text = "\n".join(textwrap.fill(paragraph, width=76) for paragraph in paragraphs)
    return text or None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="runcast", **_help(DESCRIPTION, EPILOG))
    parser.add_argument("--version", action="version", version=f"runcast {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, title="commands", metavar="COMMAND"
    )
    serve = commands.add_parser(
        "serve",
        help="run the server (flags override RUNCAST_* env)",
        **_help(SERVE_DESCRIPTION, SERVE_EPILOG),
    )
    for group, description in GROUPS.items():
        flags = serve.add_argument_group(group, _group_description(group, description))
        for name in Settings.model_fields:
            if option(name).group == group and option(name).flag:
                _add_setting(flags, name)
    serve.set_defaults(setting_flags=_setting_flags(serve))
    db = commands.add_parser("db", help="database maintenance", **_help(DB_DESCRIPTION, DB_EPILOG))
    db_commands = db.add_subparsers(
        dest="db_command", required=True, title="commands", metavar="COMMAND"
    )
    check = db_commands.add_parser(
        "check",
        help="integrity: SQLite's own check, contiguous logs, terminal events",
        **_help(CHECK_DESCRIPTION, CHECK_EPILOG),
    )
    _add_setting(check, "db")
    check.set_defaults(setting_flags=_setting_flags(check))
    vacuum = db_commands.add_parser(
        "vacuum",
        help="reclaim the space of deleted runs and threads (SQLite VACUUM); "
        "prints the size before and after",
    )
    _add_setting(vacuum, "db")
    vacuum.set_defaults(setting_flags=_setting_flags(vacuum))
    bench_parser = commands.add_parser(
        "bench",
        help="measure a server (see app/bench/)",
        **_help(BENCH_DESCRIPTION, BENCH_EPILOG),
    )
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

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        except SystemExit:
            # uvicorn's answer to a failed lifespan startup, raised inside the serving
            # task: the server ends without serving, and serve() says why.
            self.should_exit = True


async def serve(settings: Settings) -> None:
    """Serve until SIGINT or SIGTERM, then shut down in order.

    What can refuse a start is checked before uvicorn starts, in this order: the agent
    modules, the address, the database.

    Raises:
        RefusalError: it cannot start; nothing was served.
    """
    try:
        app = create_app(settings)
    except ImportError as exc:
        if exc.name not in settings.agents:
            raise
        hint = None
        if isinstance(exc, ModuleNotFoundError) and exc.path is None:  # a name, not a file
            hint = (
                "run runcast from the directory that holds the module's file, or give the "
                "file's path: --agents path/to/module.py"
            )
        raise RefusalError(str(exc), hint=hint, status=2) from exc
    runtime: Runtime = app.state.runtime
    sock = _listen(settings.host, settings.port)
    try:
        await _check_store(settings.db)
        await _serve(app, runtime, sock, settings)
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host``:``port`` (port 0: any free one).

    Raises:
        RefusalError: the address is in use, not this machine's, or not an address.
    """
    # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on sockets that say so, and
    # without it Nagle holds an events frame sent right after a reply for a delayed ACK.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        hint = None
        if exc.errno == errno.EADDRINUSE:
            hint = "stop what listens there, or give another --port (0: any free one)"
        raise RefusalError(f"cannot listen on {host}:{port}: {exc}", hint=hint) from exc
    return sock


async def _check_store(path: Path | str) -> None:
    """Open the database once and close it: a file that cannot be opened or created, or
    that a newer runcast wrote, refuses the start here, before uvicorn's lifespan would
    fail on it with a traceback.

    Raises:
        RefusalError: what is wrong with the file.
    """
    if not is_database_url(path):
        _check_database_path(Path(path))
    store = open_store(path)
    try:
        await store.open()
    except StoreError as exc:  # the message names the file and why (store/sqlite.py)
        raise RefusalError(str(exc)) from exc
    finally:
        # Whatever open() raised: an open connection's thread would keep the process alive.
        await store.close()


def _check_database_path(path: Path) -> None:
    """Raises: RefusalError, for the two mistakes SQLite would only call "unable to open
    database file"."""
    what = f"cannot open database {path}"
    if path.is_dir():
        raise RefusalError(f"{what}: it is a directory", hint="give --db a file's path")
    if not path.parent.is_dir():
        mkdir = f"mkdir -p {shlex.quote(str(path.parent))}"
        raise RefusalError(
            f"{what}: there is no directory {path.parent}",
            hint=f"create it ({mkdir}), or give --db another path",
        )


def _remember_startup_failure(app: ASGIApp, failures: list[Exception]) -> ASGIApp:
    """``app``, whose lifespan startup failure is kept in ``failures`` (for serve() to say
    in one line) rather than sent to uvicorn, which would log its whole traceback.

    Not a coroutine but a function returning ``app``'s for every other scope: each open
    connection's stack holds no frame of it (uvicorn is told ``interface="asgi3"``)."""

    def wrapped(scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        if scope["type"] != "lifespan":
            return app(scope, receive, send)
        return lifespan(scope, receive, send)

    async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_quietly(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                message = {**message, "message": ""}
            await send(message)

        try:
            await app(scope, receive, send_quietly)
        except Exception as exc:
            failures.append(exc)
            raise

    return wrapped


async def _serve(app: ASGIApp, runtime: Runtime, sock: socket.socket, settings: Settings) -> None:
    host, port = sock.getsockname()[:2]
    failures: list[Exception] = []
    config = uvicorn.Config(
        _remember_startup_failure(app, failures),
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers go through runcast's handler (configure_logging)
        interface="asgi3",
        lifespan="on",
        # runcast's own shutdown (below) has ended runs and closed sockets, each within
        # the grace, before uvicorn's begins: what uvicorn waits for is only a connection
        # whose unsent data a client will never read.
        timeout_graceful_shutdown=1,
        **websocket_options(settings),
    )
    server = _Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
    # The socket listens already, so a client that connects before uvicorn accepts waits in
    # the backlog; the line below is printed once the store is open and runs recovered.
    ready = asyncio.create_task(runtime.ready.wait(), name="ready")
    await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    await asyncio.wait({ready})
    if not runtime.ready.is_set():
        await serving
        # What the failed start opened (the database, perhaps the flusher) is closed, or
        # its thread would keep the process alive; close() is bounded by the grace.
        await runtime.close()
        cause = failures[0] if failures else None
        why = "see the log above" if cause is None else str(cause)
        if cause is not None and not isinstance(cause, RuncastError):
            why = f"{type(cause).__name__}: {cause}"
        raise RefusalError(f"cannot start: {why}") from cause
    _tune_gc()
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    print(f"runcast {__version__} listening on {url}", flush=True)
    if settings.log_format == "json":  # a log collector reads stderr: the address is there too
        logger.info("runcast %s listening on %s", __version__, url)
    exit_requested = asyncio.create_task(server.exit_requested.wait(), name="exit signal")
    await asyncio.wait({serving, exit_requested}, return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():
        logger.info("shutdown requested: ending runs, flushing, closing connections")
        await runtime.shutdown()
        server.should_exit = True
    exit_requested.cancel()
    await asyncio.wait({exit_requested})
    await serving


# Young objects collected after this many allocations (Python's default: 700). Every event
# is a tracked object and a run appends hundreds of thousands a second: at 700 a
# collection ran every few hundred events.
GC_YOUNG_THRESHOLD = 10_000


def _tune_gc() -> None:
    """Once the server is up: what it holds for its whole life (modules, agents, settings,
    the app) leaves the collector's generations (``gc.freeze``), so a full collection
    scans only what runs and connections made; young collections run less often.

    Measured with ``runcast bench fanout latency start --reference --watchers 1,1,50
    --compare DIR`` against the same tree without it (medians of 3 runs): 50 watchers
    0.12 -> 0.08 µs of server CPU per delivered event, 1.33 -> 1.14 times the bare
    reference's; 1 watcher 241,000 -> 256,000 events/s; latency and start unchanged.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def websocket_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's WebSocket settings for ``runcast serve`` (tests build their servers with
    them too)."""
    return {
        # uvicorn's own WebSocket protocols hold 12 to 23 KB more per open connection than
        # this one, which behaves as its websockets-sansio does (app/transport/leanws.py).
        "ws": LeanWebSocketProtocol,
        # A frame a little over the limit is read and answered payload_too_large; a frame
        # twice over closes the connection (1009). Reading pauses while a frame waits for
        # the session, so a connection buffers at most what one read brought.
        "ws_max_size": 2 * settings.max_frame_bytes,
        "ws_ping_interval": settings.ping_interval_s,
        "ws_ping_timeout": settings.ping_interval_s,
        # Events are small JSON frames: compressing them costs server CPU on every send and
        # a zlib state per connection (hundreds of KB); clients get them uncompressed (the
        # protocol above never negotiates it).
        "ws_per_message_deflate": False,
    }


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


def _shown(db: Path | str) -> str:
    """A database as it may be printed: a URL without its password."""
    if not is_database_url(db):
        return str(db)
    parts = urlsplit(str(db))
    if parts.password is None:
        return str(db)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def check_database(path: Path | str) -> int:
    """``runcast db check``: print every problem; exit 0 when there is none."""
    if not is_database_url(path) and not Path(path).exists():
        print(f"runcast: no database at {path}", file=sys.stderr)
        return 2

    async def run_check() -> list[str]:
        store = open_store(path)
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
    print(f"{_shown(path)}: {'ok' if not problems else f'{len(problems)} problems'}")
    return 0 if not problems else 1


def vacuum_database(path: Path | str) -> int:
    """``runcast db vacuum``: rebuild the file (or the tables) without free pages and
    dead rows; print the size before and after. Exit 0 when done, 2 when it could not
    be."""
    if not is_database_url(path) and not Path(path).exists():
        print(f"runcast: no database at {path}", file=sys.stderr)
        return 2

    async def run_vacuum() -> tuple[int, int]:
        store = open_store(path)
        await store.open()
        try:
            return await store.vacuum()
        finally:
            await store.close()

    try:
        before, after = asyncio.run(run_vacuum())
    except StoreError as exc:
        print(f"runcast: {exc}", file=sys.stderr)
        return 2
    print(f"{_shown(path)}: {before:,} bytes before, {after:,} bytes after")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in terminal.COMMANDS:
        return terminal.main(args)
    if args.command == "bench":
        return bench.main(args)
    try:
        return _run(args)
    except RefusalError as refusal:
        level = getattr(args, "log_level", None) or os.environ.get(f"{ENV_PREFIX}LOG_LEVEL", "")
        if level.lower() == "debug" and refusal.__cause__ is not None:
            traceback.print_exception(refusal.__cause__, file=sys.stderr)
        print(refusal.lines(), file=sys.stderr)
        return refusal.status


def _run(args: argparse.Namespace) -> int:
    """``runcast serve`` or ``runcast db check``. Raises: RefusalError."""
    settings = settings_of(args)
    if args.command == "db":
        if args.db_command == "vacuum":
            return vacuum_database(settings.db)
        return check_database(settings.db)
    refusal = check_access(settings)
    if refusal is not None:
        print(refusal, file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
    return 0


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings of a parsed ``runcast serve`` or ``runcast db`` command line: its
    flags on top of the ``RUNCAST_*`` variables.

    Raises:
        RefusalError: a value is invalid (the line names its flag or variable).
    """
    flags: dict[str, Any] = {
        name: tuple(value) if isinstance(value, list) else value  # a repeatable flag's
        for name, value in vars(args).items()
        if name in Settings.model_fields
    }
    return _settings(flags, args.setting_flags)


def _settings(flags: Mapping[str, Any], setting_flags: Mapping[str, str]) -> Settings:
    """Settings from ``flags`` and the environment.

    Raises:
        RefusalError: a value is invalid; the line names the flag or the variable it
            came from, what is wrong, and the value.
    """
    try:
        return Settings.from_env(flags)
    except ValidationError as exc:
        problems = [_problem(error, flags, setting_flags) for error in exc.errors()]
        if len(problems) == 1:
            raise RefusalError(f"invalid setting {problems[0]}", status=2) from None
        raise RefusalError(f"invalid settings: {'; '.join(problems)}", status=2) from None


def _problem(
    error: ErrorDetails, flags: Mapping[str, Any], setting_flags: Mapping[str, str]
) -> str:
    """``--flag: what is wrong (got VALUE)`` for one error of a Settings model."""
    name = str(error["loc"][0]) if error["loc"] else ""
    message = error["msg"].removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    if not name:  # a rule over several settings (broker with a SQLite db): its own words
        return f"--{message}"
    return f"{_source(name, flags, setting_flags)}: {message} (got {error['input']!r})"


def _source(name: str, flags: Mapping[str, Any], setting_flags: Mapping[str, str]) -> str:
    """Where setting ``name`` came from: its flag, else its variable (as
    ``Settings.from_env`` reads them), else its name."""
    if flags.get(name) is not None and name in setting_flags:
        return setting_flags[name]
    return next((given for given in variables(name) if given in os.environ), name)
