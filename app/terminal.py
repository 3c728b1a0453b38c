"""The terminal client: ``runcast runs``, ``watch``, ``start``, ``stop``.

Each command talks to a running server (``--url``, ``RUNCAST_URL``; default the local
one) with a token where it needs one (``--token``, ``RUNCAST_TOKEN``). ``watch`` follows
a run as it streams — text as it arrives, tool calls, status changes — and resumes by
cursor on its own after a dropped connection or a server restart; Ctrl-C leaves the run
running. Listing and stopping are plain HTTP (the standard library's ``urllib``), so the
commands need nothing beyond what the server itself installs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.parse
from typing import Any, TextIO

from app.client import ClientError, ConnectionLostError, Watch, request_json

DEFAULT_URL = "http://127.0.0.1:8000"
JsonObject = dict[str, Any]


class CommandError(Exception):
    """What a command prints as its one line of refusal (``runcast: ...``)."""


def add_commands(commands: Any) -> None:
    """Add the client commands to ``runcast``'s subparsers."""

    def command(name: str, summary: str, description: str, example: str) -> Any:
        parser = commands.add_parser(
            name,
            help=summary,
            description=description,
            epilog=f"example: {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument(
            "--url", help=f"the server (RUNCAST_URL; default {DEFAULT_URL})", default=None
        )
        parser.add_argument("--token", help="a token, in token mode (RUNCAST_TOKEN)")
        return parser

    runs = command(
        "runs",
        "list runs, newest first",
        "List runs, newest first.",
        "runcast runs --status running --limit 20",
    )
    runs.add_argument("--status", help="only runs in this status (running, completed, ...)")
    runs.add_argument("--thread", dest="thread_id", help="only runs of this thread")
    runs.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    runs.add_argument("--json", action="store_true", help="print the RunInfo objects as JSON")

    watch = command(
        "watch",
        "follow a run in the terminal",
        "Follow a run: its text as it streams, tool calls and status changes. "
        "A dropped connection or a restarted server is resumed without a gap; Ctrl-C "
        "leaves the run running.",
        "runcast watch run_3kT... --after 0",
    )
    watch.add_argument("run_id")
    watch.add_argument("--after", type=int, default=0, help="start after this index (0: all)")
    watch.add_argument("--events", action="store_true", help="print every event as JSON")

    start = command(
        "start",
        "start a run",
        "Start a run of AGENT and print its RunInfo (or follow it with --watch).",
        "runcast start demo --input '{\"tokens\": 40}' --watch",
    )
    start.add_argument("agent")
    start.add_argument("--input", default="{}", help="the agent's input, a JSON object")
    start.add_argument("--thread", dest="thread_id", help="start it in this thread")
    start.add_argument("--watch", action="store_true", help="then follow it")

    stop = command(
        "stop",
        "stop a run",
        "Ask a run to stop; prints whether it was stopping and its status.",
        "runcast stop run_3kT...",
    )
    stop.add_argument("run_id")


