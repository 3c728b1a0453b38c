"""app/transport/wire.py, pure: client frames parsed per PROTOCOL.md §2, server frames built."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.core.events import Event
from app.engine.threads import ThreadChanged
from app.errors import (
    BadRequestError,
    CursorOutOfRangeError,
    NotFoundError,
    RuncastError,
    RunInProgressError,
)
from app.transport import wire

# -- parse_op: valid frames ------------------------------------------------------------

VALID: list[tuple[dict[str, Any], type[Any], dict[str, Any]]] = [
    (
        {"op": "subscribe", "run_id": "run_1"},
        wire.SubscribeOp,
        {
            "ref": None,
            "run_id": "run_1",
            "after": 0,
            "epoch": None,
            "snapshot": False,
            "presence": True,
        },
    ),
    (
        {
            "op": "subscribe",
            "ref": "r1",
            "run_id": "run_1",
            "after": 5,
            "epoch": "e1",
            "snapshot": True,
            "presence": False,
        },
        wire.SubscribeOp,
        {
            "ref": "r1",
            "run_id": "run_1",
            "after": 5,
            "epoch": "e1",
            "snapshot": True,
            "presence": False,
        },
    ),
    (
        {"op": "subscribe", "run_id": "run_1", "after": "latest", "epoch": None},
        wire.SubscribeOp,
        {"after": "latest", "epoch": None},
    ),
    ({"op": "unsubscribe", "run_id": "run_1", "ref": 3}, wire.UnsubscribeOp, {"run_id": "run_1"}),
    (
        {"op": "start", "agent": "counter", "input": {"n": 3}},
        wire.StartOp,
        {
            "agent": "counter",
            "input": {"n": 3},
            "thread_id": None,
            "multitask": "reject",
            "subscribe": True,
        },
    ),
    *[
        (
            {
                "op": "start",
                "agent": "demo",
                "input": {"nested": {"a": [1, None]}},
                "thread_id": "thr_1",
                "multitask": multitask,
                "subscribe": False,
            },
            wire.StartOp,
            {
                "agent": "demo",
                "input": {"nested": {"a": [1, None]}},
                "thread_id": "thr_1",
                "multitask": multitask,
                "subscribe": False,
            },
        )
        for multitask in ("reject", "interrupt", "enqueue", "rollback")
    ],
    ({"op": "stop", "run_id": "run_1"}, wire.StopOp, {"run_id": "run_1"}),
    (
        {"op": "respond", "run_id": "run_1", "request_id": "req_1", "value": {"name": "Ada"}},
        wire.RespondOp,
        {"run_id": "run_1", "request_id": "req_1", "value": {"name": "Ada"}},
    ),
    (
        {"op": "respond", "run_id": "run_1", "request_id": "req_1", "value": None},
        wire.RespondOp,
        {"value": None},
    ),
    (
        {"op": "respond", "run_id": "run_1", "request_id": "req_1", "value": [1, "2", 3.5]},
        wire.RespondOp,
        {"value": [1, "2", 3.5]},
    ),
    ({"op": "watch_thread", "thread_id": "thr_1"}, wire.WatchThreadOp, {"thread_id": "thr_1"}),
    (
        {"op": "unwatch_thread", "thread_id": "thr_1"},
        wire.UnwatchThreadOp,
        {"thread_id": "thr_1"},
    ),
    ({"op": "ping"}, wire.PingOp, {"ref": None}),
    ({"op": "ping", "ref": "a"}, wire.PingOp, {"ref": "a"}),
    ({"op": "ping", "ref": 7}, wire.PingOp, {"ref": 7}),
    ({"op": "ping", "ref": 1.5}, wire.PingOp, {"ref": 1.5}),
    ({"op": "ping", "ref": None}, wire.PingOp, {"ref": None}),
    ({"op": "stop", "run_id": "r" * 200}, wire.StopOp, {"run_id": "r" * 200}),
]


@pytest.mark.parametrize(
    ("frame", "model", "fields"), VALID, ids=[f"{i}-{v[0]['op']}" for i, v in enumerate(VALID)]
)
def test_parse_op_valid(frame: dict[str, Any], model: type[Any], fields: dict[str, Any]) -> None:
    text = json.dumps(frame)
    for raw in (text, text.encode()):
        ref, op = wire.parse_op(raw)
        assert type(op) is model
        assert op.op == frame["op"]  # type: ignore[attr-defined]
        assert ref == frame.get("ref")
        assert {key: getattr(op, key) for key in fields} == fields


def test_every_op_of_the_protocol_is_known() -> None:
    assert set(wire.OPS) == {
        "subscribe",
        "unsubscribe",
        "start",
        "stop",
        "respond",
        "watch_thread",
        "unwatch_thread",
        "ping",
        "send",
        "rewind",
        "edit",
        "regenerate",
        "undo",
        "aside",
    }


def test_parsed_ops_are_frozen() -> None:
    _, op = wire.parse_op('{"op": "stop", "run_id": "run_1"}')
    with pytest.raises(ValueError):
        op.run_id = "other"  # type: ignore[attr-defined]


# -- parse_op: bad frames --------------------------------------------------------------

NOT_READABLE: list[str | bytes] = [
    "",
    "{",
    "nope",
    "{'op': 'ping'}",
    '{"op": "ping",}',
    b"\xff\xfe",
    "[]",
    "1",
    '"ping"',
    "null",
    "true",
    '[{"op": "ping"}]',
]


@pytest.mark.parametrize("text", NOT_READABLE)
def test_parse_op_frame_not_a_json_object(text: str | bytes) -> None:
    with pytest.raises(BadRequestError) as caught:
        wire.parse_op(text)
    error = caught.value
    assert error.code == "bad_request"
    assert "field" not in error.details
    assert "ref" not in error.details
    assert error.to_dict()["code"] == "bad_request"


BAD: list[tuple[dict[str, Any], str]] = [
    # missing or unknown op
    ({}, "op"),
    ({"ref": 1}, "op"),
    ({"op": None}, "op"),
    ({"op": "subscribe2", "run_id": "r"}, "op"),
    ({"op": "SUBSCRIBE", "run_id": "r"}, "op"),
    ({"op": ""}, "op"),
    ({"op": 5}, "op"),
    ({"op": True}, "op"),
    ({"op": ["ping"]}, "op"),
    ({"op": {"name": "ping"}}, "op"),
    # missing fields
    ({"op": "subscribe"}, "run_id"),
    ({"op": "subscribe", "after": 1}, "run_id"),
    ({"op": "unsubscribe"}, "run_id"),
    ({"op": "start", "input": {}}, "agent"),
    ({"op": "stop"}, "run_id"),
    ({"op": "respond", "request_id": "q", "value": 1}, "run_id"),
    ({"op": "respond", "run_id": "r", "value": 1}, "request_id"),
    ({"op": "watch_thread"}, "thread_id"),
    ({"op": "unwatch_thread"}, "thread_id"),
    # wrongly typed fields: strict, "5" is not an int and true is not one either
    ({"op": "subscribe", "run_id": "r", "after": "5"}, "after"),
    ({"op": "subscribe", "run_id": "r", "after": True}, "after"),
    ({"op": "subscribe", "run_id": "r", "after": -1}, "after"),
    ({"op": "subscribe", "run_id": "r", "after": 1.0}, "after"),
    ({"op": "subscribe", "run_id": "r", "after": 1.5}, "after"),
    ({"op": "subscribe", "run_id": "r", "after": "earliest"}, "after"),
    ({"op": "subscribe", "run_id": "r", "after": None}, "after"),
    ({"op": "subscribe", "run_id": "r", "after": [1]}, "after"),
    ({"op": "subscribe", "run_id": "r", "epoch": 5}, "epoch"),
    ({"op": "subscribe", "run_id": "r", "snapshot": "true"}, "snapshot"),
    ({"op": "subscribe", "run_id": "r", "snapshot": 1}, "snapshot"),
    ({"op": "subscribe", "run_id": "r", "presence": 0}, "presence"),
    ({"op": "subscribe", "run_id": 5}, "run_id"),
    ({"op": "subscribe", "run_id": ""}, "run_id"),
    ({"op": "subscribe", "run_id": "r" * 201}, "run_id"),
    ({"op": "subscribe", "run_id": None}, "run_id"),
    ({"op": "unsubscribe", "run_id": ["r"]}, "run_id"),
    ({"op": "start", "agent": 5, "input": {}}, "agent"),
    ({"op": "start", "agent": "", "input": {}}, "agent"),
    ({"op": "start", "agent": "a", "input": []}, "input"),
    ({"op": "start", "agent": "a", "input": "x"}, "input"),
    ({"op": "start", "agent": "a", "input": None}, "input"),
    ({"op": "start", "agent": "a", "input": {}, "thread_id": 5}, "thread_id"),
    ({"op": "start", "agent": "a", "input": {}, "thread_id": ""}, "thread_id"),
    ({"op": "start", "agent": "a", "input": {}, "multitask": "queue"}, "multitask"),
    ({"op": "start", "agent": "a", "input": {}, "multitask": None}, "multitask"),
    ({"op": "start", "agent": "a", "input": {}, "subscribe": "yes"}, "subscribe"),
    ({"op": "stop", "run_id": True}, "run_id"),
    ({"op": "respond", "run_id": "r", "request_id": 7, "value": 1}, "request_id"),
    ({"op": "watch_thread", "thread_id": 1}, "thread_id"),
    ({"op": "unwatch_thread", "thread_id": {}}, "thread_id"),
    ({"op": "ping", "ref": True}, "ref"),
    ({"op": "ping", "ref": [1]}, "ref"),
    ({"op": "ping", "ref": {"a": 1}}, "ref"),
    # unknown extra fields
    ({"op": "ping", "x": 1}, "x"),
    ({"op": "subscribe", "run_id": "r", "cursor": 3}, "cursor"),
    ({"op": "start", "agent": "a", "inputs": {}}, "inputs"),
    ({"op": "stop", "run_id": "r", "by": "me"}, "by"),
    ({"op": "respond", "run_id": "r", "request_id": "q", "value": 1, "answer": 2}, "answer"),
    ({"op": "watch_thread", "thread_id": "t", "run_id": "r"}, "run_id"),
]


@pytest.mark.parametrize(
    ("frame", "field"), BAD, ids=[f"{i}-{field}" for i, (_, field) in enumerate(BAD)]
)
def test_parse_op_bad_field(frame: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        wire.parse_op(json.dumps(frame))
    error = caught.value
    assert error.code == "bad_request"
    assert error.details == {"field": field}
    assert field in error.message
    assert error.to_dict() == {"code": "bad_request", "message": error.message, "field": field}


@pytest.mark.parametrize(
    ("frame", "words"),
    [
        ({}, "op is missing"),
        ({"op": "nope"}, "unknown op 'nope'"),
        ({"op": "subscribe"}, "run_id is required"),
        ({"op": "ping", "x": 1}, "unknown field x"),
        ({"op": "subscribe", "run_id": "r", "after": "5"}, "op subscribe: after:"),
    ],
)
def test_parse_op_messages_say_what_is_wrong(frame: dict[str, Any], words: str) -> None:
    with pytest.raises(BadRequestError, match=words):
        wire.parse_op(json.dumps(frame))


def test_unknown_op_message_lists_the_known_ones() -> None:
    with pytest.raises(BadRequestError) as caught:
        wire.parse_op('{"op": "nope"}')
    for op in wire.OPS:
        assert op in caught.value.message


# -- read_ref --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "ref"),
    [
        ({"ref": "a"}, "a"),
        ({"ref": 3}, 3),
        ({"ref": 0}, 0),
        ({"ref": -2.5}, -2.5),
        ({"ref": ""}, ""),
        ({"ref": None}, None),
        ({}, None),
        ({"ref": True}, None),
        ({"ref": False}, None),
        ({"ref": [1]}, None),
        ({"ref": {"a": 1}}, None),
        ([{"ref": 1}], None),
        ("ref", None),
        (None, None),
        (7, None),
    ],
)
def test_read_ref(obj: Any, ref: Any) -> None:
    got = wire.read_ref(obj)
    assert got == ref
    assert type(got) is type(ref)


def test_read_ref_of_a_bad_frame_is_still_echoed() -> None:
    text = '{"op": "subscribe", "ref": "r9", "after": "5"}'
    with pytest.raises(BadRequestError):
        wire.parse_op(text)
    assert wire.read_ref(json.loads(text)) == "r9"


# -- HTTP bodies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "obj", "field"),
    [
        (wire.StartRunBody, [], "body"),
        (wire.StartRunBody, "x", "body"),
        (wire.StartRunBody, {}, "agent"),
        (wire.StartRunBody, {"agent": "a", "input": 1}, "input"),
        (wire.StartRunBody, {"agent": "a", "subscribe": True}, "subscribe"),
        (wire.RespondBody, {"value": 1}, "request_id"),
        (wire.CreateThreadBody, {"metadata": []}, "metadata"),
    ],
)
def test_parse_model_names_the_field(model: type[Any], obj: Any, field: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        wire.parse_model(model, obj, "body")
    assert caught.value.details == {"field": field}
    assert caught.value.__cause__ is None


def test_parse_model_valid_body() -> None:
    body = wire.parse_model(wire.StartRunBody, {"agent": "a", "input": {"n": 1}}, "body")
    assert (body.agent, body.input, body.thread_id, body.multitask) == (
        "a",
        {"n": 1},
        None,
        "reject",
    )


# -- server frames ---------------------------------------------------------------------


def _events() -> list[Event]:
    return [
        Event(1, "status", {"status": "running"}, 10.0),
        Event(2, "text", {"text": 'quote " and é'}, 10.000001),
        Event(3, "tick", {"n": [1, {"a": None}]}, 10.5),
    ]


@pytest.mark.parametrize("count", [0, 1, 3])
def test_events_frame_is_the_protocol_structure(count: int) -> None:
    events = _events()[:count]
    frame = wire.events_frame("run_1", "ep1", events)
    decoded = json.loads(frame)
    assert decoded == {
        "type": "events",
        "run_id": "run_1",
        "epoch": "ep1",
        "events": [event.to_dict() for event in events],
    }
    assert list(decoded) == ["type", "run_id", "epoch", "events"]


def test_events_frame_joins_the_events_own_encodings() -> None:
    # Events read back from storage keep their text; the frame must carry it verbatim.
    texts = [
        '{"i": 1, "type": "tick", "data": {"n": 1}, "ts": 1.5}',
        '{ "i":2,"type":"tick","data":{"n":2},"ts":1.6 }',
    ]
    events = [Event.from_json(text) for text in texts]
    frame = wire.events_frame("run_1", "ep1", events)
    assert (
        frame
        == '{"type":"events","run_id":"run_1","epoch":"ep1","events":[' + ",".join(texts) + "]}"
    )
    assert [e["i"] for e in json.loads(frame)["events"]] == [1, 2]


def test_events_frame_with_awkward_ids_is_valid_json() -> None:
    run_id, epoch = 'run_"}]\\', "é\n"
    frame = wire.events_frame(run_id, epoch, _events())
    decoded = json.loads(frame)
    assert (decoded["run_id"], decoded["epoch"]) == (run_id, epoch)
    assert len(decoded["events"]) == 3


@pytest.mark.parametrize("ref", ["r1", 4, 2.5, None])
def test_reply_ok(ref: Any) -> None:
    frame = wire.reply_ok(ref, {"run": {"run_id": "run_1"}})
    decoded = json.loads(frame)
    assert decoded == {
        "type": "reply",
        "ref": ref,
        "ok": True,
        "result": {"run": {"run_id": "run_1"}},
    }
    assert "ref" in decoded
    assert list(decoded) == ["type", "ref", "ok", "result"]


def test_reply_ok_empty_result() -> None:
    assert json.loads(wire.reply_ok(1, {})) == {"type": "reply", "ref": 1, "ok": True, "result": {}}


@pytest.mark.parametrize(
    ("ref", "error", "expected"),
    [
        (
            "r1",
            BadRequestError("op is missing", field="op"),
            {"code": "bad_request", "message": "op is missing", "field": "op"},
        ),
        (
            None,
            BadRequestError("frame is not valid JSON"),
            {"code": "bad_request", "message": "frame is not valid JSON"},
        ),
        (
            2,
            CursorOutOfRangeError(9, 4),
            {
                "code": "cursor_out_of_range",
                "message": "after=9 is past the last index 4 of the run",
                "last_index": 4,
                "field": "after",
            },
        ),
        (
            3,
            RunInProgressError("thr_1", "run_7"),
            {
                "code": "run_in_progress",
                "message": "thread thr_1 already has an active run",
                "active_run_id": "run_7",
            },
        ),
        (4, NotFoundError("no run run_x"), {"code": "not_found", "message": "no run run_x"}),
        (5, RuncastError("boom"), {"code": "internal", "message": "boom"}),
    ],
)
def test_reply_error(ref: Any, error: RuncastError, expected: dict[str, Any]) -> None:
    decoded = json.loads(wire.reply_error(ref, error))
    assert decoded == {"type": "reply", "ref": ref, "ok": False, "error": expected}
    assert list(decoded) == ["type", "ref", "ok", "error"]


def test_other_server_frames() -> None:
    assert json.loads(wire.welcome("0.1.0", "conn_1", "viewer")) == {
        "type": "welcome",
        "protocol": 1,
        "server": "0.1.0",
        "connection_id": "conn_1",
        "role": "viewer",
    }
    snapshot = {"run_id": "run_1", "index": 3, "epoch": "ep", "state": {"status": "running"}}
    assert json.loads(wire.snapshot_frame(snapshot)) == {"type": "snapshot", **snapshot}
    assert json.loads(wire.reset_frame("run_1", "ep2")) == {
        "type": "reset",
        "run_id": "run_1",
        "epoch": "ep2",
    }
    assert json.loads(wire.presence_frame("run_1", 4)) == {
        "type": "presence",
        "run_id": "run_1",
        "watchers": 4,
    }


def test_thread_frame_encodes_a_thread_change() -> None:
    frame = json.loads(wire.thread_frame(ThreadChanged("thr_1", "updated", 3)))
    assert frame == {"type": "thread", "thread_id": "thr_1", "change": "updated", "revision": 3}
    assert list(frame) == ["type", "thread_id", "change", "revision"]


def test_http_status_table_covers_every_error_code() -> None:
    codes = {
        "bad_request",
        "not_found",
        "unknown_agent",
        "run_in_progress",
        "conflict",
        "cursor_out_of_range",
        "not_waiting",
        "unauthorized",
        "forbidden",
        "payload_too_large",
        "too_many_subscriptions",
        "rate_limited",
        "overloaded",
        "internal",
    }
    assert set(wire.HTTP_STATUS) == codes
    assert wire.HTTP_STATUS["bad_request"] == 422
    assert wire.HTTP_STATUS["cursor_out_of_range"] == 422
    assert wire.HTTP_STATUS["run_in_progress"] == 409
    assert wire.HTTP_STATUS["not_found"] == 404
    assert wire.HTTP_STATUS["payload_too_large"] == 413
