"""The ``openai`` agent: streams chat completions from any OpenAI-compatible endpoint
(OpenAI itself, vLLM, Ollama, llama.cpp's server, a gateway) with the official SDK.

What it writes (PROTOCOL.md "Built-in agents"): content deltas -> ``text``, reasoning
deltas (``reasoning_content`` or ``reasoning``, where the endpoint sends them) ->
``thinking``, tool calls assembled from their deltas -> ``tool_call`` then ``tool_result``,
the final usage -> ``usage`` (``input_tokens``, ``output_tokens``). The messages are
``system`` (when given), then the thread's history, or ``prompt`` as one user message.

Configured by ``--openai-base-url`` / ``RUNCAST_OPENAI_BASE_URL`` and ``--openai-model`` /
``RUNCAST_OPENAI_MODEL``; the key comes from ``RUNCAST_OPENAI_API_KEY`` only, and is never
logged nor put in an event (a local server without keys needs none).

Tools. A module loaded with ``--agents`` gives the built-in agent its Python functions::

    from app.agents.openai import tool

    @tool
    async def weather(city: str) -> dict[str, object]:
        '''The weather in a city, now.'''
        return {"city": city, "sky": "clear"}

The name, the description (the docstring's first paragraph) and the JSON Schema of the
arguments (from the annotations, by pydantic) are what the model sees. The agent validates
the model's arguments, awaits the function (a plain ``def`` runs on the event loop: keep it
quick), emits ``tool_result`` with what it returned, sends that back and continues until
the model answers without tools, for at most ``max_tool_rounds`` rounds. Raise
:class:`ToolError` to tell the model (and clients) what went wrong; any other exception
shows only "the tool failed" and goes to the log. An agent of one's own, with its own
tools: ``register("helper")(OpenAIAgent(base_url, model, tools=Tools([weather])))``.

Stop cancels the agent at its await: the upstream response is closed and the run's HTTP
client with it, so the upstream connection is closed, never drained. Upstream failures end
the run ``failed`` with an :class:`~app.errors.AgentError` whose code says which:
``upstream_unauthorized`` (401, 403), ``upstream_rate_limited`` (429),
``upstream_rejected`` (another 4xx: an unknown model, a bad parameter),
``upstream_error`` (5xx, or an error event in the stream), ``upstream_timeout`` (nothing
for ``timeout_s``), ``upstream_unreachable`` (no connection), ``upstream_cut`` (the stream
ended mid-answer). A request is retried, at most ``max_attempts`` times in all, with
backoff that honours ``retry-after`` up to ``max_backoff_s``, only while nothing of its
answer has been emitted: a retry never repeats or contradicts text a client has seen.
Each retry is announced in the log of the run by an ``upstream_retry`` event
(``{attempt, code, delay_s}``; no effect on the snapshot), so a watcher knows why it waits.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import inspect
import json
import logging
import os
import random
import re
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast, get_type_hints

import openai
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolUnionParam
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import to_jsonable_python

from app.agents.context import RunContext
from app.agents.registry import Registry
from app.config import ENV_PREFIX, Settings
from app.core.events import JsonObject
from app.errors import AgentError

logger = logging.getLogger(__name__)

API_KEY_ENV = ENV_PREFIX + "OPENAI_API_KEY"

# Sent when no key is configured: the SDK insists on one, and a local server ignores it.
_NO_KEY = "no-key"
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Between the texts of two assistant messages of one run, which the page shows as one.
PARAGRAPH = "\n\n"
_MAX_UPSTREAM_MESSAGE = 300  # characters of an upstream's error message shown to clients


# -- tools ----------------------------------------------------------------------------------


class ToolError(Exception):
    """Raised by a tool: its message goes back to the model and into ``tool_result``."""


@dataclass(frozen=True, slots=True)
class Tool:
    """A Python function the model may call."""

    name: str
    description: str
    fn: Callable[..., Any]
    arguments: type[BaseModel]

    def schema(self) -> JsonObject:
        """The entry of the request's ``tools`` list."""
        parameters = self.arguments.model_json_schema()
        parameters.pop("title", None)
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": parameters,
            },
        }

    async def call(self, arguments: JsonObject) -> Any:
        """Validate ``arguments`` and call the function with them.

        Raises:
            ValidationError: the arguments do not fit the signature.
            Whatever the function raises.
        Cancellation: an async tool is cancelled with the run.
        """
        values = self.arguments.model_validate(arguments)
        result = self.fn(**{name: getattr(values, name) for name in type(values).model_fields})
        if inspect.isawaitable(result):
            result = await result
        return result


