"""Agents: the registry, RunContext, and the built-in agents."""

from app.agents.context import RunContext
from app.agents.registry import Agent, Registry, default_registry, register
from app.errors import AgentError

__all__ = ["Agent", "AgentError", "Registry", "RunContext", "default_registry", "register"]
