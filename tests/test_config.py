"""Settings (app/config.py): each setting's flag and variables, read from the environment
with the flags on top, its help, and the Markdown table generated from the definitions.

What a process does with them (refusals, a flag winning over a variable in a real
server) is in tests/test_cli.py; the committed tables in tests/test_readme.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from app.cli import RefusalError, build_parser, main, settings_of
from app.config import (
    ENV_PREFIX,
    GROUPS,
    Settings,
    default_text,
    is_list,
    option,
    rewrite_settings_tables,
    settings_table,
    settings_tables,
    variable,
    variables,
)

# Every setting: its flag (None: the environment only) and the variables it is read
# from, the first one set winning. Each flag and variable that users had before the
# settings were generated is here, so that renaming one fails: it would break their
# scripts and unit files.
EXPECTED: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "host": ("--host", ("RUNCAST_HOST",)),
    "port": ("--port", ("RUNCAST_PORT",)),
    "db": ("--db", ("RUNCAST_DB",)),
    "agents": ("--agents", ("RUNCAST_AGENTS",)),
    "log_level": ("--log-level", ("RUNCAST_LOG_LEVEL",)),
    "log_format": ("--log-format", ("RUNCAST_LOG_FORMAT",)),
    "static_dir": ("--static-dir", ("RUNCAST_STATIC_DIR",)),
    "flush_interval_s": (
        "--flush-interval",
        ("RUNCAST_FLUSH_INTERVAL_S", "RUNCAST_FLUSH_INTERVAL"),
    ),
    "linger_s": ("--linger", ("RUNCAST_LINGER_S", "RUNCAST_LINGER")),
    "broker": ("--broker", ("RUNCAST_BROKER",)),
    "node_id": ("--node-id", ("RUNCAST_NODE_ID",)),
    "lease_s": ("--lease", ("RUNCAST_LEASE_S", "RUNCAST_LEASE")),
    "stop_grace_s": ("--stop-grace", ("RUNCAST_STOP_GRACE_S", "RUNCAST_STOP_GRACE")),
    "shutdown_grace_s": (
        "--shutdown-grace",
        ("RUNCAST_SHUTDOWN_GRACE_S", "RUNCAST_SHUTDOWN_GRACE"),
    ),
    "tail_events": ("--tail-events", ("RUNCAST_TAIL_EVENTS",)),
    "keyframe_every": ("--keyframe-every", ("RUNCAST_KEYFRAME_EVERY",)),
    "max_unflushed": ("--max-unflushed", ("RUNCAST_MAX_UNFLUSHED",)),
    "default_agent": ("--default-agent", ("RUNCAST_DEFAULT_AGENT",)),
    "token_file": ("--token-file", ("RUNCAST_TOKEN_FILE",)),
    "tokens": (None, ("RUNCAST_TOKENS",)),
    "allow_origins": ("--allow-origin", ("RUNCAST_ALLOW_ORIGINS",)),
    "secret": ("--secret", ("RUNCAST_SECRET",)),
    "insecure": ("--insecure", ("RUNCAST_INSECURE",)),
    "metrics_public": ("--metrics-public", ("RUNCAST_METRICS_PUBLIC",)),
    "max_frame_bytes": ("--max-frame-bytes", ("RUNCAST_MAX_FRAME_BYTES",)),
    "max_subscriptions": ("--max-subscriptions", ("RUNCAST_MAX_SUBSCRIPTIONS",)),
    "max_thread_watches": ("--max-thread-watches", ("RUNCAST_MAX_THREAD_WATCHES",)),
    "max_connections_per_address": (
        "--max-connections-per-address",
        ("RUNCAST_MAX_CONNECTIONS_PER_ADDRESS",),
    ),
    "rate": ("--rate", ("RUNCAST_RATE",)),
    "rate_burst": ("--rate-burst", ("RUNCAST_RATE_BURST",)),
    "max_live_runs": ("--max-live-runs", ("RUNCAST_MAX_LIVE_RUNS",)),
    "max_event_bytes": ("--max-event-bytes", ("RUNCAST_MAX_EVENT_BYTES",)),
    "max_input_bytes": ("--max-input-bytes", ("RUNCAST_MAX_INPUT_BYTES",)),
    "ping_interval_s": ("--ping-interval", ("RUNCAST_PING_INTERVAL_S", "RUNCAST_PING_INTERVAL")),
    "write_timeout_s": ("--write-timeout", ("RUNCAST_WRITE_TIMEOUT_S", "RUNCAST_WRITE_TIMEOUT")),
    "openai_base_url": ("--openai-base-url", ("RUNCAST_OPENAI_BASE_URL",)),
    "openai_model": ("--openai-model", ("RUNCAST_OPENAI_MODEL",)),
}

SETTINGS = list(Settings.model_fields)
FLAGGED = [name for name in SETTINGS if option(name).flag]


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The process's environment without any ``RUNCAST_*`` variable; set some with
    ``environ.setenv``."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    return monkeypatch


# -- the definitions -----------------------------------------------------------------------


def test_every_setting_has_the_flag_and_the_variables_users_know() -> None:
    generated = {name: (option(name).flag, variables(name)) for name in SETTINGS}
    assert generated == EXPECTED


@pytest.mark.parametrize("name", SETTINGS)
def test_every_setting_is_described_and_grouped(name: str) -> None:
    field = Settings.model_fields[name]
    # A phrase that reads after its flag and before "(VARIABLE; default ...)".
    assert field.description, name
    assert not field.description.endswith("."), name
    assert option(name).group in GROUPS
    if option(name).flag and field.annotation is not bool:
        assert option(name).metavar, f"{name}: its flag needs a placeholder in the help"
    assert variable(name) in variables(name)


def test_the_flags_are_all_different() -> None:
    flags = [option(name).flag for name in FLAGGED]
    assert len(flags) == len(set(flags))


# -- flags and help --------------------------------------------------------------------------


def sample(name: str) -> tuple[list[str], Any]:
    """A command line that sets ``name``, and the value argparse gives it."""
    flag = option(name).flag
    assert flag is not None
    annotation = Settings.model_fields[name].annotation
    if annotation is bool:
        return [flag], True
    if is_list(name):
        return [flag, "a", flag, "b"], ["a", "b"]
    if annotation in (int, float):
        return [flag, "7"], 7
    return [flag, "x"], "x"


@pytest.mark.parametrize("name", FLAGGED)
def test_each_flag_sets_its_setting(name: str) -> None:
    argv, value = sample(name)
    args = build_parser().parse_args(["serve", *argv])
    assert getattr(args, name) == value
    assert args.setting_flags[name] == option(name).flag
    # Any flag not given is None, so that its variable (or its default) applies.
    others = build_parser().parse_args(["serve"])
    assert all(getattr(others, other) is None for other in FLAGGED)


def test_serve_help_lists_every_setting_with_its_variable_and_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no help text wrapped
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in SETTINGS:
        flag, metavar = option(name).flag, option(name).metavar
        if flag is None:  # under its group's title, from its variable on
            shown = text.split(f" {variable(name)} ", 1)[1]
        else:  # from the flag (as listed, not as in the usage line) to the next one
            listed = f" {flag} {metavar} " if metavar else f" {flag} "
            shown = text.split(listed, 1)[1].split(" --", 1)[0]
            assert f"({variable(name)}" in shown, shown
        if default_text(name):
            assert f"default {default_text(name)}" in shown, shown


def test_db_commands_take_the_generated_db_flag() -> None:
    args = build_parser().parse_args(["db", "check", "--db", "x.db"])
    assert (args.db, args.setting_flags) == ("x.db", {"db": "--db"})


# -- from the environment, flags on top ----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "env", "name", "expected"),
    [
        ([], {"RUNCAST_FLUSH_INTERVAL": "1.5"}, "flush_interval_s", 1.5),
        ([], {"RUNCAST_FLUSH_INTERVAL_S": "1.5"}, "flush_interval_s", 1.5),
        (
            [],
            {"RUNCAST_FLUSH_INTERVAL_S": "1.5", "RUNCAST_FLUSH_INTERVAL": "9"},
            "flush_interval_s",
            1.5,
        ),
        (["--flush-interval", "0.5"], {"RUNCAST_FLUSH_INTERVAL": "1.5"}, "flush_interval_s", 0.5),
        ([], {"RUNCAST_LINGER": "5"}, "linger_s", 5.0),
        (["--linger", "0"], {"RUNCAST_LINGER": "5"}, "linger_s", 0.0),
        ([], {"RUNCAST_PING_INTERVAL": "3"}, "ping_interval_s", 3.0),
        (["--write-timeout", "4"], {}, "write_timeout_s", 4.0),
        ([], {"RUNCAST_PORT": "9000"}, "port", 9000),
        (["--port", "0"], {"RUNCAST_PORT": "9000"}, "port", 0),
        ([], {"RUNCAST_AGENTS": "x, y,,z"}, "agents", ("x", "y", "z")),
        (["--agents", "a", "--agents", "b"], {"RUNCAST_AGENTS": "x"}, "agents", ("a", "b")),
        (
            ["--allow-origin", "https://a.example"],
            {"RUNCAST_ALLOW_ORIGINS": "https://b.example,https://c.example"},
            "allow_origins",
            ("https://a.example",),
        ),
        ([], {"RUNCAST_TOKENS": "admin:x,viewer:y"}, "tokens", ("admin:x", "viewer:y")),
        ([], {"RUNCAST_INSECURE": "true"}, "insecure", True),
        (["--insecure"], {}, "insecure", True),
        ([], {"RUNCAST_METRICS_PUBLIC": "1"}, "metrics_public", True),
        (["--metrics-public"], {"RUNCAST_METRICS_PUBLIC": "0"}, "metrics_public", True),
        ([], {"RUNCAST_LOG_FORMAT": "json"}, "log_format", "json"),
        (["--log-format", "text"], {"RUNCAST_LOG_FORMAT": "json"}, "log_format", "text"),
        ([], {"RUNCAST_LOG_LEVEL": "DEBUG"}, "log_level", "debug"),
        (["--stop-grace", "1"], {"RUNCAST_STOP_GRACE": "9"}, "stop_grace_s", 1.0),
        (["--max-unflushed", "5000"], {}, "max_unflushed", 5000),
        (["--default-agent", "echo"], {"RUNCAST_DEFAULT_AGENT": "ask"}, "default_agent", "echo"),
        ([], {"RUNCAST_DB": "/srv/runs.db"}, "db", Path("/srv/runs.db")),
        ([], {"RUNCAST_OPENAI_BASE_URL": ""}, "openai_base_url", None),
        ([], {}, "flush_interval_s", 0.2),
    ],
)
def test_a_setting_comes_from_its_variable_and_its_flag_wins(
    environ: pytest.MonkeyPatch,
    argv: list[str],
    env: dict[str, str],
    name: str,
    expected: Any,
) -> None:
    for key, value in env.items():
        environ.setenv(key, value)
    settings = settings_of(build_parser().parse_args(["serve", *argv]))
    assert getattr(settings, name) == expected


def test_settings_given_as_values_read_no_environment(environ: pytest.MonkeyPatch) -> None:
    environ.setenv("RUNCAST_PORT", "9000")
    assert Settings().port == 8000
    assert Settings(port=1).port == 1
    assert Settings.from_env().port == 9000
    assert Settings.from_env(env={}).port == 8000  # the mapping given, not the process's
    assert Settings.from_env({"port": None}, env={"RUNCAST_PORT": "2"}).port == 2  # None: unset


def test_settings_are_frozen_and_refuse_unknown_names() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError, match="extra"):
        Settings(no_such_setting=1)


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (
            ["--log-format", "xml"],
            {},
            "invalid setting --log-format: input should be 'text' or 'json' (got 'xml')",
        ),
        (
            [],
            {"RUNCAST_LOG_FORMAT": "xml"},
            "invalid setting RUNCAST_LOG_FORMAT: input should be 'text' or 'json' (got 'xml')",
        ),
        (
            [],
            {"RUNCAST_LINGER_S": "-1"},
            "invalid setting RUNCAST_LINGER_S: input should be greater than or equal to 0 "
            "(got '-1')",
        ),
        (
            [],
            {"RUNCAST_INSECURE": "maybe"},
            "invalid setting RUNCAST_INSECURE: input should be a valid boolean, unable to "
            "interpret input (got 'maybe')",
        ),
        (
            ["--max-unflushed", "1"],
            {},
            "invalid setting --max-unflushed: input should be greater than or equal to 1000 "
            "(got 1)",
        ),
    ],
)
def test_an_invalid_value_is_refused_naming_its_flag_or_variable(
    environ: pytest.MonkeyPatch, argv: list[str], env: dict[str, str], expected: str
) -> None:
    for key, value in env.items():
        environ.setenv(key, value)
    with pytest.raises(RefusalError) as refused:
        settings_of(build_parser().parse_args(["serve", *argv]))
    assert (str(refused.value), refused.value.status) == (expected, 2)


# -- the generated table -------------------------------------------------------------------------


def table_cells(table: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in row.strip("|").split(" | ")] for row in table.splitlines()[2:]
    ]


def test_the_table_has_a_row_for_every_setting_in_order() -> None:
    rows = table_cells(settings_table())
    assert [row[1].split()[0].strip("`") for row in rows] == [variable(n) for n in SETTINGS]
    by_variable = {row[1].split()[0].strip("`"): row for row in rows}
    assert by_variable["RUNCAST_TOKENS"][0] == ""  # no flag
    assert by_variable["RUNCAST_AGENTS"][1] == "`RUNCAST_AGENTS` (comma-separated)"
    assert by_variable["RUNCAST_FLUSH_INTERVAL"][:3] == [
        "`--flush-interval`",
        "`RUNCAST_FLUSH_INTERVAL`",
        "`0.2`",
    ]
    assert by_variable["RUNCAST_INSECURE"][2] == "off"
    assert by_variable["RUNCAST_SECRET"][2] == "one kept in the database"


def test_a_table_of_some_groups_has_only_their_settings() -> None:
    rows = table_cells(settings_table(["limits", "server"]))
    names = [n for n in SETTINGS if option(n).group in ("limits", "server")]
    assert [row[1].split()[0].strip("`") for row in rows] == [variable(n) for n in names]


STALE = """\
# Title

