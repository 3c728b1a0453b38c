"""``runcast serve`` as a process: its address line, its settings from flags and
``RUNCAST_*`` variables (flags win), agent modules, its help, and refusals to start.

Servers that start are run with the ``spawn`` fixture; commands expected to refuse are
run with ``subprocess.run`` under a timeout, and each refusal is checked whole: one
``runcast: <what>: <why>`` line, at most one ``hint:`` line, the exit status, and no
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import socket
import sqlite3
import struct
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from app import __version__
from app.cli import main
from app.store.sqlite import SCHEMA_VERSION
from tests.conftest import Spawned

TERMINAL = {"completed", "failed", "stopped", "interrupted"}

# A module that registers its agent on the default registry with the decorator.
SHOUT_MODULE = """
from app.agents.registry import register


@register("shout", description="Answers with its input text in capitals.")
async def shout(ctx):
    await ctx.text(str(ctx.input.get("text", "")).upper() + "!")
"""

# A module that exposes register(registry) instead.
REVERSE_MODULE = '''
async def reverse(ctx):
    """Answers with its input text reversed."""
    await ctx.text(str(ctx.input.get("text", ""))[::-1])


def register(registry):
    registry.add("reverse", reverse)
'''


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 20.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -P -m app`` to its end (for commands that must refuse to start).

    ``-P``: the current directory is not put on ``sys.path``, as with the ``runcast``
    console script, so that finding an agent module there is runcast's own doing.
    """
    return subprocess.run(
        [sys.executable, "-P", "-m", "app", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=cwd,
        check=False,
    )


def refusal(result: subprocess.CompletedProcess[str], status: int) -> list[str]:
    """The lines of a refusal to start, checked for its shape: one ``runcast: `` line
    and at most one ``hint: `` line on stderr, ``status``, no traceback, nothing served."""
    lines = result.stderr.splitlines()
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "listening" not in result.stdout
    assert 1 <= len(lines) <= 2 and lines[0].startswith("runcast: "), result.stderr
    assert len(lines) == 1 or lines[1].startswith("hint: "), result.stderr
    return lines


def agent_modules(tmp_path: Path) -> dict[str, str]:
    """Write the agent modules under ``tmp_path``; the environment that finds them."""
    (tmp_path / "shout_agents.py").write_text(textwrap.dedent(SHOUT_MODULE))
    (tmp_path / "reverse_agents.py").write_text(textwrap.dedent(REVERSE_MODULE))
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path}


@contextlib.asynccontextmanager
async def connect(server: Spawned) -> AsyncIterator[ClientConnection]:
    # max_queue=None: these clients stop reading between frames (to look at the file)
    # while a run streams on; with a bounded queue the client stops reading the socket
    # and its closing handshake stalls (python-websockets/websockets#1555).
    async with websockets.connect(
        server.ws_url, open_timeout=10, close_timeout=2, max_queue=None
    ) as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        yield ws


async def run_to_end(ws: ClientConnection, agent: str, input: dict[str, Any]) -> list[Any]:
    """Start a run with ``subscribe: true`` and return its events up to the terminal one."""
    await ws.send(json.dumps({"op": "start", "agent": agent, "input": input, "ref": agent}))
    events: list[dict[str, Any]] = []
    run_id = None
    while not events or not (
        events[-1]["type"] == "status" and events[-1]["data"]["status"] in TERMINAL
    ):
        frame = json.loads(await ws.recv())
        if frame["type"] == "reply" and frame["ref"] == agent:
            assert frame["ok"], frame
            run_id = frame["result"]["run"]["run_id"]
        elif frame["type"] == "events" and frame["run_id"] == run_id:
            events.extend(frame["events"])
    return events


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["text"] for e in events if e["type"] == "text")


async def agent_names(server: Spawned) -> set[str]:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.get("/api/agents")
    assert response.status_code == 200
    return {agent["name"] for agent in response.json()["agents"]}


