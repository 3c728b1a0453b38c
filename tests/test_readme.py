"""The README's examples, run as they are written there.

Each test reads its example out of README.md (code blocks by section, the file name from
the text), so that the test fails when the README drifts from what runcast does. The
commands run with the ``runcast`` console script from a temporary directory, as a new
user would run them; the only change is the port (``RUNCAST_PORT=0``, or ``:8000``
replaced by the server's port in a client's commands), so that tests can run side by
side. Shell sessions run with bash and the real ``curl``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.agents.openai import default_tools
from app.cli import build_parser
from app.config import ENV_PREFIX, SERVER, settings_table, settings_tables
from tests.conftest import Spawned

README = Path(__file__).resolve().parent.parent / "README.md"
RUNCAST = Path(sys.executable).parent / "runcast"  # the console script `pip install -e .` made
_LISTENING = re.compile(r"listening on http://127\.0\.0\.1:(\d+)")


def sections() -> dict[str, str]:
    """The README's text under each heading (any level), up to the next heading; a
    ``#`` line inside a code block is not a heading."""
    found: dict[str, list[str]] = {"": []}
    title, fenced = "", False
    for line in README.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#+ (.+)", line)):
            title = heading[1].strip()
            found[title] = []
            continue
        found[title].append(line)
    return {title: "".join(lines) for title, lines in found.items()}


def code_blocks(text: str, language: str) -> list[str]:
    return [
        code
        for lang, code in re.findall(r"^```(\w*)\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
        if lang == language
    ]


def the_block(language: str, containing: str) -> str:
    """The one code block of the README in ``language`` that contains ``containing``
    (wherever a section around it moves to)."""
    [block] = [code for code in code_blocks(README.read_text(), language) if containing in code]
    return block


def user_environment(**extra: str) -> dict[str, str]:
    """The test's environment without runcast settings or PYTHONPATH (a new user's
    shell), with ``extra`` on top."""
    environ = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(ENV_PREFIX) and name != "PYTHONPATH"
    }
    return {**environ, "PYTHONUNBUFFERED": "1", **extra}


def command_argv(command: str) -> list[str]:
    """``runcast ...`` as written, with the console script found beside this Python."""
    argv = shlex.split(command, comments=True)
    assert argv[0] == "runcast", command
    assert RUNCAST.exists(), f"no console script at {RUNCAST}: pip install -e ."
    return [str(RUNCAST), *argv[1:]]


def _drain(stream: Any, lines: list[str], arrived: queue.SimpleQueue[str | None]) -> None:
    for line in stream:
        lines.append(line)
        arrived.put(line)
    arrived.put(None)


