"""``runcast serve`` as a process: its address line, its settings from flags and
``RUNCAST_*`` variables (flags win), agent modules, and refusals to start.

Servers that start are run with the ``spawn`` fixture; commands expected to refuse are
run with ``subprocess.run`` under a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    *args: str, env: Mapping[str, str] | None = None, timeout_s: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m app`` to its end (for commands that must refuse to start)."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        check=False,
    )


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


def test_unknown_agents_module_refuses_to_start(tmp_path: Path) -> None:
    result = run_cli(
        "serve", "--port", "0", "--db", str(tmp_path / "x.db"), "--agents", "no_such_agents_mod"
    )
    assert result.returncode != 0
    assert "listening" not in result.stdout
    assert "no_such_agents_mod" in result.stderr


# -- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--flush-interval", "-1"], {}, "flush_interval"),
        (["--flush-interval", "soon"], {}, "--flush-interval"),
        ([], {"RUNCAST_FLUSH_INTERVAL": "0"}, "flush_interval"),
        (["--port", "70000"], {}, "port"),
        ([], {"RUNCAST_PORT": "eighty"}, "port"),
        (["--log-level", "loud"], {}, "log_level"),
    ],
    ids=["flag-negative", "flag-not-a-number", "env-zero", "port-range", "env-port", "log-level"],
)
def test_invalid_setting_exits_nonzero_with_a_message(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    db = tmp_path / "never.db"
    result = run_cli("serve", "--db", str(db), *args, env=env)
    assert result.returncode != 0
    assert named in result.stderr
    assert "Traceback" not in result.stderr  # a message for people, not a crash
    assert "listening" not in result.stdout
    assert not db.exists()  # refused before touching anything


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
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "listening" not in output
    assert "schema version 999" in output and "newer" in output
    assert sqlite_schema(db) == before


def sqlite_schema(db: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
        schema += conn.execute("SELECT key, value, '' FROM meta ORDER BY key").fetchall()
    return schema
