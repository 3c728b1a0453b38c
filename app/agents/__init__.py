"""Agents: the registry, RunContext, and the built-in agents."""

from app.agents.context import RunContext
from app.agents.registry import Agent, Registry, default_registry, register

__all__ = ["Agent", "Registry", "RunContext", "default_registry", "register"]
