"""The ``openai`` agent: the real SDK against a real OpenAI-compatible server on loopback
(tests/agents/upstream.py), run by a real RunManager on SQLite, and once by a real server.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.agents import openai as agent_module
from app.agents.context import RunContext
from app.agents.openai import (
    OpenAIAgent,
    OpenAIInput,
    ToolError,
    Tools,
    build_messages,
    register_openai,
)
from app.agents.registry import Registry
from app.config import Settings
from app.core.events import JsonObject, RunStatus
from app.engine.manager import EngineSettings, RunManager
from app.engine.run import LiveRun
from app.errors import AgentError
from app.store.sqlite import SqliteStore
from tests.agents.upstream import (
    Cut,
    FakeUpstream,
    Hold,
    Reply,
    answer,
    content,
    error,
    finish,
    reasoning,
    role,
    tool_delta,
    usage,
)

pytestmark = pytest.mark.timeout(20)

KEY = "sk-test-0123456789abcdef"
# From stop to the upstream seeing its connection closed: generous for a busy 2-core CI
# machine; measured at about a millisecond (the note of issue 13).
STOP_BOUND_S = 0.5

Start = Callable[..., Awaitable[LiveRun]]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as server:
        yield server


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[RunManager]:
    """A real RunManager on SQLite; its agents are added by ``start``."""
    store = SqliteStore(tmp_path / "runcast.db")
    manager = RunManager(store, Registry(), EngineSettings(stop_grace_s=1.0, linger_s=60.0))
    await manager.open()
    try:
        yield manager
    finally:
        async with asyncio.timeout(10):
            await manager.close()
            await store.close()


@pytest.fixture
def start(manager: RunManager, upstream: FakeUpstream) -> Start:
    """``await start(input, **agent options)``: a run of an OpenAIAgent on the upstream
    (short timeouts and backoff unless told otherwise)."""

    async def go(input: JsonObject | None = None, **options: Any) -> LiveRun:
        options = {"api_key": KEY, "timeout_s": 2.0, "backoff_s": 0.01, **options}
        agent = OpenAIAgent(upstream.base_url, "test-model", **options)
        registry = manager.agents
        assert isinstance(registry, Registry)
        registry.add("openai", agent, input_model=OpenAIInput)
        return await manager.start("openai", input if input is not None else {"prompt": "hi"})

    return go


async def ended(run: LiveRun, timeout_s: float = 10.0) -> LiveRun:
    async with asyncio.timeout(timeout_s):
        await run.wait_ended()
    return run


def events(run: LiveRun) -> list[tuple[str, JsonObject]]:
    return [(event.type, event.data) for event in run.read_after(0)]


def emitted(run: LiveRun) -> list[tuple[str, JsonObject]]:
    """The agent's own events: not the status ones."""
    return [(t, d) for t, d in events(run) if t != "status"]


def error_of(run: LiveRun) -> JsonObject:
    assert run.status == RunStatus.FAILED, events(run)
    error: JsonObject = run.state["error"]
    return error


# -- streaming --------------------------------------------------------------------------------


async def test_streams_text_thinking_and_usage(start: Start, upstream: FakeUpstream) -> None:
    upstream.script(
        Reply(
            [
                role(),
                reasoning("Let me"),
                reasoning(" think.", key="reasoning"),  # Ollama's and OpenRouter's name
                content("Hel"),
                content("lo"),
                content("!"),
                finish(),
                usage(11, 3),
            ]
        )
    )
    run = await ended(
        await start({"prompt": "Say hello", "system": "Be brief.", "temperature": 0.5})
    )
    assert run.status == RunStatus.COMPLETED, events(run)
    assert emitted(run) == [
        ("thinking", {"text": "Let me"}),
        ("thinking", {"text": " think."}),
        ("text", {"text": "Hel"}),
        ("text", {"text": "lo"}),
        ("text", {"text": "!"}),
        ("usage", {"input_tokens": 11, "output_tokens": 3}),
    ]
    assert run.state["message"]["content"] == "Hello!"
    assert run.state["message"]["thinking"] == "Let me think."
    assert run.state["usage"] == {"input_tokens": 11, "output_tokens": 3}

    (request,) = upstream.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body == {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hello"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.5,
    }
    # One connection, closed with the run's client.
    await upstream.until(lambda: upstream.connections[0].closed_at is not None)
    assert not upstream.connections[0].cut_short


