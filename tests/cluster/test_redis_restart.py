"""Redis restarts under a cluster of three real ``runcast serve`` nodes (PROTOCOL §9,
docs/operations.md "If Redis restarts"): nothing acknowledged is lost.

Redis keeps nothing on disk here (``--save '' --appendonly no``): a restart forgets every
stream, lease and subscription. Each test starts a Redis of its own (the ``redis-server``
binary on a free loopback port, never the machine's shared one), nodes A, B and C on it
and on a PostgreSQL database of their own (as tests/cluster/test_cluster.py does), then
SIGKILLs Redis mid-run and starts it again on the same port. What is checked:

- every watcher, on the owner and on another node, receives 1..last exactly once, in
  order, with one epoch and no ``reset``, and the run ends as it would have without the
  restart (``completed``, ``stopped``), never ``interrupted`` / ``node_lost``: a Redis
  that just restarted has lost every lease, and no sweeper may take a run over for it;
- so, too, when Redis stays down for longer than the lease;
- a stop sent from a node that does not own the run while Redis is down is recorded and
  acted on once Redis is back.

Nothing sleeps to wait for something it can poll: waits are for frames or for Redis to
answer, each bounded. The only sleeps keep Redis down for a set time.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from app.core import events as ev
from tests.cluster.test_cluster import (
    LEASE_S,
    Client,
    Cluster,
    Frame,
    assert_whole_log,
    clients,
    log_on_disk,
    running_cluster,
)

REDIS_START_S = 10.0  # the bound on Redis answering PING after it is started
RUN_END_S = 30.0  # the bound on a run ending once Redis is back


# -- a Redis of the test's own ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` process on a loopback port, with no persistence: started,
    SIGKILLed and started again on the same port by the test. Its output goes to
    ``log`` (shown with a failing test's report)."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.log = log
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            return subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--bind",
                    "127.0.0.1",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def start(self) -> float:
        """Start it; returns once it answers PING (the time that took)."""
        assert not self.running(), "already running"
        began = time.monotonic()
        self.process = self._spawn()
        self.starts += 1
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        try:
            deadline = began + REDIS_START_S
            while True:
                assert self.process.poll() is None, (
                    f"redis-server exited ({self.process.returncode}):\n{self.output()}"
                )
                with contextlib.suppress(OSError, aioredis.RedisError):
                    if await client.ping():
                        return time.monotonic() - began
                assert time.monotonic() < deadline, f"Redis did not answer:\n{self.output()}"
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    def kill(self) -> None:
        """SIGKILL it and wait for it to be gone (its port is free again)."""
        assert self.process is not None and self.process.poll() is None, "not running"
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=10) == -signal.SIGKILL

    def stop(self) -> None:
        """At teardown: kill it if it runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def uptime_s(self) -> int:
        client = aioredis.Redis.from_url(self.url, decode_responses=True)
        try:
            info = await client.info("server")
            return int(info["uptime_in_seconds"])
        finally:
            await client.aclose()

    def output(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-5000:]
        return ""


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    """A Redis of this test's own, running; killed after the test."""
    server = PrivateRedis(free_port(), tmp_path / "redis.log")
    try:
        await server.start()
        yield server
    finally:
        server.stop()
        print(f"----- redis-server on port {server.port} (started {server.starts} times) -----")
        print(server.output())


@pytest.fixture
async def cluster(private_redis: PrivateRedis) -> AsyncIterator[Cluster]:
    """Nodes A, B and C (lease 2 s) on a fresh database and on ``private_redis``."""
    async with running_cluster(private_redis.url) as running:
        yield running


async def restart(server: PrivateRedis, down_s: float) -> float:
    """SIGKILL Redis, keep it down ``down_s``, start it again on the same port; returns
    how long it was down (killed to answering PING)."""
    server.kill()
    killed_at = time.monotonic()
    await asyncio.sleep(down_s)
    await server.start()
    return time.monotonic() - killed_at


def check_whole_run(name: str, watcher: Client, run_id: str, epoch: str, status: str) -> None:
    """``watcher`` received 1..last of the run exactly once, in order, ending ``status``,
    every frame with ``epoch``, and no ``reset``."""
    events = watcher.events[run_id]
    assert_whole_log(events, status)
    terminal = events[-1]["data"]
    assert terminal.get("reason") != "node_lost", (name, terminal)
    assert set(watcher.epochs[run_id]) == {epoch}, (name, watcher.epochs[run_id])
    assert not watcher.resets, (name, watcher.resets)


def check_counter(name: str, events: list[Frame], n: int) -> None:
    """A counter to ``n`` that completed: running, 1..n, completed."""
    assert len(events) == n + 2, (name, len(events))
    assert events[0]["type"] == ev.STATUS, (name, events[0])
    assert [e["data"]["n"] for e in events[1:-1]] == list(range(1, n + 1)), name


async def check_fresh_reader(
    cluster: Cluster, node: str, run_id: str, epoch: str, log: list[Frame]
) -> None:
    """A new connection to ``node`` subscribing after=0 with ``epoch`` gets ``log``, and
    so does the log on disk."""
    async with clients(cluster, node) as (fresh,):
        info = (await fresh.call("subscribe", run_id=run_id, after=0, epoch=epoch))["run"]
        assert (info["status"], info["epoch"], info["last_index"]) == (
            log[-1]["data"]["status"],
            epoch,
            len(log),
        ), info
        assert await fresh.until_ended(run_id) == log
        assert set(fresh.epochs[run_id]) == {epoch}
        assert not fresh.resets
    head, on_disk = await log_on_disk(cluster[node], run_id)
    assert (head["epoch"], head["status"]) == (epoch, log[-1]["data"]["status"]), head
    assert on_disk == log