def events_on_disk(db: Path, run_id: str) -> int:
    uri = f"file:{db}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as conn:
        [(count,)] = conn.execute("SELECT count(*) FROM events WHERE run_id = ?", (run_id,))
    return int(count)


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port``, from Linux's
    /proc/net tables (which print each address as 32-bit words in host byte order)."""
    assert os.path.exists("/proc/net/tcp"), "runcast's tests run on Linux (reads /proc/net/tcp)"
    found = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                address, _, hex_port = fields[1].partition(":")
                if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    words = [int(address[k : k + 8], 16) for k in range(0, len(address), 8)]
                    packed = struct.pack(f"={len(words)}I", *words)
                    found.add(socket.inet_ntop(family, packed))
    return found


# -- starting ---------------------------------------------------------------------------


async def test_prints_its_address_and_listens_on_loopback_by_default(spawn: Any) -> None:
    server = spawn()
    line = next(line for line in server.output if "listening on" in line)
    assert re.fullmatch(
        rf"runcast {re.escape(__version__)} listening on http://127\.0\.0\.1:{server.port}\n",
        line,
    )
    assert server.port != 0
    assert listening_addresses(server.port) == {"127.0.0.1"}  # and nothing else
    async with asyncio.timeout(10), httpx.AsyncClient(base_url=server.http_url) as http:
        health = (await http.get("/api/health")).json()
    assert health["ok"] is True


async def test_host_flag_wins_over_runcast_host(spawn: Any) -> None:
    server = spawn("--host", "127.0.0.1", env={"RUNCAST_HOST": "0.0.0.0"})
    assert listening_addresses(server.port) == {"127.0.0.1"}
    async with asyncio.timeout(10), httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/api/health")).json()["ok"] is True


async def test_flush_interval_from_env_and_the_flag_wins(spawn: Any, tmp_path: Path) -> None:
    """RUNCAST_FLUSH_INTERVAL=30 holds events in memory; --flush-interval 0.05 overrides it."""
    slow_db, fast_db = tmp_path / "slow.db", tmp_path / "fast.db"
    slow = spawn(db=slow_db, env={"RUNCAST_FLUSH_INTERVAL": "30"})
    fast = spawn("--flush-interval", "0.05", db=fast_db, env={"RUNCAST_FLUSH_INTERVAL": "30"})
    start = {"op": "start", "agent": "counter", "input": {"n": 100_000, "delay_s": 0.002}}
    on_disk: dict[Path, int] = {}
    for server in (fast, slow):
        async with asyncio.timeout(10), connect(server) as ws:
            await ws.send(json.dumps({**start, "ref": 1}))
            run_id = json.loads(await ws.recv())["result"]["run"]["run_id"]
            # Arriving events are the clock: read until the disk has some (fast), or
            # until 200 events (>= 0.4 s, two default intervals) have streamed (slow: its
            # next flush is 30 s away).
            seen = 0
            while seen < 200 and (server is slow or events_on_disk(server.db, run_id) == 0):
                frame = json.loads(await ws.recv())
                if frame["type"] == "events":
                    seen = frame["events"][-1]["i"]
            on_disk[server.db] = events_on_disk(server.db, run_id)
    assert on_disk[fast_db] > 0
    assert on_disk[slow_db] == 0


# -- agent modules ----------------------------------------------------------------------


async def test_agents_flag_loads_modules(spawn: Any, tmp_path: Path) -> None:
    env = agent_modules(tmp_path)
    server = spawn("--agents", "shout_agents", "--agents", "reverse_agents", env=env)
    async with asyncio.timeout(15):
        names = await agent_names(server)
        assert {"shout", "reverse", "counter", "demo"} <= names
        async with connect(server) as ws:
            shouted = await run_to_end(ws, "shout", {"text": "hello"})
            reversed_ = await run_to_end(ws, "reverse", {"text": "hello"})
    assert shouted[-1]["data"]["status"] == "completed"
    assert text_of(shouted) == "HELLO!"
    assert reversed_[-1]["data"]["status"] == "completed"
    assert text_of(reversed_) == "olleh"


async def test_runcast_agents_env_loads_modules(spawn: Any, tmp_path: Path) -> None:
    env = {**agent_modules(tmp_path), "RUNCAST_AGENTS": "shout_agents,reverse_agents"}
    server = spawn(env=env)
    async with asyncio.timeout(15):
        assert {"shout", "reverse"} <= await agent_names(server)
        async with connect(server) as ws:
            events = await run_to_end(ws, "shout", {"text": "env"})
    assert events[-1]["data"]["status"] == "completed"
    assert text_of(events) == "ENV!"


async def test_agents_flag_wins_over_runcast_agents(spawn: Any, tmp_path: Path) -> None:
    env = {**agent_modules(tmp_path), "RUNCAST_AGENTS": "no_such_agents_module"}
    server = spawn("--agents", "shout_agents", env=env)
    async with asyncio.timeout(15):
        names = await agent_names(server)
    assert "shout" in names and "reverse" not in names


# -- refusals ---------------------------------------------------------------------------

NOT_FOUND_HINT = (
    "hint: run runcast from the directory that holds the module's file, or give the "
    "file's path: --agents path/to/module.py"
)

# name -> (files written in the current directory, --agents, the refusal's lines), run
# from that directory with no PYTHONPATH: the module is found there, or not at all.
AGENT_REFUSALS: dict[str, tuple[dict[str, str], str, list[str]]] = {
    "missing-module": (
        {},
        "no_such_agents_mod",
        [
            "runcast: cannot load agent module no_such_agents_mod: no module named "
            "'no_such_agents_mod' in {cwd} or on the Python path",
            NOT_FOUND_HINT,
        ],
    ),
    "missing-file": (
        {},
        "./no_such_agents.py",
        ["runcast: cannot load agent module ./no_such_agents.py: no such file"],
    ),
    "raises-on-import": (
        {"broken_agents.py": "from app.agents import register\n\nsettings = {}\nsettings['x']\n"},
        "broken_agents",
        [
            "runcast: cannot load agent module broken_agents: broken_agents.py, line 4: "
            "KeyError: 'x'"
        ],
    ),
    "raises-on-import-by-path": (
        {"broken_agents.py": "import os\n\nos.environ['RUNCAST_NO_SUCH_VARIABLE']\n"},
        "./broken_agents.py",
        [
            "runcast: cannot load agent module ./broken_agents.py: broken_agents.py, line 3: "
            "KeyError: 'RUNCAST_NO_SUCH_VARIABLE'"
        ],
    ),
    "imports-a-missing-package": (
        {"needy_agents.py": "import json\nimport no_such_package_xyz\n"},
        "needy_agents",
        [
            "runcast: cannot load agent module needy_agents: needy_agents.py, line 2: "
            "ModuleNotFoundError: No module named 'no_such_package_xyz'"
        ],
    ),
    "syntax-error": (
        {"typo_agents.py": "from app.agents import register\n\n\nasync def f(ctx:\n"},
        "typo_agents",
        [
            "runcast: cannot load agent module typo_agents: typo_agents.py, line 4: "
            "SyntaxError: '(' was never closed"
        ],
    ),
    "plain-def-agent": (
        {
            "plain_agents.py": "from app.agents import register\n\n\n"
            "@register('plain')\ndef plain(ctx):\n    pass\n"
        },
        "plain_agents",
        [
            "runcast: cannot load agent module plain_agents: plain_agents.py, line 4: "
            "TypeError: agent 'plain' must be an async function (async def)"
        ],
    ),
    "register-raises": (
        {"reg_agents.py": "def register(registry):\n    registry.add('x', None)\n"},
        "reg_agents",
        [
            "runcast: cannot load agent module reg_agents: reg_agents.py, line 2: "
            "TypeError: agent 'x' must be an async function (async def)"
        ],
    ),
}


@pytest.mark.parametrize("case", list(AGENT_REFUSALS))
def test_an_agent_module_that_is_missing_or_broken_refuses_in_one_line(
    tmp_path: Path, case: str
) -> None:
    files, agents, expected = AGENT_REFUSALS[case]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {"PYTHONPATH": ""}
    result = run_cli("serve", "--port", "0", "--agents", agents, env=env, cwd=tmp_path)
    assert refusal(result, 2) == [line.format(cwd=tmp_path) for line in expected]
    assert not (tmp_path / "runcast.db").exists()  # refused before the database


def test_a_module_in_the_current_directory_is_found_before_the_python_path(
    tmp_path: Path,
) -> None:
    """A module name is looked up in the current directory before PYTHONPATH (as
    uvicorn's ``--app-dir .``); both files raise, so the refusal says which one loaded."""
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "cwd_first_agents.py").write_text("raise RuntimeError('path')\n")
    (tmp_path / "cwd_first_agents.py").write_text("raise RuntimeError('cwd')\n")
    env = {"PYTHONPATH": str(tmp_path / "shadow")}
    result = run_cli("serve", "--port", "0", "--agents", "cwd_first_agents", env=env, cwd=tmp_path)
    [line] = refusal(result, 2)
    assert line.endswith("cwd_first_agents.py, line 1: RuntimeError: cwd")


