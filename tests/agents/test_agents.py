"""Built-in agents, RunContext and the registry, driven on a LiveRun with no manager."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from app.agents import AgentError
from app.agents.builtin import _WORDS, ask, counter, demo, echo, register_builtins
from app.agents.context import RunContext
from app.agents.registry import AnyInput, Registry
from app.core import events as ev
from app.core.events import JsonObject, RunStatus
from app.engine.run import LiveRun, Retention
from app.errors import BadRequestError, PayloadTooLargeError, UnknownAgentError
from tests.fakes import ManualClock, settle, until

pytestmark = pytest.mark.timeout(10)


def running(input: JsonObject) -> LiveRun:
    """A run in status ``running`` (index 1), as the manager hands it to an agent."""
    run = LiveRun(
        run_id="run_1",
        thread_id="thr_1",
        agent="test",
        input=input,
        epoch="e1",
        created_at=1.0,
    )
    run.append(ev.STATUS, ev.status_data(RunStatus.RUNNING))
    return run


def emitted(run: LiveRun) -> list[tuple[str, JsonObject]]:
    """What the agent emitted: every event after the initial status."""
    return [(e.type, e.data) for e in run.read_after(1)]


def validated(agent: str, input: JsonObject) -> JsonObject:
    registry = Registry()
    register_builtins(registry)
    return registry.get(agent).validate_input(input)


# -- counter -----------------------------------------------------------------------------


async def test_counter_emits_n_ticks() -> None:
    run = running(validated("counter", {"n": 5}))
    async with asyncio.timeout(2):
        await counter(RunContext(run))
    assert emitted(run) == [("tick", {"n": k}) for k in range(1, 6)]


async def test_counter_with_zero_ticks_emits_nothing() -> None:
    run = running(validated("counter", {"n": 0}))
    async with asyncio.timeout(2):
        await counter(RunContext(run))
    assert emitted(run) == []


async def test_counter_with_delays() -> None:
    run = running(validated("counter", {"n": 3, "delay_s": 0.001, "start_delay_s": 0.001}))
    async with asyncio.timeout(2):
        await counter(RunContext(run))
    assert emitted(run) == [("tick", {"n": k}) for k in range(1, 4)]


async def test_a_fast_agent_lets_readers_run_while_it_emits() -> None:
    run = running(validated("counter", {"n": 2500}))  # more than one yield's worth
    seen: list[int] = []

    async def reader() -> None:
        await run.wait_after(1)
        seen.append(run.last_index)

    reading = asyncio.create_task(reader())
    await settle()
    async with asyncio.timeout(2):
        await counter(RunContext(run))
        await reading
    assert run.last_index == 2501
    assert seen and seen[0] < 2501, "the reader woke before the agent was done"


# -- demo ----------------------------------------------------------------------------------


async def test_demo_thinks_calls_a_tool_and_streams_text() -> None:
    input = validated("demo", {"prompt": "what is it", "tokens": 5, "speed": 10_000})
    run = running(input)
    async with asyncio.timeout(2):
        await demo(RunContext(run))

    types = [t for t, _ in emitted(run)]
    assert types == ["thinking"] * 3 + ["tool_call", "tool_result", "usage"] + ["text"] * 5 + [
        "usage"
    ]
    state = run.state
    assert state["message"]["thinking"] == "Reading the question and planning an answer."
    assert state["message"]["content"] == " ".join(_WORDS[:5])
    assert state["message"]["tools"] == [
        {
            "id": "call_1",
            "name": "search",
            "args": {"query": "what is it"},
            "status": "completed",
            "output": {"hits": 3, "top": "runcast design notes"},
        }
    ]
    assert state["usage"] == {"input_tokens": 3 + 12, "output_tokens": 5}


async def test_demo_defaults() -> None:
    assert validated("demo", {}) == {
        "prompt": "Tell me about runcast.",
        "tokens": 60,
        "speed": 30.0,
    }


# -- ask -----------------------------------------------------------------------------------


async def test_ask_requests_input_and_answers_with_it() -> None:
    run = running(validated("ask", {"prompt": "Your name?"}))
    task = asyncio.create_task(ask(RunContext(run)))
    async with asyncio.timeout(2):
        await until(run, lambda r: r.status == RunStatus.REQUIRES_ACTION)
    assert run.pending_input is not None
    request_id, answer = run.pending_input
    assert run.state["pending_input"] == {"request_id": request_id, "prompt": "Your name?"}
    assert request_id.startswith("req_") and len(request_id) > 20

    answer.set_result("Ada")  # what RunManager.respond does, after its own appends
    async with asyncio.timeout(2):
        await task
    assert run.pending_input is None
    assert emitted(run)[-1] == ("text", {"text": "You said: Ada"})


async def test_request_input_carries_a_schema_and_a_cancel_clears_it() -> None:
    run = running({})
    ctx = RunContext(run)
    schema = {"type": "string"}
    task = asyncio.create_task(ctx.request_input("pick", schema=schema))
    async with asyncio.timeout(2):
        await until(run, lambda r: r.pending_input is not None)
    assert run.state["pending_input"]["schema"] == schema
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert run.pending_input is None


# -- echo ----------------------------------------------------------------------------------


async def test_echo_answers_with_its_input_text() -> None:
    run = running(validated("echo", {"text": "hello there"}))
    async with asyncio.timeout(2):
        await echo(RunContext(run))
    assert emitted(run) == [("state", {"history": []}), ("text", {"text": "hello there"})]
    assert run.state["data"] == {"history": []}


async def test_echo_answers_with_the_last_user_turn_of_its_history() -> None:
    history = [
        {"role": "user", "content": "first", "turn_id": "t1"},
        {"role": "assistant", "content": "answer", "turn_id": "t2"},
        {"role": "user", "content": "second", "turn_id": "t3"},
    ]
    run = running(validated("echo", {}))
    async with asyncio.timeout(2):
        await echo(RunContext(run, history))
    assert run.state["message"]["content"] == "second"
    assert run.state["data"]["history"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "second"},
    ]


async def test_echo_with_nothing_to_echo_answers_empty() -> None:
    run = running({})
    async with asyncio.timeout(2):
        await echo(RunContext(run, [{"role": "assistant", "content": "hi"}]))
    assert emitted(run)[-1] == ("text", {"text": ""})


# -- RunContext ---------------------------------------------------------------------------


async def test_context_helpers_emit_standard_events() -> None:
    run = running({"a": 1})
    ctx = RunContext(run)
    assert (ctx.run_id, ctx.thread_id, ctx.input, ctx.history) == ("run_1", "thr_1", {"a": 1}, [])
    assert await ctx.text("hi") == 2
    assert await ctx.thinking("hmm") == 3
    assert await ctx.tool_call("c1", "calc") == 4
    assert await ctx.tool_result("c1", error="division by zero") == 5
    assert await ctx.usage(input_tokens=2, cost=0.5) == 6
    assert await ctx.state({"k": {"x": 1}}) == 7
    assert await ctx.state({"k": {"y": 2}}) == 8
    assert await ctx.emit("custom") == 9
    assert emitted(run)[2:4] == [
        ("tool_call", {"id": "c1", "name": "calc", "args": {}}),
        ("tool_result", {"id": "c1", "error": "division by zero"}),
    ]
    assert emitted(run)[-1] == ("custom", {})
    assert run.state["message"]["tools"][0]["status"] == "failed"
    assert run.state["usage"] == {"input_tokens": 2, "cost": 0.5}
    assert run.state["data"] == {"k": {"x": 1, "y": 2}}


@pytest.mark.parametrize(
    ("type", "data", "error"),
    [
        ("status", {"status": "completed"}, ValueError),
        ("", {}, ValueError),
        ("x" * (ev.MAX_TYPE_LENGTH + 1), {}, ValueError),
        ("tick\n", {}, ValueError),  # would break SSE framing
        ("a\nevent: status", {}, ValueError),
        ("a b", {}, ValueError),
        ("é", {}, ValueError),
        ("text", {"text": {1, 2}}, TypeError),  # not JSON
        ("text", "just a string", TypeError),  # data must be an object
        ("tick", [1, 2], TypeError),
    ],
)
async def test_context_refuses_bad_events_and_leaves_the_run_as_it_was(
    type: str, data: Any, error: type[Exception]
) -> None:
    run = running({})
    ctx = RunContext(run)
    before = (run.last_index, repr(run.state))
    with pytest.raises(error):
        await ctx.emit(type, data)
    assert (run.last_index, repr(run.state)) == before
    assert await ctx.emit("x" * ev.MAX_TYPE_LENGTH, {}) == 2  # the longest name is fine
    assert await ctx.emit("a.b:c-d_e", {}) == 3


async def test_emit_of_an_event_over_max_event_bytes_raises_and_appends_nothing() -> None:
    limit = 1_000
    run = LiveRun(
        run_id="run_1",
        thread_id="thr_1",
        agent="test",
        input={},
        epoch="e1",
        created_at=1.0,
        clock=ManualClock(1.0),
        retention=Retention(max_event_bytes=limit),
    )
    run.append(ev.STATUS, ev.status_data(RunStatus.RUNNING))
    ctx = RunContext(run)
    overhead = len(ev.Event(2, "text", {"text": ""}, 1.0).json)
    before = (run.last_index, repr(run.state), run.backlog)
    with pytest.raises(PayloadTooLargeError) as caught:
        await ctx.text("x" * (limit - overhead + 1))
    assert caught.value.details == {"field": "data"}
    assert f"{limit + 1} bytes" in caught.value.message
    # Counted in UTF-8 bytes, not characters: "é" is two.
    with pytest.raises(PayloadTooLargeError):
        await ctx.text("é" * ((limit - overhead) // 2 + 1))
    assert (run.last_index, repr(run.state), run.backlog) == before
    assert await ctx.text("x" * (limit - overhead)) == 2  # exactly at the limit is fine
    assert await ctx.text("é" * ((limit - overhead) // 2)) == 3
    assert len(run.read_after(2)[0].json.encode()) <= limit


def test_agent_error_is_exported_with_a_code_per_instance() -> None:
    error = AgentError("quota_exceeded", "the quota is used up")
    assert (error.code, error.message) == ("quota_exceeded", "the quota is used up")
    assert error.to_dict() == {"code": "quota_exceeded", "message": "the quota is used up"}
    assert AgentError("other", "x").code == "other" and error.code == "quota_exceeded"


# -- the registry ----------------------------------------------------------------------------


class _NeedsName(BaseModel):
    name: str
    size: int = 1


async def _documented(ctx: RunContext) -> None:
    """Says hello.

    More text.
    """


def test_registry_describes_its_agents() -> None:
    registry = Registry()
    register_builtins(registry)
    assert [agent.name for agent in registry.all()] == ["ask", "counter", "demo", "echo"]
    assert "counter" in registry and "nope" not in registry
    for agent in registry.all():
        described = agent.describe()
        assert described["name"] == agent.name
        assert described["description"]
        schema = described["input_schema"]
        assert schema["type"] == "object" and "properties" in schema
    counter_schema = registry.get("counter").describe()["input_schema"]
    assert counter_schema["required"] == ["n"]
    assert set(counter_schema["properties"]) == {"n", "delay_s", "start_delay_s"}
    assert counter_schema["additionalProperties"] is False


def test_registry_add_and_register() -> None:
    registry = Registry()
    added = registry.add("doc", _documented)
    assert added.description.startswith("Says hello.")
    assert added.input_model is AnyInput
    assert registry.add("doc2", _documented, description="mine").description == "mine"

    @registry.register("named", input_model=_NeedsName, description="needs a name")
    async def named(ctx: RunContext) -> None:
        pass

    agent = registry.get("named")
    assert agent.fn is named and agent.description == "needs a name"
    assert agent.describe()["input_schema"]["required"] == ["name"]
    with pytest.raises(UnknownAgentError) as caught:
        registry.get("missing")
    assert caught.value.details == {"field": "agent"}


class _AsyncCallable:
    async def __call__(self, ctx: RunContext) -> None:
        pass


def _plain(ctx: RunContext) -> None:
    pass


def test_registry_refuses_an_agent_that_is_not_async() -> None:
    registry = Registry()
    for fn in (_plain, lambda ctx: _documented(ctx), _AsyncCallable, print):
        with pytest.raises(TypeError) as caught:
            registry.add("x", fn)  # type: ignore[arg-type]
        assert str(caught.value) == "agent 'x' must be an async function (async def)"
    with pytest.raises(TypeError, match="agent 'deco' must be an async function"):
        registry.register("deco")(_plain)  # type: ignore[arg-type]
    assert registry.all() == []
    # An object whose __call__ is async is an async function for this purpose.
    assert registry.add("callable", _AsyncCallable()).name == "callable"


@pytest.mark.parametrize(
    ("agent", "input", "field"),
    [
        ("counter", {}, "input.n"),
        ("counter", {"n": "x"}, "input.n"),
        ("counter", {"n": 1, "delay_s": -1}, "input.delay_s"),
        ("counter", {"n": 1, "what": 1}, "input.what"),
        ("demo", {"speed": 0}, "input.speed"),
        ("demo", {"tokens": 1.5}, "input.tokens"),
        ("ask", {"prompt": 3}, "input.prompt"),
        ("echo", {"text": ["a"]}, "input.text"),
    ],
)
def test_validate_input_errors_name_the_field(agent: str, input: JsonObject, field: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        validated(agent, input)
    assert caught.value.details == {"field": field}
    assert field in caught.value.message


def test_validate_input_of_nested_and_open_models() -> None:
    registry = Registry()
    agent = registry.add("open", _documented)
    assert agent.validate_input({"anything": [1, {"x": None}]}) == {"anything": [1, {"x": None}]}
    with pytest.raises(BadRequestError) as caught:
        agent.validate_input([1, 2])  # type: ignore[arg-type]
    assert caught.value.details == {"field": "input"}
    named = registry.add("named", _documented, input_model=_NeedsName)
    assert named.validate_input({"name": "a"}) == {"name": "a", "size": 1}
