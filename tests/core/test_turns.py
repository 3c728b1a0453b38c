"""app/core/turns.py: the active path, the history an agent gets, and what each thread
operation of PROTOCOL.md §6 does to the tree (decided before anything changes)."""

from __future__ import annotations

import copy
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.core.turns import (
    ASSISTANT,
    HEAD,
    USER,
    Turn,
    TurnPlan,
    active_path,
    history,
    last_with_role,
    plan_operation,
)
from app.errors import BadRequestError, NotFoundError


def turn(turn_id: str, parent_id: str | None, role: str, content: str = "") -> Turn:
    run_id = f"run_{turn_id}" if role == ASSISTANT else None
    return Turn(turn_id, "thr", parent_id, role, content or turn_id, run_id, "completed", 1.0)


def tree(*turns: Turn) -> dict[str, Turn]:
    return {t.turn_id: t for t in turns}


# u1 - a1 - u2 - a2 - u3 - a3      (the main line)
#         \ u2b - a2b              (a branch: u2 edited)
#              \ a2c               (a2b regenerated)
TREE = tree(
    turn("u1", None, USER),
    turn("a1", "u1", ASSISTANT),
    turn("u2", "a1", USER),
    turn("a2", "u2", ASSISTANT),
    turn("u3", "a2", USER),
    turn("a3", "u3", ASSISTANT),
    turn("u2b", "a1", USER),
    turn("a2b", "u2b", ASSISTANT),
    turn("a2c", "u2b", ASSISTANT),
)


def ids(turns: list[Turn]) -> list[str]:
    return [t.turn_id for t in turns]


# -- active path and history --------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (None, []),
        ("u1", ["u1"]),
        ("a1", ["u1", "a1"]),
        ("a3", ["u1", "a1", "u2", "a2", "u3", "a3"]),
        ("u3", ["u1", "a1", "u2", "a2", "u3"]),
        ("a2b", ["u1", "a1", "u2b", "a2b"]),
        ("a2c", ["u1", "a1", "u2b", "a2c"]),
    ],
)
def test_active_path_is_the_head_and_its_ancestors_oldest_first(
    head: str | None, expected: list[str]
) -> None:
    assert ids(active_path(TREE, head)) == expected


def test_active_path_of_an_empty_thread() -> None:
    assert active_path({}, None) == []


def test_active_path_refuses_a_cycle() -> None:
    looped = tree(turn("x", "y", USER), turn("y", "x", ASSISTANT))
    with pytest.raises(AssertionError, match="cycle"):
        active_path(looped, "x")


def test_history_is_role_content_and_turn_id_oldest_first() -> None:
    path = active_path(TREE, "a2b")
    assert history(path) == [
        {"turn_id": "u1", "role": "user", "content": "u1"},
        {"turn_id": "a1", "role": "assistant", "content": "a1"},
        {"turn_id": "u2b", "role": "user", "content": "u2b"},
        {"turn_id": "a2b", "role": "assistant", "content": "a2b"},
    ]
    assert history([]) == []


@pytest.mark.parametrize(
    ("head", "role", "expected"),
    [
        ("a3", USER, "u3"),
        ("a3", ASSISTANT, "a3"),
        ("u3", ASSISTANT, "a2"),
        ("u1", ASSISTANT, None),
        (None, USER, None),
    ],
)
def test_last_with_role(head: str | None, role: str, expected: str | None) -> None:
    found = last_with_role(active_path(TREE, head), role)
    assert (found.turn_id if found else None) == expected


def test_turn_to_dict_is_the_wire_shape() -> None:
    assert TREE["a1"].to_dict() == {
        "turn_id": "a1",
        "parent_id": "u1",
        "role": "assistant",
        "content": "a1",
        "run_id": "run_a1",
        "status": "completed",
        "created_at": 1.0,
    }


# -- plan_operation: what each operation does ----------------------------------------------


