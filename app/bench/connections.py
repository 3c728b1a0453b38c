"""The ``connections`` scenario of ``runcast bench``: C idle subscribed connections on one
server, the server's memory per connection, and the time one event takes to reach all.

The connections are held by client processes of their own (``--client-processes``;
default: as few as the open-file limit allows, at most 20,000 connections each), each a
plain asyncio protocol per connection (a WebSocket client of a hundred lines: no task
and no library state per connection), so that the clients' CPU and open files are not
the server's, and reading 15,000 frames costs the clients less than the server's sending
them (one process reads them in half the CPU three do: each wakeup finds more sockets
ready). Against a loopback server
the connections come from 127.0.0.2, 127.0.0.3, ... (``--per-address`` each; the
server refuses more than ``--max-connections-per-address`` from one address).

Figures:

- ``kb_per_conn``: the server's RSS after every connection subscribed (and a second of
  quiet) minus its RSS before the first, divided by the connections; user-space memory
  only (the kernel's socket buffers are not in a process's RSS);
- ``fanout_p50_ms`` / ``fanout_p99_ms`` / ``fanout_max_ms``: from the ``stop`` op sent
  (wall clock) to each connection's receiving the run's last event, over all
  connections; with ``--fanout-rounds`` R, each round subscribes every connection to a
  new run and stops it, and the figures are the median round's (the max: the worst);
- with ``--tracemalloc``, once more with a server that traces its allocations (from
  this source tree, ``--tracemalloc-connections`` connections): the Python heap per
  connection, and the lines that allocated it (tracemalloc snapshots before and after,
  diffed, divided by the connections).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import signal
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from app.bench._client import _INDEX, BenchError, Conn, counter_op, pct
from app.bench._servers import Target, _spawn, _stop, raise_nofile, rss_bytes
from app.bench.report import Report

CONNECTIONS_PER_PROCESS = 20_000  # at most, and as the open-file limit allows
OPEN_PARALLEL = 64  # handshakes in flight per client process


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the connections scenario (``--connections`` and ``--presence`` are
    the runner's)."""
    parser.add_argument(
        "--client-processes",
        type=int,
        default=0,
        help="connections: client processes (default: as few as --nofile allows)",
    )
    parser.add_argument(
        "--per-address",
        type=int,
        default=1_000,
        help="connections: connections per loopback source address (127.0.0.2, ...)",
    )
    parser.add_argument(
        "--fanout-rounds", type=int, default=3, help="connections: one event to all, R times"
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="connections: also the Python heap per connection, by line (a traced server)",
    )
    parser.add_argument(
        "--tracemalloc-connections",
        type=int,
        default=2_000,
        help="connections: connections of the traced server",
    )


# -- the scenario ------------------------------------------------------------------------


