"""Events, run statuses and the transitions between them (PROTOCOL.md §1).

An :class:`Event` is immutable and carries its JSON encoding, made once when the event
is created: every subscriber, the SSE stream and the database write the same string.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Set as AbstractSet
from typing import Any, Final

import orjson

JsonObject = dict[str, Any]


class RunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    REQUIRES_ACTION = "requires_action"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"
    INTERRUPTED = "interrupted"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: Final = frozenset(
    {RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.STOPPED, RunStatus.INTERRUPTED}
)

_ENDINGS: Final = TERMINAL_STATUSES
ALLOWED_TRANSITIONS: Final[dict[RunStatus, frozenset[RunStatus]]] = {
    RunStatus.QUEUED: frozenset({RunStatus.RUNNING}) | _ENDINGS,
    RunStatus.RUNNING: frozenset({RunStatus.REQUIRES_ACTION}) | _ENDINGS,
    RunStatus.REQUIRES_ACTION: frozenset({RunStatus.RUNNING}) | _ENDINGS,
    RunStatus.COMPLETED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.STOPPED: frozenset(),
    RunStatus.INTERRUPTED: frozenset(),
}


def can_transition(old: RunStatus, new: RunStatus) -> bool:
    """True when a run in status ``old`` may move to ``new``."""
    return new in ALLOWED_TRANSITIONS[old]


# Standard event types of PROTOCOL.md §1.
STATUS: Final = "status"
TEXT: Final = "text"
THINKING: Final = "thinking"
TOOL_CALL: Final = "tool_call"
TOOL_RESULT: Final = "tool_result"
USAGE: Final = "usage"
INPUT_REQUIRED: Final = "input_required"
INPUT_RECEIVED: Final = "input_received"
STATE: Final = "state"
STANDARD_TYPES: Final = frozenset(
    {STATUS, TEXT, THINKING, TOOL_CALL, TOOL_RESULT, USAGE, INPUT_REQUIRED, INPUT_RECEIVED, STATE}
)

MAX_TYPE_LENGTH: Final = 64
# ASCII letters, digits and ``_ . : -``: a type goes into SSE's ``event:`` line as it is,
# where a newline (or any other control character) would break the framing.
_TYPE_PATTERN: Final = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_TYPE_LENGTH}}}")


def check_event_type(type: str) -> None:
    """Refuse an event type that is not 1..64 of ``A-Z a-z 0-9 _ . : -``.

    Raises:
        ValueError: names the type and what a type may hold.
    """
    if not isinstance(type, str):
        raise ValueError(f"event type must be a string, not {type.__class__.__name__}")
    if type in _CHECKED:
        return
    if _TYPE_PATTERN.fullmatch(type) is None:
        raise ValueError(
            f"event type {type!r} must be 1..{MAX_TYPE_LENGTH} characters of "
            "A-Z, a-z, 0-9, '_', '.', ':' and '-'"
        )
    if len(_CHECKED) < _CHECKED_MAX:
        _CHECKED.add(type)


# Types found good: a run emits a handful of types, each many times, and a set lookup is
# a seventh of a regex match. A cache only (the answer depends on the type alone), bounded.
_CHECKED: Final[set[str]] = set(STANDARD_TYPES)
_CHECKED_MAX: Final = 4096
# The same cache, for a caller's fast path: a ``str`` in it needs no check_event_type (a
# set lookup without the call, on the path of every event an agent emits). Read only.
CHECKED_TYPES: Final[AbstractSet[str]] = _CHECKED


_dumps = orjson.dumps


def encode(obj: Any) -> str:
    """JSON-encode ``obj`` compactly (UTF-8 text, as every frame of the protocol)."""
    return orjson.dumps(obj).decode()


def decode(text: str | bytes) -> Any:
    """Parse JSON text; raises ``orjson.JSONDecodeError`` (a ``ValueError``)."""
    return orjson.loads(text)


class Event:
    """One entry of a run's log: ``{"i", "type", "data", "ts"}`` plus its encoding.

    ``ts`` is given by the caller (the core reads no clock); it is rounded to the
    microsecond, the precision the protocol promises.
    """

    __slots__ = ("data", "index", "json", "ts", "type")

    index: int
    type: str
    data: JsonObject
    ts: float
    json: str

    def __init__(self, index: int, type: str, data: JsonObject, ts: float) -> None:
        self.index = index
        self.type = type
        self.data = data
        # To the microsecond: an integer round and a division cost a quarter of
        # round(ts, 6), which rounds through decimal digits.
        self.ts = ts = round(ts * 1_000_000) / 1_000_000
        self.json = _dumps({"i": index, "type": type, "data": data, "ts": ts}).decode()

    @classmethod
    def from_json(cls, text: str) -> Event:
        """Rebuild an event from its stored encoding, keeping that encoding as is."""
        obj = decode(text)
        event = cls.__new__(cls)
        event.index = obj["i"]
        event.type = obj["type"]
        event.data = obj["data"]
        event.ts = obj["ts"]
        event.json = text
        return event

    def to_dict(self) -> JsonObject:
        return {"i": self.index, "type": self.type, "data": self.data, "ts": self.ts}

    def __repr__(self) -> str:
        return f"Event(i={self.index}, type={self.type!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Event) and self.json == other.json

    def __hash__(self) -> int:
        return hash(self.json)


def status_data(
    status: RunStatus,
    *,
    error: JsonObject | None = None,
    reason: str | None = None,
    by: str | None = None,
) -> JsonObject:
    """The ``data`` of a ``status`` event, with only the keys that apply."""
    data: JsonObject = {"status": status.value}
    if error is not None:
        data["error"] = error
    if reason is not None:
        data["reason"] = reason
    if by is not None:
        data["by"] = by
    return data