COMMANDS = frozenset({"runs", "watch", "start", "stop"})


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run one client command; prints ``runcast: ...`` and returns 1 when it fails."""
    base = (args.url or os.environ.get("RUNCAST_URL") or DEFAULT_URL).rstrip("/")
    token = args.token or os.environ.get("RUNCAST_TOKEN") or None
    try:
        if args.command == "runs":
            return _runs(base, token, args, out)
        if args.command == "stop":
            result = _http(base, token, "POST", f"/api/runs/{_quote(args.run_id)}/stop", {})
            print(f"{args.run_id}: stopping {result['stopping']}, {result['status']}", file=out)
            return 0
        if args.command == "start":
            try:
                value = json.loads(args.input)
            except ValueError as exc:
                raise CommandError(f"--input is not JSON: {exc}") from None
            body: JsonObject = {"agent": args.agent, "input": value}
            if args.thread_id:
                body["thread_id"] = args.thread_id
            run = _http(base, token, "POST", "/api/runs", body)
            if not args.watch:
                print(json.dumps(run), file=out)
                return 0
            print(f"started {run['run_id']}", file=sys.stderr)
            return _watch(base, token, run["run_id"], 0, False, out)
        assert args.command == "watch", args.command
        return _watch(base, token, args.run_id, args.after, args.events, out)
    except CommandError as exc:
        print(f"runcast: {exc}", file=sys.stderr)
        return 1


def _runs(base: str, token: str | None, args: argparse.Namespace, out: TextIO) -> int:
    query = {"limit": str(args.limit)}
    if args.status:
        query["status"] = args.status
    if args.thread_id:
        query["thread_id"] = args.thread_id
    runs = _http(base, token, "GET", "/api/runs?" + urllib.parse.urlencode(query))["runs"]
    if args.json:
        print(json.dumps(runs, indent=2), file=out)
        return 0
    for run in runs:
        print(
            f"{run['run_id']}  {run['status']:<15} {run['agent']:<10} "
            f"{run['last_index']:>8} events  {run['watchers']} watching",
            file=out,
        )
    return 0


def _watch(base: str, token: str | None, run_id: str, after: int, raw: bool, out: TextIO) -> int:
    ws_url = "ws" + base.removeprefix("http") + "/ws"
    try:
        return asyncio.run(_follow(ws_url, token, run_id, after, raw, out))
    except KeyboardInterrupt:
        print("\n(left; the run goes on)", file=sys.stderr)
        return 130


async def _follow(
    ws_url: str, token: str | None, run_id: str, after: int, raw: bool, out: TextIO
) -> int:
    view = _View(out)
    # A server restart takes a few seconds: keep trying for a minute before giving up.
    watch = Watch(ws_url, run_id, after, token=token, max_attempts=None, max_outage_s=60.0)
    try:
        async with watch:
            async for event in watch:
                if raw:
                    print(json.dumps(event), file=out, flush=True)
                else:
                    view.show(event)
    except ClientError as exc:
        raise CommandError(f"watch {run_id}: {exc}") from None
    if watch.snapshot is not None and watch.snapshot["index"] >= watch.cursor:
        # After a reset the run's end may be folded into the snapshot, not sent as an
        # event: say it all the same.
        ended = str(watch.snapshot["state"]["status"])
        if ended != view.status:
            view.line(f"[{ended}]")
            view.status = ended
    status = view.status or (watch.info or {}).get("status", "")
    if watch.resets:
        print(
            f"(the server restarted after a crash; resumed from its state {watch.resets}x)",
            file=sys.stderr,
        )
    return 0 if status in ("completed", "") else 3


class _View:
    """Events as a person reads them: text inline, everything else on lines of its own."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.inline = False  # the last thing printed was streamed text (no newline yet)
        self.status: str | None = None

    def line(self, text: str) -> None:
        if self.inline:
            self.out.write("\n")
            self.inline = False
        self.out.write(text + "\n")
        self.out.flush()

    def show(self, event: JsonObject) -> None:
        kind, data = event["type"], event.get("data") or {}
        if kind == "text":
            self.out.write(str(data.get("text", "")))
            self.out.flush()
            self.inline = True
        elif kind == "thinking":
            self.line(f"  (thinking) {data.get('text', '')}")
        elif kind == "tool_call":
            self.line(f"  -> {data.get('name')}({json.dumps(data.get('args', {}))})")
        elif kind == "tool_result":
            shown = data.get("error") if "error" in data else data.get("output")
            self.line(f"  <- {json.dumps(shown)[:200]}")
        elif kind == "input_required":
            self.line(f"  ? {data.get('prompt')} (request_id {data.get('request_id')})")
        elif kind == "status":
            self.status = str(data.get("status"))
            extra = data.get("error") or data.get("reason") or data.get("by") or ""
            self.line(f"[{self.status}{f': {extra}' if extra else ''}]")


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _http(
    base: str, token: str | None, method: str, path: str, body: JsonObject | None = None
) -> JsonObject:
    """One JSON request. Raises: CommandError (the server's error, or no server)."""
    try:
        return request_json(base + path, token, 30.0, method=method, body=body)
    except ConnectionLostError as exc:
        raise CommandError(f"cannot reach {base}: {exc.message}") from None
    except ClientError as exc:
        raise CommandError(f"{exc.code}: {exc.message}") from None
