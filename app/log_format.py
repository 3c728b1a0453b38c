"""How ``runcast serve`` logs: ``text`` lines for a terminal, or ``json`` lines for a log
collector. uvicorn's loggers go through the same handler, so every line of the log has
the chosen shape.

A JSON line is one object: ``time`` (UTC, ISO 8601, milliseconds), ``level``
(``debug`` ... ``critical``), ``logger``, ``message``, ``run_id`` and ``connection_id``
when the line is about one, and ``exception`` (the traceback) when it carries one. The
ids are read from the message, where every runcast log call writes them
(``run_id=run_... ended completed``); ``extra={"run_id": ...}`` on a call gives one too
and wins over the message.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

IDS = ("run_id", "connection_id")
_ID_IN_MESSAGE = re.compile(r"\b(run_id|connection_id)=([\w.-]+)")

# uvicorn's own loggers: in runcast they have no handler of their own and propagate.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON (see the module docstring for its keys)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        for key, value in _ID_IN_MESSAGE.findall(message):
            line.setdefault(key, value)
        for key in IDS:
            given = getattr(record, key, None)
            if given is not None:
                line[key] = str(given)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure_logging(
    level: str, log_format: Literal["text", "json"], stream: TextIO | None = None
) -> None:
    """Log at ``level`` and above to ``stream`` (default: stderr) in ``log_format``, the
    records of uvicorn's loggers included (give uvicorn ``log_config=None`` so that it
    keeps them so)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        for old in logger.handlers[:]:
            logger.removeHandler(old)
        logger.setLevel(logging.NOTSET)  # the root's level rules, whatever was set before
        logger.propagate = True
