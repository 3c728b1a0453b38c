"""The LangGraph adapter: real compiled graphs (langgraph itself, langchain-core's fake chat
model, its ToolNode, interrupt) run by a real RunManager on SQLite."""

from __future__ import annotations

import asyncio
import operator
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import pytest
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import interrupt
from pydantic import BaseModel

from app.agents.context import RunContext
from app.agents.langgraph import graph_agent, graph_input, merge_patch
from app.agents.registry import Registry
from app.core import snapshot
from app.core.events import JsonObject, RunStatus
from app.engine.manager import EngineSettings, RunManager
from app.engine.run import LiveRun
from app.store.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(20)

Start = Callable[..., Awaitable[LiveRun]]


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[RunManager]:
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
def start(manager: RunManager) -> Start:
    """``await start(agent, input)``: a run of ``agent`` on the manager."""

    async def go(agent: Any, input: JsonObject | None = None) -> LiveRun:
        registry = manager.agents
        assert isinstance(registry, Registry)
        registry.add("graph", agent)
        return await manager.start("graph", input or {})

    return go


async def ended(run: LiveRun) -> LiveRun:
    async with asyncio.timeout(10):
        await run.wait_ended()
    return run


async def until(run: LiveRun, predicate: Callable[[LiveRun], bool]) -> None:
    async with asyncio.timeout(5):
        while not predicate(run):
            assert not run.ended, [(e.type, e.data) for e in run.read_after(0)]
            await run.wait_after(run.last_index)


def emitted(run: LiveRun, *types: str) -> list[tuple[str, JsonObject]]:
    return [(e.type, e.data) for e in run.read_after(0) if e.type in types]


# -- graphs -------------------------------------------------------------------------------------


class State(MessagesState):
    step: int
    answer: str
    notes: Annotated[list[str], operator.add]


@tool
def add(a: int, b: int) -> int:
    """Adds two integers."""
    return a + b


@tool
def divide(a: int, b: int) -> float:
    """Divides a by b."""
    return a / b


def assistant_graph() -> Any:
    """A planner (no model: it returns a message with tool calls), real tools, then a fake
    chat model that streams its answer token by token."""
    model = GenericFakeChatModel(messages=iter([AIMessage(content="The sum is 5.")]))

    def plan(state: State) -> JsonObject:
        call = {"id": "call_1", "name": "add", "args": {"a": 2, "b": 3}}
        bad = {"id": "call_2", "name": "divide", "args": {"a": 1, "b": 0}}
        message = AIMessage(content="Adding.", tool_calls=[call, bad], id="plan-1")
        return {"messages": [message], "step": 1, "notes": ["planned"]}

    async def answer(state: State) -> JsonObject:
        message = await model.ainvoke(state["messages"])
        return {"messages": [message], "step": state["step"] + 1, "notes": ["answered"]}

    builder = StateGraph(State)
    builder.add_node("plan", plan)
    builder.add_node("tools", ToolNode([add, divide], handle_tool_errors=True))
    builder.add_node("answer", answer)
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "tools")
    builder.add_edge("tools", "answer")
    builder.add_edge("answer", END)
    return builder.compile()


