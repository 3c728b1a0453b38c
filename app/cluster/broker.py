"""The Redis side of a cluster: each run's live log as a stream, its lease, presence, and
the messages nodes send each other (signals, thread changes, presence).

Keys, under the prefix of the broker URL (``?prefix=NAME``, default ``runcast``):

- ``P:s:RUN`` — the run's stream. Entry ids are ``0-INDEX`` (the event's index), field
  ``e`` the event's JSON as encoded once; the first entry of each append also carries
  ``f``, the owner's index on disk then. The owner trims what is on disk (less a margin),
  so the stream holds about what a crash could lose; it expires after the run ends.
- ``P:l:RUN`` — the run's lease: the owner node's id, expiring unless renewed. Every
  append is fenced on it (a script: an append by a node that does not hold it is refused).
- ``P:w:RUN`` — presence: a hash of node id -> watchers there.
- the channel ``P:msg``: what nodes tell each other (a signal for a run's owner,
  presence, a thread's change, a deletion), each message a JSON object with its ``kind``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as redis
from redis.exceptions import NoScriptError, RedisError

from app.core.events import Event

logger = logging.getLogger(__name__)

# Every failure of Redis or of the connection to it.
BROKER_ERRORS = (RedisError, OSError, TimeoutError)

DEFAULT_PREFIX = "runcast"
STREAM_TTL_MS = 120_000  # how long an ended run's stream stays (readers then page from disk)
TRIM_MARGIN = 1_000  # events on disk a stream keeps before the oldest it may drop

# An append, fenced: refused (-1) unless the lease is free or this node's; entries the
# stream already holds (a retry, a republish) are skipped; the lease is renewed, or, with
# the run's last append, dropped and the stream set to expire.
# KEYS: lease, stream. ARGV: node, lease ms, flushed, trim below, final ttl ms (0: not
# final), the first event's index, the events' JSON joined by newlines (compact JSON has
# none of its own). Returns the entries added. (Two arguments an event instead cost the
# owner 2 µs an event in redis-py's encoding of the command.)
_APPEND = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return -1 end
local top = 0
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if last[1] then top = tonumber(string.match(last[1][1], '-(%d+)$')) end
local added = 0
local i = tonumber(ARGV[6]) - 1
for body in string.gmatch(ARGV[7], '[^\\n]+') do
  i = i + 1
  if i > top then
    if added == 0 then
      redis.call('XADD', KEYS[2], '0-' .. i, 'e', body, 'f', ARGV[3])
    else
      redis.call('XADD', KEYS[2], '0-' .. i, 'e', body)
    end
    added = added + 1
  end
end
if tonumber(ARGV[4]) > 0 then redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. ARGV[4]) end
if tonumber(ARGV[5]) > 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return added
"""

# Renew this node's leases: each is taken again if free (Redis restarted), and reported
# lost (0) if another node holds it. KEYS: leases. ARGV: node, lease ms.
_RENEW = """
local held = {}
for i, key in ipairs(KEYS) do
  local owner = redis.call('GET', key)
  if owner and owner ~= ARGV[1] then
    held[i] = 0
  else
    redis.call('SET', key, ARGV[1], 'PX', ARGV[2])
    held[i] = 1
  end
end
return held
"""