async def test_max_tokens_and_no_key(start: Start, upstream: FakeUpstream) -> None:
    upstream.script(answer("ok"))
    run = await ended(await start({"prompt": "hi", "max_tokens": 7}, api_key=None))
    assert run.status == RunStatus.COMPLETED
    (request,) = upstream.requests
    assert request.body["max_tokens"] == 7
    assert "temperature" not in request.body
    # A local server needs no key: a placeholder is sent, never another variable's key.
    assert request.headers["authorization"] == "Bearer no-key"


async def test_thread_history_becomes_the_messages() -> None:
    history: list[JsonObject] = [
        {"role": "user", "content": "first", "turn_id": "t1"},
        {"role": "assistant", "content": "answer", "turn_id": "t2", "run_id": "r"},
        {"role": "assistant", "content": "", "turn_id": "t3"},  # a stopped run's
        {"role": "user", "content": "second", "turn_id": "t4"},
    ]
    assert build_messages({"content": "second", "system": "S"}, history) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "second"},
    ]
    assert build_messages({"content": "alone"}, []) == [{"role": "user", "content": "alone"}]
    for input, past in (({}, []), ({"system": "S"}, []), ({}, [history[1]])):
        with pytest.raises(AgentError) as caught:
            build_messages(input, past)
        assert caught.value.code == "bad_request"


async def test_a_run_with_nothing_to_answer_fails_without_a_request(
    start: Start, upstream: FakeUpstream
) -> None:
    run = await ended(await start({"system": "Be brief."}))
    assert error_of(run)["code"] == "bad_request"
    assert upstream.requests == []


# -- tools --------------------------------------------------------------------------------------


async def weather(city: str, unit: str = "C") -> dict[str, Any]:
    """The weather in a city.

    More text the model does not need.
    """
    await asyncio.sleep(0)
    return {"city": city, "temp": 21, "unit": unit}


def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


def refuse(reason: str) -> None:
    """Always refuses."""
    raise ToolError(f"refused: {reason}")


def crash() -> None:
    """Always crashes."""
    raise RuntimeError("secret detail of the crash")


def test_tools_describe_their_functions() -> None:
    tools = Tools([weather, add])
    schema = tools.get("weather")
    assert schema is not None
    assert schema.schema() == {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"title": "City", "type": "string"},
                    "unit": {"default": "C", "title": "Unit", "type": "string"},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    assert [tool.name for tool in tools] == ["weather", "add"] and len(tools) == 2

    @tools.tool(name="plus", description="Adds.")
    def plus(a: int, b: int) -> int:
        return a + b

    @tools.tool
    def bare() -> str:
        return "x"

    assert plus(1, 2) == 3 and bare() == "x"
    plus_tool = tools.get("plus")
    assert plus_tool is not None and plus_tool.description == "Adds."
    assert tools.get("bare") is not None and tools.get("missing") is None

    def spread(*args: int) -> None:
        pass

    with pytest.raises(ValueError, match="named arguments only"):
        tools.add(spread)
    with pytest.raises(ValueError, match=r"1\.\.64"):
        tools.add(add, name="no spaces")