def asking_graph(schema: Any = None, checkpointer: Any = None) -> Any:
    def ask(state: State) -> JsonObject:
        value = interrupt({"prompt": "Approve the plan?"}, response_schema=schema)
        shown = value if isinstance(value, str) else repr(value)
        return {"answer": shown, "messages": [AIMessage(content=f"You said {shown}.")]}

    builder = StateGraph(State)
    builder.add_node("ask", ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    return builder.compile(checkpointer=checkpointer)


# -- messages and state ----------------------------------------------------------------------------


async def test_messages_tools_and_state_of_a_real_graph(start: Start) -> None:
    run = await ended(await start(graph_agent(assistant_graph()), {"prompt": "2 + 3?"}))
    assert run.status == RunStatus.COMPLETED, [(e.type, e.data) for e in run.read_after(0)]
    failure = "Error: ZeroDivisionError('division by zero')\n Please fix your mistakes."
    assert emitted(run, "text", "tool_call", "tool_result") == [
        ("text", {"text": "Adding."}),
        ("tool_call", {"id": "call_1", "name": "add", "args": {"a": 2, "b": 3}}),
        ("tool_call", {"id": "call_2", "name": "divide", "args": {"a": 1, "b": 0}}),
        ("tool_result", {"id": "call_1", "output": "5"}),
        ("tool_result", {"id": "call_2", "error": failure}),
        # The fake model streams its answer in pieces: each is a text event.
        ("text", {"text": "\n\nThe"}),
        ("text", {"text": " "}),
        ("text", {"text": "sum"}),
        ("text", {"text": " "}),
        ("text", {"text": "is"}),
        ("text", {"text": " "}),
        ("text", {"text": "5."}),
    ]
    state = run.state
    assert state["message"]["content"] == "Adding.\n\nThe sum is 5."
    assert [t["status"] for t in state["message"]["tools"]] == ["completed", "failed"]
    data = state["data"]
    assert data["step"] == 2 and data["notes"] == ["planned", "answered"]
    assert [(m["type"], m["content"]) for m in data["messages"]] == [
        ("human", "2 + 3?"),
        ("ai", "Adding."),
        ("tool", "5"),
        ("tool", failure),
        ("ai", "The sum is 5."),
    ]
    assert data["messages"][1]["tool_calls"][0] == {
        "id": "call_1",
        "name": "add",
        "args": {"a": 2, "b": 3},
    }
    assert data["messages"][2]["tool_call_id"] == "call_1"

    # Each step's state event patches only what changed: the inspector can show the
    # graph's state at any index by folding the log up to it.
    patches = [d for t, d in emitted(run, "state")]
    assert patches[0] == {"messages": [data["messages"][0]], "notes": []}
    assert patches[1].keys() == {"messages", "step", "notes"}
    assert patches[2].keys() == {"messages"}
    events = run.read_after(0)
    first_tool_result = next(e.index for e in events if e.type == "tool_result")
    before = snapshot.fold(events[: first_tool_result - 1])
    assert before["data"]["step"] == 1 and before["data"]["notes"] == ["planned"]


async def test_thinking_from_reasoning_content_and_blocks(start: Start) -> None:
    def think(state: State) -> JsonObject:
        first = AIMessage(
            content="",
            additional_kwargs={"reasoning_content": "Hmm."},
            id="m1",
        )
        second = AIMessage(
            content=[
                {"type": "thinking", "thinking": " Plan."},
                {"type": "reasoning", "reasoning": " More."},
                {"type": "text", "text": "Done"},
                "!",
            ],
            id="m2",
        )
        return {"messages": [first, second]}

    builder = StateGraph(State)
    builder.add_node("think", think)
    builder.add_edge(START, "think")
    run = await ended(await start(graph_agent(builder.compile()), {"prompt": "x"}))
    assert run.status == RunStatus.COMPLETED
    assert run.state["message"]["thinking"] == "Hmm. Plan. More."
    assert run.state["message"]["content"] == "Done!"


async def test_the_history_becomes_the_graph_messages(manager: RunManager) -> None:
    seen: list[Any] = []

    def echo(state: State) -> JsonObject:
        seen.extend((m.type, m.content) for m in state["messages"])
        return {"messages": [AIMessage(content="ok")]}

    builder = StateGraph(State)
    builder.add_node("echo", echo)
    builder.add_edge(START, "echo")
    agent = graph_agent(builder.compile())
    run = LiveRun(
        run_id="run_1",
        thread_id="thr_1",
        agent="graph",
        input={"content": "second"},
        epoch="e",
        created_at=1.0,
    )
    run.append("status", {"status": "running"})
    history = [
        {"role": "user", "content": "first", "turn_id": "t1"},
        {"role": "assistant", "content": "answer", "turn_id": "t2"},
        {"role": "user", "content": "second", "turn_id": "t3"},
    ]
    async with asyncio.timeout(5):
        await agent(RunContext(run, history))
    assert seen == [("human", "first"), ("ai", "answer"), ("human", "second")]
    assert graph_input(RunContext(run)) == {"messages": [{"role": "user", "content": "second"}]}


async def test_a_custom_input_and_a_graph_without_messages(start: Start) -> None:
    class Counter(BaseModel):
        n: int = 0

    def bump(state: Counter) -> JsonObject:
        return {"n": state.n + 1}

    builder = StateGraph(Counter)
    builder.add_node("bump", bump)
    builder.add_edge(START, "bump")
    agent = graph_agent(builder.compile(), input=lambda ctx: {"n": ctx.input["start"]})
    run = await ended(await start(agent, {"start": 40}))
    assert run.status == RunStatus.COMPLETED
    assert [d for _, d in emitted(run, "state")] == [{"n": 40}, {"n": 41}]


# -- interrupt and stop ----------------------------------------------------------------------------


async def test_interrupt_asks_any_client_and_the_answer_resumes_the_graph(
    manager: RunManager, start: Start
) -> None:
    run = await start(graph_agent(asking_graph()), {"prompt": "plan"})
    await until(run, lambda r: r.status == RunStatus.REQUIRES_ACTION)
    pending = run.state["pending_input"]
    assert pending["prompt"] == "Approve the plan?" and "schema" not in pending
    manager.respond(run, pending["request_id"], "yes")
    await ended(run)
    assert run.status == RunStatus.COMPLETED
    assert run.state["data"]["answer"] == "yes"
    assert run.state["message"]["content"] == "You said yes."


class Approval(BaseModel):
    approve: bool


async def test_an_answer_the_schema_refuses_is_asked_for_again(
    manager: RunManager, start: Start
) -> None:
    run = await start(graph_agent(asking_graph(schema=Approval)), {"prompt": "plan"})
    await until(run, lambda r: r.status == RunStatus.REQUIRES_ACTION)
    first = run.state["pending_input"]
    assert first["schema"]["properties"] == {"approve": {"title": "Approve", "type": "boolean"}}
    manager.respond(run, first["request_id"], {"approve": "perhaps"})
    await until(
        run,
        lambda r: r.pending_input is not None and r.pending_input[0] != first["request_id"],
    )
    again = run.state["pending_input"]
    assert again["prompt"] == "That answer did not fit; try again. Approve the plan?"
    manager.respond(run, again["request_id"], {"approve": True})
    await ended(run)
    assert run.status == RunStatus.COMPLETED
    assert run.state["data"]["answer"] == "Approval(approve=True)"


async def test_stop_cancels_the_graph(manager: RunManager, start: Start) -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(state: State) -> JsonObject:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    builder = StateGraph(State)
    builder.add_node("slow", slow)
    builder.add_edge(START, "slow")
    run = await start(graph_agent(builder.compile()), {"prompt": "x"})
    async with asyncio.timeout(5):
        await entered.wait()
    manager.stop(run, by="test")
    async with asyncio.timeout(1):
        await cancelled.wait()
    await ended(run)
    assert run.status == RunStatus.STOPPED


async def test_stop_while_waiting_for_input(manager: RunManager, start: Start) -> None:
    run = await start(graph_agent(asking_graph()), {"prompt": "plan"})
    await until(run, lambda r: r.status == RunStatus.REQUIRES_ACTION)
    manager.stop(run)
    await ended(run)
    assert run.status == RunStatus.STOPPED


async def test_an_owned_checkpointer_forgets_each_run_and_a_given_one_keeps_it() -> None:
    graph = asking_graph()
    agent = graph_agent(graph)  # compiled without a checkpointer
    assert graph.checkpointer is None  # the adapter's copy has one; the graph is untouched
    owned = agent.owned
    assert owned is not None
    kept = InMemorySaver()
    mine = graph_agent(asking_graph(checkpointer=kept), config={"recursion_limit": 5})
    assert mine.owned is None

    for each in (agent, mine):
        run = LiveRun(
            run_id=f"run_{id(each)}",
            thread_id="thr",
            agent="graph",
            input={"prompt": "x"},
            epoch="e",
            created_at=1.0,
        )
        run.append("status", {"status": "running"})
        task = asyncio.create_task(each(RunContext(run)))
        await until(run, lambda r: r.pending_input is not None)
        assert run.pending_input is not None
        thread = {"configurable": {"thread_id": run.run_id}}
        assert (each.owned or kept).get_tuple(thread) is not None  # mid-run: kept
        run.pending_input[1].set_result("ok")
        async with asyncio.timeout(5):
            await task
        assert run.state["data"]["answer"] == "ok"
        assert (kept.get_tuple(thread) is None) == (each is agent)
        assert owned.get_tuple(thread) is None


# -- the merge patch -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "after", "patch"),
    [
        ({}, {"a": 1}, {"a": 1}),
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({"a": {"x": 1, "y": 2}}, {"a": {"x": 1, "y": 3}}, {"a": {"y": 3}}),
        ({"a": {"x": 1}}, {"a": {}}, {"a": {"x": None}}),
        ({"a": [1, 2]}, {"a": [1, 2, 3]}, {"a": [1, 2, 3]}),  # arrays are replaced
        ({"a": 1}, {"a": {"x": 1}}, {"a": {"x": 1}}),
        ({"a": {"x": 1}}, {"a": 2}, {"a": 2}),
    ],
)
def test_merge_patch(before: JsonObject, after: JsonObject, patch: JsonObject) -> None:
    assert merge_patch(before, after) == patch
    # Applied as the snapshot reducer applies a state event, it gives ``after``.
    assert snapshot.merge_patch(before, patch) == after


def test_chunks_and_tool_messages_are_told_apart() -> None:
    # The adapter's view of LangChain's classes (a chunk is an AIMessage too).
    assert isinstance(AIMessageChunk(content="x"), AIMessage)
    assert AIMessageChunk(content="x").type != "ai"
    assert ToolMessage(content="x", tool_call_id="c").status == "success"