class Tools:
    """Tools by name. ``tools.tool`` registers a function, as a bare decorator or with
    ``name=`` / ``description=``."""

    def __init__(self, fns: Iterable[Callable[..., Any]] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for fn in fns:
            self.add(fn)

    def add(
        self, fn: Callable[..., Any], *, name: str | None = None, description: str | None = None
    ) -> Tool:
        """Register ``fn`` (replacing a tool of the same name).

        Raises:
            ValueError: the name is not 1..64 of ``A-Z a-z 0-9 _ -``, or ``fn`` takes
                ``*args`` or ``**kwargs`` (the model passes named arguments only).
        """
        name = name or fn.__name__
        if not _TOOL_NAME.match(name):
            raise ValueError(f"tool name {name!r} must be 1..64 of A-Z a-z 0-9 _ -")
        hints = get_type_hints(fn)
        fields: dict[str, Any] = {}
        for parameter in inspect.signature(fn).parameters.values():
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                raise ValueError(f"tool {name!r} must take named arguments only")
            default = ... if parameter.default is parameter.empty else parameter.default
            fields[parameter.name] = (hints.get(parameter.name, Any), default)
        arguments = create_model(
            f"{name}_arguments",
            __config__=ConfigDict(extra="forbid"),
            **fields,
        )
        if description is None:
            description = (inspect.getdoc(fn) or "").split("\n\n")[0].strip()
        tool = Tool(name, description, fn, arguments)
        self._tools[name] = tool
        return tool

    def tool(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        description: str | None = None,
    ) -> Any:
        """Decorator: ``@tools.tool`` or ``@tools.tool(name="x")``; returns ``fn``."""

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.add(fn, name=name, description=description)
            return fn

        return decorate if fn is None else decorate(fn)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)


default_tools = Tools()
"""The tools of the built-in ``openai`` agent."""
tool = default_tools.tool


# -- the agent ------------------------------------------------------------------------------


class OpenAIInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    content: str | None = Field(None, description="the user turn it answers (in a thread)")
    prompt: str | None = Field(None, max_length=1_000_000, description="the user's message")
    system: str | None = Field(None, max_length=1_000_000, description="the system message")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)


@dataclass
class _Call:
    """A tool call as its deltas assemble it."""

    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Round:
    """What one request's stream has produced so far."""

    responded: bool = False  # the upstream answered 200 and the stream began
    emitted: bool = False  # text or thinking of this answer reached the run's log
    finished: bool = False  # a choice carried a finish_reason
    content: list[str] = field(default_factory=list)
    calls: dict[int, _Call] = field(default_factory=dict)
    lead: str = ""  # shown before its first text (not sent back to the model)


@dataclass(frozen=True, slots=True)
class _Request:
    """What one round asks the endpoint (the model is the agent's)."""

    messages: list[JsonObject]
    tools: list[JsonObject]
    temperature: float | None
    max_tokens: int | None


class _StreamCutError(Exception):
    """The stream ended (cleanly, or not) before a finish_reason."""