async def scenario_connections(args: argparse.Namespace, target: Target, report: Report) -> None:
    count = args.connections
    have = raise_nofile(args.nofile)  # the server's too: it was started with --nofile
    if target.pid is not None and have < count + 64:
        raise BenchError(
            f"the open-file limit is {have}: too low for {count:,} connections to one server "
            "process; raise it (ulimit -n, or LimitNOFILE= under systemd: README, "
            "Performance) and give --nofile"
        )
    pid = target.pid
    starter = await Conn.open(target.ws_url)
    clients: list[_Clients] = []
    try:
        run_id = await _held_run(starter)
        await asyncio.sleep(0.2)
        rss0 = rss_bytes(pid) if pid else 0
        began = time.perf_counter()
        clients = await _Clients.start_all(args, target.ws_url, count, run_id)
        setup_s = time.perf_counter() - began
        await asyncio.sleep(1.0)
        rss1 = rss_bytes(pid) if pid else 0
        info = await starter.request({"op": "subscribe", "run_id": run_id, "presence": False})
        if info["run"]["watchers"] != count + 1:
            raise BenchError(f"server counts {info['run']['watchers']} watchers, not {count + 1}")
        rounds: list[tuple[list[float], float, float]] = []
        for round_ in range(max(1, args.fanout_rounds)):
            if round_:
                run_id = await _held_run(starter)
                await asyncio.gather(*(c.command({"subscribe": run_id}) for c in clients))
            cpu0 = target.cpu()
            latencies, client_cpu = await _fan_out(starter, clients, run_id)
            cpu1 = target.cpu()
            cpu = float("nan") if cpu0 is None or cpu1 is None else cpu1 - cpu0
            rounds.append((latencies, cpu, client_cpu))
        by_p99 = sorted(rounds, key=lambda r: pct(r[0], 99))
        median, median_cpu, median_client_cpu = by_p99[len(by_p99) // 2]
        report.add(
            "connections",
            f"{count:,} idle subscribers",
            held=count,
            kb_per_conn=(rss1 - rss0) / count / 1024 if pid else float("nan"),
            server_rss_mb=rss1 / 2**20 if pid else float("nan"),
            setup_s=setup_s,
            fanout_p50_ms=pct(median, 50) * 1e3,
            fanout_p99_ms=pct(median, 99) * 1e3,
            fanout_max_ms=max(max(r[0]) for r in rounds) * 1e3,
            fanout_server_cpu_ms=median_cpu * 1e3,
            fanout_client_cpu_ms=median_client_cpu * 1e3,
        )
    finally:
        await asyncio.gather(*(c.quit() for c in clients), return_exceptions=True)
        await starter.close()
    if args.tracemalloc and report.label == "":
        await _traced(args, target, report)


async def _held_run(starter: Conn) -> str:
    """A run that emits ``running`` and then nothing until it is stopped."""
    result = await starter.request({**counter_op(1, start_delay_s=3600), "subscribe": False})
    return str(result["run"]["run_id"])


async def _fan_out(
    starter: Conn, clients: list[_Clients], run_id: str
) -> tuple[list[float], float]:
    """Stop ``run_id``: its last event goes to every connection. Returns each connection's
    seconds from the stop sent to that event received, and the client processes' CPU
    seconds since they subscribed."""
    began = time.time()
    await starter.request({"op": "stop", "run_id": run_id})
    replies = await asyncio.gather(*(c.command({"collect": 120}) for c in clients))
    latencies = [at - began for reply in replies for at in reply["arrivals"]]
    return latencies, sum(reply["cpu_s"] for reply in replies)


def source_addresses(host: str, count: int, per_address: int) -> list[tuple[str | None, int]]:
    """(source address, connections) covering ``count``: 127.0.0.2, 127.0.0.3, ... with
    ``per_address`` each for a loopback IPv4 server; else the default address for all."""
    try:
        loopback = ipaddress.ip_address(host).is_loopback and ":" not in host
    except ValueError:
        loopback = host == "localhost"
    if not loopback or per_address <= 0:
        return [(None, count)]
    spread: list[tuple[str | None, int]] = []
    left = count
    for k in range(2, 2 + math.ceil(count / per_address)):
        spread.append((str(ipaddress.IPv4Address(0x7F000000 + k)), min(per_address, left)))
        left -= per_address
    return spread


def split(spread: list[tuple[str | None, int]], parts: int) -> list[list[tuple[str | None, int]]]:
    """``spread`` cut into ``parts`` shares of (almost) equal connections."""
    total = sum(n for _, n in spread)
    shares: list[list[tuple[str | None, int]]] = [[] for _ in range(parts)]
    wants = [total // parts + (1 if k < total % parts else 0) for k in range(parts)]
    k = 0
    for address, n in spread:
        while n:
            while not wants[k]:
                k += 1
            take = min(n, wants[k])
            shares[k].append((address, take))
            wants[k] -= take
            n -= take
    return shares


class _Clients:
    """One client process (``client_main``): commands as JSON lines on its stdin, answers
    on its stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start_all(
        cls, args: argparse.Namespace, url: str, count: int, run_id: str
    ) -> list[_Clients]:
        host = urlsplit(url).hostname or "127.0.0.1"
        have = raise_nofile(args.nofile)
        each = max(1, min(CONNECTIONS_PER_PROCESS, have - 256))
        parts = args.client_processes or math.ceil(count / each)
        parts = max(1, min(parts, count))
        shares = split(source_addresses(host, count, args.per_address), parts)
        clients: list[_Clients] = []
        for share in shares:
            config = {"url": url, "share": share, "run_id": run_id, "presence": args.presence}
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                "from app.bench.connections import client_main; client_main()",
                json.dumps(config),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=2**26,
                preexec_fn=lambda: raise_nofile(args.nofile),
            )
            clients.append(cls(process))
        await asyncio.gather(*(c.answer() for c in clients))  # each: all subscribed
        return clients

    async def answer(self) -> Any:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            code = await self.process.wait()
            raise BenchError(f"a client process exited with {code}")
        reply = json.loads(line)
        if "error" in reply:
            raise BenchError(f"client process: {reply['error']}")
        return reply

    async def command(self, command: dict[str, Any]) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        return await self.answer()

    async def quit(self) -> None:
        if self.process.returncode is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                async with asyncio.timeout(30):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


# -- the traced server -------------------------------------------------------------------

# Run as ``python -c``: tracemalloc from the first line, a snapshot written on SIGUSR1
# (to a file of its own, renamed once whole).
_TRACED_SERVER = """
import os, signal, sys, tracemalloc
tracemalloc.start(int(sys.argv[1]))
written = [0]
def dump(signum, frame):
    written[0] += 1
    path = f"{sys.argv[2]}.{written[0]}"
    tracemalloc.take_snapshot().dump(path + ".part")
    os.replace(path + ".part", path)  # whole, or not there yet
signal.signal(signal.SIGUSR1, dump)
from app.cli import main
sys.exit(main(sys.argv[3:]))
"""


async def _traced(args: argparse.Namespace, target: Target, report: Report) -> None:
    """The Python heap per connection, by line: a server of this tree under tracemalloc,
    snapshots before and after ``--tracemalloc-connections`` connections subscribed."""
    count = args.tracemalloc_connections
    with tempfile.TemporaryDirectory(prefix="runcast-traced-") as tmp:
        snapshots = Path(tmp) / "snapshot"
        env = {**os.environ, "RUNCAST_LOG_LEVEL": "warning", "RUNCAST_LINGER_S": "1"}
        argv = [sys.executable, "-c", _TRACED_SERVER, "8", str(snapshots)]
        argv += ["serve", "--host", "127.0.0.1", "--port", "0", "--db", f"{tmp}/traced.db"]
        process, line = _spawn(argv, env, args.nofile)
        clients: list[_Clients] = []
        try:
            url = "ws://" + line.split("http://", 1)[1].split()[0] + "/ws"
            starter = await Conn.open(url)
            try:
                run_id = await _held_run(starter)
                await asyncio.sleep(0.2)
                before = await _snapshot(process.pid, snapshots, 1)
                clients = await _Clients.start_all(args, url, count, run_id)
                await asyncio.sleep(1.0)
                after = await _snapshot(process.pid, snapshots, 2)
            finally:
                await asyncio.gather(*(c.quit() for c in clients), return_exceptions=True)
                await starter.close()
        finally:
            _stop(process)
    lines = list(breakdown(before, after, count))
    total = sum(size for size, _ in lines)
    report.add(
        "connections",
        f"{count:,} subscribers, tracemalloc",
        heap_b_per_conn=total,
        lines=len(lines),
    )
    for size, where in lines[:15]:
        print(f"    {size:>8,.0f} B/conn  {where}", flush=True)


async def _snapshot(pid: int, path: Path, k: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    done = path.with_name(f"{path.name}.{k}")
    async with asyncio.timeout(120):
        while True:
            await asyncio.sleep(0.2)
            try:
                return tracemalloc.Snapshot.load(str(done))
            except FileNotFoundError:  # not written yet (it appears whole)
                continue


def breakdown(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, count: int
) -> Iterator[tuple[float, str]]:
    """(bytes per connection, where), largest first: the allocations that grew between the
    snapshots, net of those that shrank, each by the innermost line of its traceback that
    is not the standard library's (``[…]``: the standard library's line under it, e.g. a
    task, a future or a deque allocated for that line)."""
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    diff = after.filter_traces(ignore).compare_to(before.filter_traces(ignore), "traceback")
    sizes: dict[str, int] = {}
    for stat in diff:
        frames = list(reversed(stat.traceback))  # innermost first
        owner = next((f for f in frames if not _stdlib(f.filename)), frames[0])
        where = f"{_short(owner.filename)}:{owner.lineno}"
        if owner is not frames[0]:
            where += f" [{_short(frames[0].filename)}:{frames[0].lineno}]"
        sizes[where] = sizes.get(where, 0) + stat.size_diff
    for where, size in sorted(sizes.items(), key=lambda item: -item[1]):
        if size / count < 1:
            break
        yield size / count, where


def _stdlib(filename: str) -> bool:
    return "site-packages" not in filename and (
        filename.startswith("<") or os.path.dirname(os.__file__) in filename
    )


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/app/", "/lib/python"):
        if marker in filename:
            tail = filename.rpartition(marker)[2]
            return (marker.strip("/") + "/" if marker == "/app/" else "") + tail
    return filename


# -- the client process ------------------------------------------------------------------


class _Socket(asyncio.Protocol):
    """One WebSocket client connection, as little as one can be: the handshake, frames
    parsed from the bytes, pings answered, and each text message handed to ``on_text``."""

    def __init__(self, request: bytes, client: _Holder) -> None:
        self.request = request
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False
        self.fragments: list[bytes] = []
        self.welcomed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.replied: asyncio.Future[Any] | None = None
        self.cursor = 0
        self.arrived = 0.0
        self.error: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost ({exc})" if exc else "connection closed")

    def _fail(self, why: str) -> None:
        if self.error is not None:
            return
        self.error = why
        for future in (self.welcomed, self.replied):
            if future is not None and not future.done():
                future.set_exception(BenchError(why))
        self.client.closed(self)

    def send_text(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_frame(0x1, payload))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self._fail(buffer[: buffer.find(b"\r\n")].decode(errors="replace"))
                return
            self.upgraded = True
            buffer = buffer[end + 4 :]
        size = len(buffer)
        at = 0
        while size - at >= 2:
            first, second = buffer[at], buffer[at + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                head = 4
            elif length == 127:
                head = 10
            if size - at < head:
                break
            if head > 2:
                length = int.from_bytes(buffer[at + 2 : at + head], "big")
            if size - at < head + length:
                break
            payload = buffer[at + head : at + head + length]
            at += head + length
            self._frame(first, payload)
        self.buffer = buffer[at:]

    def _frame(self, first: int, payload: bytes) -> None:
        opcode = first & 0x0F
        if opcode == 0x9:  # ping
            assert self.transport is not None
            self.transport.write(_frame(0xA, payload))
        elif opcode == 0x8:  # close: answered, and the connection is over
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            assert self.transport is not None
            self.transport.write(_frame(0x8, payload[:2]))
            self._fail(f"closed by the server: {code} {payload[2:].decode(errors='replace')}")
            self.transport.close()
        elif opcode in (0x0, 0x1, 0x2):
            self.fragments.append(payload)
            if first & 0x80:
                message = b"".join(self.fragments) if len(self.fragments) > 1 else payload
                self.fragments = []
                self._message(message)

    def _message(self, message: bytes) -> None:
        if message.startswith(b'{"type":"events"'):
            found = _INDEX.findall(message)
            expected = [b"%d" % i for i in range(self.cursor + 1, self.cursor + 1 + len(found))]
            if found != expected:
                self.error = f"after index {self.cursor} expected {self.cursor + 1}.. got {found}"
            self.cursor += len(found)
            if not self.arrived:
                self.arrived = time.time()
                self.client.arrived(self)
        elif message.startswith(b'{"type":"reply"'):
            if self.replied is not None and not self.replied.done():
                self.replied.set_result(orjson.loads(message))
        elif not self.welcomed.done() and message.startswith(b'{"type":"welcome"'):
            self.welcomed.set_result(None)


def _frame(opcode: int, payload: bytes) -> bytes:
    """A client frame: masked, with the mask 0 (the payload as is)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class _Holder:
    """The connections of one client process."""

    def __init__(self, url: str, presence: bool) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        # The headers of the Python websockets client (and the subprotocol): what the
        # server keeps of a handshake grows with them.
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: cnVuY2FzdC1iZW5jaGtleQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
            "Sec-WebSocket-Protocol: runcast\r\n"
            f"User-Agent: Python/{sys.version_info[0]}.{sys.version_info[1]} runcast-bench\r\n\r\n"
        ).encode()
        self.presence = presence
        self.sockets: list[_Socket] = []
        self.waiting = 0
        self.all_arrived: asyncio.Event = asyncio.Event()
        self.lost: list[_Socket] = []
        self.quitting = False
        self.cpu_mark = 0.0  # CPU time when the last subscribe was answered

    async def open(self, share: list[tuple[str | None, int]]) -> None:
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(OPEN_PARALLEL)

        async def one(address: str | None) -> None:
            async with limit:
                local = None if address is None else (address, 0)
                _, sock = await loop.create_connection(
                    lambda: _Socket(self.request, self), self.host, self.port, local_addr=local
                )
                self.sockets.append(sock)
                async with asyncio.timeout(120):
                    await sock.welcomed

        await asyncio.gather(*(one(a) for a, n in share for _ in range(n)))

    async def subscribe(self, run_id: str) -> None:
        loop = asyncio.get_running_loop()
        op = {"op": "subscribe", "run_id": run_id, "after": "latest", "presence": self.presence}
        payload = orjson.dumps({**op, "ref": 1})
        for sock in self.sockets:
            sock.replied = loop.create_future()
            sock.arrived = 0.0
            sock.send_text(payload)
        self.waiting = len(self.sockets)
        self.all_arrived.clear()
        async with asyncio.timeout(120):
            for sock in self.sockets:
                assert sock.replied is not None
                reply = await sock.replied
                if not reply["ok"]:
                    raise BenchError(f"subscribe failed: {reply['error']}")
                sock.cursor = reply["result"]["run"]["last_index"]
        self.cpu_mark = time.process_time()

    def arrived(self, sock: _Socket) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.all_arrived.set()

    def closed(self, sock: _Socket) -> None:
        if not self.quitting:
            self.lost.append(sock)
            self.all_arrived.set()

    async def collect(self, timeout_s: float) -> list[float]:
        try:
            async with asyncio.timeout(timeout_s):
                await self.all_arrived.wait()
        except TimeoutError:
            pass
        if self.lost:
            raise BenchError(f"{len(self.lost)} connections lost: {self.lost[0].error}")
        wrong = [s.error for s in self.sockets if s.error]
        if wrong:
            raise BenchError(wrong[0])
        missing = sum(1 for s in self.sockets if not s.arrived)
        if missing:
            raise BenchError(f"{missing} connections had no event after {timeout_s} s")
        return [s.arrived for s in self.sockets]

    def close(self) -> None:
        self.quitting = True
        for sock in self.sockets:
            if sock.transport is not None:
                sock.transport.close()


async def _client_process(config: dict[str, Any]) -> None:
    """Open and subscribe the share, say so; then answer commands until stdin ends."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    holder = _Holder(config["url"], config["presence"])

    def say(answer: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()

    try:
        try:
            await holder.open([(a, n) for a, n in config["share"]])
            await holder.subscribe(config["run_id"])
            say({"subscribed": len(holder.sockets)})
            while line := await reader.readline():
                command = json.loads(line)
                if "subscribe" in command:
                    await holder.subscribe(command["subscribe"])
                    say({"subscribed": len(holder.sockets)})
                elif "collect" in command:
                    arrivals = await holder.collect(command["collect"])
                    say({"arrivals": arrivals, "cpu_s": time.process_time() - holder.cpu_mark})
        except (BenchError, OSError, TimeoutError) as exc:
            say({"error": str(exc) or type(exc).__name__})
    finally:
        holder.close()
        await asyncio.sleep(0.1)


def client_main() -> None:
    """A client process: its config, JSON, is its first argument."""
    raise_nofile(1 << 20)
    asyncio.run(_client_process(json.loads(sys.argv[1])))
