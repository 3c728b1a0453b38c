"""app/core/events.py: statuses and their transitions, Event encoding, status data."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core import events as ev
from app.core.events import Event, RunStatus

# -- statuses (PROTOCOL.md §1 "Statuses") ---------------------------------------------

WIRE_STATUSES = [
    "queued",
    "running",
    "requires_action",
    "completed",
    "failed",
    "stopped",
    "interrupted",
]
TERMINAL = {"completed", "failed", "stopped", "interrupted"}

# queued -> running <-> requires_action -> one terminal status; a run that is not yet
# ended may end in any terminal status (a queued run can be stopped or interrupted), and
# an ended run never moves again. Written out from the protocol, not from the code.
ALLOWED = {
    ("queued", "running"),
    ("running", "requires_action"),
    ("requires_action", "running"),
    *{(old, new) for old in ("queued", "running", "requires_action") for new in TERMINAL},
}


def test_status_values_are_the_wire_strings() -> None:
    assert [status.value for status in RunStatus] == WIRE_STATUSES
    assert [RunStatus(value) for value in WIRE_STATUSES] == list(RunStatus)
    # A StrEnum: a status is usable wherever its wire string is.
    assert RunStatus.REQUIRES_ACTION == "requires_action"


@pytest.mark.parametrize("value", WIRE_STATUSES)
def test_is_terminal(value: str) -> None:
    assert RunStatus(value).is_terminal is (value in TERMINAL)


def test_terminal_statuses() -> None:
    assert {status.value for status in ev.TERMINAL_STATUSES} == TERMINAL


@pytest.mark.parametrize("new", WIRE_STATUSES)
@pytest.mark.parametrize("old", WIRE_STATUSES)
def test_can_transition(old: str, new: str) -> None:
    assert ev.can_transition(RunStatus(old), RunStatus(new)) is ((old, new) in ALLOWED)


def test_no_status_moves_to_itself_or_back_to_queued() -> None:
    for status in RunStatus:
        assert not ev.can_transition(status, status)
        assert not ev.can_transition(status, RunStatus.QUEUED)


def test_standard_types_are_those_of_the_protocol_table() -> None:
    assert {
        "status",
        "text",
        "thinking",
        "tool_call",
        "tool_result",
        "usage",
        "input_required",
        "input_received",
        "state",
    } == ev.STANDARD_TYPES


# -- event types -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "type",
    [
        "a.b:c-d_e",
        "tick",
        "text",  # a standard type
        "x" * 64,
        "A-Z.a-z:0-9_",
        "0",
        "-",
    ],
)
def test_check_event_type_accepts(type: str) -> None:
    ev.check_event_type(type)
    ev.check_event_type(type)  # and again, as the hot path sees it


@pytest.mark.parametrize(
    ("type", "why"),
    [
        ("a\nb", "a newline would end an SSE line"),
        ("a\rb", "a carriage return too"),
        ("tick\n", "even at the end"),
        ("a b", "space"),
        ("", "empty"),
        ("x" * 65, "65 characters"),
        ("é", "unicode letter"),
        ("tick\u2028", "unicode line separator"),
        ("\uff54ick", "fullwidth letter"),
        ("\u0663", "non-ASCII digit"),
        ("a/b", "slash"),
        ("a\x00", "NUL"),
        ("a\tb", "tab"),
    ],
)
def test_check_event_type_refuses(type: str, why: str) -> None:
    with pytest.raises(ValueError, match="event type") as caught:
        ev.check_event_type(type)
    assert repr(type) in str(caught.value), why
    assert "1..64" in str(caught.value)


def test_the_types_found_good_are_remembered_within_a_bound() -> None:
    for k in range(5_000):
        ev.check_event_type(f"type_{k}")
    assert len(ev._CHECKED) <= 4_096
    ev.check_event_type("type_4999")  # not remembered: checked again, still good


@pytest.mark.parametrize("type", [None, 7, b"tick", ["tick"]])
def test_check_event_type_refuses_what_is_not_a_string(type: Any) -> None:
    with pytest.raises(ValueError, match="must be a string"):
        ev.check_event_type(type)


# -- encode / decode -------------------------------------------------------------------


def test_encode_is_compact_utf8_json() -> None:
    text = ev.encode({"a": [1, 2.5, None, True], "b": 'é "q"', "c": {}})
    assert text == '{"a":[1,2.5,null,true],"b":"é \\"q\\"","c":{}}'


def test_decode_accepts_text_and_bytes() -> None:
    assert ev.decode('{"a":[1,"é"]}') == {"a": [1, "é"]}
    assert ev.decode('{"a":[1,"é"]}'.encode()) == {"a": [1, "é"]}


@pytest.mark.parametrize("text", ["", "{", "nope", "{'a': 1}", "NaN", b"\xff"])
def test_decode_rejects_what_is_not_json(text: str | bytes) -> None:
    with pytest.raises(ValueError):
        ev.decode(text)


# -- Event -----------------------------------------------------------------------------


def test_event_encoding_is_the_protocol_shape_compact() -> None:
    event = Event(7, "text", {"text": "Hel"}, 1763773200.123)
    assert event.json == '{"i":7,"type":"text","data":{"text":"Hel"},"ts":1763773200.123}'
    assert (event.index, event.type, event.data, event.ts) == (
        7,
        "text",
        {"text": "Hel"},
        1763773200.123,
    )
    assert event.to_dict() == {
        "i": 7,
        "type": "text",
        "data": {"text": "Hel"},
        "ts": 1763773200.123,
    }
    assert json.loads(event.json) == event.to_dict()


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (1763773200.1234567, 1763773200.123457),
        (1763773200.1234564, 1763773200.123456),
        (1.0000004, 1.0),
        (2.5, 2.5),
        (0.0, 0.0),
    ],
)
def test_event_ts_is_rounded_to_the_microsecond(ts: float, expected: float) -> None:
    event = Event(1, "tick", {}, ts)
    assert event.ts == expected
    assert json.loads(event.json)["ts"] == expected


def test_event_from_json_keeps_the_text_as_is() -> None:
    text = '{"i": 3, "type": "tick", "data": {"n": 1, "s": "\\u00e9"}, "ts": 2.5}'
    event = Event.from_json(text)
    assert event.json == text
    assert (event.index, event.type, event.data, event.ts) == (3, "tick", {"n": 1, "s": "é"}, 2.5)


def test_event_from_json_of_an_encoding_is_an_equal_event() -> None:
    event = Event(12, "state", {"a": {"b": [1, None]}}, 5.25)
    again = Event.from_json(event.json)
    assert again == event
    assert hash(again) == hash(event)
    assert again.to_dict() == event.to_dict()


def test_event_equality_is_by_encoding() -> None:
    event = Event(1, "text", {"text": "a"}, 1.0)
    assert event == Event(1, "text", {"text": "a"}, 1.0)
    assert event != Event(2, "text", {"text": "a"}, 1.0)
    assert event != Event(1, "text", {"text": "b"}, 1.0)
    assert event != Event(1, "text", {"text": "a"}, 1.5)
    assert event != event.to_dict()
    assert event != event.json
    assert len({event, Event(1, "text", {"text": "a"}, 1.0), Event(2, "x", {}, 1.0)}) == 2


def test_event_repr_names_index_and_type() -> None:
    assert repr(Event(4, "tool_call", {"id": "t"}, 1.0)) == "Event(i=4, type='tool_call')"


def test_event_is_slotted() -> None:
    event = Event(1, "text", {}, 1.0)
    with pytest.raises(AttributeError):
        event.extra = 1  # type: ignore[attr-defined]


_keys = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _keys,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    index=st.integers(min_value=1, max_value=2**40),
    type=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=64),
    data=st.dictionaries(_keys, _json, max_size=5),
    ts=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_event_round_trips_through_its_encoding(
    index: int, type: str, data: dict[str, Any], ts: float
) -> None:
    event = Event(index, type, data, ts)
    assert event.ts == round(event.ts, 6)  # to the microsecond
    assert abs(event.ts - ts) <= 5e-7 + 1e-9 * ts
    decoded = json.loads(event.json)
    assert decoded == {"i": index, "type": type, "data": data, "ts": event.ts}
    assert list(decoded) == ["i", "type", "data", "ts"]
    again = Event.from_json(event.json)
    assert again == event
    assert (again.index, again.type, again.data, again.ts) == (index, type, data, event.ts)


# -- status_data -----------------------------------------------------------------------

ERROR = {"code": "internal", "message": "boom"}


@pytest.mark.parametrize(
    ("status", "kwargs", "expected"),
    [
        (RunStatus.RUNNING, {}, {"status": "running"}),
        (RunStatus.REQUIRES_ACTION, {}, {"status": "requires_action"}),
        (RunStatus.COMPLETED, {}, {"status": "completed"}),
        (RunStatus.FAILED, {"error": ERROR}, {"status": "failed", "error": ERROR}),
        (RunStatus.STOPPED, {"by": "conn_1"}, {"status": "stopped", "by": "conn_1"}),
        (RunStatus.STOPPED, {"by": None}, {"status": "stopped"}),
        (
            RunStatus.INTERRUPTED,
            {"reason": "crash"},
            {"status": "interrupted", "reason": "crash"},
        ),
        (
            RunStatus.FAILED,
            {"error": ERROR, "reason": "r", "by": "b"},
            {"status": "failed", "error": ERROR, "reason": "r", "by": "b"},
        ),
    ],
)
def test_status_data(status: RunStatus, kwargs: dict[str, Any], expected: dict[str, Any]) -> None:
    data = ev.status_data(status, **kwargs)
    assert data == expected
    # Plain strings, so the encoding is the wire form.
    assert type(data["status"]) is str
    assert json.loads(ev.encode(data)) == expected
