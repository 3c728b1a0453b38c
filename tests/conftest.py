"""Shared fixtures: a real runcast server on an ephemeral loopback port.

``server`` runs uvicorn in the test's own event loop with a fresh SQLite file under
``tmp_path``; ``spawn`` starts ``python -m app serve`` as a separate process for tests
that kill or signal it.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import uvicorn

from app.cli import websocket_options
from app.config import Settings
from app.transport.app import Runtime, create_app


@dataclass
class Server:
    """A running server: its base URLs, settings and runtime (for white-box checks)."""

    host: str
    port: int
    settings: Settings
    runtime: Runtime

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws"


async def start_server(
    db: Path, **overrides: Any
) -> tuple[Server, uvicorn.Server, asyncio.Task[None]]:
    settings = Settings(db=db, port=0, **overrides)
    app = create_app(settings)
    # IPPROTO_TCP, as runcast serve does: asyncio sets TCP_NODELAY only on such sockets.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    port = sock.getsockname()[1]
    # As runcast serve configures it: its WebSocket protocol and limits.
    config = uvicorn.Config(
        app, log_level="warning", lifespan="on", interface="asgi3", **websocket_options(settings)
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    runtime: Runtime = app.state.runtime
    async with asyncio.timeout(10):
        await runtime.ready.wait()
    return Server("127.0.0.1", port, settings, runtime), server, task


async def stop_server(server: uvicorn.Server, task: asyncio.Task[None], runtime: Runtime) -> None:
    async with asyncio.timeout(20):
        await runtime.shutdown()
        server.should_exit = True
        await task


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """A real runcast server (uvicorn, SQLite file) on 127.0.0.1 and a free port.

    With ``RUNCAST_TEST_CLUSTER=1``: three nodes of a cluster (a PostgreSQL database and
    a Redis prefix of their own) behind a proxy that sends every connection to a random
    node; ``runtime`` is the first node's."""
    if os.environ.get("RUNCAST_TEST_CLUSTER") == "1":
        from tests.cluster.nodes import random_node_cluster

        async with random_node_cluster(flush_interval_s=0.05) as info:
            yield info
        return
    info, uv, task = await start_server(tmp_path / "runcast.db", flush_interval_s=0.05)
    try:
        yield info
    finally:
        await stop_server(uv, task, info.runtime)


@pytest.fixture
async def server_factory(tmp_path: Path) -> AsyncIterator[Any]:
    """Start servers with custom settings: ``await server_factory(linger_s=0.1)``.

    Each call starts another server (by default on the same SQLite file); all are stopped
    at teardown. ``stop(server)`` stops one early (for restart tests).
    """
    running: dict[int, tuple[uvicorn.Server, asyncio.Task[None], Runtime]] = {}

    async def factory(**overrides: Any) -> Server:
        overrides.setdefault("flush_interval_s", 0.05)
        db = overrides.pop("db", tmp_path / "runcast.db")
        info, uv, task = await start_server(db, **overrides)
        running[info.port] = (uv, task, info.runtime)
        return info

    async def stop(info: Server) -> None:
        uv, task, runtime = running.pop(info.port)
        await stop_server(uv, task, runtime)

    factory.stop = stop  # type: ignore[attr-defined]
    try:
        yield factory
    finally:
        for uv, task, runtime in running.values():
            await stop_server(uv, task, runtime)


@dataclass
class Spawned:
    """A ``runcast serve`` process. ``output`` keeps growing (stdout and stderr, merged)
    while the process runs: a reader thread drains the pipe, so a chatty server never
    blocks on a full pipe."""

    process: subprocess.Popen[str]
    port: int
    db: Path
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def wait(self, timeout_s: float) -> int:
        """Wait for the process to exit (``subprocess.TimeoutExpired`` past
        ``timeout_s``); returns its exit code once all of its output is in ``output``."""
        code = self.process.wait(timeout=timeout_s)
        if self.reader is not None:
            self.reader.join(timeout=timeout_s)
        return code

    @property
    def text(self) -> str:
        return "".join(self.output)


_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def _drain(stream: IO[str], lines: list[str], arrived: queue.SimpleQueue[str | None]) -> None:
    for line in stream:
        lines.append(line)
        arrived.put(line)
    arrived.put(None)


def spawn_server(
    db: Path, *args: str, timeout_s: float = 20.0, env: Mapping[str, str] | None = None
) -> Spawned:
    """Start ``python -m app serve --port 0`` on ``db``; returns once it listens.

    ``env`` adds to (or overrides) the test's own environment.
    """
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve", "--port", "0", "--db", str(db), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ,
    )
    assert process.stdout is not None
    lines: list[str] = []
    arrived: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    reader = threading.Thread(
        target=_drain, args=(process.stdout, lines, arrived), name="spawned output", daemon=True
    )
    reader.start()
    deadline = time.monotonic() + timeout_s
    while (remaining_s := deadline - time.monotonic()) > 0:
        try:
            line = arrived.get(timeout=remaining_s)
        except queue.Empty:
            break
        if line is None:
            break
        match = _LISTENING.search(line)
        if match:
            return Spawned(process, int(match.group(1)), db, lines, reader)
    process.kill()
    process.wait()
    reader.join(timeout=10)
    process.stdout.close()
    raise AssertionError("server did not start:\n" + "".join(lines))


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """``spawn(*args, db=None, env=None)`` starts a server process; all are killed at
    teardown. ``env`` adds variables to the process's environment."""
    processes: list[Spawned] = []

    def start(*args: str, db: Path | None = None, env: Mapping[str, str] | None = None) -> Spawned:
        spawned = spawn_server(db or tmp_path / "runcast.db", *args, env=env)
        processes.append(spawned)
        return spawned

    yield start
    for spawned in processes:
        stop_spawned(spawned)


def stop_spawned(spawned: Spawned, grace_s: float = 10.0) -> None:
    """Stop a server process as an operator does (SIGTERM: it shuts down, and coverage
    writes what it measured), then SIGKILL if it has not exited after ``grace_s``."""
    if spawned.process.poll() is None:
        spawned.process.terminate()
        try:
            spawned.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            spawned.process.kill()
    spawned.wait(timeout_s=10)
    if spawned.process.stdout is not None:
        spawned.process.stdout.close()
