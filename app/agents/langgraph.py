"""Run a compiled LangGraph graph as a runcast agent (``pip install 'runcast[langgraph]'``)::

    from app.agents import register
    from app.agents.langgraph import graph_agent

    register("planner")(graph_agent(builder.compile()))

What the run's log gets, as the graph runs:

- the messages the graph streams (a chat model's tokens, and the messages nodes return):
  an AI message's text -> ``text``, its reasoning (``reasoning_content``, or ``thinking``
  and ``reasoning`` content blocks) -> ``thinking``, its tool calls -> ``tool_call``
  (once each, whole, when the node that made them has finished); a tool message ->
  ``tool_result`` (``error`` when its status is ``error``);
- after each step, ``state``: a JSON Merge Patch of the channels whose values changed, so
  the snapshot's ``data`` is the graph's state at any index (messages shown as
  ``{type, content, id, tool_calls?, tool_call_id?, name?}``; channels named ``__*`` are
  left out; a merge patch cannot hold a null inside an object, so such a value reads as
  absent);
- ``interrupt(value)`` -> ``request_input`` (the prompt is ``value`` itself when it is a
  string, its ``prompt`` or ``question`` when it is an object that has one, else its
  JSON; the interrupt's ``response_schema`` is the input's schema). Any client's answer
  resumes the graph with ``Command(resume=answer)``; an answer the schema refuses is asked
  for again. Several interrupts at once are asked one after the other.

A stop cancels the graph's run (its running nodes are cancelled at their awaits).

The graph's input is the run's input, plus ``messages``: the thread's history (or
``prompt`` as one user message), as ``{"role", "content"}`` dicts that LangGraph's
``add_messages`` turns into messages. ``input=`` maps a RunContext to the graph's input
yourself. Each run is a LangGraph thread of its own (``thread_id`` is the run's id: runcast
hands the history in); a graph compiled without a checkpointer gets an in-memory one, whose
thread is deleted when the run ends. ``config=`` adds to each run's config
(``recursion_limit``, ``configurable`` values).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, cast

from pydantic_core import to_jsonable_python

from app.agents.context import RunContext
from app.core.events import JsonObject

try:
    from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.errors import is_invalid_resume
    from langgraph.pregel import Pregel
    from langgraph.types import Command, Interrupt
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "the LangGraph adapter needs langgraph: pip install 'runcast[langgraph]'"
    ) from exc

GraphInput = Callable[[RunContext], Any]

# A list, not a tuple: only a list makes LangGraph yield (mode, data) pairs.
_STREAM_MODES: list[Any] = ["messages", "updates", "values"]
_INTERRUPT = "__interrupt__"
# Between the texts of two AI messages, which the page shows as one (as the openai agent).
PARAGRAPH = "\n\n"


def graph_agent(
    graph: Pregel[Any, Any, Any, Any],
    *,
    input: GraphInput | None = None,
    config: RunnableConfig | None = None,
) -> GraphAgent:
    """An agent that runs ``graph`` (compiled) on each run's input; see the module
    docstring for what it emits.

    Args:
        graph: a compiled graph (``StateGraph(...).compile()``, or any Pregel).
        input: the graph's input from the RunContext (default: :func:`graph_input`).
        config: merged into each run's config; ``thread_id`` is always the run's id.
    """
    return GraphAgent(graph, input=input, config=config)


class GraphAgent:
    """Runs a compiled LangGraph graph (an async callable: an agent for the registry)."""

    def __init__(
        self,
        graph: Pregel[Any, Any, Any, Any],
        *,
        input: GraphInput | None = None,
        config: RunnableConfig | None = None,
    ) -> None:
        self.owned: InMemorySaver | None = None
        if graph.checkpointer is None:
            # interrupt() needs a checkpointer to resume from; the caller's graph is left
            # as it is.
            self.owned = InMemorySaver()
            graph = graph.copy(update={"checkpointer": self.owned})
        self.graph = graph
        self.make_input = input or graph_input
        self.config: Mapping[str, Any] = dict(config or {})

    async def __call__(self, ctx: RunContext) -> None:
        """Run the graph to its end, asking for input at each interrupt.

        Cancellation: the graph's run is cancelled; an owned checkpoint thread is deleted.
        """
        run_config = _run_config(self.config, ctx.run_id)
        stream = _Translator(ctx)
        try:
            command: Any = self.make_input(ctx)
            pending: list[Interrupt] = []
            note = ""
            while True:
                try:
                    interrupts = await stream.run(self.graph, command, run_config)
                except Exception as exc:
                    if not (pending and is_invalid_resume(exc)):
                        raise
                    # Nothing was saved: the same interrupts are answered again.
                    interrupts, note = pending, "That answer did not fit; try again. "
                else:
                    note = ""
                if not interrupts:
                    return
                pending = interrupts
                command = Command(resume=await _ask(ctx, interrupts, note))
        finally:
            if self.owned is not None:
                await self.owned.adelete_thread(ctx.run_id)


def graph_input(ctx: RunContext) -> JsonObject:
    """The default graph input: the run's input without ``prompt`` and ``content``, with
    ``messages`` from the history, or ``prompt`` (or ``content``) as one user message."""
    value = {k: v for k, v in ctx.input.items() if k not in ("prompt", "content")}
    if ctx.history:
        value["messages"] = [
            {"role": turn.get("role"), "content": turn.get("content") or ""}
            for turn in ctx.history
            if turn.get("role") in ("user", "assistant")
        ]
    else:
        prompt = ctx.input.get("prompt") or ctx.input.get("content")
        if prompt:
            value["messages"] = [{"role": "user", "content": str(prompt)}]
    return value


def merge_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> JsonObject:
    """The JSON Merge Patch (RFC 7386) that turns ``before`` into ``after``."""
    patch: JsonObject = {key: None for key in before if key not in after}
    for key, value in after.items():
        old = before.get(key, _ABSENT)
        if old == value:
            continue
        if isinstance(old, dict) and isinstance(value, dict):
            patch[key] = merge_patch(old, value)
        else:
            patch[key] = value
    return patch


_ABSENT = object()


class _Translator:
    """Turns one run's graph stream into runcast events."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.state: JsonObject = {}
        self.calls: set[str] = set()  # tool calls emitted, by id
        self.results: set[str] = set()  # tool results emitted, by tool_call_id
        self.writing: str | None = None  # the id of the message whose text came last
        self.wrote = False

    async def run(
        self, graph: Pregel[Any, Any, Any, Any], command: Any, config: RunnableConfig
    ) -> list[Interrupt]:
        """Stream the graph until it ends or interrupts; the interrupts.

        Cancellation: the graph's stream is closed, which cancels its running nodes.
        """
        interrupts: list[Interrupt] = []
        # With several modes, an async generator of (mode, data) pairs.
        stream = cast(
            AsyncGenerator[tuple[str, Any], None],
            graph.astream(command, config, stream_mode=_STREAM_MODES),
        )
        async with contextlib.aclosing(stream):
            async for mode, data in stream:
                if mode == "messages":
                    message, _metadata = data
                    await self.message(message)
                elif mode == "updates":
                    interrupts.extend(await self.updates(data))
                elif mode == "values":
                    await self.values(data)
        return interrupts

    async def message(self, message: Any) -> None:
        if isinstance(message, ToolMessage):
            await self.tool_result(message)
        elif isinstance(message, AIMessage):
            thinking, text = _split_content(message)
            if thinking:
                await self.ctx.thinking(thinking)
            if text:
                # Another message's text than the last one: a paragraph of its own.
                new = message.id is None or message.id != self.writing
                await self.ctx.text(PARAGRAPH + text if new and self.wrote else text)
                self.writing, self.wrote = message.id, True
            # A chunk's tool calls are partial: the whole message comes with the update.
            if message.type == "ai":
                await self.tool_calls(message)

    async def tool_calls(self, message: AIMessage) -> None:
        for number, call in enumerate(message.tool_calls):
            id = call.get("id") or f"{message.id}_{number}"
            if id not in self.calls:
                self.calls.add(id)
                await self.ctx.tool_call(id, call["name"], _jsonable(call.get("args") or {}))

    async def tool_result(self, message: ToolMessage) -> None:
        if message.tool_call_id in self.results:
            return
        self.results.add(message.tool_call_id)
        output = _jsonable(message.content)
        if message.status == "error":
            error = output if isinstance(output, str) else json.dumps(output)
            await self.ctx.tool_result(message.tool_call_id, error=error)
        else:
            await self.ctx.tool_result(message.tool_call_id, output=output)

    async def updates(self, data: Any) -> list[Interrupt]:
        """A step's updates: whole messages complete what chunks began; the interrupts."""
        if not isinstance(data, dict):
            return []
        interrupts: list[Interrupt] = []
        for node, update in data.items():
            if node == _INTERRUPT:
                interrupts.extend(update)
                continue
            for message in _messages_in(update):
                if isinstance(message, AIMessage):
                    await self.tool_calls(message)
                elif isinstance(message, ToolMessage):
                    await self.tool_result(message)
        return interrupts

    async def values(self, data: Any) -> None:
        value = _jsonable(data)
        if not isinstance(value, dict):
            value = {"value": value}
        current = {k: v for k, v in value.items() if not k.startswith("__")}
        patch = merge_patch(self.state, current)
        self.state = current
        if patch:
            await self.ctx.state(patch)