def test_debug_adds_the_traceback_before_the_line(tmp_path: Path) -> None:
    (tmp_path / "broken_agents.py").write_text("x = 1 / 0\n")
    args = ("serve", "--port", "0", "--agents", "broken_agents", "--log-level", "debug")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "ZeroDivisionError" in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "runcast: cannot load agent module broken_agents: broken_agents.py, line 1: "
        "ZeroDivisionError: division by zero"
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            ["--flush-interval", "-1"],
            {},
            "runcast: invalid setting --flush-interval: input should be greater than 0 (got -1.0)",
        ),
        (
            ["--flush-interval", "soon"],
            {},
            "runcast: argument --flush-interval: invalid float value: 'soon'",
        ),
        (
            [],
            {"RUNCAST_FLUSH_INTERVAL": "0"},
            "runcast: invalid setting RUNCAST_FLUSH_INTERVAL: input should be greater than 0 "
            "(got '0')",
        ),
        (
            ["--port", "70000"],
            {},
            "runcast: invalid setting --port: input should be less than or equal to 65535 "
            "(got 70000)",
        ),
        (
            [],
            {"RUNCAST_PORT": "eighty"},
            "runcast: invalid setting RUNCAST_PORT: input should be a valid integer, unable "
            "to parse string as an integer (got 'eighty')",
        ),
        (
            ["--log-level", "loud"],
            {},
            "runcast: invalid setting --log-level: log_level must be one of critical, error, "
            "warning, info, debug (got 'loud')",
        ),
        (
            ["--broker", "redis://127.0.0.1:6379/0"],
            {},
            "runcast: invalid setting --broker needs a PostgreSQL --db (postgresql://...): the "
            "nodes of a cluster share one database, and a SQLite file belongs to one process",
        ),
        (
            ["--broker", "http://127.0.0.1:6379"],
            {},
            "runcast: invalid setting --broker: broker must be a redis:// (or rediss://, "
            "unix://) URL (got 'http://127.0.0.1:6379')",
        ),
        (
            ["--port", "70000", "--linger", "-1"],
            {},
            "runcast: invalid settings: --port: input should be less than or equal to 65535 "
            "(got 70000); --linger: input should be greater than or equal to 0 (got -1.0)",
        ),
    ],
    ids=[
        "flag-negative",
        "flag-not-a-number",
        "env-zero",
        "port-range",
        "env-port",
        "log-level",
        "broker-with-sqlite",
        "broker-not-redis",
        "two-at-once",
    ],
)
def test_invalid_setting_refuses_in_one_line_naming_the_flag_or_variable(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    db = tmp_path / "never.db"
    result = run_cli("serve", "--db", str(db), *args, env=env)
    lines = refusal(result, 2)
    assert lines[0] == expected
    if "argument" in expected:  # argparse's own refusals point at the help
        assert lines[1:] == ["hint: see 'runcast serve --help'"]
    assert not db.exists()  # refused before touching anything


def test_a_database_in_a_missing_directory_refuses_with_a_hint(tmp_path: Path) -> None:
    db = tmp_path / "no" / "such" / "dir" / "x.db"
    result = run_cli("serve", "--port", "0", "--db", str(db))
    assert refusal(result, 1) == [
        f"runcast: cannot open database {db}: there is no directory {db.parent}",
        f"hint: create it (mkdir -p {db.parent}), or give --db another path",
    ]
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("kind", ["directory", "not-a-database"])
def test_a_database_path_that_cannot_be_opened_refuses(tmp_path: Path, kind: str) -> None:
    db = tmp_path / "runs.db"
    if kind == "directory":
        db.mkdir()
        expected = [f"runcast: cannot open database {db}: it is a directory"]
        expected.append("hint: give --db a file's path")
    else:
        db.write_bytes(b"these are not the runs you are looking for" * 100)
        expected = [f"runcast: cannot open database {db}: file is not a database"]
    result = run_cli("serve", "--port", "0", "--db", str(db))
    assert refusal(result, 1) == expected


def test_a_port_in_use_refuses_with_a_hint(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port), "--db", str(tmp_path / "x.db"))
    assert refusal(result, 1) == [
        f"runcast: cannot listen on 127.0.0.1:{port}: [Errno 98] Address already in use",
        "hint: stop what listens there, or give another --port (0: any free one)",
    ]
    assert not (tmp_path / "x.db").exists()  # the address is checked before the database


