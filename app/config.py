"""Settings: every setting of runcast, defined once.

A setting is a field of ``Settings``: its type, default and bounds, a description, and an
``Option`` (its flag, the group ``runcast serve --help`` lists it in, the placeholder of
its value). Everything a user reads about it is generated from that field: the flags of
``runcast serve`` (app/cli.py), their help, the ``RUNCAST_*`` variable, and the settings
tables of README.md and docs/operations.md (``settings_table()``; ``python -m app.config
README.md docs/operations.md`` rewrites them, and tests/test_readme.py fails while they
differ). A new field without a description or an ``Option`` fails tests/test_config.py.

``Settings(...)`` takes its values as given (tests, embedding); ``Settings.from_env()``
reads the ``RUNCAST_*`` variables and puts the flags on top. A setting in seconds is
named with its unit (``flush_interval_s``) and read from its variable with or without it
(``RUNCAST_FLUSH_INTERVAL``, ``RUNCAST_FLUSH_INTERVAL_S``); a list is comma-separated in
the environment.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "RUNCAST_"
DATABASE_URL_SCHEMES = ("postgresql://", "postgres://")


def is_database_url(db: object) -> bool:
    """True when ``db`` is a PostgreSQL URL rather than the path of a SQLite file."""
    return isinstance(db, str) and db.startswith(DATABASE_URL_SCHEMES)


LOG_LEVELS = ("critical", "error", "warning", "info", "debug")

# The groups of `runcast serve --help`, in order, with what each says above its flags.
SERVER = "server"
RUNS = "runs and storage"
CLUSTER = "several nodes"
ACCESS = "access"
LIMITS = "limits"
OPENAI = "the openai agent"
GROUPS: dict[str, str] = {
    SERVER: "",
    RUNS: "",
    CLUSTER: "Nodes that share one PostgreSQL --db and one Redis --broker are one service "
    "(docs/operations.md, 'Running several nodes').",
    ACCESS: "Without a token the server is open to whoever reaches it, so it listens on "
    "loopback only.",
    LIMITS: "Past a limit a client is answered with an error it can act on, and no other "
    "client notices (docs/operations.md, 'Limits and how to size them').",
    OPENAI: "",
}


@dataclass(frozen=True, slots=True)
class Option:
    """How a setting is given on the command line and shown in the help and the docs.

    Attributes:
        flag: its flag of ``runcast serve``; None for a setting given in the environment
            only (a secret, which a flag would show in the process list).
        group: its group in ``runcast serve --help`` (one of ``GROUPS``).
        metavar: the placeholder of its value in the help (none for an on/off flag).
        default: how its default reads, when the value alone would not say it.
    """

    flag: str | None
    group: str
    metavar: str | None = None
    default: str | None = None


class Settings(BaseSettings):
    """Every setting of runcast, frozen. See the module docstring for how they are given."""

    # enable_decoding=False: a list in the environment is comma-separated, never JSON.
    model_config = SettingsConfigDict(
        frozen=True, extra="forbid", env_prefix=ENV_PREFIX, enable_decoding=False
    )

    # -- server --------------------------------------------------------------------------
    host: Annotated[str, Option("--host", SERVER, "ADDRESS")] = Field(
        "127.0.0.1",
        description="address to listen on; one that is not loopback needs a token",
    )
    port: Annotated[int, Option("--port", SERVER, "PORT")] = Field(
        8000,
        ge=0,
        le=65535,
        description="port; `0` takes any free port, which the start line names",
    )
    db: Annotated[Path | str, Option("--db", SERVER, "FILE|URL")] = Field(
        Path("runcast.db"),
        description="the SQLite file runs and threads are kept in, or a PostgreSQL URL "
        "(postgresql://...)",
    )
    agents: Annotated[tuple[str, ...], Option("--agents", SERVER, "MODULE")] = Field(
        (),
        description="modules that register agents: a module name, found in the current "
        "directory first, or a `.py` file's path",
    )
    log_level: Annotated[str, Option("--log-level", SERVER, "LEVEL")] = Field(
        "info",
        description="`critical`, `error`, `warning`, `info` or `debug`; `debug` also prints "
        "the traceback of a refusal to start",
    )
    log_format: Annotated[Literal["text", "json"], Option("--log-format", SERVER, "FORMAT")] = (
        Field(
            "text",
            description="`text`, or `json`: one JSON object a line on stderr, with `time`, "
            "`level`, `logger`, `message`, and `run_id`, `connection_id` when the line is "
            "about one",
        )
    )
    static_dir: Annotated[
        Path | None, Option("--static-dir", SERVER, "DIR", "the bundled page")
    ] = Field(None, description="the directory of the page served at `/`")
    # -- runs and storage ----------------------------------------------------------------
    flush_interval_s: Annotated[float, Option("--flush-interval", RUNS, "SECONDS")] = Field(
        0.2,
        gt=0,
        le=60,
        description="seconds between group commits: what a crash can lose",
    )
    linger_s: Annotated[float, Option("--linger", RUNS, "SECONDS")] = Field(
        30.0, ge=0, description="seconds an ended run stays in memory"
    )
    stop_grace_s: Annotated[float, Option("--stop-grace", RUNS, "SECONDS")] = Field(
        2.0, ge=0, description="seconds a stopped agent has to end before it is abandoned"
    )
    shutdown_grace_s: Annotated[float, Option("--shutdown-grace", RUNS, "SECONDS")] = Field(
        5.0, ge=0, description="seconds live runs have to end at shutdown"
    )
    tail_events: Annotated[int, Option("--tail-events", RUNS, "N")] = Field(
        10_000,
        ge=100,
        description="events of a live run kept in memory; older ones are read from the file",
    )
    keyframe_every: Annotated[int, Option("--keyframe-every", RUNS, "N")] = Field(
        1_000,
        ge=10,
        description="a run's state is kept every this many events, to compute old snapshots",
    )
    # One budget for the whole server: past it, agents' appends wait for the flusher.
    max_unflushed: Annotated[int, Option("--max-unflushed", RUNS, "N")] = Field(
        200_000,
        ge=1_000,
        description="events not yet on disk, over the whole server, before fast agents wait "
        "for the disk",
    )
    default_agent: Annotated[str, Option("--default-agent", RUNS, "NAME")] = Field(
        "demo", description="the agent of a thread operation that names none"
    )
    # -- several nodes (PROTOCOL.md §9) --------------------------------------------------
    broker: Annotated[str | None, Option("--broker", CLUSTER, "URL", "one node, no broker")] = (
        Field(
            None,
            description="a Redis URL (redis://host:6379/0?prefix=NAME): this process is a "
            "node of the cluster of the processes that share it and the PostgreSQL database",
        )
    )
    node_id: Annotated[str | None, Option("--node-id", CLUSTER, "NAME", "host and pid")] = Field(
        None,
        pattern=r"^[A-Za-z0-9_.:-]{1,64}$",
        description="this node's name in the cluster; unique among the nodes",
    )
    lease_s: Annotated[float, Option("--lease", CLUSTER, "SECONDS")] = Field(
        5.0,
        ge=1,
        le=300,
        description="seconds a node's hold on its runs lasts unrenewed; a node silent that "
        "long has its runs ended `node_lost` by another",
    )
    # -- access (PROTOCOL.md §8) ---------------------------------------------------------
    token_file: Annotated[Path | None, Option("--token-file", ACCESS, "FILE")] = Field(
        None,
        description="server tokens, one `ROLE SECRET` a line; roles `viewer`, `operator`, `admin`",
    )
    tokens: Annotated[tuple[str, ...], Option(None, ACCESS)] = Field(
        (),
        description="more server tokens, `ROLE:SECRET` each; in the environment only, so "
        "that no secret shows in a process list",
    )
    allow_origins: Annotated[tuple[str, ...], Option("--allow-origin", ACCESS, "ORIGIN")] = Field(
        (), description="browser origins allowed besides the server's own, exact"
    )
    secret: Annotated[
        str | None, Option("--secret", ACCESS, "SECRET", "one kept in the database")
    ] = Field(None, description="the secret that signs share links")
    insecure: Annotated[bool, Option("--insecure", ACCESS)] = Field(
        False, description="allow an open server (no token) on an address that is not loopback"
    )
    metrics_public: Annotated[bool, Option("--metrics-public", ACCESS)] = Field(
        False, description="serve `GET /metrics` without a token in token mode"
    )
    # -- limits (PROTOCOL.md §8) ---------------------------------------------------------
    max_frame_bytes: Annotated[int, Option("--max-frame-bytes", LIMITS, "N")] = Field(
        1_048_576, ge=1024, description="largest WebSocket frame or HTTP body"
    )
    max_subscriptions: Annotated[int, Option("--max-subscriptions", LIMITS, "N")] = Field(
        256, ge=1, description="subscriptions per connection"
    )
    max_thread_watches: Annotated[int, Option("--max-thread-watches", LIMITS, "N")] = Field(
        64, ge=1, description="thread watches per connection"
    )
    max_connections_per_address: Annotated[
        int, Option("--max-connections-per-address", LIMITS, "N")
    ] = Field(1_000, ge=0, description="WebSocket connections per client address; `0`: no limit")
    rate: Annotated[float, Option("--rate", LIMITS, "N")] = Field(
        100.0,
        gt=0,
        description="ops a second per connection, requests a second per client address",
    )
    rate_burst: Annotated[int, Option("--rate-burst", LIMITS, "N")] = Field(
        1_000, ge=1, description="how many ops or requests may come at once"
    )
    max_live_runs: Annotated[int, Option("--max-live-runs", LIMITS, "N")] = Field(
        1_000, ge=1, description="runs created and not ended, queued ones included"
    )
    max_event_bytes: Annotated[int, Option("--max-event-bytes", LIMITS, "N")] = Field(
        1_048_576, ge=64, description="largest event an agent may emit"
    )
    max_input_bytes: Annotated[int, Option("--max-input-bytes", LIMITS, "N")] = Field(
        262_144, ge=64, description="largest agent input"
    )
    ping_interval_s: Annotated[float, Option("--ping-interval", LIMITS, "SECONDS")] = Field(
        20.0,
        gt=0,
        description="seconds between WebSocket pings, and the time allowed for the pong; "
        "no pong: closed with 1011",
    )
    write_timeout_s: Annotated[float, Option("--write-timeout", LIMITS, "SECONDS")] = Field(
        30.0,
        gt=0,
        description="seconds a send to a client may make no progress; then closed with 4408",
    )
    # -- the openai agent (PROTOCOL.md "Built-in agents"): registered when both are set --
    # Its key is read from RUNCAST_OPENAI_API_KEY by the agent alone: never a setting, so
    # never in a flag, a log line or a repr of these settings.
    openai_base_url: Annotated[str | None, Option("--openai-base-url", OPENAI, "URL")] = Field(
        None,
        description="an OpenAI-compatible endpoint, e.g. `http://localhost:11434/v1`; with a "
        "model, registers the `openai` agent",
    )
    openai_model: Annotated[str | None, Option("--openai-model", OPENAI, "NAME")] = Field(
        None,
        description="the `openai` agent's model; its key is read from "
        "`RUNCAST_OPENAI_API_KEY` only, never a flag",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The values given, nothing else: from_env() adds the environment on purpose.
        return (init_settings,)

    @field_validator("agents", "tokens", "allow_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("db", mode="before")
    @classmethod
    def _file_or_url(cls, value: object) -> object:
        # A PostgreSQL URL stays a string (a Path would drop its "//"); anything else is
        # the path of a SQLite file.
        if isinstance(value, str) and not is_database_url(value):
            return Path(value)
        return value

    @field_validator("broker")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("broker must be a redis:// (or rediss://, unix://) URL")
        return value or None

    @model_validator(mode="after")
    def _broker_needs_a_shared_database(self) -> Settings:
        if self.broker is not None and not is_database_url(self.db):
            raise ValueError(
                "broker needs a PostgreSQL --db (postgresql://...): the nodes of a cluster "
                "share one database, and a SQLite file belongs to one process"
            )
        return self

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
        """Settings from the ``RUNCAST_*`` variables of ``env`` (default: the process's),
        with ``overrides`` (the flags given; None values are not given) on top.

        Raises:
            pydantic.ValidationError: a value is invalid; its ``loc`` is the field's name
                and its ``input`` the value as given (a variable's: a string).
        """
        values = _Environment(cls, os.environ if env is None else env)()
        values.update(
            {name: value for name, value in (overrides or {}).items() if value is not None}
        )
        return cls(**values)


class _Environment(EnvSettingsSource):
    """The ``RUNCAST_*`` variables of a mapping, each looked up by ``variables(name)``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls, case_sensitive=True)
        self.env_vars = dict(environ)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        value = next(
            (self.env_vars[name] for name in variables(field_name) if name in self.env_vars),
            None,
        )
        return value, field_name, False


# -- what a user reads about each setting --------------------------------------------------


def option(name: str) -> Option:
    """The ``Option`` of setting ``name``."""
    [found] = [item for item in Settings.model_fields[name].metadata if isinstance(item, Option)]
    return found


def variables(name: str) -> tuple[str, ...]:
    """The variables setting ``name`` is read from, the first one set wins:
    ``RUNCAST_<NAME>``, and for a setting in seconds the same without its unit."""
    names = [f"{ENV_PREFIX}{name.upper()}"]
    if name.endswith("_s"):
        names.append(f"{ENV_PREFIX}{name.removesuffix('_s').upper()}")
    return tuple(names)


def variable(name: str) -> str:
    """The variable of setting ``name`` as the docs name it (a setting in seconds: without
    its unit, ``RUNCAST_FLUSH_INTERVAL``)."""
    return variables(name)[-1]


def is_list(name: str) -> bool:
    """Whether setting ``name`` is a list: a repeatable flag, comma-separated variable."""
    return Settings.model_fields[name].annotation == tuple[str, ...]


def default_text(name: str) -> str:
    """How the default of setting ``name`` reads ("" when there is none)."""
    given = option(name).default
    if given is not None:
        return given
    value = Settings.model_fields[name].default
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == ():
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def settings_table(groups: Collection[str] | None = None) -> str:
    """The Markdown table of the settings of ``groups`` (default: every setting), one row
    each in the order they are defined: flag, variable, default, what."""
    rows = ["| flag | environment | default | what |", "|---|---|---|---|"]
    for name in Settings.model_fields:
        opt = option(name)
        if groups is not None and opt.group not in groups:
            continue
        description = Settings.model_fields[name].description or ""
        flag = f"`{opt.flag}`" if opt.flag else ""
        environment = f"`{variable(name)}`"
        if is_list(name):
            environment += " (comma-separated)"
            if opt.flag:
                description += "; repeatable"
        default = default_text(name)
        value = Settings.model_fields[name].default
        if default and opt.default is None and not isinstance(value, bool):  # a value
            default = f"`{default}`"
        rows.append(f"| {flag} | {environment} | {default} | {description} |")
    return "\n".join(rows) + "\n"


# A generated table in a Markdown file: between these two comments, which name its groups.
_TABLE = re.compile(
    r"(?P<begin><!-- settings table \((?P<groups>[a-z ,]+)\): generated from app/config\.py"
    r"[^\n]*-->\n)(?P<table>.*?)(?P<end><!-- end of the settings table -->)",
    re.DOTALL,
)


def rewrite_settings_tables(text: str) -> str:
    """``text`` (Markdown) with each settings table it marks generated anew. A table is
    marked by ``<!-- settings table (GROUPS): generated from app/config.py ... -->``
    before it and ``<!-- end of the settings table -->`` after; GROUPS is ``all`` or
    group names separated by commas."""

    def generated(match: re.Match[str]) -> str:
        named = [group.strip() for group in match["groups"].split(",")]
        unknown = set(named) - {"all", *GROUPS}
        if unknown:
            raise ValueError(f"no settings group {', '.join(sorted(unknown))}")
        table = settings_table(None if named == ["all"] else named)
        return f"{match['begin']}{table}{match['end']}"

    return _TABLE.sub(generated, text)


def settings_tables(text: str) -> list[str]:
    """The settings tables ``text`` marks as generated, as written there."""
    return [match["table"] for match in _TABLE.finditer(text)]


def _main(paths: list[str]) -> int:
    """``python -m app.config FILE...``: rewrite the settings tables of each file."""
    for path in map(Path, paths):
        text = path.read_text(encoding="utf-8")
        if not settings_tables(text):
            print(f"{path}: no settings table marked as generated", file=sys.stderr)
            return 1
        new = rewrite_settings_tables(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
        print(f"{path}: {'rewritten' if new != text else 'up to date'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
