"""The broker's fenced append on the machine's Redis (a key prefix of its own per test):
events land once each at their indexes, a republish skips what the stream holds, another
node's lease refuses the append, and the events' text comes back to the byte."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from app.cluster.broker import Broker, RunAppend
from app.core.events import Event
from tests.cluster.nodes import fresh_prefix

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with fresh_prefix() as broker_url:
        yield broker_url


@contextlib.asynccontextmanager
async def opened(url: str, node_id: str) -> AsyncIterator[Broker]:
    broker = Broker(url, node_id, lease_s=5.0)
    await broker.open()
    try:
        yield broker
    finally:
        await broker.close()


def ticks(first: int, last: int) -> list[Event]:
    texts = ["plain", 'quote " and \\ backslash', "line\nbreak", "ünïcødé ✓", ""]
    return [
        Event(i, "tick", {"n": i, "text": texts[i % len(texts)]}, 1_764_936_000.5 + i)
        for i in range(first, last + 1)
    ]


async def test_events_land_once_each_and_a_republish_skips_what_is_there(url: str) -> None:
    async with opened(url, "a") as broker:
        assert await broker.append([RunAppend("run_1", ticks(1, 3), 0, False)]) == [3]
        # A republish that overlaps (after a lost answer): only 4 and 5 are new.
        assert await broker.append([RunAppend("run_1", ticks(2, 5), 0, False)]) == [2]
        events, exists = await broker.read_range("run_1", 0)
        assert exists
        assert [event.json for event in events] == [event.json for event in ticks(1, 5)]


async def test_one_call_appends_for_many_runs(url: str) -> None:
    async with opened(url, "a") as broker:
        batches = [RunAppend(f"run_{k}", ticks(1, k), 0, False) for k in (1, 2, 3)]
        assert await broker.append(batches) == [1, 2, 3]
        for k in (1, 2, 3):
            events, _ = await broker.read_range(f"run_{k}", 0)
            assert [event.index for event in events] == list(range(1, k + 1))


async def test_another_nodes_lease_refuses_the_append(url: str) -> None:
    async with opened(url, "a") as a, opened(url, "b") as b:
        assert await a.append([RunAppend("run_1", ticks(1, 2), 0, False)]) == [2]
        assert await b.append([RunAppend("run_1", ticks(3, 4), 0, False)]) == [-1]
        events, _ = await b.read_range("run_1", 0)
        assert [event.index for event in events] == [1, 2]


async def test_an_event_whose_json_holds_a_newline_is_refused(url: str) -> None:
    broken = Event.from_json('{"i":1,"type":"tick",\n"data":{},"ts":1.0}')
    async with opened(url, "a") as broker:
        with pytest.raises(ValueError, match="newline"):
            await broker.append([RunAppend("run_1", [broken], 0, False)])
        assert await broker.read_range("run_1", 0) == ([], False)
