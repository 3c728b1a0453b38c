"""Built-in agents, so that ``runcast serve`` is useful with nothing else installed."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from app.agents.context import RunContext
from app.agents.registry import Registry


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CounterInput(_Input):
    n: int = Field(ge=0, le=100_000_000, description="how many tick events")
    delay_s: float = Field(0.0, ge=0, le=3600, description="pause between ticks")
    start_delay_s: float = Field(0.0, ge=0, le=3600, description="pause before the first")


class DemoInput(_Input):
    content: str | None = Field(None, description="the user turn it answers (in a thread)")
    prompt: str = Field("Tell me about runcast.", max_length=10_000)
    tokens: int = Field(60, ge=0, le=100_000, description="how many text tokens")
    speed: float = Field(30.0, gt=0, le=100_000, description="tokens per second")


class AskInput(_Input):
    content: str | None = Field(None, description="the user turn it answers (in a thread)")
    prompt: str = Field("What should I say?", max_length=10_000)


class EchoInput(_Input):
    content: str | None = Field(None, description="the user turn it answers (in a thread)")
    text: str | None = Field(None, max_length=1_000_000)


async def counter(ctx: RunContext) -> None:
    """Emits n `tick` events as fast as it can, or one per delay_s; for benchmarks."""
    n = int(ctx.input["n"])
    delay_s = float(ctx.input.get("delay_s", 0.0))
    start_delay_s = float(ctx.input.get("start_delay_s", 0.0))
    if start_delay_s:
        await asyncio.sleep(start_delay_s)
    for k in range(1, n + 1):
        await ctx.emit("tick", {"n": k})
        if delay_s:
            await asyncio.sleep(delay_s)


_WORDS = (
    "runcast keeps every run as an indexed append-only log, so any tab can attach "
    "with a cursor, drop its connection, and come back without a gap or a duplicate. "
    "Stop works from whichever tab is open, and the log is flushed to SQLite on a "
    "throttle so a restart keeps what was written."
).split()


async def demo(ctx: RunContext) -> None:
    """A scripted assistant: thinks, calls a pretend tool, then streams an answer."""
    prompt = str(ctx.input.get("content") or ctx.input.get("prompt", ""))
    tokens = int(ctx.input.get("tokens", 60))
    pause_s = 1.0 / float(ctx.input.get("speed", 30.0))
    for word in ("Reading the question", " and planning", " an answer."):
        await ctx.thinking(word)
        await asyncio.sleep(pause_s * 3)
    await ctx.tool_call("call_1", "search", {"query": prompt[:200]})
    await asyncio.sleep(pause_s * 10)
    await ctx.tool_result("call_1", output={"hits": 3, "top": "runcast design notes"})
    await ctx.usage(input_tokens=len(prompt.split()) + 12)
    words = _WORDS
    if ctx.history:
        # In a thread: answer about the last user message, and say how much it has seen.
        said = " ".join(prompt.split()[:12])
        opening = f'You said "{said}". I have seen {len(ctx.history)} turns of this thread.'
        words = [*opening.split(), *_WORDS]
    for k in range(tokens):
        word = words[k % len(words)]
        await ctx.text(word if k == 0 else " " + word)
        await asyncio.sleep(pause_s)
    await ctx.usage(output_tokens=tokens)


async def ask(ctx: RunContext) -> None:
    """Asks for input with request_input, then answers with what it got."""
    value = await ctx.request_input(str(ctx.input.get("prompt", "What should I say?")))
    await ctx.text(f"You said: {value}")


async def echo(ctx: RunContext) -> None:
    """Answers with its input text, or the last user turn of its history."""
    text = ctx.input.get("text")
    if text is None and ctx.history:
        users = [turn for turn in ctx.history if turn.get("role") == "user"]
        text = str(users[-1].get("content", "")) if users else ""
    if text is None:
        text = ctx.input.get("content") or ""
    history = [{"role": t.get("role"), "content": t.get("content")} for t in ctx.history]
    await ctx.state({"history": history})
    await ctx.text(str(text))


def register_builtins(registry: Registry) -> None:
    registry.add("counter", counter, input_model=CounterInput)
    registry.add("demo", demo, input_model=DemoInput)
    registry.add("ask", ask, input_model=AskInput)
    registry.add("echo", echo, input_model=EchoInput)