@pytest.mark.parametrize(
    ("kind", "head", "fields", "new_head", "plan"),
    [
        # start: no turns, the head stays
        ("start", "a3", {}, "a3", None),
        ("start", None, {}, None, None),
        # send: a user turn at the head (whatever it is when the run starts)
        ("send", "a3", {"content": "hi"}, "a3", TurnPlan(HEAD, "hi")),
        ("send", None, {"content": "hi"}, None, TurnPlan(HEAD, "hi")),
        ("send", "a1", {}, "a1", TurnPlan(HEAD, "")),
        # rewind: anywhere in the tree, other branches included, or before the first turn
        ("rewind", "a3", {"turn_id": "a1"}, "a1", None),
        ("rewind", "a3", {"turn_id": "a2c"}, "a2c", None),
        ("rewind", "a2b", {"turn_id": "u3"}, "u3", None),
        ("rewind", "a3", {"turn_id": None}, None, None),
        ("rewind", None, {"turn_id": None}, None, None),
        # edit: a sibling of the user turn (same parent) that a run answers
        ("edit", "a3", {"turn_id": "u2", "content": "new"}, "a3", TurnPlan("a1", "new")),
        ("edit", "a3", {"turn_id": "u1", "content": "new"}, "a3", TurnPlan(None, "new")),
        ("edit", "a3", {"turn_id": "u3", "content": "new"}, "a3", TurnPlan("a2", "new")),
        # edit with run false: the same sibling, that no run answers (it becomes the head)
        (
            "edit",
            "a3",
            {"turn_id": "u2", "content": "new", "run": False},
            "a3",
            TurnPlan("a1", "new", answered=False),
        ),
        # aside: a user turn under the head that a run answers; the head does not move
        ("aside", "a3", {"content": "why?"}, "a3", TurnPlan(HEAD, "why?", moves_head=False)),
        ("aside", None, {"content": "why?"}, None, TurnPlan(HEAD, "why?", moves_head=False)),
        # regenerate: a new answer to the user turn of the last assistant turn
        ("regenerate", "a3", {}, "a3", TurnPlan("u3")),
        ("regenerate", "a2c", {}, "a2c", TurnPlan("u2b")),
        ("regenerate", "u3", {}, "u3", TurnPlan("u2")),
        # undo: the head moves to the parent of the last user turn
        ("undo", "a3", {}, "a2", None),
        ("undo", "u3", {}, "a2", None),
        ("undo", "a2", {}, "a1", None),
        ("undo", "a2c", {}, "a1", None),
        ("undo", "a1", {}, None, None),
        ("undo", "u1", {}, None, None),
    ],
)
def test_plan_operation(
    kind: str,
    head: str | None,
    fields: dict[str, str | bool | None],
    new_head: str | None,
    plan: TurnPlan | None,
) -> None:
    before = copy.deepcopy(TREE)
    assert plan_operation(kind, TREE, head, **fields) == (new_head, plan)
    assert before == TREE  # deciding changes nothing


@pytest.mark.parametrize(
    ("kind", "head", "fields", "error", "field"),
    [
        ("rewind", "a3", {"turn_id": "nope"}, NotFoundError, None),
        ("edit", "a3", {"turn_id": "nope", "content": "x"}, NotFoundError, None),
        ("edit", "a3", {"turn_id": None, "content": "x"}, NotFoundError, None),
        ("edit", "a3", {"turn_id": "a2", "content": "x"}, BadRequestError, "turn_id"),
        ("edit", "a3", {"turn_id": "a2c", "content": "x"}, BadRequestError, "turn_id"),
        ("regenerate", None, {}, BadRequestError, None),
        ("regenerate", "u1", {}, BadRequestError, None),
        ("undo", None, {}, BadRequestError, None),
    ],
)
def test_plan_operation_refuses_what_it_cannot_do(
    kind: str,
    head: str | None,
    fields: dict[str, str | None],
    error: type[Exception],
    field: str | None,
) -> None:
    with pytest.raises(error) as raised:
        plan_operation(kind, TREE, head, **fields)
    assert isinstance(raised.value, NotFoundError | BadRequestError)
    assert raised.value.code == ("not_found" if error is NotFoundError else "bad_request")
    assert raised.value.details.get("field") == field


def test_regenerate_refuses_an_assistant_turn_without_a_user_turn() -> None:
    orphan = tree(turn("a0", None, ASSISTANT))
    with pytest.raises(BadRequestError):
        plan_operation("regenerate", orphan, "a0")


def test_undo_refuses_a_path_without_a_user_turn() -> None:
    orphan = tree(turn("a0", None, ASSISTANT))
    with pytest.raises(BadRequestError):
        plan_operation("undo", orphan, "a0")


def test_an_unknown_operation_is_our_bug() -> None:
    with pytest.raises(AssertionError, match="delete"):
        plan_operation("delete", TREE, "a3")


# -- properties ---------------------------------------------------------------------------


@st.composite
def trees(draw: st.DrawFn) -> tuple[dict[str, Turn], str | None]:
    """A random tree of turns (each turn's parent is an earlier turn or the root) and a
    head anywhere in it."""
    n = draw(st.integers(0, 25))
    turns: dict[str, Turn] = {}
    for k in range(n):
        parent = draw(st.sampled_from([None, *turns])) if turns else None
        role = draw(st.sampled_from([USER, ASSISTANT]))
        turns[f"t{k}"] = turn(f"t{k}", parent, role)
    head = draw(st.sampled_from([None, *turns]))
    return turns, head


@given(trees())
def test_the_active_path_is_a_chain_from_the_root_to_the_head(
    case: tuple[dict[str, Turn], str | None],
) -> None:
    turns, head = case
    path = active_path(turns, head)
    if head is None:
        assert path == []
        return
    assert path[-1].turn_id == head
    assert path[0].parent_id is None
    for parent, child in itertools.pairwise(path):
        assert child.parent_id == parent.turn_id
    assert [h["turn_id"] for h in history(path)] == ids(path)


@given(trees())
def test_undo_moves_the_head_to_an_ancestor_before_the_last_user_turn(
    case: tuple[dict[str, Turn], str | None],
) -> None:
    turns, head = case
    path = active_path(turns, head)
    users = [t for t in path if t.role == USER]
    if not users:
        with pytest.raises(BadRequestError):
            plan_operation("undo", turns, head)
        return
    new_head, plan = plan_operation("undo", turns, head)
    assert plan is None
    new_path = active_path(turns, new_head)
    assert ids(new_path) == ids(path)[: len(new_path)]  # a prefix of the old path
    assert ids(new_path) == ids(path)[: path.index(users[-1])]