async def _ask(ctx: RunContext, interrupts: list[Interrupt], note: str) -> Any:
    """Ask for each interrupt in turn; the resume value (a map by id for several)."""
    answers: dict[str, Any] = {}
    for interrupt in interrupts:
        value = interrupt.value
        prompt: Any = value
        if isinstance(value, dict):
            prompt = value.get("prompt") or value.get("question") or value
        if not isinstance(prompt, str):
            prompt = json.dumps(_jsonable(prompt))
        schema = interrupt.response_schema
        answers[interrupt.id] = await ctx.request_input(
            note + prompt, schema if isinstance(schema, dict) else None
        )
    if len(interrupts) == 1:
        return answers[interrupts[0].id]
    return answers


def _run_config(extra: Mapping[str, Any], run_id: str) -> RunnableConfig:
    configurable = {**extra.get("configurable", {}), "thread_id": run_id}
    return RunnableConfig(**{**extra, "configurable": configurable})  # type: ignore[typeddict-item]


def _split_content(message: AIMessage) -> tuple[str, str]:
    """(thinking, text) of an AI message or chunk."""
    thinking: list[str] = []
    text: list[str] = []
    reasoning = message.additional_kwargs.get("reasoning_content")
    if isinstance(reasoning, str):
        thinking.append(reasoning)
    content = message.content
    if isinstance(content, str):
        text.append(content)
    else:
        for block in content:
            if isinstance(block, str):
                text.append(block)
                continue
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                text.append(block["text"])
            elif kind in ("thinking", "reasoning"):
                words = block.get(kind) or block.get("text")
                if isinstance(words, str):
                    thinking.append(words)
    return "".join(thinking), "".join(text)


def _messages_in(update: Any) -> list[BaseMessage]:
    """The messages a node's update carries, at its top level or in a list there."""
    if not isinstance(update, dict):
        return []
    found: list[BaseMessage] = []
    for value in update.values():
        if isinstance(value, BaseMessage):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(item for item in value if isinstance(item, BaseMessage))
    return found


def _jsonable(value: Any) -> Any:
    """``value`` as JSON: messages compact, everything else as pydantic dumps it."""
    if isinstance(value, BaseMessage):
        return _message_json(value)
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return to_jsonable_python(value, fallback=str)


def _message_json(message: BaseMessage) -> JsonObject:
    shown: JsonObject = {"type": message.type, "content": _jsonable(message.content)}
    if message.id:
        shown["id"] = message.id
    if message.name:
        shown["name"] = message.name
    if isinstance(message, AIMessage) and message.tool_calls:
        shown["tool_calls"] = [
            {"id": call.get("id"), "name": call["name"], "args": _jsonable(call["args"])}
            for call in message.tool_calls
        ]
    if isinstance(message, ToolMessage):
        shown["tool_call_id"] = message.tool_call_id
    return shown


__all__ = ["GraphAgent", "graph_agent", "graph_input", "merge_patch"]
