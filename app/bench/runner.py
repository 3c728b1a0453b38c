"""The command line of ``runcast bench``: its flags, and running the scenarios."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from app.bench import chaos, cluster
from app.bench._client import FAILURES, BenchError
from app.bench._servers import raise_nofile, runcast_server
from app.bench.connections import add_arguments as connections_arguments
from app.bench.connections import scenario_connections
from app.bench.fanout import scenario_fanout
from app.bench.latency import scenario_latency
from app.bench.persist import scenario_persist
from app.bench.report import Report
from app.bench.resume import scenario_resume
from app.bench.start import scenario_start

SCENARIOS = ("fanout", "latency", "start", "resume", "connections", "persist")
# Run only when named: they start servers of their own (cluster: PostgreSQL and Redis).
ON_DEMAND = ("cluster",)


_RUNNERS = {
    "fanout": scenario_fanout,
    "latency": scenario_latency,
    "start": scenario_start,
    "resume": scenario_resume,
    "connections": scenario_connections,
    "persist": scenario_persist,
}
_OWN_SERVERS = {"cluster": cluster.scenario_cluster}


# -- command line ------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _latency_cases(text: str) -> list[tuple[int, int, float]]:
    """``RxW@Pms`` items, comma-separated: R runs, W watchers each, one event per P ms."""
    cases = []
    for item in text.split(","):
        match = re.fullmatch(r"(\d+)x(\d+)@([\d.]+)(?:ms)?", item.strip())
        if match is None:
            raise argparse.ArgumentTypeError(f"not RxW@Pms: {item!r}")
        cases.append((int(match[1]), int(match[2]), float(match[3])))
    return cases


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``runcast bench`` (called by app.cli)."""
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS)} (default: all), {', '.join(ON_DEMAND)} "
        "(app/bench/cluster.py); or chaos, alone (app/bench/chaos.py)",
    )
    parser.add_argument(
        "--url",
        action=cluster.UrlsAction,
        help="drive this server (ws://host:port/ws) instead of one of ours; cluster: once per node",
    )
    parser.add_argument("--db", help="with --url: its SQLite file (for persist)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument(
        "--reference",
        action="store_true",
        help="fanout: also measure a bare websockets broadcaster",
    )
    parser.add_argument("--events", type=int, default=20_000, help="fanout: events per run")
    parser.add_argument(
        "--watchers",
        type=_ints,
        default=[1, 10, 50, 100],
        help="fanout: watcher counts, comma-separated",
    )
    parser.add_argument(
        "--latency-cases",
        type=_latency_cases,
        default=_latency_cases("1x10@10,100x5@50"),
        help="latency: RUNSxWATCHERS@PERIODms, comma-separated",
    )
    parser.add_argument("--latency-s", type=float, default=3.0, help="latency: seconds per case")
    parser.add_argument("--starts", type=int, default=200, help="start: runs started")
    parser.add_argument(
        "--resume-sizes",
        type=_ints,
        default=[1000, 1_000_000],
        help="resume: run sizes, comma-separated",
    )
    parser.add_argument(
        "--resume-disk-samples",
        type=int,
        default=9,
        help="resume: resumes after eviction, each with one from memory after a pause"
        " (each pair waits 1.5 linger + 0.5 s; 3 samples gave medians 0.3 ms apart)",
    )
    parser.add_argument(
        "--resume-live-events",
        type=int,
        default=3000,
        help="resume: events of the live run the drop/resume cycles follow",
    )
    parser.add_argument("--seed", type=int, default=6, help="resume: random seed")
    parser.add_argument(
        "--connections", type=int, default=15_000, help="connections: idle subscribed connections"
    )
    parser.add_argument(
        "--presence",
        action="store_true",
        help="connections: subscribe with presence (default: without)",
    )
    parser.add_argument(
        "--persist-events", type=int, default=2_000_000, help="persist: events of the long run"
    )
    parser.add_argument(
        "--persist-kills",
        type=int,
        default=None,
        help="persist: SIGKILLs at full speed (default: one per 200,000 events, 1 to 10)",
    )
    parser.add_argument(
        "--linger",
        type=float,
        default=1.0,
        help="seconds an ended run stays in memory (our server; resume from disk)",
    )
    parser.add_argument("--nofile", type=int, default=20_000, help="open-file limit to ask for")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="DIR",
        help="also run each scenario against a server from the source tree DIR",
    )
    connections_arguments(parser)
    chaos.add_arguments(parser)
    cluster.add_arguments(parser)


async def run_bench(args: argparse.Namespace) -> Report:
    report = Report()
    scenarios = args.scenarios or list(SCENARIOS)
    raise_nofile(args.nofile)
    sources: list[str | None] = [None, *args.compare]
    with tempfile.TemporaryDirectory(prefix="runcast-bench-") as tmp:
        for name in scenarios:
            if name in _OWN_SERVERS:  # its own servers; not compared (--compare)
                report.label = ""
                await _OWN_SERVERS[name](args, Path(tmp), report)
                if FAILURES:
                    raise FAILURES[0]
                continue
            for source in sources:
                # One server per scenario (per source): scenarios do not see each other's runs.
                with runcast_server(args, Path(tmp), source) as target:
                    report.label = "" if source is None else f" [{Path(source).name}]"
                    await _RUNNERS[name](args, target, report)
                if FAILURES:
                    raise FAILURES[0]
    return report


def main(args: argparse.Namespace) -> int:
    """Run the scenarios; print the table; 1 when a check failed."""
    began = time.strftime("%Y-%m-%d %H:%M")
    if args.scenarios == ["chaos"]:
        return chaos.main(args)
    unknown = [name for name in args.scenarios if name not in (*SCENARIOS, *ON_DEMAND)]
    if unknown:
        print(
            f"runcast bench: unknown scenario {unknown[0]!r}; expected any of "
            f"{', '.join((*SCENARIOS, *ON_DEMAND))}",
            file=sys.stderr,
        )
        return 2
    try:
        report = asyncio.run(run_bench(args))
    except BenchError as exc:
        print(f"runcast bench: FAILED: {exc}", file=sys.stderr)
        return 1
    print()
    print(f"runcast bench, {began}, {' '.join(sys.argv[1:])}")
    print(report.table())
    if args.json:
        rows = [{"scenario": r.scenario, "case": r.case, **r.figures} for r in report.rows]
        Path(args.json).write_text(json.dumps({"date": began, "rows": rows}, indent=2) + "\n")
    return 0