async def run_through_a_restart(
    cluster: Cluster, server: PrivateRedis, n: int, down_s: float
) -> None:
    """A counter to ``n`` on A watched from A and B; Redis restarts (down ``down_s``)
    once both have seen 30 events: both receive the whole run, ``completed``, one epoch;
    the run outlives the lease on the new Redis (the sweepers could have taken it over
    had its owner not taken its lease back); C reads the same log afterwards."""
    async with clients(cluster, "A", "B") as (a, b):
        run = (await a.call("start", agent="counter", input={"n": n, "delay_s": 0.01}))["run"]
        run_id, epoch = run["run_id"], run["epoch"]
        info = (await b.call("subscribe", run_id=run_id, after=0))["run"]
        assert info["epoch"] == epoch
        for watcher in (a, b):
            await watcher.until_index(run_id, 30)
        seen_before = {w.node: w.last_index(run_id) for w in (a, b)}
        down = await restart(server, down_s)
        print(f"Redis down {down:.2f} s; watchers were at {seen_before}")
        assert down < down_s + 1.0, f"Redis took {down:.2f} s to restart"
        for watcher in (a, b):
            await watcher.until_ended(run_id, timeout_s=RUN_END_S)
        uptime = await server.uptime_s()
        print(f"run ended {uptime} s after Redis started again")
        for name, watcher in (("A", a), ("B", b)):
            check_whole_run(name, watcher, run_id, epoch, "completed")
            check_counter(name, watcher.events[run_id], n)
            assert seen_before[name] < n, f"{name}: the run ended before Redis went down"
        assert a.events[run_id] == b.events[run_id]
        log = a.events[run_id]
    # The test means something only if the run was still live once Redis had been up
    # long enough for a sweeper to take a run whose lease is free.
    assert uptime >= LEASE_S + 2, f"the run ended {uptime} s after the restart: make n larger"
    await check_fresh_reader(cluster, "C", run_id, epoch, log)


# -- 1. a quick restart -----------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_a_redis_restart_mid_run_loses_nothing(
    cluster: Cluster, private_redis: PrivateRedis
) -> None:
    """Redis SIGKILLed mid-run and started again within about half a second."""
    await run_through_a_restart(cluster, private_redis, n=800, down_s=0.3)


# -- 2. Redis down for longer than the lease --------------------------------------------------


@pytest.mark.timeout(60)
async def test_redis_down_longer_than_the_lease_loses_nothing(
    cluster: Cluster, private_redis: PrivateRedis
) -> None:
    """Redis down 3 s, longer than the 2 s lease: every lease expired with it, yet no
    node takes the run over, and it completes."""
    assert LEASE_S < 3.0
    await run_through_a_restart(cluster, private_redis, n=1000, down_s=3.0)


# -- 3. a stop sent while Redis is down -------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("c_watches", [True, False], ids=["c-watches", "c-never-subscribed"])
async def test_a_stop_sent_while_redis_is_down_is_acted_on_once_it_is_back(
    cluster: Cluster, private_redis: PrivateRedis, c_watches: bool
) -> None:
    """A counter on A watched from A (and from C if ``c_watches``); Redis is SIGKILLed,
    and C (which does not own the run) sends `stop` while it is down: the reply says
    `stopping` (it may come while Redis is down: the stop is recorded in PostgreSQL);
    once Redis is back the run ends `stopped`, by C's connection, for every watcher,
    with nothing lost and no takeover."""
    down_s = 2.0  # longer than a lease renewal (lease / 3): the owner misses some
    async with clients(cluster, "A", "C") as (a, c):
        run = (await a.call("start", agent="counter", input={"n": 10**6, "delay_s": 0.02}))["run"]
        run_id, epoch = run["run_id"], run["epoch"]
        watchers = [("A", a)]
        if c_watches:
            await c.call("subscribe", run_id=run_id, after=0)
            watchers.append(("C", c))
        for _, watcher in watchers:
            await watcher.until_index(run_id, 10)

        private_redis.kill()
        killed_at = time.monotonic()
        reply = await c.request("stop", run_id=run_id)
        replied_s = time.monotonic() - killed_at
        redis_down = not private_redis.running()
        print(f"stop reply after {replied_s:.2f} s, Redis still down: {redis_down}: {reply}")
        assert reply["ok"], reply
        assert reply["result"] == {"stopping": True, "status": "running"}, reply
        await asyncio.sleep(max(0.0, down_s - (time.monotonic() - killed_at)))
        await private_redis.start()
        back_at = time.time()

        for name, watcher in watchers:
            await watcher.until_ended(run_id, timeout_s=RUN_END_S)
            check_whole_run(name, watcher, run_id, epoch, "stopped")
            by = watcher.events[run_id][-1]["data"].get("by")
            assert by == c.connection_id, (name, watcher.events[run_id][-1])
        stopped_after = a.events[run_id][-1]["ts"] - back_at
        print(f"the run ended stopped {stopped_after:.2f} s after Redis was back")
        if c_watches:
            assert c.events[run_id] == a.events[run_id]
        log = a.events[run_id]
    await check_fresh_reader(cluster, "B", run_id, epoch, log)
