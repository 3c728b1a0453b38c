"""The agent registry: agents by name, each with a description and an input model."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from app.agents.context import RunContext
from app.errors import BadRequestError, UnknownAgentError

if TYPE_CHECKING:
    from app.engine.run import LiveRun

AgentFn = Callable[[RunContext], Coroutine[Any, Any, None]]


class AnyInput(BaseModel):
    """Input model of an agent that takes any JSON object."""

    model_config = ConfigDict(extra="allow")


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    fn: AgentFn
    description: str
    input_model: type[BaseModel]

    def validate_input(self, value: dict[str, Any]) -> dict[str, Any]:
        """The input as the agent gets it (defaults filled in).

        Raises:
            BadRequestError: ``value`` does not fit the input model (names the field).
        """
        try:
            model = self.input_model.model_validate(value)
        except ValidationError as exc:
            what = f"invalid input for agent {self.name!r}"
            raise BadRequestError.from_validation(exc, what, within="input") from None
        return model.model_dump(mode="json", exclude_none=True)

    def invoke(self, run: LiveRun, history: list[dict[str, Any]]) -> Coroutine[Any, Any, None]:
        """The agent's coroutine on ``run``, writing through a fresh RunContext."""
        return self.fn(RunContext(run, history))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_model.model_json_schema(),
        }


class Registry:
    """Agents by name. ``register`` is also usable as a decorator."""

    def __init__(self) -> None:
        self._agents: dict[str, Agent] = {}

    def add(
        self,
        name: str,
        fn: AgentFn,
        *,
        description: str = "",
        input_model: type[BaseModel] = AnyInput,
    ) -> Agent:
        """Register ``fn`` under ``name`` (replacing any agent of that name).

        Raises:
            TypeError: ``fn`` is not an async function (or an object with an async
                ``__call__``): the engine runs an agent as a task of its own.
        """
        if not _is_async_callable(fn):
            raise TypeError(f"agent {name!r} must be an async function (async def)")
        agent = Agent(name, fn, description or (fn.__doc__ or "").strip(), input_model)
        self._agents[name] = agent
        return agent

    def register(
        self, name: str, *, description: str = "", input_model: type[BaseModel] = AnyInput
    ) -> Callable[[AgentFn], AgentFn]:
        def decorate(fn: AgentFn) -> AgentFn:
            self.add(name, fn, description=description, input_model=input_model)
            return fn

        return decorate

    def get(self, name: str) -> Agent:
        """Raises: UnknownAgentError."""
        try:
            return self._agents[name]
        except KeyError:
            raise UnknownAgentError(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._agents

    def all(self) -> list[Agent]:
        return sorted(self._agents.values(), key=lambda agent: agent.name)


def _is_async_callable(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    # An instance of a class whose __call__ is async (a class itself makes an instance).
    return callable(fn) and inspect.iscoroutinefunction(type(fn).__call__)


default_registry = Registry()
register = default_registry.register
