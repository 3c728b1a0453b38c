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

_LISTS = frozenset({"agents", "tokens", "allow_origins"})  # comma-separated in the environment


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
    # One budget for the whole server: past it, agents' appends wait for the flusher.
    max_unflushed: int = Field(200_000, ge=1_000)
    # -- access (PROTOCOL.md §8) ---------------------------------------------------------
    token_file: Path | None = None
    tokens: tuple[str, ...] = ()  # "ROLE:SECRET" each (RUNCAST_TOKENS, comma-separated)
    allow_origins: tuple[str, ...] = ()
    secret: str | None = None  # signs share tokens; kept in the database when not given
    insecure: bool = False  # allow open mode on a non-loopback address
    metrics_public: bool = False  # GET /metrics without a token in token mode
    # -- limits (PROTOCOL.md §8) ---------------------------------------------------------
    max_frame_bytes: int = Field(1_048_576, ge=1024)
    max_subscriptions: int = Field(256, ge=1)
    max_thread_watches: int = Field(64, ge=1)
    max_connections_per_address: int = Field(1_000, ge=0)  # 0: no limit
    rate: float = Field(100.0, gt=0)  # ops (per connection) or requests (per address) a second
    rate_burst: int = Field(1_000, ge=1)
    max_live_runs: int = Field(1_000, ge=1)
    max_event_bytes: int = Field(1_048_576, ge=64)
    max_input_bytes: int = Field(262_144, ge=64)
    ping_interval_s: float = Field(20.0, gt=0)
    write_timeout_s: float = Field(30.0, gt=0)
    # -- the openai agent (PROTOCOL.md "Built-in agents"): registered when both are set --
    # Its key is read from RUNCAST_OPENAI_API_KEY by the agent alone: never a setting, so
    # never in a flag, a log line or a repr of these settings.
    openai_base_url: str | None = None  # e.g. http://localhost:11434/v1
    openai_model: str | None = None

    @field_validator("log_level")
    @classmethod
    def _known_log_level(cls, value: str) -> str:
        # Checked here, so that a wrong level is a settings error, not a crash in logging.
        level = value.lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("openai_base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("openai_base_url must be an http:// or https:// URL")
        return value or None

    @classmethod
    def from_env(
        cls, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Settings from ``RUNCAST_<NAME>`` variables, then ``overrides`` (flags) on top.

        ``RUNCAST_AGENTS``, ``RUNCAST_TOKENS`` and ``RUNCAST_ALLOW_ORIGINS`` are
        comma-separated lists; a setting in seconds
        (``flush_interval_s``) is also read without its unit (``RUNCAST_FLUSH_INTERVAL``).
        """
        environ = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None and name.endswith("_s"):  # RUNCAST_FLUSH_INTERVAL, RUNCAST_LINGER
                raw = environ.get(ENV_PREFIX + name.removesuffix("_s").upper())
            if raw is not None:
                values[name] = tuple(filter(None, raw.split(","))) if name in _LISTS else raw
        for name, value in (overrides or {}).items():
            if value is not None:
                values[name] = value
        return cls.model_validate(values)
