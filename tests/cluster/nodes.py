"""A cluster for tests: a fresh PostgreSQL database, a Redis key prefix of its own, nodes
in this process (uvicorn, as ``tests/conftest.py`` starts one), and a proxy that sends
every TCP connection to a random node.

``RUNCAST_TEST_POSTGRES`` names the PostgreSQL maintenance database (default
``postgresql://postgres@127.0.0.1:5432/postgres``), ``RUNCAST_TEST_REDIS`` the Redis
(default ``redis://127.0.0.1:6379/0``). Both are required: the tests fail, never skip,
without them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as redis

from tests.conftest import Server, start_server, stop_server

ADMIN_URL = os.environ.get("RUNCAST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("RUNCAST_TEST_REDIS", "redis://127.0.0.1:6379/0")


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """The URL of a new, empty database, dropped afterwards."""
    try:
        admin = await asyncpg.connect(ADMIN_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.fail(f"PostgreSQL at {ADMIN_URL} is not reachable: {exc}")
    name = f"runcast_test_{secrets.token_hex(6)}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        try:
            parts = urlsplit(ADMIN_URL)
            yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, ""))
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def fresh_prefix(redis_url: str = REDIS_URL) -> AsyncIterator[str]:
    """A broker URL on ``redis_url`` with a key prefix of its own; its keys are deleted
    afterwards."""
    prefix = f"runcast-test-{secrets.token_hex(6)}"
    client = redis.Redis.from_url(redis_url)
    try:
        await client.ping()
    except (OSError, redis.RedisError) as exc:
        pytest.fail(f"Redis at {redis_url} is not reachable: {exc}")
    try:
        yield f"{redis_url}?prefix={prefix}"
    finally:
        with contextlib.suppress(OSError, redis.RedisError):  # a Redis a test stopped
            keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
            if keys:
                await client.delete(*keys)
        await client.aclose()


class RandomProxy:
    """Accepts TCP connections on a free loopback port and pipes each to a random one of
    ``ports``."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RandomProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(
                "127.0.0.1", random.choice(self.ports)
            )
        except OSError:
            writer.close()
            return
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pipe(source, sink))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            sink.close()


@contextlib.asynccontextmanager
async def random_node_cluster(nodes: int = 3, **overrides: Any) -> AsyncIterator[Server]:
    """``nodes`` nodes in this process behind a ``RandomProxy``: a Server whose port is
    the proxy's and whose runtime is the first node's."""
    async with fresh_database() as db, fresh_prefix() as broker:
        started = []
        try:
            for number in range(nodes):
                started.append(
                    await start_server(
                        db,  # type: ignore[arg-type]  # a URL; Settings takes it as is
                        broker=broker,
                        node_id=f"node{number}",
                        lease_s=2.0,
                        **overrides,
                    )
                )
            async with RandomProxy([info.port for info, _, _ in started]) as proxy:
                first = started[0][0]
                yield Server("127.0.0.1", proxy.port, first.settings, first.runtime)
        finally:
            for info, uv, task in started:
                await stop_server(uv, task, info.runtime)
