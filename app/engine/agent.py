"""What the engine needs of an agent, as protocols: the agents layer implements them.

The engine starts an agent by name without knowing RunContext or the registry (agents
depend on the engine, never the other way round).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol

from app.core.events import JsonObject
from app.engine.run import LiveRun


class AgentSpec(Protocol):
    @property
    def name(self) -> str: ...

    def validate_input(self, value: JsonObject) -> JsonObject:
        """The input as the agent will get it. Raises: BadRequestError (names the field)."""
        ...

    def invoke(self, run: LiveRun, history: list[JsonObject]) -> Coroutine[Any, Any, None]:
        """The coroutine that runs the agent on ``run``; the engine owns its task."""
        ...


class AgentCatalog(Protocol):
    def get(self, name: str) -> AgentSpec:
        """Raises: UnknownAgentError."""
        ...
