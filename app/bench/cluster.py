"""The ``cluster`` scenario of ``runcast bench``: nodes sharing one PostgreSQL database
and one Redis prefix (PROTOCOL.md §9), measured side by side with one node in one run.

The bench makes its own cluster: a fresh database (``CREATE DATABASE`` with a random
name on the ``--postgres`` server, dropped ``WITH (FORCE)`` at the end), a random key
prefix on the ``--redis`` server (its keys deleted at the end), and ``--cluster-nodes``
``python -m app serve`` processes on them. Or it drives the nodes of ``--url`` given
once per node (then it measures no server CPU, and no takeover: it cannot kill them).

Three parts:

- fanout: one ``counter`` run of ``--events`` events on node A, ``--cluster-watchers``
  watchers spread evenly over the nodes; server CPU per delivered event summed over the
  nodes (``cpu_s``, as ``fanout`` reads it), against ONE node (no broker, a
  fresh database of its own on the same PostgreSQL, or SQLite) with all the watchers,
  in the same run, ``--cluster-rounds`` times each; medians, and their ratio (the
  target: a cluster at most 2x one node);
- cross-node latency: a run on A emitting one event every ``--cluster-period-ms``,
  ``--cluster-latency-watchers`` watchers on B: from the event's ``ts`` (A's clock: the
  same machine's) to its arrival on B (the target: p99 under 5 ms); the run's starter
  on A is measured alongside;
- takeover: nodes with ``--takeover-lease`` (2 s, to keep it short); a long run on A
  watched from B, A SIGKILLed: the time until B's watcher receives the run's terminal
  ``interrupted`` (``node_lost``) event, against the lease + 2 s.

It is not among the scenarios run by default: it needs PostgreSQL and Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from app.bench._client import (
    BenchError,
    Conn,
    Watch,
    close_conns,
    counter_op,
    open_conns,
    pct,
    wait_all,
)
from app.bench._servers import Target, _spawn, _stop, cpu_s
from app.bench.fanout import FanoutResult, _measure_fanout, _ratio, _started, watch_counter
from app.bench.report import Report

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
TAKEOVER_SLACK_S = 2.0  # the takeover's target: the lease, plus this
TERMINAL = frozenset({"completed", "failed", "stopped", "interrupted"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the cluster scenario (called by app.bench.runner)."""
    group = parser.add_argument_group(
        "cluster (PostgreSQL and Redis: a fresh database and key prefix, dropped after)"
    )
    group.add_argument(
        "--postgres",
        default=DEFAULT_POSTGRES,
        metavar="URL",
        help="cluster: the PostgreSQL server the bench creates its databases on",
    )
    group.add_argument(
        "--redis", default=DEFAULT_REDIS, metavar="URL", help="cluster: the Redis of the nodes"
    )
    group.add_argument("--cluster-nodes", type=int, default=2, help="cluster: nodes to start")
    group.add_argument(
        "--cluster-watchers",
        type=int,
        default=50,
        help="cluster: fanout watchers, spread evenly over the nodes (events: --events)",
    )
    group.add_argument(
        "--cluster-rounds",
        type=int,
        default=3,
        help="cluster: fanout measurements of each of one node and the cluster (medians)",
    )
    group.add_argument(
        "--cluster-baseline",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="cluster: the one node's database: a fresh PostgreSQL one, or a SQLite file",
    )
    group.add_argument(
        "--cluster-lease", type=float, default=5.0, help="cluster: --lease of the nodes"
    )
    group.add_argument(
        "--cluster-latency-watchers",
        type=int,
        default=10,
        help="cluster: latency watchers on node B (seconds: --latency-s)",
    )
    group.add_argument(
        "--cluster-period-ms",
        type=float,
        default=10.0,
        help="cluster: latency: one event every this many ms",
    )
    group.add_argument(
        "--takeover-samples",
        type=int,
        default=3,
        help="cluster: node A killed this many times (0: no takeover part)",
    )
    group.add_argument(
        "--takeover-lease",
        type=float,
        default=2.0,
        help="cluster: --lease of the nodes of the takeover part",
    )
    parser.set_defaults(urls=[])  # every --url (UrlsAction)


