"""app/log_format.py: the JSON line of a record, and one handler for runcast's and
uvicorn's loggers. A real ``runcast serve --log-format json`` is in tests/test_cli.py."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from app.log_format import UVICORN_LOGGERS, JsonFormatter, configure_logging


def record(message: str, *args: Any, **attributes: Any) -> logging.LogRecord:
    made = logging.LogRecord("app.engine.manager", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(attributes)
    return made


def line(made: logging.LogRecord) -> dict[str, Any]:
    text = JsonFormatter().format(made)
    assert "\n" not in text
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def test_a_line_has_time_level_logger_and_message() -> None:
    parsed = line(record("store open at %s", "x.db"))
    assert {k: parsed[k] for k in ("level", "logger", "message")} == {
        "level": "info",
        "logger": "app.engine.manager",
        "message": "store open at x.db",
    }
    assert parsed["time"].endswith("Z")
    assert datetime.fromisoformat(parsed["time"]).utcoffset() is not None
    assert set(parsed) == {"time", "level", "logger", "message"}


@pytest.mark.parametrize(
    ("message", "args", "ids"),
    [
        ("run_id=%s ended %s", ("run_3xY-k", "completed"), {"run_id": "run_3xY-k"}),
        ("run_id=%s: agent %s failed", ("run_a", "demo"), {"run_id": "run_a"}),
        ("connection_id=%s connected", ("conn_b",), {"connection_id": "conn_b"}),
        (
            "connection_id=%s stopped run_id=%s",
            ("conn_c", "run_d"),
            {"connection_id": "conn_c", "run_id": "run_d"},
        ),
        ("shutdown: final flush", (), {}),
        ("a thread_run_id=x is not a run_id", (), {}),
    ],
)
def test_the_ids_in_a_message_become_keys(
    message: str, args: tuple[str, ...], ids: dict[str, str]
) -> None:
    parsed = line(record(message, *args))
    assert {k: parsed[k] for k in ("run_id", "connection_id") if k in parsed} == ids
    assert parsed["message"] == message % args  # the message itself is unchanged


def test_an_id_given_with_extra_wins_over_the_message() -> None:
    parsed = line(record("run_id=run_old restarted", run_id="run_new", connection_id="conn_x"))
    assert (parsed["run_id"], parsed["connection_id"]) == ("run_new", "conn_x")


def test_a_traceback_is_one_key_of_the_one_line() -> None:
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        made = record("run_id=%s: agent failed", "run_z", exc_info=sys.exc_info())
    parsed = line(made)
    assert parsed["run_id"] == "run_z"
    assert parsed["exception"].startswith("Traceback (most recent call last):")
    assert parsed["exception"].endswith("ZeroDivisionError: division by zero")


def test_text_that_is_not_ascii_stays_readable() -> None:
    assert JsonFormatter().format(record("café ☕")).count("café ☕") == 1


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Put the root and uvicorn loggers back as they were (pytest's handlers included)."""
    names = ["", *UVICORN_LOGGERS]
    saved = {
        name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
        for name in names
    }
    level = logging.getLogger().level
    try:
        yield
    finally:
        for name, (handlers, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        logging.getLogger().setLevel(level)


@pytest.mark.usefixtures("restored_logging")
def test_uvicorn_and_runcast_records_go_through_one_handler() -> None:
    access = logging.getLogger("uvicorn.access")
    access.addHandler(logging.StreamHandler(io.StringIO()))  # as uvicorn's own config does
    access.propagate = False
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/api/health", "1.1", 200)
    logging.getLogger("app.transport.ws").info("connection_id=%s connected", "conn_q")
    logging.getLogger("app.transport.ws").debug("below the level")
    lines = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert [(parsed["logger"], parsed["message"]) for parsed in lines] == [
        ("uvicorn.access", '127.0.0.1:5000 - "GET /api/health HTTP/1.1" 200'),
        ("app.transport.ws", "connection_id=conn_q connected"),
    ]
    assert lines[1]["connection_id"] == "conn_q"


@pytest.mark.usefixtures("restored_logging")
def test_text_lines_keep_their_shape() -> None:
    stream = io.StringIO()
    configure_logging("warning", "text", stream)
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    logging.getLogger("app").info("below the level")
    [text] = stream.getvalue().splitlines()
    assert text.endswith(" WARNING uvicorn.error: Invalid HTTP request received.")
