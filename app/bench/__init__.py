"""``runcast bench``: drive a runcast server from a separate process and measure it.

The bench starts ``python -m app serve`` as a child process (or targets ``--url``) and
drives it with its own WebSocket clients from this process, so the server's CPU time
(the scheduler's run time of its threads and its child processes, from ``/proc``)
belongs to the server alone. Every watcher checks as it
measures that it receives every index exactly once and in order; a gap, a duplicate or
a reordering raises :class:`BenchError` and the bench fails.

Scenarios (each sized by flags; the defaults finish in under a minute each):

- ``fanout``: one ``counter`` run of N events watched by K connections; with
  ``--reference`` the same clients also read the same frames from a bare ``websockets``
  broadcaster (no runcast code, a separate process), and the ratio is printed;
- ``latency``: R runs emitting every P ms, W watchers each: emit-to-receive percentiles;
- ``start``: start request to first event;
- ``resume``: time to first event when resuming at ``last - 10`` of runs of 1,000 and
  1,000,000 events, from memory and from disk, and exactness over drop/resume cycles;
- ``connections``: C idle subscribed connections, held by client processes of their own:
  the server's memory per connection (RSS; with ``--tracemalloc`` its heap, by line) and
  the time one event takes to reach them all (connections.py);
- ``persist``: a long run with the flusher: sustained events/s, commits, emit-to-durable;
- ``cluster`` (only when named: it needs PostgreSQL and Redis): nodes of one cluster side
  by side with one node: fanout CPU, cross-node latency, takeover time (cluster.py).

The client is kept cheap: an ``events`` frame is matched on its prefix, its indexes are
taken with one regular expression and compared, as bytes, to the expected run of
indexes; only the latency scenario parses the events (for their ``ts``).
"""

from __future__ import annotations

from app.bench._client import BenchError, ExactlyOnceError, Watch
from app.bench.runner import SCENARIOS, add_arguments, main, run_bench

__all__ = [
    "SCENARIOS",
    "BenchError",
    "ExactlyOnceError",
    "Watch",
    "add_arguments",
    "main",
    "run_bench",
]