def split_url(url: str) -> tuple[str, str]:
    """(Redis URL, key prefix): ``?prefix=NAME`` is runcast's, not the client's."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    prefix = next((value for key, value in query if key == "prefix"), DEFAULT_PREFIX)
    rest = urlencode([(key, value) for key, value in query if key != "prefix"])
    return urlunsplit((*parts[:3], rest, parts.fragment)), prefix


def redact(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}" if ":" in user else netloc
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class Broker:
    """One node's connections to Redis: ``redis`` for commands, ``reader`` (one
    connection) for the blocking read that feeds the node's mirrors."""

    def __init__(self, url: str, node_id: str, lease_s: float) -> None:
        self.url, self.prefix = split_url(url)
        self.name = redact(url)
        self.node_id = node_id
        self.lease_ms = int(lease_s * 1000)
        self.redis: redis.Redis = redis.Redis.from_url(self.url, decode_responses=True)
        self.reader: redis.Redis = redis.Redis.from_url(
            self.url, decode_responses=True, single_connection_client=True
        )
        self._renew = self.redis.register_script(_RENEW)
        # The append script by its hash, loaded at open (and again after a Redis that
        # restarted forgot it): a pipeline of registered scripts would ask Redis whether
        # it has them first, a second round trip per append.
        self._append_sha = ""
        self.channel = f"{self.prefix}:msg"

    def stream(self, run_id: str) -> str:
        return f"{self.prefix}:s:{run_id}"

    def lease(self, run_id: str) -> str:
        return f"{self.prefix}:l:{run_id}"

    def watchers(self, run_id: str) -> str:
        return f"{self.prefix}:w:{run_id}"

    async def open(self) -> None:
        """Raises: RedisError, OSError: Redis cannot be reached."""
        self._append_sha = await self.redis.script_load(_APPEND)

    async def close(self) -> None:
        await self.reader.aclose()
        await self.redis.aclose()

    # -- the owner ---------------------------------------------------------------------

    async def append(self, batches: Sequence[RunAppend]) -> list[int]:
        """Append each run's events to its stream, fenced on its lease: ONE round trip
        for every run. Returns per run the entries added, or -1: another node holds it."""
        try:
            return await self._append_all(batches)
        except NoScriptError:
            self._append_sha = await self.redis.script_load(_APPEND)
            return await self._append_all(batches)

    async def _append_all(self, batches: Sequence[RunAppend]) -> list[int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch in batches:
                args: list[Any] = [
                    self.node_id,
                    self.lease_ms,
                    batch.flushed,
                    max(0, batch.flushed - TRIM_MARGIN),
                    STREAM_TTL_MS if batch.final else 0,
                    batch.events[0].index,
                    _joined(batch.events),
                ]
                pipe.evalsha(
                    self._append_sha, 2, self.lease(batch.run_id), self.stream(batch.run_id), *args
                )
            return [int(result) for result in await pipe.execute()]

    async def renew(self, run_ids: Sequence[str]) -> list[bool]:
        """Renew this node's leases; False for a run another node holds now."""
        if not run_ids:
            return []
        held = await self._renew(
            keys=[self.lease(run_id) for run_id in run_ids], args=[self.node_id, self.lease_ms]
        )
        return [bool(flag) for flag in held]

    async def seize(self, run_id: str) -> None:
        """Hold a run's lease from now on (a takeover PostgreSQL granted this node): the
        old owner's appends are refused from this command on."""
        await self.redis.set(self.lease(run_id), self.node_id, px=self.lease_ms)

    # -- readers -----------------------------------------------------------------------

    async def watcher_counts(self, run_id: str) -> dict[str, int]:
        """node id -> watchers of the run there."""
        counts: Any = await self.redis.hgetall(self.watchers(run_id))
        return {str(node): int(count) for node, count in counts.items()}

    async def read_range(self, run_id: str, after: int) -> tuple[list[Event], bool]:
        """(the events of the run's stream after index ``after``, whether it exists)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.stream(run_id))
            pipe.xrange(self.stream(run_id), f"(0-{after}", "+")
            exists, entries = await pipe.execute()
        return [Event.from_json(fields["e"]) for _, fields in entries], bool(exists)

    async def read(
        self, cursors: dict[str, int], block_ms: int
    ) -> list[tuple[str, list[Event], int]]:
        """Block until some run of ``cursors`` (run id -> index held) has events after its
        cursor, or ``block_ms`` passed; returns (run id, events, owner's flushed index)."""
        streams: dict[Any, Any] = {
            self.stream(run_id): f"0-{index}" for run_id, index in cursors.items()
        }
        reply: Any = await self.reader.xread(streams, count=10_000, block=block_ms)
        found: list[tuple[str, list[Event], int]] = []
        cut = len(self.prefix) + 3
        for key, entries in reply or ():
            flushed = 0
            events = []
            for _, fields in entries:
                events.append(Event.from_json(fields["e"]))
                if "f" in fields:
                    flushed = int(fields["f"])
            found.append((key[cut:], events, flushed))
        return found

    async def reader_id(self) -> int:
        """The id of the reader's connection (to wake its blocking read)."""
        return int(await self.reader.client_id())

    async def wake_reader(self, client_id: int) -> None:
        await self.redis.client_unblock(client_id)

    async def uptime_s(self) -> float:
        """Seconds Redis has been up: a lease can have expired only if more than a lease."""
        info = await self.redis.info("server")
        return float(info["uptime_in_seconds"])

    async def held(self, run_ids: Sequence[str]) -> list[bool]:
        """Whether each run's lease is held by some node."""
        if not run_ids:
            return []
        values = await self.redis.mget([self.lease(run_id) for run_id in run_ids])
        return [value is not None for value in values]


def _joined(events: Sequence[Event]) -> str:
    """The events' JSON, one a line (``_APPEND`` splits it)."""
    text = "\n".join([event.json for event in events])
    if text.count("\n") != len(events) - 1:  # not orjson's: a bug, not a client's input
        raise ValueError("an event's JSON holds a newline")
    return text


class RunAppend:
    """One run's part of an append: its ``events`` (contiguous, oldest first), the
    owner's index on disk, and whether they end the run."""

    __slots__ = ("events", "final", "flushed", "run_id")

    def __init__(self, run_id: str, events: Sequence[Event], flushed: int, final: bool) -> None:
        self.run_id = run_id
        self.events = events
        self.flushed = flushed
        self.final = final