async def test_tool_calls_are_assembled_run_and_answered(
    start: Start, upstream: FakeUpstream
) -> None:
    upstream.script(
        Reply(
            [
                role(),
                content("Checking."),
                # Two calls, each split across chunks, the JSON cut mid-token.
                tool_delta(0, id="call_a", name="weather", arguments='{"ci'),
                tool_delta(0, arguments='ty": "Par'),
                tool_delta(1, id="call_b", name="add", arguments='{"a": 2,'),
                tool_delta(0, arguments='is"}'),
                tool_delta(1, arguments=' "b": 40}'),
                finish("tool_calls"),
                usage(20, 9),
            ]
        ),
        answer("Paris is 21 C; 2 + 40 = 42.", prompt_tokens=40, completion_tokens=12),
    )
    run = await ended(await start({"prompt": "weather and sum"}, tools=Tools([weather, add])))
    assert run.status == RunStatus.COMPLETED, events(run)
    assert emitted(run) == [
        ("text", {"text": "Checking."}),
        ("usage", {"input_tokens": 20, "output_tokens": 9}),
        ("tool_call", {"id": "call_a", "name": "weather", "args": {"city": "Paris"}}),
        ("tool_call", {"id": "call_b", "name": "add", "args": {"a": 2, "b": 40}}),
        ("tool_result", {"id": "call_a", "output": {"city": "Paris", "temp": 21, "unit": "C"}}),
        ("tool_result", {"id": "call_b", "output": 42}),
        ("text", {"text": "\n\nParis is 21 C; 2 + 40 = 42."}),
        ("usage", {"input_tokens": 40, "output_tokens": 12}),
    ]
    assert run.state["message"]["content"] == "Checking.\n\nParis is 21 C; 2 + 40 = 42."
    assert [tool["status"] for tool in run.state["message"]["tools"]] == ["completed"] * 2
    assert run.state["usage"] == {"input_tokens": 60, "output_tokens": 21}

    first, second = upstream.requests
    assert [tool["function"]["name"] for tool in first.body["tools"]] == ["weather", "add"]
    assert second.body["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 40}'},
                },
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_a",
            "content": '{"city": "Paris", "temp": 21, "unit": "C"}',
        },
        {"role": "tool", "tool_call_id": "call_b", "content": "42"},
    ]


