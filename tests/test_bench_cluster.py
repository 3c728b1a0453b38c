"""``runcast bench cluster`` at tiny sizes, so the command cannot rot.

The scenario needs PostgreSQL (``RUNCAST_TEST_POSTGRES``, default
``postgresql://postgres@127.0.0.1:5432/postgres``) and Redis (``RUNCAST_TEST_REDIS``,
default ``redis://127.0.0.1:6379/0``): without them these tests fail, never skip. The
figures live in the bench itself; this checks that every part runs against real node
processes and prints its figures, and that the bench leaves no database and no key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis

from app import bench
from app.bench import cluster

pytestmark = pytest.mark.timeout(240)

ADMIN_URL = os.environ.get("RUNCAST_TEST_POSTGRES", cluster.DEFAULT_POSTGRES)
REDIS_URL = os.environ.get("RUNCAST_TEST_REDIS", cluster.DEFAULT_REDIS)
LEASE_S = 1.0

TINY = [
    "--postgres", ADMIN_URL, "--redis", REDIS_URL,
    "--events", "300", "--cluster-watchers", "4", "--cluster-rounds", "1",
    "--latency-s", "0.3", "--cluster-latency-watchers", "2",
    "--takeover-samples", "1", "--takeover-lease", str(LEASE_S),
    "--linger", "0.3",
]  # fmt: skip


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    """The cluster rows of a --json file, by the start of their case."""
    rows = json.loads(path.read_text())["rows"]
    assert {row["scenario"] for row in rows} == {"cluster"}
    return {row["case"]: row for row in rows}


def _one(rows: dict[str, dict[str, Any]], pattern: str) -> dict[str, Any]:
    found = [row for case, row in rows.items() if re.match(pattern, case)]
    assert len(found) == 1, (pattern, list(rows))
    return found[0]


async def _leftovers(database: str, prefix: str) -> tuple[bool, list[bytes]]:
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        exists = await admin.fetchval(
            "SELECT count(*) > 0 FROM pg_database WHERE datname LIKE $1", f"{database}%"
        )
    finally:
        await admin.close()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
    finally:
        await client.aclose()
    return bool(exists), keys


def test_the_cluster_scenario_runs_at_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "app", "bench", "cluster", *TINY, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 5, list(rows)

    alone = _one(rows, r"fanout 4 watchers x 300 events, 1 node \(postgres\)")
    spread = _one(rows, r"fanout 4 watchers x 300 events, 2 nodes \(2\+2\)")
    for row in (alone, spread):
        assert row["events/s"] > 0 and row["rounds"] == 1
        assert isinstance(row["server µs/ev"], float)  # CPU ticks: a tiny run may show 0
    assert {"A µs/ev", "B µs/ev", "cpu/1 node"} <= spread.keys()

    one_latency = _one(rows, r"latency 1 node \(postgres\), 2 watchers @10ms")
    cross = _one(rows, r"latency run on A, 2 watchers on B @10ms")
    for row in (one_latency, cross):
        assert row["samples"] == 2 * 30 and 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert cross["on A p99_ms"] > 0

    takeover = _one(rows, r"takeover, --lease 1: kill A -> end on B")
    assert takeover["reason"] == "node_lost" and takeover["samples"] == 1
    assert takeover["target_s"] == LEASE_S + cluster.TAKEOVER_SLACK_S
    # Nobody may end the run node_lost before its lease (renewed by every append) expired.
    assert LEASE_S * 0.9 < takeover["median_s"] < 30

    assert "| cluster | takeover" in done.stdout
    named = re.search(r"on database (\S+), Redis prefix (\S+);", done.stdout)
    assert named is not None, done.stdout
    exists, keys = asyncio.run(_leftovers(named[1], named[2]))
    assert not exists and keys == []


@contextlib.asynccontextmanager
async def _two_nodes(tmp_path: Path) -> Any:
    args = argparse.Namespace(linger=0.3, nofile=1024)
    tag = secrets.token_hex(5)
    async with (
        cluster.fresh_database(ADMIN_URL, f"runcast_test_{tag}") as db,
        cluster.fresh_prefix(REDIS_URL, f"runcast-test-{tag}") as broker,
    ):
        with (
            cluster.serve_node(args, "A", db, broker, 5.0) as a,
            cluster.serve_node(args, "B", db, broker, 5.0) as b,
        ):
            yield a, b


def test_the_cluster_scenario_drives_the_nodes_of_url_given_repeatedly(
    tmp_path: Path,
) -> None:
    out = tmp_path / "bench.json"

    async def bench_nodes() -> tuple[int, str, str]:
        async with _two_nodes(tmp_path) as (a, b):
            process = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "app", "bench", "cluster", *TINY],
                *["--url", a.ws_url, "--url", b.ws_url, "--json", str(out)],
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await asyncio.wait_for(process.communicate(), 200)
            assert process.returncode is not None
            return process.returncode, stdout.decode(), stderr.decode()

    code, stdout, stderr = asyncio.run(bench_nodes())
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    rows = _rows(out)
    assert len(rows) == 2, list(rows)
    spread = _one(rows, r"fanout 4 watchers x 300 events, 2 nodes \(2\+2\)")
    assert spread["events/s"] > 0 and math.isnan(spread["server µs/ev"])  # not our pids
    cross = _one(rows, r"latency run on A, 2 watchers on B @10ms")
    assert cross["samples"] == 2 * 30
    assert "no takeover against --url nodes" in stdout


def test_url_may_be_given_once_per_node() -> None:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["cluster", "--url", "ws://a/ws", "--url", "ws://b/ws"])
    assert args.url == "ws://a/ws" and args.urls == ["ws://a/ws", "ws://b/ws"]
    assert parser.parse_args(["fanout"]).urls == []


def test_a_cluster_of_one_url_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app", "bench", "cluster", "--url", "ws://127.0.0.1:9/ws"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "once per node, at least two" in done.stderr