class UrlsAction(argparse.Action):
    """``--url`` given repeatedly: ``url`` is the first (what the other scenarios drive),
    ``urls`` every one (the nodes of a cluster)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        namespace.urls = [*(getattr(namespace, "urls", None) or []), str(values)]
        if getattr(namespace, "url", None) is None:
            namespace.url = str(values)


# -- the cluster's resources ---------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def _with_prefix(url: str, prefix: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}prefix={prefix}"


@contextlib.asynccontextmanager
async def fresh_database(admin_url: str, name: str) -> AsyncIterator[str]:
    """A new, empty database on the server of ``admin_url``; dropped at the end (with
    whatever connections are still open to it)."""
    import asyncpg  # only this scenario needs it

    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise BenchError(f"not a database name the bench makes: {name!r}")
    try:
        admin = await asyncpg.connect(admin_url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise BenchError(f"PostgreSQL at {admin_url} is not reachable: {exc}") from None
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        try:
            yield _with_database(admin_url, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def fresh_prefix(redis_url: str, prefix: str) -> AsyncIterator[str]:
    """``redis_url`` with the key prefix ``prefix``; its keys are deleted at the end."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(redis_url)
    try:
        try:
            await client.ping()
        except (OSError, redis.RedisError) as exc:
            raise BenchError(f"Redis at {redis_url} is not reachable: {exc}") from None
        try:
            yield _with_prefix(redis_url, prefix)
        finally:
            keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
            if keys:
                await client.delete(*keys)
    finally:
        await client.aclose()


@dataclass
class Node(Target):
    """A node the bench drives, by name."""

    name: str = ""

    def kill(self) -> None:
        """SIGKILL: the node dies without a word (no shutdown, no last append)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


@dataclass
class Nodes(Target):
    """Several nodes read as one server: CPU summed over them, and each one's kept."""

    nodes: list[Node] = field(default_factory=list)
    readings: list[list[float]] = field(default_factory=list)

    def cpu(self) -> float | None:
        if any(node.pid is None for node in self.nodes):
            return None
        each = [cpu_s(node.pid) for node in self.nodes if node.pid is not None]
        self.readings.append(each)
        return sum(each)

    def cpu_each(self) -> list[float]:
        """CPU seconds per node between the last two readings (NaN when unknown)."""
        if len(self.readings) < 2:
            return [float("nan")] * len(self.nodes)
        return [b - a for a, b in zip(self.readings[-2], self.readings[-1], strict=True)]


@contextlib.contextmanager
def serve_node(
    args: argparse.Namespace,
    name: str,
    db: str,
    broker: str | None = None,
    lease_s: float | None = None,
) -> Iterator[Node]:
    """``python -m app serve`` on ``db`` (and ``broker``, as node ``name``)."""
    env = dict(os.environ)
    env["RUNCAST_LINGER_S"] = str(args.linger)
    env["RUNCAST_LOG_LEVEL"] = "warning"
    argv = [sys.executable, "-m", "app", "serve", "--host", "127.0.0.1", "--port", "0"]
    argv += ["--db", db]
    if broker is not None:
        argv += ["--broker", broker, "--node-id", name]
        if lease_s is not None:
            argv += ["--lease", f"{lease_s:g}"]
    process, line = _spawn(argv, env, args.nofile)
    try:
        match = re.search(r"http://([^\s]+)", line)
        if match is None:
            raise BenchError(f"unexpected first line from node {name}: {line!r}")
        yield Node(f"ws://{match.group(1)}/ws", process.pid, process=process, name=name)
    finally:
        _stop(process)
        if process.stdout is not None:
            process.stdout.close()