class OpenAIAgent:
    """An agent that answers with a model behind an OpenAI-compatible endpoint.

    Args:
        base_url: the endpoint, ending in ``/v1`` as a rule (``http://localhost:11434/v1``).
        model: the model's name there.
        api_key: the bearer key; ``None``: none (a placeholder is sent).
        tools: what the model may call; ``None``: :data:`default_tools`, read at each run.
        max_tool_rounds: rounds of tool calls before the run fails ``tool_rounds_exceeded``.
        max_attempts: requests per round in all, the first included (1: never retry).
        timeout_s: how long to wait for the connection, the answer's start, or the next
            bytes of the stream.
        backoff_s: the first retry's delay without ``retry-after``; doubled each time.
        max_backoff_s: the longest wait before a retry; an upstream that asks for more
            fails the run at once.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        tools: Tools | None = None,
        max_tool_rounds: int = 8,
        max_attempts: int = 3,
        timeout_s: float = 60.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 20.0,
    ) -> None:
        if max_attempts < 1 or max_tool_rounds < 0:
            raise ValueError("max_attempts must be at least 1, max_tool_rounds at least 0")
        self.base_url = base_url
        self.model = model
        self._api_key = api_key
        self._tools = tools
        self.max_tool_rounds = max_tool_rounds
        self.max_attempts = max_attempts
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s

    def __repr__(self) -> str:  # never the key
        return f"OpenAIAgent(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def tools(self) -> Tools:
        return default_tools if self._tools is None else self._tools

    async def __call__(self, ctx: RunContext) -> None:
        """Answer the run's input; see the module docstring.

        Raises:
            AgentError: the input has nothing to answer, the upstream failed, or the
                model asked for tools more than ``max_tool_rounds`` rounds in a row.
        Cancellation: the upstream response and connection are closed before it returns.
        """
        messages = build_messages(ctx.input, ctx.history)
        tools = self.tools
        lead = ""
        async with self._client() as client:
            for round_number in range(self.max_tool_rounds + 1):
                answer = await self._complete(ctx, client, messages, tools, lead)
                if answer.content:
                    # The answer after a tool round is a paragraph of its own.
                    lead = PARAGRAPH
                if not answer.calls:
                    return
                if round_number == self.max_tool_rounds:
                    raise AgentError(
                        "tool_rounds_exceeded",
                        f"the model asked for tools {round_number + 1} times in a row; "
                        f"the limit is {self.max_tool_rounds}",
                    )
                messages.extend(await self._run_tools(ctx, tools, answer, round_number))

    def _client(self) -> openai.AsyncOpenAI:
        """A client of its own per run: closing it closes its connections, whatever the
        SDK's pool would keep. The TLS context, costly to build, is shared."""
        return openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self._api_key or _NO_KEY,
            max_retries=0,  # retried here, where "before the first token" is known
            timeout=self.timeout_s,
            http_client=openai.DefaultAsyncHttpxClient(
                verify=_tls_context(), timeout=self.timeout_s
            ),
        )

    # -- one round: a request, streamed, with retries ------------------------------------

    async def _complete(
        self,
        ctx: RunContext,
        client: openai.AsyncOpenAI,
        messages: list[JsonObject],
        tools: Tools,
        lead: str,
    ) -> _Round:
        request = _Request(
            messages=messages,
            tools=[tool.schema() for tool in tools],
            temperature=ctx.input.get("temperature"),
            max_tokens=ctx.input.get("max_tokens"),
        )
        attempt = 0
        while True:
            attempt += 1
            answer = _Round(lead=lead)
            try:
                await self._stream(ctx, client, request, answer)
                return answer
            except (openai.APIError, _StreamCutError) as exc:
                failure, delay_s = self._judge(exc, answer, attempt)
                logger.warning(
                    "run_id=%s: upstream %s on attempt %d of %d (%s)%s",
                    ctx.run_id,
                    failure.code,
                    attempt,
                    self.max_attempts,
                    self._redacted(exc),
                    "" if delay_s is None else f"; retrying in {delay_s:.2f} s",
                )
                if delay_s is None:
                    # Not chained: the SDK's error holds the upstream's own words, which
                    # may quote the key (OpenAI's 401 does), and the failure is logged.
                    raise failure from None
                await ctx.emit(
                    "upstream_retry",
                    {"attempt": attempt + 1, "code": failure.code, "delay_s": round(delay_s, 3)},
                )
                await asyncio.sleep(delay_s)

    async def _stream(
        self, ctx: RunContext, client: openai.AsyncOpenAI, request: _Request, answer: _Round
    ) -> None:
        stream = await client.chat.completions.create(
            model=self.model,
            messages=cast("list[ChatCompletionMessageParam]", request.messages),
            stream=True,
            stream_options={"include_usage": True},
            tools=cast("list[ChatCompletionToolUnionParam]", request.tools) or openai.omit,
            # Unset, they are left out: some servers refuse a null.
            temperature=openai.omit if request.temperature is None else request.temperature,
            max_tokens=openai.omit if request.max_tokens is None else request.max_tokens,
        )
        answer.responded = True
        # ``async with``: the response is closed however this ends, a stop included.
        async with stream:
            async for chunk in stream:
                if chunk.usage is not None:
                    await ctx.usage(
                        input_tokens=chunk.usage.prompt_tokens,
                        output_tokens=chunk.usage.completion_tokens,
                    )
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    delta = choice.delta
                    thinking = _reasoning(delta.model_extra)
                    if thinking:
                        answer.emitted = True
                        await ctx.thinking(thinking)
                    if delta.content:
                        answer.emitted = True
                        shown = delta.content if answer.content else answer.lead + delta.content
                        answer.content.append(delta.content)
                        await ctx.text(shown)
                    for piece in delta.tool_calls or ():
                        call = answer.calls.setdefault(piece.index, _Call())
                        call.id = call.id or piece.id or ""
                        if piece.function is not None:
                            call.name = call.name or piece.function.name or ""
                            call.arguments.append(piece.function.arguments or "")
                    if choice.finish_reason is not None:
                        answer.finished = True
        if not answer.finished:
            raise _StreamCutError("the stream ended before a finish_reason")

    def _judge(
        self, exc: Exception, answer: _Round, attempt: int
    ) -> tuple[AgentError, float | None]:
        """The error the run fails with, and the delay before a retry (None: no retry)."""
        retry_after_s: float | None = None
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            upstream = self._upstream_message(exc)
            if status in (401, 403):
                failure = AgentError(
                    "upstream_unauthorized",
                    f"the upstream endpoint refused the key (HTTP {status}); check {API_KEY_ENV}",
                )
                return failure, None
            if status == 429:
                retry_after_s = _retry_after_s(exc.response.headers)
                wait = (
                    ""
                    if retry_after_s is None
                    else f"; it asked to retry after {retry_after_s:g} s"
                )
                failure = AgentError(
                    "upstream_rate_limited",
                    f"the upstream endpoint is rate limiting (HTTP 429){wait}",
                )
            elif status >= 500 or status == 408:
                failure = AgentError(
                    "upstream_error", f"the upstream endpoint failed (HTTP {status}){upstream}"
                )
            else:
                failure = AgentError(
                    "upstream_rejected",
                    f"the upstream endpoint refused the request (HTTP {status}){upstream}",
                )
                return failure, None
        elif isinstance(exc, openai.APITimeoutError):
            failure = AgentError(
                "upstream_timeout",
                f"the upstream endpoint sent nothing for {self.timeout_s:g} s",
            )
        elif isinstance(exc, openai.APIConnectionError | _StreamCutError) and answer.responded:
            failure = AgentError("upstream_cut", "the upstream stream broke off mid-answer")
        elif isinstance(exc, openai.APIConnectionError):
            failure = AgentError(
                "upstream_unreachable", "could not connect to the upstream endpoint"
            )
        else:  # an error event inside the stream
            upstream = self._upstream_message(exc) if isinstance(exc, openai.APIError) else ""
            failure = AgentError(
                "upstream_error", f"the upstream endpoint reported an error mid-stream{upstream}"
            )
        if answer.emitted or attempt >= self.max_attempts:
            if attempt > 1:
                message = f"{failure.message}; gave up after {attempt} attempts"
                failure = AgentError(failure.code, message)
            return failure, None
        if retry_after_s is not None:
            if retry_after_s > self.max_backoff_s:
                return failure, None
            return failure, retry_after_s
        backoff_s = self.backoff_s * 2 ** (attempt - 1)
        return failure, min(self.max_backoff_s, backoff_s * random.uniform(0.5, 1.0))

    def _redacted(self, exc: Exception) -> str:
        """The error's class and text for the log, without the key."""
        text = f"{type(exc).__name__}: {exc}"
        return text.replace(self._api_key, "***") if self._api_key else text

    def _upstream_message(self, exc: openai.APIError) -> str:
        """``": <the upstream's own message>"``, short, and never with the key in it."""
        body = exc.body
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, str) or not message:
            return ""
        if self._api_key:
            message = message.replace(self._api_key, "***")
        return ": " + message[:_MAX_UPSTREAM_MESSAGE]

    # -- tools ---------------------------------------------------------------------------

    async def _run_tools(
        self, ctx: RunContext, tools: Tools, answer: _Round, round_number: int
    ) -> list[JsonObject]:
        """Emit each call, run it, emit its result; the messages that carry them back."""
        calls: list[tuple[str, str, str]] = []
        for index, call in sorted(answer.calls.items()):
            call_id = call.id or f"call_{round_number}_{index}"
            calls.append((call_id, call.name, "".join(call.arguments)))
        messages: list[JsonObject] = [
            {
                "role": "assistant",
                "content": "".join(answer.content) or None,
                "tool_calls": [
                    {"id": id, "type": "function", "function": {"name": name, "arguments": args}}
                    for id, name, args in calls
                ],
            }
        ]
        parsed = [(id, name, _parse_arguments(args)) for id, name, args in calls]
        for id, name, arguments in parsed:
            shown = arguments if isinstance(arguments, dict) else {"_raw": arguments}
            await ctx.tool_call(id, name, shown)
        for id, name, arguments in parsed:
            output, error = await self._run_tool(ctx, tools, name, arguments)
            if error is not None:
                await ctx.tool_result(id, error=error)
                text = json.dumps({"error": error})
            else:
                await ctx.tool_result(id, output=output)
                text = output if isinstance(output, str) else json.dumps(output)
            messages.append({"role": "tool", "tool_call_id": id, "content": text})
        return messages

    async def _run_tool(
        self, ctx: RunContext, tools: Tools, name: str, arguments: JsonObject | str
    ) -> tuple[Any, str | None]:
        """``(output, None)``, or ``(None, what went wrong)`` as the model will read it."""
        found = tools.get(name)
        if found is None:
            return None, f"there is no tool named {name!r}"
        if not isinstance(arguments, dict):
            return None, "the arguments are not a JSON object"
        try:
            result = await found.call(arguments)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors()
            )
            return None, f"invalid arguments: {problems}"
        except ToolError as exc:
            return None, str(exc)
        except Exception:
            logger.warning("run_id=%s: tool %s failed", ctx.run_id, name, exc_info=True)
            return None, "the tool failed"
        return to_jsonable_python(result, fallback=str), None


