"""End to end: ``GET /metrics`` (app/transport/metrics.py) over a real server. The counts
move as runs start, stream to watchers and end; the text parses as Prometheus's format;
each app counts apart; refusals for a rate are counted; who may read (PROTOCOL.md §8)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from app.core.events import TERMINAL_STATUSES
from app.store.sqlite import SqliteStore
from tests.conftest import Server
from tests.fakes import RecordingStore
from tests.transport.helpers import connect

VIEWER = "viewer-secret-0123456789"
ADMIN = "admin-secret-0123456789"
TOKENS = (f"viewer:{VIEWER}", f"admin:{ADMIN}")

NAMES = {
    "runcast_runs_live": "gauge",
    "runcast_runs_in_memory": "gauge",
    "runcast_runs_started": "counter",
    "runcast_runs_ended": "counter",
    "runcast_events_appended": "counter",
    "runcast_events_delivered": "counter",
    "runcast_connections": "gauge",
    "runcast_subscriptions": "gauge",
    "runcast_flush_seconds": "histogram",
    "runcast_flush_events": "histogram",
    "runcast_store_degraded": "gauge",
    "runcast_store_errors": "counter",
    "runcast_rate_limited": "counter",
}


@dataclass
class Scrape:
    """One scrape, parsed: every sample by name and labels, and every family's type."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    types: dict[str, str]

    def __call__(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]


def parse(text: str) -> Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, types)


async def scrape(http: httpx.AsyncClient, **headers: str) -> Scrape:
    async with asyncio.timeout(5):
        response = await http.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return parse(response.text)


async def scrape_until(
    http: httpx.AsyncClient, condition: Callable[[Scrape], bool], timeout_s: float = 5.0
) -> Scrape:
    """Scrape until ``condition`` holds: a frame's events are counted once the server's
    send returns, which a client can see after it has read the frame."""
    async with asyncio.timeout(timeout_s):
        while True:
            found = await scrape(http)
            if condition(found):
                return found


