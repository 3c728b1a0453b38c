"""app/core/snapshot.py: the reducer of PROTOCOL.md §1, table-driven and by properties."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core import snapshot
from app.core.events import Event, encode

Step = tuple[str, dict[str, Any]]

ERROR = {"code": "internal", "message": "boom"}


def initial() -> dict[str, Any]:
    """The starting state, as PROTOCOL.md §1 writes it."""
    return {
        "status": "queued",
        "message": {"content": "", "thinking": "", "tools": []},
        "usage": {},
        "pending_input": None,
        "data": {},
        "error": None,
    }


def expected(**changes: Any) -> dict[str, Any]:
    """The initial state with top-level keys replaced; ``message`` keys merge."""
    state = initial()
    message = changes.pop("message", {})
    state["message"].update(message)
    state.update(changes)
    return state


def make_events(steps: list[Step]) -> list[Event]:
    return [Event(i, type, data, 1000.0 + i) for i, (type, data) in enumerate(steps, start=1)]


def fold_steps(steps: list[Step]) -> dict[str, Any]:
    return snapshot.fold(make_events(steps))


def tool(id: str, status: str = "running", **extra: Any) -> dict[str, Any]:
    return {"id": id, "name": "search", "args": {"q": id}, "status": status, **extra}


def call(id: str) -> Step:
    return ("tool_call", {"id": id, "name": "search", "args": {"q": id}})


# -- the initial state -----------------------------------------------------------------


def test_initial_state_is_the_protocol_one() -> None:
    assert snapshot.initial_state() == initial()
    assert snapshot.fold([]) == initial()


def test_initial_state_is_fresh_each_time() -> None:
    first = snapshot.initial_state()
    first["message"]["tools"].append({"id": "x"})
    first["usage"]["n"] = 1
    first["data"]["k"] = 1
    assert snapshot.initial_state() == initial()


# -- one table over every standard type ------------------------------------------------

CASES: list[tuple[str, list[Step], dict[str, Any]]] = [
    # text / thinking
    ("text", [("text", {"text": "Hel"})], expected(message={"content": "Hel"})),
    (
        "text appends",
        [("text", {"text": "Hel"}), ("text", {"text": "lo"}), ("text", {"text": ""})],
        expected(message={"content": "Hello"}),
    ),
    (
        "thinking appends",
        [("thinking", {"text": "Let me "}), ("thinking", {"text": "see"})],
        expected(message={"thinking": "Let me see"}),
    ),
    (
        "text and thinking stay apart",
        [
            ("thinking", {"text": "hm"}),
            ("text", {"text": "A"}),
            ("thinking", {"text": "!"}),
            ("text", {"text": "B"}),
        ],
        expected(message={"content": "AB", "thinking": "hm!"}),
    ),
    ("text without text", [("text", {})], expected()),
    # status
    ("status", [("status", {"status": "running"})], expected(status="running")),
    (
        "status sequence",
        [
            ("status", {"status": "running"}),
            ("status", {"status": "requires_action"}),
            ("status", {"status": "running"}),
            ("status", {"status": "completed"}),
        ],
        expected(status="completed"),
    ),
    (
        "failed sets error",
        [("status", {"status": "running"}), ("status", {"status": "failed", "error": ERROR})],
        expected(status="failed", error=ERROR),
    ),
    (
        "stopped: by is not state",
        [("status", {"status": "stopped", "by": "conn_1"})],
        expected(status="stopped"),
    ),
    (
        "interrupted: reason is not state",
        [("status", {"status": "interrupted", "reason": "crash"})],
        expected(status="interrupted"),
    ),
    (
        "status without error keeps the error",
        [
            ("status", {"status": "running", "error": ERROR}),
            ("status", {"status": "requires_action"}),
        ],
        expected(status="requires_action", error=ERROR),
    ),
    (
        "status with a null error clears it",
        [
            ("status", {"status": "running", "error": ERROR}),
            ("status", {"status": "requires_action", "error": None}),
        ],
        expected(status="requires_action"),
    ),
    # tool_call / tool_result
    ("tool_call", [call("t1")], expected(message={"tools": [tool("t1")]})),
    (
        "tool_call keeps order",
        [call("t1"), call("t2")],
        expected(message={"tools": [tool("t1"), tool("t2")]}),
    ),
    (
        "tool_call with missing keys",
        [("tool_call", {"id": "t1"})],
        expected(
            message={"tools": [{"id": "t1", "name": None, "args": None, "status": "running"}]}
        ),
    ),
    (
        "tool_result output",
        [call("t1"), ("tool_result", {"id": "t1", "output": {"hits": 3}})],
        expected(message={"tools": [tool("t1", "completed", output={"hits": 3})]}),
    ),
    (
        "tool_result null output",
        [call("t1"), ("tool_result", {"id": "t1", "output": None})],
        expected(message={"tools": [tool("t1", "completed", output=None)]}),
    ),
    (
        "tool_result without output",
        [call("t1"), ("tool_result", {"id": "t1"})],
        expected(message={"tools": [tool("t1", "completed")]}),
    ),
    (
        "tool_result error",
        [call("t1"), ("tool_result", {"id": "t1", "error": "timeout"})],
        expected(message={"tools": [tool("t1", "failed", error="timeout")]}),
    ),
    (
        "tool_result null error is success",
        [call("t1"), ("tool_result", {"id": "t1", "output": 1, "error": None})],
        expected(message={"tools": [tool("t1", "completed", output=1)]}),
    ),
    (
        "tool_result output and error",
        [call("t1"), ("tool_result", {"id": "t1", "output": "partial", "error": "cut"})],
        expected(message={"tools": [tool("t1", "failed", output="partial", error="cut")]}),
    ),
    (
        "tool_result reaches only its tool",
        [call("t1"), call("t2"), ("tool_result", {"id": "t1", "output": 1})],
        expected(message={"tools": [tool("t1", "completed", output=1), tool("t2")]}),
    ),
    (
        "tool_result unknown id",
        [call("t1"), ("tool_result", {"id": "nope", "output": 1})],
        expected(message={"tools": [tool("t1")]}),
    ),
    (
        "tool_result before any call",
        [("tool_result", {"id": "t1", "output": 1})],
        expected(),
    ),
    (
        "id reused after its result",
        [
            call("t1"),
            ("tool_result", {"id": "t1", "output": 1}),
            call("t1"),
            ("tool_result", {"id": "t1", "error": "e"}),
        ],
        expected(
            message={"tools": [tool("t1", "completed", output=1), tool("t1", "failed", error="e")]}
        ),
    ),
    (
        "repeated id: the latest call gets the result",
        [call("t1"), call("t1"), ("tool_result", {"id": "t1", "output": 2})],
        expected(message={"tools": [tool("t1"), tool("t1", "completed", output=2)]}),
    ),
    (
        "a second result replaces the first: error then output",
        [
            call("t1"),
            ("tool_result", {"id": "t1", "error": "e"}),
            ("tool_result", {"id": "t1", "output": 5}),
        ],
        expected(message={"tools": [tool("t1", "completed", output=5)]}),
    ),
    (
        "a second result replaces the first: output then error",
        [
            call("t1"),
            ("tool_result", {"id": "t1", "output": 5}),
            ("tool_result", {"id": "t1", "error": "e"}),
        ],
        expected(message={"tools": [tool("t1", "failed", error="e")]}),
    ),
    # usage
    (
        "usage",
        [("usage", {"input_tokens": 10, "output_tokens": 2})],
        expected(usage={"input_tokens": 10, "output_tokens": 2}),
    ),
    (
        "usage counters add",
        [
            ("usage", {"input_tokens": 10, "output_tokens": 2}),
            ("usage", {"output_tokens": 3, "cost": 0.5}),
            ("usage", {"output_tokens": -1, "cost": 0.25}),
        ],
        expected(usage={"input_tokens": 10, "output_tokens": 4, "cost": 0.75}),
    ),
    (
        "usage ignores what is not a number",
        [
            ("usage", {"a": 1}),
            (
                "usage",
                {"a": "5", "b": True, "c": None, "d": [1], "e": {"x": 1}, "f": False},
            ),
        ],
        expected(usage={"a": 1}),
    ),
    # input_required / input_received
    (
        "input_required",
        [
            (
                "input_required",
                {"request_id": "req_1", "prompt": "Name?", "schema": {"type": "string"}},
            )
        ],
        expected(
            pending_input={"request_id": "req_1", "prompt": "Name?", "schema": {"type": "string"}}
        ),
    ),
    (
        "input_received",
        [
            ("input_required", {"request_id": "req_1", "prompt": "Name?"}),
            ("input_received", {"request_id": "req_1", "value": "Ada"}),
        ],
        expected(),
    ),
    (
        "input asked twice",
        [
            ("input_required", {"request_id": "req_1", "prompt": "A?"}),
            ("input_received", {"request_id": "req_1", "value": 1}),
            ("input_required", {"request_id": "req_2", "prompt": "B?"}),
        ],
        expected(pending_input={"request_id": "req_2", "prompt": "B?"}),
    ),
    # state: RFC 7386 JSON Merge Patch into data
    ("state", [("state", {"a": 1, "b": [1, 2]})], expected(data={"a": 1, "b": [1, 2]})),
    (
        "state merges",
        [("state", {"a": 1}), ("state", {"b": 2}), ("state", {"a": 3})],
        expected(data={"a": 3, "b": 2}),
    ),
    (
        "state null deletes",
        [("state", {"a": 1, "b": 2}), ("state", {"a": None, "missing": None})],
        expected(data={"b": 2}),
    ),
    (
        "state nested objects merge",
        [
            ("state", {"doc": {"title": "t", "meta": {"x": 1, "y": 2}}}),
            ("state", {"doc": {"meta": {"y": None, "z": 3}}}),
        ],
        expected(data={"doc": {"title": "t", "meta": {"x": 1, "z": 3}}}),
    ),
    (
        "state arrays are replaced, not merged",
        [("state", {"a": [1, 2, 3]}), ("state", {"a": [4]})],
        expected(data={"a": [4]}),
    ),
    (
        "state object replaces a scalar",
        [("state", {"a": 1}), ("state", {"a": {"b": 1, "c": None}})],
        expected(data={"a": {"b": 1}}),
    ),
    (
        "state scalar replaces an object",
        [("state", {"a": {"b": 1}}), ("state", {"a": "x"})],
        expected(data={"a": "x"}),
    ),
    ("state empty patch", [("state", {"a": 1}), ("state", {})], expected(data={"a": 1})),
    # anything else
    (
        "unknown types have no effect",
        [
            ("tick", {"n": 1}),
            ("custom", {"text": "x", "status": "failed", "a": 1}),
            ("Text", {"text": "x"}),
            ("STATE", {"a": 1}),
            ("", {}),
        ],
        expected(),
    ),
]


@pytest.mark.parametrize(
    ("steps", "want"), [(s, w) for _, s, w in CASES], ids=[c[0] for c in CASES]
)
def test_fold(steps: list[Step], want: dict[str, Any]) -> None:
    assert fold_steps(steps) == want


def test_a_whole_run() -> None:
    steps: list[Step] = [
        ("status", {"status": "running"}),
        ("thinking", {"text": "Looking up"}),
        call("t1"),
        ("tool_result", {"id": "t1", "output": ["doc"]}),
        ("tick", {"n": 1}),
        ("text", {"text": "Here "}),
        ("usage", {"input_tokens": 5, "output_tokens": 1}),
        ("state", {"progress": {"done": 1, "total": 2}}),
        ("status", {"status": "requires_action"}),
        ("input_required", {"request_id": "req_1", "prompt": "ok?"}),
        ("input_received", {"request_id": "req_1", "value": True}),
        ("status", {"status": "running"}),
        ("text", {"text": "it is."}),
        ("usage", {"output_tokens": 2}),
        ("state", {"progress": {"done": 2}}),
        ("status", {"status": "completed"}),
    ]
    assert fold_steps(steps) == {
        "status": "completed",
        "message": {
            "content": "Here it is.",
            "thinking": "Looking up",
            "tools": [tool("t1", "completed", output=["doc"])],
        },
        "usage": {"input_tokens": 5, "output_tokens": 3},
        "pending_input": None,
        "data": {"progress": {"done": 2, "total": 2}},
        "error": None,
    }


def test_apply_changes_the_state_in_place() -> None:
    state = snapshot.initial_state()
    message = state["message"]
    snapshot.apply(state, "text", {"text": "a"})
    snapshot.apply(state, "usage", {"n": 2})
    assert state["message"] is message
    assert message["content"] == "a"
    assert state["usage"] == {"n": 2}


def test_text_grows_in_place_yet_a_reference_taken_before_keeps_its_value() -> None:
    state = snapshot.initial_state()
    for k in range(10_000):
        snapshot.apply(state, "text", {"text": f"{k},"})
        snapshot.apply(state, "thinking", {"text": "."})
    text = "".join(f"{k}," for k in range(10_000))
    content = state["message"]["content"]
    assert content == text
    assert state["message"]["thinking"] == "." * 10_000
    snapshot.apply(state, "text", {"text": "more"})
    assert content == text  # a string held elsewhere is never grown under it
    assert state["message"]["content"] == text + "more"
    assert list(state["message"]) == ["content", "thinking", "tools"]  # the protocol's order
    assert encode(state).startswith('{"status":"queued","message":{"content":"0,1,')


def test_an_agents_own_type_leaves_the_state_alone() -> None:
    state = snapshot.initial_state()
    snapshot.apply(state, "tick", {"text": "not folded", "status": "failed"})
    assert state == initial()


def test_fold_onto_a_state_starts_from_it_and_leaves_it_alone() -> None:
    start = fold_steps([("text", {"text": "a"}), call("t1"), ("usage", {"n": 1})])
    before = copy.deepcopy(start)
    more = make_events([("text", {"text": "b"}), ("tool_result", {"id": "t1", "output": 1})])
    result = snapshot.fold(more, start)
    assert start == before
    assert result == expected(
        message={"content": "ab", "tools": [tool("t1", "completed", output=1)]},
        usage={"n": 1},
    )


# -- JSON Merge Patch: RFC 7386, Appendix A --------------------------------------------

RFC_7386_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "result"), RFC_7386_EXAMPLES)
def test_merge_patch_rfc_7386_examples(target: Any, patch: Any, result: Any) -> None:
    target_before, patch_before = copy.deepcopy(target), copy.deepcopy(patch)
    assert snapshot.merge_patch(target, patch) == result
    assert target == target_before
    assert patch == patch_before


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [
        (t, p, r)
        for t, p, r in RFC_7386_EXAMPLES
        # A first state event sets ``data`` to the target, which it can do when the
        # target is an object holding no null.
        if isinstance(t, dict) and None not in t.values() and isinstance(p, dict)
    ],
)
def test_state_events_follow_rfc_7386(target: Any, patch: Any, result: Any) -> None:
    assert fold_steps([("state", target)])["data"] == target
    assert fold_steps([("state", target), ("state", patch)])["data"] == result


def test_merge_patch_result_objects_are_fresh() -> None:
    patch = {"a": {"b": {"c": 1}}}
    result = snapshot.merge_patch({}, patch)
    result["a"]["b"]["c"] = 2
    result["a"]["x"] = 1
    assert patch == {"a": {"b": {"c": 1}}}


# -- properties ------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6)
_scalar = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**6), max_value=10**6)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | _text
)
_json = st.recursive(
    _scalar,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from("abcd"), children, max_size=3)
    ),
    max_leaves=10,
)
_object = st.dictionaries(st.sampled_from("abcd"), _json, max_size=4)
_tool_id = st.sampled_from(["t1", "t2", "t3"])
_status = st.sampled_from(["running", "requires_action", "completed", "failed", "stopped"])


def _optional(key: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.just({}) | values.map(lambda v: {key: v})


_step: st.SearchStrategy[Step] = st.one_of(
    st.tuples(st.sampled_from(["text", "thinking"]), st.fixed_dictionaries({"text": _text})),
    st.tuples(
        st.just("status"),
        st.builds(lambda s, e: {"status": s, **e}, _status, _optional("error", _json)),
    ),
    st.tuples(
        st.just("tool_call"),
        st.fixed_dictionaries({"id": _tool_id, "name": _text, "args": _json}),
    ),
    st.tuples(
        st.just("tool_result"),
        st.builds(
            lambda i, o, e: {"id": i, **o, **e},
            _tool_id,
            _optional("output", _json),
            _optional("error", _json),
        ),
    ),
    st.tuples(
        st.just("usage"),
        st.dictionaries(st.sampled_from(["input_tokens", "output_tokens", "cost"]), _scalar),
    ),
    st.tuples(
        st.just("input_required"),
        st.fixed_dictionaries({"request_id": _text, "prompt": _text, "schema": _json}),
    ),
    st.tuples(
        st.just("input_received"), st.fixed_dictionaries({"request_id": _text, "value": _json})
    ),
    st.tuples(st.just("state"), _object),
    st.tuples(st.sampled_from(["tick", "custom"]), _object),
)
_steps = st.lists(_step, max_size=25)


@settings(max_examples=100, deadline=None)
@given(steps=_steps)
def test_apply_one_at_a_time_equals_fold(steps: list[Step]) -> None:
    events = make_events(steps)
    state = snapshot.initial_state()
    for event in events:
        snapshot.apply(state, event.type, event.data)
    assert state == snapshot.fold(events)


@settings(max_examples=100, deadline=None)
@given(steps=_steps, data=st.data())
def test_fold_from_a_keyframe_equals_fold_from_the_start(
    steps: list[Step], data: st.DataObject
) -> None:
    events = make_events(steps)
    k = data.draw(st.integers(min_value=0, max_value=len(events)), label="k")
    keyframe = snapshot.fold(events[:k])
    assert snapshot.fold(events[k:], keyframe) == snapshot.fold(events)


@settings(max_examples=100, deadline=None)
@given(steps=_steps)
def test_fold_never_mutates_the_events_data(steps: list[Step]) -> None:
    events = make_events(steps)
    before = [encode(event.data) for event in events]
    # In place, as the engine does, then again from scratch and from a keyframe.
    state = snapshot.initial_state()
    for event in events:
        snapshot.apply(state, event.type, event.data)
    snapshot.fold(events)
    snapshot.fold(events, snapshot.fold(events[: len(events) // 2]))
    assert [encode(event.data) for event in events] == before
    assert [event.json for event in events] == [e.json for e in make_events(steps)]


@settings(max_examples=200, deadline=None)
@given(target=_json, patch=_json)
def test_merge_patch_never_mutates_its_arguments(target: Any, patch: Any) -> None:
    target_before, patch_before = encode(target), encode(patch)
    result = snapshot.merge_patch(target, patch)
    assert encode(patch) == patch_before
    assert encode(target) == target_before
    # RFC 7386 merge patches are idempotent.
    assert snapshot.merge_patch(result, patch) == result


def _has_null_member(value: Any) -> bool:
    if isinstance(value, dict):
        return any(v is None or _has_null_member(v) for v in value.values())
    return False


@settings(max_examples=200, deadline=None)
@given(target=_object, patch=_object)
def test_merge_patch_of_objects_adds_no_nulls(
    target: dict[str, Any], patch: dict[str, Any]
) -> None:
    # A null in an object patch deletes; it never lands in the result (outside arrays).
    result = snapshot.merge_patch(target, patch)
    assert isinstance(result, dict)
    if not _has_null_member(target):
        assert not _has_null_member(result)
    for key, value in patch.items():
        if value is None:
            assert key not in result
        elif not isinstance(value, dict):
            assert result[key] == value