def _spread(k: int, nodes: int) -> list[int]:
    """``k`` watchers over ``nodes`` nodes, evenly, the first nodes taking the rest."""
    return [k // nodes + (1 if i < k % nodes else 0) for i in range(nodes)]


# -- 1. fanout -------------------------------------------------------------------------------


async def fanout(nodes: Nodes, n: int, k: int) -> FanoutResult:
    """One counter run of ``n`` events on the first node; ``k`` watchers spread over the
    nodes (the first of them starts the run); measured as ``fanout`` measures."""
    counts = _spread(k, len(nodes.nodes))
    conns: list[Conn] = []
    try:
        for node, count in zip(nodes.nodes, counts, strict=True):
            conns += await open_conns(node.ws_url, count)
        watches = await watch_counter(conns, n, start_delay_s=0.5 + k * 0.006)
        return await _measure_fanout(nodes, conns, watches, n + 2, _started)
    finally:
        await close_conns(conns)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def part_fanout(
    args: argparse.Namespace, cluster: Nodes, one: Nodes | None, report: Report
) -> None:
    n, k = args.events, args.cluster_watchers
    alone: list[FanoutResult] = []
    spread: list[FanoutResult] = []
    each: list[list[float]] = []
    for _ in range(args.cluster_rounds):
        if one is not None:
            alone.append(await fanout(one, n, k))
        spread.append(await fanout(cluster, n, k))
        delivered = (n + 2) * k
        each.append([cpu / delivered * 1e6 for cpu in cluster.cpu_each()])
    case = f"fanout {k} watchers x {n:,} events"
    if one is not None:
        report.add(
            "cluster",
            f"{case}, 1 node ({args.cluster_baseline})",
            **_fanout_figures(alone),
        )
    split = "+".join(str(c) for c in _spread(k, len(cluster.nodes)))
    figures = _fanout_figures(spread)
    for i, node in enumerate(cluster.nodes):
        figures[f"{node.name} µs/ev"] = _median([row[i] for row in each])
    if one is not None:
        figures["cpu/1 node"] = _ratio(
            _median([r.server_us for r in spread]), _median([r.server_us for r in alone])
        )
        figures["target"] = "<= 2"
    report.add("cluster", f"{case}, {len(cluster.nodes)} nodes ({split})", **figures)


def _fanout_figures(results: list[FanoutResult]) -> dict[str, float | int | str]:
    return {
        "events/s": _median([r.events_per_s for r in results]),
        "per watcher/s": _median([r.per_watcher for r in results]),
        "server µs/ev": _median([r.server_us for r in results]),
        "client µs/ev": _median([r.client_us for r in results]),
        "batch": round(_median([r.batch for r in results])),
        "rounds": len(results),
    }


# -- 2. cross-node latency -------------------------------------------------------------------


async def latency(
    args: argparse.Namespace, owner: Node, other: Node
) -> tuple[list[float], list[float]]:
    """A run on ``owner`` emitting every ``--cluster-period-ms``, watched by its starter
    and by ``--cluster-latency-watchers`` connections to ``other``: the latencies (ms)
    seen on ``other``, and those of the starter."""
    w, period_ms = args.cluster_latency_watchers, args.cluster_period_ms
    n = max(1, round(args.latency_s * 1000 / period_ms))
    starter = await Conn.open(owner.ws_url)
    conns = await open_conns(other.ws_url, w)
    try:
        start_delay_s = 0.5 + w * 0.01
        result = await starter.request(
            counter_op(n, delay_s=period_ms / 1000, start_delay_s=start_delay_s)
        )
        run_id = result["run"]["run_id"]
        local = starter.watches.get(run_id.encode()) or starter.watch(run_id)
        local.latencies = []
        watches = []
        for conn in conns:
            watch = conn.watch(run_id)
            watch.latencies = []
            watches.append(watch)
        await asyncio.gather(
            *(c.request({"op": "subscribe", "run_id": run_id, "after": 0}) for c in conns)
        )
        for watch in [local, *watches]:
            watch.expect(n + 2)
        await wait_all([local, *watches], args.latency_s * 4 + 60)
        lat_ms = [x * 1000 for watch in watches for x in watch.latencies or ()]
        return lat_ms, [x * 1000 for x in local.latencies]
    finally:
        await close_conns([starter, *conns])


async def part_latency(
    args: argparse.Namespace, cluster: Nodes, one: Nodes | None, report: Report
) -> None:
    w, period_ms = args.cluster_latency_watchers, args.cluster_period_ms
    if one is not None:
        alone, _ = await latency(args, one.nodes[0], one.nodes[0])
        report.add(
            "cluster",
            f"latency 1 node ({args.cluster_baseline}), {w} watchers @{period_ms:g}ms",
            p50_ms=pct(alone, 50),
            p99_ms=pct(alone, 99),
            max_ms=max(alone, default=float("nan")),
            samples=len(alone),
        )
    owner, other = cluster.nodes[0], cluster.nodes[1]
    lat_ms, on_owner = await latency(args, owner, other)
    report.add(
        "cluster",
        f"latency run on {owner.name}, {w} watchers on {other.name} @{period_ms:g}ms",
        p50_ms=pct(lat_ms, 50),
        p99_ms=pct(lat_ms, 99),
        max_ms=max(lat_ms, default=float("nan")),
        samples=len(lat_ms),
        target="p99 < 5",
        **{
            f"on {owner.name} p50_ms": pct(on_owner, 50),
            f"on {owner.name} p99_ms": pct(on_owner, 99),
        },
    )


# -- 3. takeover -----------------------------------------------------------------------------


class EndWatch(Watch):
    """A watcher that notes when the run's terminal status event arrives, and what it
    said."""

    __slots__ = ("end", "ended_at", "seen")

    def __init__(self) -> None:
        super().__init__()
        self.seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.end: dict[str, Any] = {}
        self.ended_at = 0.0

    def feed(self, frame: bytes) -> None:
        super().feed(frame)
        if not self.seen.done() and self.cursor >= 10:
            self.seen.set_result(None)
        if b'"status"' in frame and not self.end:
            for event in orjson.loads(frame)["events"]:
                data = event.get("data")
                if event["type"] == "status" and data.get("status") in TERMINAL:
                    self.end = data
                    self.ended_at = time.perf_counter()
                    self.finish()


async def takeover_once(
    args: argparse.Namespace, db: str, broker: str, watcher: Node, name: str
) -> tuple[float, dict[str, Any]]:
    """Start node ``name``, a long run on it watched from ``watcher``; SIGKILL it: the
    seconds from the kill to the terminal event on ``watcher``, and that event's data."""
    lease_s = args.takeover_lease
    with serve_node(args, name, db, broker, lease_s) as owner:
        starter = await Conn.open(owner.ws_url)
        conn = await Conn.open(watcher.ws_url)
        try:
            result = await starter.request(counter_op(10_000_000, delay_s=0.01))
            run_id = result["run"]["run_id"]
            watch = conn.watches[run_id.encode()] = EndWatch()
            await conn.request({"op": "subscribe", "run_id": run_id, "after": 0})
            try:
                async with asyncio.timeout(30):
                    await watch.seen  # events flow to the watcher through its node
            except TimeoutError:
                raise BenchError(
                    f"takeover: the watcher on {watcher.name} got no events (cursor {watch.cursor})"
                ) from None
            killed_at = time.perf_counter()
            owner.kill()
            await wait_all([watch], lease_s + 30)
            if not watch.end:
                raise BenchError(f"takeover: the run ended without a status: {watch.error}")
            return watch.ended_at - killed_at, watch.end
        finally:
            starter.abort()
            await close_conns([starter, conn])


async def part_takeover(args: argparse.Namespace, db: str, broker: str, report: Report) -> None:
    lease_s = args.takeover_lease
    times: list[float] = []
    ends: list[dict[str, Any]] = []
    with serve_node(args, "B", db, broker, lease_s) as watcher:
        for i in range(1, args.takeover_samples + 1):
            took, end = await takeover_once(args, db, broker, watcher, f"A{i}")
            times.append(took)
            ends.append(end)
    wrong = [end for end in ends if end != {"status": "interrupted", "reason": "node_lost"}]
    if wrong:
        raise BenchError(f"takeover: the run ended {wrong[0]}, not interrupted/node_lost")
    report.add(
        "cluster",
        f"takeover, --lease {lease_s:g}: kill A -> end on B",
        median_s=_median(times),
        min_s=min(times),
        max_s=max(times),
        target_s=lease_s + TAKEOVER_SLACK_S,
        samples=len(times),
        reason="node_lost",
    )


# -- the scenario ----------------------------------------------------------------------------


async def scenario_cluster(args: argparse.Namespace, workdir: Path, report: Report) -> None:
    urls: list[str] = list(getattr(args, "urls", None) or ([args.url] if args.url else []))
    if urls:
        if len(urls) < 2:
            raise BenchError("cluster: give --url once per node, at least two")
        nodes = [Node(url, name=chr(ord("A") + i)) for i, url in enumerate(urls)]
        await part_fanout(args, Nodes(urls[0], nodes=nodes), None, report)
        await part_latency(args, Nodes(urls[0], nodes=nodes), None, report)
        print("  (cluster: no takeover against --url nodes: the bench kills only its own)")
        return
    if args.cluster_nodes < 2:
        raise BenchError("cluster: --cluster-nodes must be at least 2")
    tag = secrets.token_hex(5)
    async with contextlib.AsyncExitStack() as stack:
        db = await stack.enter_async_context(fresh_database(args.postgres, f"runcast_bench_{tag}"))
        broker = await stack.enter_async_context(fresh_prefix(args.redis, f"runcast-bench-{tag}"))
        with contextlib.ExitStack() as servers:
            if args.cluster_baseline == "postgres":
                one_db = await stack.enter_async_context(
                    fresh_database(args.postgres, f"runcast_bench_{tag}_one")
                )
            else:
                one_db = str(workdir / f"cluster-one-{tag}.db")
            one = servers.enter_context(serve_node(args, "one", one_db))
            nodes = [
                servers.enter_context(
                    serve_node(args, chr(ord("A") + i), db, broker, args.cluster_lease)
                )
                for i in range(args.cluster_nodes)
            ]
            cluster = Nodes(nodes[0].ws_url, nodes=nodes)
            print(
                f"  (cluster: nodes {', '.join(node.name for node in nodes)} on database "
                f"{db.rpartition('/')[2]}, Redis prefix {broker.rpartition('=')[2]}; "
                "dropped at the end)",
                flush=True,
            )
            alone = Nodes(one.ws_url, nodes=[one])
            await part_fanout(args, cluster, alone, report)
            await part_latency(args, cluster, alone, report)
        if args.takeover_samples > 0:
            await part_takeover(args, db, broker, report)
