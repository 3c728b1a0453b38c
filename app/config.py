"""Settings: one frozen model, built from flags and ``RUNCAST_*`` environment variables.

Every default lives here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

ENV_PREFIX = "RUNCAST_"

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    db: Path = Path("runcast.db")
    flush_interval_s: float = Field(0.2, gt=0, le=60)
    agents: tuple[str, ...] = ()
    log_level: str = "info"
    static_dir: Path | None = None
    default_agent: str = "demo"
    stop_grace_s: float = Field(2.0, ge=0)
    shutdown_grace_s: float = Field(5.0, ge=0)
    linger_s: float = Field(30.0, ge=0)
    tail_events: int = Field(10_000, ge=100)
    keyframe_every: int = Field(1_000, ge=10)
    max_unflushed: int = Field(200_000, ge=1_000)
    max_frame_bytes: int = Field(1_048_576, ge=1024)
    max_subscriptions: int = Field(256, ge=1)
    max_thread_watches: int = Field(64, ge=1)

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        # Checked here, so that a wrong level is a settings error, not a crash in logging.
        level = value.lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        return level

    @classmethod
    def from_env(
        cls, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Settings from ``RUNCAST_<NAME>`` variables, then ``overrides`` (flags) on top.

        ``RUNCAST_AGENTS`` is a comma-separated list of modules; a setting in seconds
        (``flush_interval_s``) is also read without its unit (``RUNCAST_FLUSH_INTERVAL``).
        """
        environ = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None and name.endswith("_s"):  # RUNCAST_FLUSH_INTERVAL, RUNCAST_LINGER
                raw = environ.get(ENV_PREFIX + name.removesuffix("_s").upper())
            if raw is not None:
                values[name] = tuple(filter(None, raw.split(","))) if name == "agents" else raw
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
        return cls.model_validate(values)