@pytest.mark.parametrize(
    ("args", "tokens", "expected"),
    [
        (
            ["--host", "0.0.0.0"],
            None,
            [
                "runcast: refusing to listen on 0.0.0.0 with no token: anyone who reaches it "
                "could start, read and stop runs",
                "hint: give --token-file FILE or RUNCAST_TOKENS=ROLE:SECRET, or add --insecure",
            ],
        ),
        (
            ["--token-file", "{tmp}/no-such-tokens"],
            None,
            ["runcast: cannot read the token file {tmp}/no-such-tokens: No such file or directory"],
        ),
        (
            ["--token-file", "{tmp}/tokens"],
            "overlord 0123456789abcdef0123\n",
            ["runcast: invalid tokens: "],
        ),
    ],
    ids=["public-without-token", "no-token-file", "bad-token-file"],
)
def test_access_refusals_are_one_line(
    tmp_path: Path, args: list[str], tokens: str | None, expected: list[str]
) -> None:
    if tokens is not None:
        (tmp_path / "tokens").write_text(tokens)
    args = [arg.format(tmp=tmp_path) for arg in args]
    result = run_cli("serve", "--port", "0", "--db", str(tmp_path / "x.db"), *args)
    lines = refusal(result, 2)
    assert len(lines) == len(expected)
    for line, start in zip(lines, expected, strict=True):
        assert line.startswith(start.format(tmp=tmp_path)), line