def build_messages(input: JsonObject, history: list[JsonObject]) -> list[JsonObject]:
    """The request's messages: ``system``, then the history (or ``prompt``).

    Raises:
        AgentError: ``bad_request``, there is no user message to answer.
    """
    messages: list[JsonObject] = []
    system = input.get("system")
    if system:
        messages.append({"role": "system", "content": system})
    if history:
        for turn in history:
            role, text = turn.get("role"), turn.get("content")
            # An assistant turn left empty (a failed or stopped run) says nothing.
            if role in ("user", "assistant") and isinstance(text, str) and (text or role == "user"):
                messages.append({"role": role, "content": text})
    else:
        prompt = input.get("prompt") or input.get("content")
        if prompt:
            messages.append({"role": "user", "content": prompt})
    if not any(message["role"] == "user" for message in messages):
        raise AgentError("bad_request", "nothing to answer: give input.prompt, or send a message")
    return messages


def register_openai(
    registry: Registry, settings: Settings, environ: Mapping[str, str] | None = None
) -> bool:
    """Register the ``openai`` agent when both its settings are set; True if it did."""
    if not (settings.openai_base_url and settings.openai_model):
        return False
    env = os.environ if environ is None else environ
    agent = OpenAIAgent(
        settings.openai_base_url, settings.openai_model, api_key=env.get(API_KEY_ENV) or None
    )
    registry.add(
        "openai",
        agent,
        description=f"Streams a chat completion from {settings.openai_model}.",
        input_model=OpenAIInput,
    )
    logger.info("agent openai: model %s at %s", settings.openai_model, settings.openai_base_url)
    return True


# -- helpers ----------------------------------------------------------------------------------


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _reasoning(extra: Mapping[str, Any] | None) -> str:
    """The reasoning text of a delta, under either name endpoints use for it."""
    if not extra:
        return ""
    for key in ("reasoning_content", "reasoning"):
        value = extra.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _parse_arguments(text: str) -> JsonObject | str:
    """The arguments as an object, or their text as it came when it is not one."""
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """``retry-after-ms``, or ``retry-after`` in seconds or as an HTTP date."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


__all__ = [
    "API_KEY_ENV",
    "OpenAIAgent",
    "OpenAIInput",
    "Tool",
    "ToolError",
    "Tools",
    "build_messages",
    "default_tools",
    "register_openai",
    "tool",
]
