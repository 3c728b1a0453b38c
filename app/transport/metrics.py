"""``GET /metrics``: the server's counts in Prometheus's text format (prometheus-client).

Nothing is counted for monitoring per event. The engine keeps plain integers
(``RunManager.statistics()``), transport keeps a ``Tally`` (an addition per frame sent,
one per refusal), and a Collector reads them when Prometheus scrapes. Only the flush
histograms are observed as things happen: once per flush, through ``Flusher.on_flush``.

Each app has a registry of its own, not prometheus-client's global one: a process that
builds several apps (the tests) counts each apart.

Who may read (PROTOCOL.md §8): open mode, anyone on loopback; token mode, a server token
of any role (a share reaches its run or thread, never the server's counts), unless
``metrics_public`` opens the route to everyone (the edge then asks no token).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from app.access.policy import SERVER, Action, in_scope
from app.core.events import TERMINAL_STATUSES
from app.errors import ForbiddenError
from app.transport.gate import Gate

if TYPE_CHECKING:
    from app.transport.app import Runtime

FLUSH_SECONDS_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
FLUSH_EVENTS_BUCKETS: Final = (1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0)


class Tally:
    """Transport's counts over the app's life: events sent to WebSocket subscribers
    (added once per frame, for the frame's events), and requests (HTTP, per client
    address) and ops (WebSocket, per connection) refused for their rate."""

    __slots__ = ("events_delivered", "rate_limited_ops", "rate_limited_requests")

    def __init__(self) -> None:
        self.events_delivered = 0
        self.rate_limited_requests = 0
        self.rate_limited_ops = 0


class Metrics:
    """The app's registry: the collector of ``runtime``'s counts and the flush histograms
    (observed from the runtime's flusher)."""

    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_RuntimeCollector(runtime))
        self.flush_seconds = Histogram(
            "runcast_flush_seconds",
            "Duration of each write of the flusher (one transaction for every dirty run).",
            buckets=FLUSH_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.flush_events = Histogram(
            "runcast_flush_events",
            "Events written by each write of the flusher.",
            buckets=FLUSH_EVENTS_BUCKETS,
            registry=self.registry,
        )
        runtime.manager.flusher.on_flush = self.observe_flush

    def observe_flush(self, seconds: float, events: int) -> None:
        self.flush_seconds.observe(seconds)
        self.flush_events.observe(events)

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition (the text format, or OpenMetrics when ``accept`` asks for it)
        and its content type."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


class _RuntimeCollector(Collector):
    """Reads the engine's and transport's counts at scrape time:
    O(agents + statuses + connections)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterable[Metric]:
        runtime = self.runtime
        stats = runtime.manager.statistics()
        tally = runtime.tally
        yield GaugeMetricFamily(
            "runcast_runs_live", "Runs created and not ended (queued included).", stats.live_runs
        )
        yield GaugeMetricFamily(
            "runcast_runs_in_memory",
            "Runs held in memory (live, and ended ones lingering or read back).",
            stats.runs_in_memory,
        )
        started = CounterMetricFamily(
            "runcast_runs_started", "Runs started, by agent.", labels=["agent"]
        )
        for agent in sorted({*(a.name for a in runtime.registry.all()), *stats.started}):
            started.add_metric([agent], stats.started.get(agent, 0))
        yield started
        ended = CounterMetricFamily(
            "runcast_runs_ended", "Runs ended, by terminal status.", labels=["status"]
        )
        for status in sorted({*(s.value for s in TERMINAL_STATUSES), *stats.ended}):
            ended.add_metric([status], stats.ended.get(status, 0))
        yield ended
        yield CounterMetricFamily(
            "runcast_events_appended",
            "Events appended to runs' logs (terminal status events included).",
            stats.events_appended,
        )
        yield CounterMetricFamily(
            "runcast_events_delivered",
            "Events sent to WebSocket subscribers (one per event per subscriber).",
            tally.events_delivered,
        )
        sessions = list(runtime.sessions)
        yield GaugeMetricFamily("runcast_connections", "Open WebSocket connections.", len(sessions))
        yield GaugeMetricFamily(
            "runcast_subscriptions",
            "Run subscriptions held by open WebSocket connections.",
            sum(session.subscriptions for session in sessions),
        )
        yield GaugeMetricFamily(
            "runcast_store_degraded",
            "1 while writes to the store are failing, else 0.",
            int(runtime.manager.store_degraded),
        )
        yield CounterMetricFamily(
            "runcast_store_errors", "Writes of the flusher that failed.", stats.store_errors
        )
        limited = CounterMetricFamily(
            "runcast_rate_limited",
            "Answers refused for their rate: HTTP requests per client address (request), "
            "WebSocket ops per connection (op).",
            labels=["limit"],
        )
        limited.add_metric(["request"], tally.rate_limited_requests)
        limited.add_metric(["op"], tally.rate_limited_ops)
        yield limited


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``. Raises: ForbiddenError (a share token, without
    ``metrics_public``)."""
    runtime: Runtime = request.app.state.runtime
    if not runtime.settings.metrics_public:
        principal = request.scope["runcast.principal"]
        assert principal is not None, "the edge lets /metrics through without a token"
        Gate(principal, runtime.manager).server(Action.READ)
        if not in_scope(principal, SERVER):
            raise ForbiddenError("this token does not reach the server's metrics")
    body, content_type = runtime.metrics.render(request.headers.get("accept"))
    return Response(body, headers={"content-type": content_type})