def test_a_failed_start_after_the_checks_is_one_line_without_a_traceback(
    tmp_path: Path,
) -> None:
    """A file of this schema version with its tables missing passes the store check and
    fails the recovery in uvicorn's lifespan: said in one last line, and the process
    ends (the database's thread closed)."""
    db = tmp_path / "gutted.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executescript(
            f"""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');
            """
        )
    result = run_cli("serve", "--port", "0", "--db", str(db))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("runcast: cannot start: ") and "no such table" in last, last


def test_db_check_refuses_an_invalid_setting_in_one_line(tmp_path: Path) -> None:
    result = run_cli("db", "check", "--db", str(tmp_path / "x.db"), env={"RUNCAST_PORT": "x"})
    [line] = refusal(result, 2)
    assert line.startswith("runcast: invalid setting RUNCAST_PORT: ")


def test_db_check_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    result = run_cli("db", "check", "--db", str(tmp_path / "x.db"))
    assert refusal(result, 2) == [f"runcast: no database at {tmp_path / 'x.db'}"]


def test_newer_schema_refuses_to_start_and_leaves_the_file_alone(tmp_path: Path) -> None:
    db = tmp_path / "newer.db"
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        # What a future runcast might have written: other tables, schema version 999.
        conn.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '999');
            CREATE TABLE runs (run_id TEXT PRIMARY KEY, record TEXT NOT NULL);
            """
        )
    before = sqlite_schema(db)
    result = run_cli("serve", "--port", "0", "--db", str(db))
    assert refusal(result, 1) == [
        f"runcast: database {db} has schema version 999, newer than this runcast "
        f"understands ({SCHEMA_VERSION}); upgrade runcast"
    ]
    assert sqlite_schema(db) == before
    result = run_cli("db", "check", "--db", str(db))
    assert refusal(result, 2)[0].startswith(f"runcast: database {db} has schema version 999")


def sqlite_schema(db: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        schema += conn.execute("SELECT key, value, '' FROM meta ORDER BY key").fetchall()
    return schema


# -- logs -------------------------------------------------------------------------------


async def test_log_format_json_is_one_object_a_line_with_the_ids(tmp_path: Path) -> None:
    """``--log-format json`` (winning over RUNCAST_LOG_FORMAT; the level from
    RUNCAST_LOG_LEVEL): every line on stderr is one JSON object, uvicorn's included; a
    run's lines carry its run_id, a connection's its connection_id. The address line
    stays on stdout for scripts, and is in the log too."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env |= {"RUNCAST_LOG_FORMAT": "text", "RUNCAST_LOG_LEVEL": "debug"}
    argv = ["serve", "--port", "0", "--db", str(tmp_path / "x.db"), "--log-format", "json"]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr: list[str] = []

    async def read_log(stream: asyncio.StreamReader) -> None:
        async for line in stream:
            stderr.append(line.decode())

    reading = asyncio.create_task(read_log(process.stderr))
    try:
        async with asyncio.timeout(20):
            first = (await process.stdout.readline()).decode()
            listening = re.fullmatch(r"runcast \S+ listening on (http://127\.0\.0\.1:\d+)\n", first)
            assert listening, first + "".join(stderr)
            url = listening[1]
            async with websockets.connect(url.replace("http", "ws") + "/ws") as ws:
                welcome = json.loads(await ws.recv())
                start = {"op": "start", "agent": "counter", "input": {"n": 3}, "ref": 1}
                await ws.send(json.dumps(start))
                run_id = json.loads(await ws.recv())["result"]["run"]["run_id"]
                status = None
                while status not in TERMINAL:
                    frame = json.loads(await ws.recv())
                    for event in frame.get("events", []):
                        if event["type"] == "status":
                            status = event["data"]["status"]
            async with httpx.AsyncClient() as http:
                assert (await http.get(f"{url}/api/health")).status_code == 200
    finally:
        if process.returncode is None:
            process.terminate()
        async with asyncio.timeout(20):
            code = await process.wait()
            await reading
            await process.stdout.read()
    assert code == 0, "".join(stderr)
    lines = [json.loads(line) for line in stderr]  # each line parses on its own
    assert lines and all({"time", "level", "logger", "message"} <= set(line) for line in lines)

    def logged(**expected: str) -> bool:
        return any(all(line.get(k) == v for k, v in expected.items()) for line in lines)

    assert logged(logger="uvicorn.error", message=f"Started server process [{process.pid}]")
    assert logged(logger="app", message=f"runcast {__version__} listening on {url}")
    assert any(
        line["logger"] == "uvicorn.access" and "GET /api/health" in line["message"]
        for line in lines
    )
    assert logged(run_id=run_id, message=f"run_id={run_id} ended {status}")
    assert logged(connection_id=welcome["connection_id"], level="debug")


# -- help -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command", [[], ["serve"], ["db"], ["db", "check"], ["bench"]], ids=" ".join
)
def test_help_says_what_a_user_can_do_with_an_example(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert re.search(r"^examples?:\n  ", text, re.MULTILINE), text
    example = " ".join(["runcast", *command])
    assert re.search(rf"^ +(RUNCAST_\S+ )?{example}\b", text, re.MULTILINE), text
    # A description for users, not the module's docstring for developers.
    assert "Parses flags" not in text and "``" not in text


def test_a_missing_command_refuses_with_a_pointer_to_the_help() -> None:
    assert refusal(run_cli(), 2) == [
        "runcast: the following arguments are required: COMMAND",
        "hint: see 'runcast --help'",
    ]


def test_a_started_server_freezes_what_it_holds_and_collects_young_objects_less_often() -> None:
    from app.cli import GC_YOUNG_THRESHOLD, _tune_gc

    before = gc.get_threshold()
    try:
        _tune_gc()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