@contextlib.contextmanager
def serving(command: str, cwd: Path, timeout_s: float = 20.0) -> Iterator[Spawned]:
    """Run the README's server ``command`` from ``cwd`` (on any free port) until it
    prints its address; stop it with SIGTERM after, and check that it exits cleanly."""
    process = subprocess.Popen(
        command_argv(command),
        cwd=cwd,
        env=user_environment(RUNCAST_PORT="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines: list[str] = []
    arrived: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    reader = threading.Thread(
        target=_drain, args=(process.stdout, lines, arrived), name="server output", daemon=True
    )
    reader.start()
    spawned = Spawned(process, 0, cwd / "runcast.db", lines, reader)
    try:
        deadline = time.monotonic() + timeout_s
        while (remaining_s := deadline - time.monotonic()) > 0:
            try:
                line = arrived.get(timeout=remaining_s)
            except queue.Empty:
                break
            assert line is not None, "the server exited:\n" + spawned.text
            if match := _LISTENING.search(line):
                spawned.port = int(match[1])
                break
        assert spawned.port, "the server did not start:\n" + spawned.text
        yield spawned
        process.terminate()
        assert spawned.wait(timeout_s) == 0, spawned.text
    finally:
        if process.poll() is None:
            process.kill()
            spawned.wait(timeout_s)
        process.stdout.close()


def run_session(script: str, port: int, cwd: Path, timeout_s: float = 30.0) -> str:
    """Run a README shell session with bash (stopping at the first failure), addressed
    to ``port`` instead of 8000; returns what it printed."""
    assert ":8000" in script, "the README's sessions talk to the default port"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace(":8000", f":{port}")],
        cwd=cwd,
        env=user_environment(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def sse_events(stream: str) -> list[dict[str, Any]]:
    """The events of a Server-Sent Events stream, each ``data:`` line as JSON."""
    return [json.loads(line[5:]) for line in stream.splitlines() if line.startswith("data:")]


def json_documents(text: str) -> list[Any]:
    """The JSON values printed one after another (``curl -s`` adds no newline)."""
    decoder, documents, at = json.JSONDecoder(), [], 0
    while rest := text[at:].lstrip():
        document, end = decoder.raw_decode(rest)
        documents.append(document)
        at = len(text) - len(rest) + end
    return documents


# -- Run the server ---------------------------------------------------------------------


def test_the_server_command_serves_loopback_with_runcast_db_in_the_current_directory(
    tmp_path: Path,
) -> None:
    [install] = code_blocks(sections()["Run the server"], "sh")
    command = install.strip().split(" && ")[-1]
    assert command == "runcast serve"
    with serving(command, cwd=tmp_path) as server:
        assert "listening on http://127.0.0.1:" in server.text
        # "with the SQLite file ./runcast.db, the built-in agents and a page at /"
        assert (tmp_path / "runcast.db").is_file()
        script = f"curl -sf localhost:8000/api/agents; curl -sf localhost:8000/ -o {tmp_path}/page"
        [agents] = json_documents(run_session(script, server.port, tmp_path))
        assert {"demo", "counter", "ask", "echo"} <= {agent["name"] for agent in agents["agents"]}
        assert "<html" in (tmp_path / "page").read_text().lower()


def table_rows(text: str) -> list[list[str]]:
    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| `--")
    ]
    assert rows, "no table of flags"
    return rows


@pytest.mark.parametrize(
    ("path", "groups"), [(README, [SERVER]), (README.parent / "docs" / "operations.md", None)]
)
def test_the_settings_table_is_the_one_generated_from_the_settings(
    path: Path, groups: list[str] | None
) -> None:
    """The settings tables are generated from app/config.py; a setting added, renamed or
    redescribed there without rewriting them fails here."""
    text = path.read_text(encoding="utf-8")
    assert settings_tables(text) == [settings_table(groups)], (
        f"{path.name}'s settings table differs from app/config.py's settings: "
        f"run python -m app.config {path.relative_to(README.parent)}"
    )


def test_every_limit_in_the_security_tables_is_a_flag() -> None:
    flags = set(build_parser().parse_args(["serve"]).setting_flags.values())
    named = {
        flag
        for row in table_rows(sections()["Security"])
        for flag in re.findall(r"`(--[a-z-]+)`", row[0])
    }
    assert named and named <= flags, named - flags


def test_the_token_file_example_starts_a_server_in_token_mode(tmp_path: Path) -> None:
    [block] = code_blocks(sections()["Security"], "sh")
    setup, _, command = block.rpartition("&& ")
    subprocess.run(["bash", "-euo", "pipefail", "-c", setup], cwd=tmp_path, check=True, timeout=10)
    assert (tmp_path / "tokens").stat().st_mode & 0o777 == 0o600
    admin = (tmp_path / "tokens").read_text().splitlines()[0].split()[1]
    with serving(command, cwd=tmp_path) as server:
        script = (
            "curl -s localhost:8000/api/health; "
            "curl -s -o /dev/null -w ' %{http_code}' localhost:8000/api/runs; "
            f"curl -s -o /dev/null -w ' %{{http_code}}' -H 'Authorization: Bearer {admin}' "
            "localhost:8000/api/runs"
        )
        health, unauthorized, authorized = json_documents(
            run_session(script, server.port, tmp_path)
        )
    assert health["auth"] == "token"
    assert (unauthorized, authorized) == (401, 200)


# -- Try it, a conversation in a thread, the Python client -------------------------------


def test_the_try_it_session_streams_a_run_and_stops_it(spawn: Any, tmp_path: Path) -> None:
    server = spawn()
    session = the_block("sh", "/api/runs/$run/stop")
    output = run_session(session, server.port, tmp_path)
    streamed, stop_reply = output.rsplit("\n", 1)
    events = sse_events(streamed)
    assert [event["i"] for event in events] == list(range(1, len(events) + 1))
    assert sum(event["type"] == "text" for event in events) == 40  # {"tokens": 40}
    assert events[-1]["type"] == "status" and events[-1]["data"]["status"] == "completed"
    assert json.loads(stop_reply)["status"] == "completed"  # stopping an ended run: no error


# What a reader does before "once idle": wait for the thread's runs to end, here by
# following each active run's event stream to its end (no polling, no sleep).
WAIT_UNTIL_IDLE = """\
active='import json,sys; print(json.load(sys.stdin)["active_run_id"] or "")'
while run=$(curl -s "$api/threads/$thread" | python3 -c "$active") && [ -n "$run" ]; do
  curl -sN -H 'Accept: text/event-stream' "$api/runs/$run/events" > /dev/null
done
"""


@pytest.mark.timeout(120)  # three demo answers, one after another, on a shared machine
def test_the_thread_session_keeps_every_turn_and_branch(spawn: Any, tmp_path: Path) -> None:
    server = spawn()
    session = the_block("sh", "/regenerate")
    lines = session.splitlines(keepends=True)
    # regenerate and undo are written for an idle thread: wait before each.
    waiting = "".join(
        WAIT_UNTIL_IDLE + line if re.search(r"/(regenerate|undo) ", line) else line
        for line in lines
    )
    assert waiting.count(WAIT_UNTIL_IDLE) == 2
    first, busy, enqueued, regenerated, undone, thread = json_documents(
        run_session(waiting, server.port, tmp_path)
    )
    assert first["run"]["agent"] == "demo", first
    assert busy["error"]["code"] == "run_in_progress", busy  # "409 while the first answer streams"
    assert enqueued["run"]["status"] == "queued", enqueued
    assert regenerated["run"]["status"] in ("queued", "running"), regenerated
    turns = {turn["turn_id"]: turn for turn in thread["turns"]}
    [question] = [turn for turn in turns.values() if turn["content"] == "And epochs?"]
    answers = [turn for turn in turns.values() if turn["parent_id"] == question["turn_id"]]
    assert len(answers) == 2  # the answer and its regenerated sibling: every branch is kept
    # undo: the head is back before the last question, at the first answer.
    assert undone["thread"]["head"] == thread["head"] == question["parent_id"]
    assert thread["turns"][0]["content"] == "What is runcast?"


def test_the_python_client_snippet_watches_a_run_to_its_end(spawn: Any, tmp_path: Path) -> None:
    server = spawn()
    snippet = the_block("python", "from app.client import Client")
    assert "127.0.0.1:8000" in snippet
    result = subprocess.run(
        [sys.executable, "-c", snippet.replace(":8000", f":{server.port}")],
        cwd=tmp_path,
        env=user_environment(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split(" ", 2) for line in result.stdout.splitlines()]
    assert [int(i) for i, _, _ in lines] == list(range(1, len(lines) + 1))
    assert sum(kind == "text" for _, kind, _ in lines) == 20  # {"tokens": 20}
    assert lines[-1][1] == "status" and "completed" in lines[-1][2]


# -- Your own agents ---------------------------------------------------------------------


def own_agent_example() -> tuple[str, str, str, str]:
    """The file name, its code, the server command and the client session."""
    text = sections()["Your own agents"]
    filename = re.search(r"Save this as `([^`]+)`", text)
    assert filename is not None
    [code] = code_blocks(text, "python")
    command, session = code_blocks(text, "sh")
    return filename[1], code, command.strip(), session


def test_the_own_agent_example_runs_as_written(tmp_path: Path) -> None:
    filename, code, command, session = own_agent_example()
    (tmp_path / filename).write_text(code)
    with serving(command, cwd=tmp_path) as server:
        events = sse_events(run_session(session, server.port, tmp_path))
    assert "".join(e["data"]["text"] for e in events if e["type"] == "text") == "HELLO"
    assert events[-1]["type"] == "status" and events[-1]["data"]["status"] == "completed"


def test_the_own_agent_example_with_a_typo_refuses_as_the_readme_shows(tmp_path: Path) -> None:
    filename, code, command, _ = own_agent_example()
    [shown] = code_blocks(sections()["Your own agents"], "")
    (tmp_path / filename).write_text(code.replace("@register(", "@registr("))
    result = subprocess.run(
        command_argv(command),
        cwd=tmp_path,
        env=user_environment(RUNCAST_PORT="0"),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr == shown
    assert "listening" not in result.stdout
    assert not (tmp_path / "runcast.db").exists()


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_the_own_agent_file_is_served_by_its_path_from_elsewhere(
    tmp_path: Path, where: str
) -> None:
    """``--agents path/to/my_agents.py``, from another directory."""
    filename, code, command, session = own_agent_example()
    (tmp_path / "agents").mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "agents" / filename
    path.write_text(code)
    given = f"../agents/{filename}" if where == "relative" else str(path)
    command = command.replace("--agents my_agents", f"--agents {shlex.quote(given)}")
    assert given in command
    with serving(command, cwd=tmp_path / "elsewhere") as server:
        events = sse_events(run_session(session, server.port, tmp_path))
    assert "".join(e["data"]["text"] for e in events if e["type"] == "text") == "HELLO"


def test_the_langgraph_example_plans_asks_and_finishes(tmp_path: Path) -> None:
    """ "Use a LangGraph graph": planner.py as written, served with the command given,
    waits for approval at interrupt() and completes with the answer in its state."""
    text = sections()["Use a LangGraph graph"]
    [code] = code_blocks(text, "python")
    command = re.search(r"`(runcast serve --agents planner)`", text)
    assert command is not None
    (tmp_path / "planner.py").write_text(code)
    with (
        serving(command[1], cwd=tmp_path) as server,
        httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=10) as http,
    ):
        run = http.post("/api/runs", json={"agent": "planner", "input": {}}).json()
        run_id = run["run_id"]
        with http.stream(
            "GET", f"/api/runs/{run_id}/events", headers={"Accept": "text/event-stream"}
        ) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: input_required"):
                    break
        state = http.get(f"/api/runs/{run_id}/snapshot").json()["state"]
        assert state["data"]["steps"] == ["write", "test", "release"]
        request_id = state["pending_input"]["request_id"]
        answer = http.post(
            f"/api/runs/{run_id}/respond", json={"request_id": request_id, "value": "yes"}
        )
        assert answer.status_code == 200, answer.text
        events = sse_events(
            http.get(f"/api/runs/{run_id}/events", headers={"Accept": "text/event-stream"}).text
        )
    assert events[-1]["type"] == "status" and events[-1]["data"]["status"] == "completed"
    assert [e["data"] for e in events if e["type"] == "state"][-1] == {"approved": "yes"}


def test_the_own_model_example_names_real_flags() -> None:
    text = sections()["Use your own model"]
    [command] = code_blocks(text, "sh")
    argv = command_argv(command)
    parsed = build_parser().parse_args(argv[argv.index("serve") :])
    assert (parsed.openai_base_url, parsed.openai_model) == (
        "http://localhost:11434/v1",
        "llama3.2",
    )
    [tool_code] = code_blocks(text, "python")
    exec(compile(tool_code, "README tool example", "exec"), {})
    # The decorator put it among the tools the built-in agent offers the model.
    assert default_tools.get("weather") is not None