async def test_every_metric_is_exposed_and_parses(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        found = await scrape(http)
    assert {name: found.types.get(name) for name in NAMES} == NAMES
    assert found("runcast_runs_live") == 0
    assert found("runcast_runs_started_total", agent="counter") == 0
    for status in TERMINAL_STATUSES:
        assert found("runcast_runs_ended_total", status=status.value) == 0
    assert found("runcast_flush_seconds_bucket", le="+Inf") == found("runcast_flush_seconds_count")
    assert found("runcast_rate_limited_total", limit="request") == 0
    assert found("runcast_rate_limited_total", limit="op") == 0


async def test_the_metrics_follow_runs_as_they_start_stream_and_end(server: Server) -> None:
    async with (
        httpx.AsyncClient(base_url=server.http_url) as http,
        connect(server.ws_url) as owner,
        connect(server.ws_url) as watcher,
        connect(server.ws_url) as idle,
    ):
        before = await scrape(http)
        assert before("runcast_connections") == 3
        assert before("runcast_subscriptions") == 0

        # A run waiting for input, followed by its owner and a second watcher.
        asked = await owner.start("ask", {})
        await watcher.ok("subscribe", run_id=asked["run_id"], after=0)
        await owner.next_frame(
            lambda f: (
                f["type"] == "events" and any(e["type"] == "input_required" for e in f["events"])
            )
        )
        live = await scrape(http)
        assert live("runcast_runs_live") == 1
        assert live("runcast_runs_started_total", agent="ask") == 1
        assert live("runcast_subscriptions") == 2
        assert live("runcast_events_appended_total") > 0

        # A counter run streamed to two watchers; then the ask run is stopped.
        counted = await owner.start("counter", {"n": 500})
        await watcher.ok("subscribe", run_id=counted["run_id"], after=0)
        events = await owner.events_until_end(counted["run_id"])
        assert len(await watcher.events_until_end(counted["run_id"])) == len(events)
        await owner.ok("stop", run_id=asked["run_id"])
        asked_events = await owner.events_until_end(asked["run_id"])
        await watcher.events_until_end(asked["run_id"])
        appended = events[-1]["i"] + asked_events[-1]["i"]  # both runs, every event
        assert len(events) == events[-1]["i"]

        ended = await scrape_until(
            http, lambda s: s("runcast_events_delivered_total") == 2 * appended
        )
        assert ended("runcast_runs_live") == 0
        assert ended("runcast_runs_started_total", agent="counter") == 1
        assert ended("runcast_runs_ended_total", status="completed") == 1
        assert ended("runcast_runs_ended_total", status="stopped") == 1
        assert ended("runcast_runs_ended_total", status="failed") == 0
        assert ended("runcast_events_appended_total") == appended
        assert ended("runcast_subscriptions") == 0  # each pump ends with its run
        # Both runs ended on disk: every event appended went through a flush.
        assert ended("runcast_flush_events_sum") == appended
        assert ended("runcast_flush_events_count") >= 2
        assert ended("runcast_flush_seconds_count") == ended("runcast_flush_events_count")
        assert ended("runcast_flush_seconds_sum") > 0
        assert ended("runcast_store_errors_total") == 0
        assert ended("runcast_store_degraded") == 0
        await idle.ok("ping")


async def test_failed_writes_are_counted(server: Server) -> None:
    # The flusher writes through a store whose next two writes fail, then recover.
    assert isinstance(server.runtime.store, SqliteStore)
    store = RecordingStore(server.settings.db)
    store.inner = server.runtime.store
    store.fail_writes = 2
    server.runtime.manager.flusher.store = store  # type: ignore[assignment]
    async with httpx.AsyncClient(base_url=server.http_url) as http, connect(server.ws_url) as conn:
        run = await conn.start("counter", {"n": 3})
        await conn.events_until_end(run["run_id"])
        found = await scrape(http)
    assert store.fail_writes == 0
    assert found("runcast_store_errors_total") == 2
    assert found("runcast_store_degraded") == 0  # a good write since


async def test_each_app_counts_apart(server_factory: Any, tmp_path: Any) -> None:
    one: Server = await server_factory(db=tmp_path / "one.db")
    two: Server = await server_factory(db=tmp_path / "two.db")
    async with connect(one.ws_url) as conn:
        run = await conn.start("counter", {"n": 3})
        await conn.events_until_end(run["run_id"])
    async with (
        httpx.AsyncClient(base_url=one.http_url) as http_one,
        httpx.AsyncClient(base_url=two.http_url) as http_two,
    ):
        assert (await scrape(http_one))("runcast_runs_started_total", agent="counter") == 1
        assert (await scrape(http_two))("runcast_runs_started_total", agent="counter") == 0


async def test_refusals_for_a_rate_are_counted(server_factory: Any) -> None:
    server: Server = await server_factory(rate=0.001, rate_burst=2)
    # The scrapes come from another loopback address: its own bucket, never refused.
    scraper = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with (
        httpx.AsyncClient(base_url=server.http_url) as http,
        httpx.AsyncClient(base_url=server.http_url, transport=scraper) as metrics_http,
        connect(server.ws_url) as conn,
    ):
        statuses = [(await http.get("/api/health")).status_code for _ in range(5)]
        assert statuses.count(429) == 3, statuses
        replies = [await conn.op("ping") for _ in range(5)]
        refused = [r for r in replies if not r["ok"] and r["error"]["code"] == "rate_limited"]
        assert len(refused) == 3, replies
        found = await scrape(metrics_http)
    assert found("runcast_rate_limited_total", limit="request") == 3
    assert found("runcast_rate_limited_total", limit="op") == 3


async def test_openmetrics_when_asked(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        response = await http.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    names = {family.name for family in openmetrics_families(response.text)}  # type: ignore[no-untyped-call]
    assert set(NAMES) <= names


async def test_a_token_is_needed_in_token_mode(server_factory: Any) -> None:
    server: Server = await server_factory(tokens=TOKENS)
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        assert (await http.get("/metrics")).status_code == 401
        bad = await http.get("/metrics", headers={"Authorization": "Bearer not-a-token-0123"})
        assert bad.status_code == 401
        await scrape(http, Authorization=f"Bearer {VIEWER}")  # viewer is enough
        run = (
            await http.post(
                "/api/runs",
                json={"agent": "counter", "input": {"n": 1}},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
        ).json()
        share = await http.post(
            f"/api/runs/{run['run_id']}/share",
            json={"role": "viewer"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert share.status_code == 201, share.text
        refused = await http.get(
            "/metrics", headers={"Authorization": f"Bearer {share.json()['token']}"}
        )
        assert refused.status_code == 403  # a share reaches its run, not the server's counts
        assert refused.json()["error"]["code"] == "forbidden"


async def test_metrics_public_needs_no_token(server_factory: Any) -> None:
    server: Server = await server_factory(tokens=TOKENS, metrics_public=True)
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        found = await scrape(http)
        assert found("runcast_runs_live") == 0
        assert (await http.get("/api/runs")).status_code == 401  # only /metrics is open