async def test_tool_failures_go_back_to_the_model(
    start: Start, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    calls = [
        ("c1", "missing", "{}"),
        ("c2", "add", '{"a": "x", "b": 1}'),
        ("c3", "add", "[1, 2]"),
        ("c4", "refuse", '{"reason": "no"}'),
        ("c5", "crash", ""),
    ]
    upstream.script(
        Reply(
            [
                role(),
                *(
                    tool_delta(i, id=id, name=name, arguments=args)
                    for i, (id, name, args) in enumerate(calls)
                ),
                finish("tool_calls"),
            ]
        ),
        answer("Sorry."),
    )
    with caplog.at_level(logging.WARNING, logger="app.agents.openai"):
        run = await ended(await start(tools=Tools([add, refuse, crash])))
    assert run.status == RunStatus.COMPLETED, events(run)
    results = {d["id"]: d["error"] for t, d in emitted(run) if t == "tool_result"}
    assert results == {
        "c1": "there is no tool named 'missing'",
        "c2": "invalid arguments: a: Input should be a valid integer, "
        "unable to parse string as an integer",
        "c3": "the arguments are not a JSON object",
        "c4": "refused: no",
        "c5": "the tool failed",
    }
    shown = {d["id"]: d["args"] for t, d in emitted(run) if t == "tool_call"}
    assert shown["c3"] == {"_raw": "[1, 2]"} and shown["c5"] == {}
    assert "secret detail of the crash" in caplog.text  # the log has it; clients do not
    assert "secret detail" not in json.dumps(events(run))
    tool_messages = [m for m in upstream.requests[1].body["messages"] if m["role"] == "tool"]
    assert json.loads(tool_messages[3]["content"]) == {"error": "refused: no"}


async def test_tool_rounds_are_bounded(start: Start, upstream: FakeUpstream) -> None:
    def again() -> Reply:
        return Reply(
            [role(), tool_delta(0, id="c", name="add", arguments='{"a":1,"b":1}'), finish()]
        )

    upstream.script(again(), again(), again())
    run = await ended(await start(tools=Tools([add]), max_tool_rounds=2))
    assert error_of(run) == {
        "code": "tool_rounds_exceeded",
        "message": "the model asked for tools 3 times in a row; the limit is 2",
    }
    assert len(upstream.requests) == 3
    assert [t for t, _ in emitted(run)].count("tool_result") == 2


async def test_the_builtin_agent_offers_the_default_tools(
    start: Start, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    tools = Tools()
    monkeypatch.setattr(agent_module, "default_tools", tools)
    tools.tool(add)  # registered after the agent was made: read at each run
    upstream.script(answer("ok"))
    run = await ended(await start())
    assert run.status == RunStatus.COMPLETED
    assert [t["function"]["name"] for t in upstream.requests[0].body["tools"]] == ["add"]


# -- upstream errors ------------------------------------------------------------------------------


async def test_401_fails_at_once_and_never_shows_the_key(
    start: Start, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.script(error(401, f"Incorrect API key provided: {KEY}."))
    with caplog.at_level(logging.DEBUG):
        run = await ended(await start())
    assert error_of(run) == {
        "code": "upstream_unauthorized",
        "message": "the upstream endpoint refused the key (HTTP 401); check RUNCAST_OPENAI_API_KEY",
    }
    assert len(upstream.requests) == 1
    assert KEY not in json.dumps(events(run))
    assert KEY not in caplog.text


async def test_429_is_retried_after_retry_after(start: Start, upstream: FakeUpstream) -> None:
    upstream.script(error(429, "slow down", **{"retry-after": "0.2"}), answer("fine"))
    loop = asyncio.get_running_loop()
    began = loop.time()
    run = await ended(await start())
    assert run.status == RunStatus.COMPLETED, events(run)
    assert len(upstream.requests) == 2
    assert loop.time() - began >= 0.2
    assert emitted(run)[0] == (
        "upstream_retry",
        {"attempt": 2, "code": "upstream_rate_limited", "delay_s": 0.2},
    )
    assert run.state["message"]["content"] == "fine"


async def test_429_asking_for_more_than_the_cap_fails_at_once(
    start: Start, upstream: FakeUpstream
) -> None:
    upstream.script(error(429, "quota", **{"retry-after": "3600"}))
    run = await ended(await start(max_backoff_s=5.0))
    assert error_of(run) == {
        "code": "upstream_rate_limited",
        "message": "the upstream endpoint is rate limiting (HTTP 429); "
        "it asked to retry after 3600 s",
    }
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_is_retried_with_bounded_attempts(
    start: Start, upstream: FakeUpstream, status: int
) -> None:
    upstream.script(*(error(status, "overloaded") for _ in range(3)))
    run = await ended(await start(max_attempts=3))
    assert error_of(run) == {
        "code": "upstream_error",
        "message": f"the upstream endpoint failed (HTTP {status}): overloaded; "
        "gave up after 3 attempts",
    }
    assert len(upstream.requests) == 3
    assert [d["attempt"] for t, d in emitted(run) if t == "upstream_retry"] == [2, 3]


async def test_a_5xx_then_an_answer_completes(start: Start, upstream: FakeUpstream) -> None:
    upstream.script(error(503, "busy"), answer("Hi"))
    run = await ended(await start())
    assert run.status == RunStatus.COMPLETED
    assert run.state["message"]["content"] == "Hi"


async def test_other_4xx_is_not_retried_and_says_why(start: Start, upstream: FakeUpstream) -> None:
    upstream.script(error(404, "model 'test-model' not found, try pulling it first"))
    run = await ended(await start())
    assert error_of(run) == {
        "code": "upstream_rejected",
        "message": "the upstream endpoint refused the request (HTTP 404): "
        "model 'test-model' not found, try pulling it first",
    }
    assert len(upstream.requests) == 1


async def test_a_hang_times_out_after_bounded_attempts(
    start: Start, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(hang=True), Reply(hang=True))
    run = await ended(await start(timeout_s=0.2, max_attempts=2))
    assert error_of(run) == {
        "code": "upstream_timeout",
        "message": "the upstream endpoint sent nothing for 0.2 s; gave up after 2 attempts",
    }
    assert len(upstream.requests) == 2


async def test_a_hang_mid_answer_times_out_without_a_retry(
    start: Start, upstream: FakeUpstream
) -> None:
    upstream.script(Reply([role(), content("Half an"), Hold()]), answer("never asked for"))
    run = await ended(await start(timeout_s=0.2))
    assert error_of(run) == {
        "code": "upstream_timeout",
        "message": "the upstream endpoint sent nothing for 0.2 s",
    }
    assert len(upstream.requests) == 1
    assert run.state["message"]["content"] == "Half an"


async def test_a_cut_mid_answer_fails_without_a_retry(start: Start, upstream: FakeUpstream) -> None:
    upstream.script(Reply([role(), content("Half an"), Cut()]), answer("never asked for"))
    run = await ended(await start())
    assert error_of(run) == {
        "code": "upstream_cut",
        "message": "the upstream stream broke off mid-answer",
    }
    assert len(upstream.requests) == 1
    assert run.state["message"]["content"] == "Half an"


async def test_a_clean_end_without_a_finish_is_a_cut(start: Start, upstream: FakeUpstream) -> None:
    upstream.script(Reply([role(), content("Half an")]))  # [DONE], but no finish_reason
    run = await ended(await start())
    assert error_of(run)["code"] == "upstream_cut"


async def test_a_cut_before_the_first_token_is_retried(
    start: Start, upstream: FakeUpstream
) -> None:
    # A partial tool call is not shown to anyone yet: retrying repeats nothing.
    upstream.script(
        Reply([role(), tool_delta(0, id="c", name="add", arguments='{"a"'), Cut()]),
        answer("Whole."),
    )
    run = await ended(await start())
    assert run.status == RunStatus.COMPLETED, events(run)
    assert [t for t, _ in emitted(run)] == ["upstream_retry", "text", "usage"]
    assert run.state["message"]["content"] == "Whole."


async def test_an_error_event_mid_stream(start: Start, upstream: FakeUpstream) -> None:
    upstream.script(
        Reply([role(), content("Par"), {"error": {"message": "model crashed", "type": "x"}}])
    )
    run = await ended(await start())
    assert error_of(run) == {
        "code": "upstream_error",
        "message": "the upstream endpoint reported an error mid-stream: model crashed",
    }


async def test_an_unreachable_endpoint(manager: RunManager) -> None:
    # A port nothing listens on: bind one, then close it.
    async with FakeUpstream() as gone:
        base_url = gone.base_url
    registry = manager.agents
    assert isinstance(registry, Registry)
    registry.add("openai", OpenAIAgent(base_url, "m", max_attempts=2, backoff_s=0.01))
    run = await ended(await manager.start("openai", {"prompt": "hi"}))
    assert error_of(run) == {
        "code": "upstream_unreachable",
        "message": "could not connect to the upstream endpoint; gave up after 2 attempts",
    }


# -- stop -----------------------------------------------------------------------------------------


async def test_stop_closes_the_upstream_connection_at_once(
    manager: RunManager, start: Start, upstream: FakeUpstream
) -> None:
    upstream.script(Reply([role(), content("Once upon"), Hold(), content(" a time")]))
    run = await start()
    async with asyncio.timeout(5):
        while run.state["message"]["content"] != "Once upon":
            await run.wait_after(run.last_index)
    loop = asyncio.get_running_loop()
    stopped_at = loop.time()
    assert manager.stop(run, by="test")["stopping"] is True
    async with asyncio.timeout(STOP_BOUND_S):
        await upstream.until(lambda: upstream.connections[0].closed_at is not None)
    connection = upstream.connections[0]
    assert connection.closed_at is not None
    assert connection.cut_short  # closed by the client mid-reply, not read to the end
    assert connection.closed_at - stopped_at < STOP_BOUND_S
    await ended(run)
    assert run.status == RunStatus.STOPPED
    assert run.state["message"]["content"] == "Once upon"


async def test_stop_before_the_answer_starts_closes_the_connection(
    manager: RunManager, start: Start, upstream: FakeUpstream
) -> None:
    upstream.script(Reply(hang=True))
    run = await start(timeout_s=30.0)
    async with asyncio.timeout(5):
        await upstream.until(lambda: len(upstream.requests) == 1)
    manager.stop(run)
    async with asyncio.timeout(STOP_BOUND_S):
        await upstream.until(lambda: upstream.connections[0].closed_at is not None)
    await ended(run)
    assert run.status == RunStatus.STOPPED


async def test_stop_during_a_retry_wait(
    manager: RunManager, start: Start, upstream: FakeUpstream
) -> None:
    upstream.script(error(503, "busy"))
    run = await start(backoff_s=30.0, max_backoff_s=60.0)
    async with asyncio.timeout(5):
        while not any(t == "upstream_retry" for t, _ in events(run)):
            await run.wait_after(run.last_index)
    manager.stop(run)
    await ended(run, timeout_s=2.0)
    assert run.status == RunStatus.STOPPED
    assert len(upstream.requests) == 1


# -- configuration and a real server --------------------------------------------------------------


def test_register_openai_only_when_configured() -> None:
    registry = Registry()
    assert not register_openai(registry, Settings())
    assert not register_openai(registry, Settings(openai_model="m"))
    assert "openai" not in registry
    settings = Settings(openai_base_url="http://127.0.0.1:9/v1", openai_model="m")
    assert register_openai(registry, settings, {"RUNCAST_OPENAI_API_KEY": KEY})
    agent = registry.get("openai")
    assert isinstance(agent.fn, OpenAIAgent)
    assert KEY not in repr(agent.fn) and KEY not in repr(settings)
    schema = agent.describe()["input_schema"]
    assert set(schema["properties"]) == {"content", "prompt", "system", "temperature", "max_tokens"}


def test_settings_read_the_openai_variables_but_not_the_key() -> None:
    env = {
        "RUNCAST_OPENAI_BASE_URL": "http://localhost:11434/v1",
        "RUNCAST_OPENAI_MODEL": "llama3.2",
        "RUNCAST_OPENAI_API_KEY": KEY,
    }
    settings = Settings.from_env(env=env)
    assert (settings.openai_base_url, settings.openai_model) == (
        "http://localhost:11434/v1",
        "llama3.2",
    )
    assert KEY not in repr(settings) and KEY not in settings.model_dump_json()
    assert Settings.from_env(env={"RUNCAST_OPENAI_BASE_URL": ""}).openai_base_url is None
    with pytest.raises(ValueError, match="http"):
        Settings(openai_base_url="localhost:11434")


async def test_a_real_server_runs_the_openai_agent_in_a_thread_and_stops_it(
    server_factory: Any, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A registry of its own, so that no later test finds an "openai" agent it did not ask for.
    monkeypatch.setattr("app.transport.app.default_registry", Registry())
    monkeypatch.setenv("RUNCAST_OPENAI_API_KEY", KEY)
    server = await server_factory(openai_base_url=upstream.base_url, openai_model="test-model")
    manager = server.runtime.manager
    upstream.script(
        answer("Hello, Ada."),
        Reply([role(), content("Your name"), Hold()]),
    )
    async with httpx.AsyncClient(base_url=server.http_url, timeout=5) as http:
        agents = (await http.get("/api/agents")).json()["agents"]
        assert "openai" in [agent["name"] for agent in agents]
        thread = (await http.post("/api/threads", json={})).json()
        send = f"/api/threads/{thread['thread_id']}/messages"
        first = (await http.post(send, json={"content": "I am Ada", "agent": "openai"})).json()
        run = await ended(await manager.get(first["run"]["run_id"]))
        assert run.status == RunStatus.COMPLETED

        second = (await http.post(send, json={"content": "My name?", "agent": "openai"})).json()
        run = await manager.get(second["run"]["run_id"])
        async with asyncio.timeout(5):
            while not run.state["message"]["content"]:
                await run.wait_after(run.last_index)
        stopped_at = asyncio.get_running_loop().time()
        reply = await http.post(f"/api/runs/{run.run_id}/stop")
        assert reply.json()["stopping"] is True
        async with asyncio.timeout(STOP_BOUND_S):
            await upstream.until(lambda: upstream.connections[-1].closed_at is not None)
        closed_at = upstream.connections[-1].closed_at
        assert closed_at is not None and closed_at - stopped_at < STOP_BOUND_S
        await ended(run)
        assert run.status == RunStatus.STOPPED

    assert upstream.requests[1].headers["authorization"] == f"Bearer {KEY}"
    assert upstream.requests[1].body["messages"] == [
        {"role": "user", "content": "I am Ada"},
        {"role": "assistant", "content": "Hello, Ada."},
        {"role": "user", "content": "My name?"},
    ]


async def test_the_agent_runs_on_a_bare_context(upstream: FakeUpstream) -> None:
    """No manager: what an agent author's own test would do."""
    upstream.script(answer("x"))
    run = LiveRun(
        run_id="run_1", thread_id="thr_1", agent="openai", input={}, epoch="e", created_at=1.0
    )
    run.append("status", {"status": "running"})
    agent = OpenAIAgent(upstream.base_url, "m")
    history = [{"role": "user", "content": "from the thread"}]
    async with asyncio.timeout(5):
        await agent(RunContext(run, history))
    assert run.state["message"]["content"] == "x"
    assert upstream.requests[0].body["messages"] == history