Before.

<!-- settings table (server): generated from app/config.py (python -m app.config X.md) -->
| flag | environment | default | what |
|---|---|---|---|
| `--old` | `RUNCAST_OLD` | | gone |
<!-- end of the settings table -->

Between.

<!-- settings table (all): generated from app/config.py -->
<!-- end of the settings table -->
After.
"""


def test_rewriting_replaces_only_the_marked_tables() -> None:
    text = rewrite_settings_tables(STALE)
    assert settings_tables(text) == [settings_table(["server"]), settings_table()]
    outside = re.sub(r"-->\n.*?<!-- end", "-->\n<!-- end", text, flags=re.DOTALL)
    assert outside == re.sub(r"-->\n.*?<!-- end", "-->\n<!-- end", STALE, flags=re.DOTALL)
    assert rewrite_settings_tables(text) == text


def test_a_table_of_an_unknown_group_is_refused() -> None:
    with pytest.raises(ValueError, match="no settings group nonsense"):
        rewrite_settings_tables(STALE.replace("(server)", "(nonsense)"))


def test_python_m_app_config_rewrites_the_files_it_is_given(tmp_path: Path) -> None:
    docs, plain = tmp_path / "docs.md", tmp_path / "plain.md"
    docs.write_text(STALE)
    plain.write_text("# no table\n")
    command = [sys.executable, "-m", "app.config"]
    done = subprocess.run(
        [*command, str(docs)], capture_output=True, text=True, timeout=30, check=False
    )
    assert (done.returncode, done.stdout) == (0, f"{docs}: rewritten\n"), done.stderr
    assert docs.read_text() == rewrite_settings_tables(STALE)
    done = subprocess.run(
        [*command, str(plain)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 1
    assert done.stderr == f"{plain}: no settings table marked as generated\n"
