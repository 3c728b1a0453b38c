"""Turns of a thread (PROTOCOL.md §6): a tree of user and assistant turns and a head.

The *active path* is the head and its ancestors, oldest first; it is what an agent gets
as its history. No operation removes a turn: rewinding, editing, regenerating or asking
aside adds turns or moves the head, and every branch stays in the tree (only deleting
the whole thread, PROTOCOL.md §10, erases them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal

from app.core.events import JsonObject
from app.errors import BadRequestError, NotFoundError

Role = Literal["user", "assistant"]
USER: Final = "user"
ASSISTANT: Final = "assistant"


@dataclass(frozen=True, slots=True)
class Turn:
    turn_id: str
    thread_id: str
    parent_id: str | None
    role: str
    content: str
    run_id: str | None
    status: str
    created_at: float

    def to_dict(self) -> JsonObject:
        return {
            "turn_id": self.turn_id,
            "parent_id": self.parent_id,
            "role": self.role,
            "content": self.content,
            "run_id": self.run_id,
            "status": self.status,
            "created_at": self.created_at,
        }


class Head:
    """Marker: "the thread's head at the time the run starts" (a queued send)."""

    def __repr__(self) -> str:
        return "HEAD"


HEAD: Final = Head()


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """The turns an operation writes (a run's, when it starts).

    With ``user_content``, a user turn is added under ``parent`` (a turn id, None for the
    root, or HEAD) and the run answers it; without, the run's assistant turn goes under
    ``parent`` (the user turn it answers again: regenerate). The head moves to the last
    turn written, unless ``moves_head`` is false (an aside: a branch of its own). Without
    ``answered`` no run answers: only the user turn is written, and it becomes the head
    (an edit saved with ``"run": false``).
    """

    parent: str | Head | None
    user_content: str | None = None
    moves_head: bool = True
    answered: bool = True


def active_path(turns: Mapping[str, Turn], head: str | None) -> list[Turn]:
    """``head`` and its ancestors, oldest first (empty when ``head`` is None)."""
    path: list[Turn] = []
    seen: set[str] = set()
    turn_id = head
    while turn_id is not None:
        assert turn_id not in seen, f"cycle in turns at {turn_id}"
        seen.add(turn_id)
        turn = turns[turn_id]
        path.append(turn)
        turn_id = turn.parent_id
    path.reverse()
    return path


def last_with_role(path: list[Turn], role: str) -> Turn | None:
    """The newest turn of ``path`` with ``role``."""
    for turn in reversed(path):
        if turn.role == role:
            return turn
    return None


def history(path: list[Turn]) -> list[JsonObject]:
    """What an agent receives: role, content and turn id of each turn, oldest first."""
    return [{"turn_id": t.turn_id, "role": t.role, "content": t.content} for t in path]


OPERATIONS: Final = ("start", "send", "edit", "regenerate", "rewind", "undo", "aside")
# Operations that start a run (``edit`` unless ``run`` is false).
RUN_OPERATIONS: Final = frozenset({"start", "send", "edit", "regenerate", "aside"})


def plan_operation(
    kind: str,
    turns: Mapping[str, Turn],
    head: str | None,
    *,
    turn_id: str | None = None,
    content: str | None = None,
    run: bool = True,
) -> tuple[str | None, TurnPlan | None]:
    """What a thread operation does to the tree, decided before anything changes.

    Returns the new head and, for an operation that writes turns, the plan of the turns
    it (or its run) writes. ``run`` false: an ``edit`` that starts no run.

    Raises:
        NotFoundError: ``turn_id`` is not a turn of this thread.
        BadRequestError: nothing to act on (undo/regenerate), or editing a non-user turn.
    """
    path = active_path(turns, head)
    if kind == "start":
        return head, None
    if kind == "send":
        return head, TurnPlan(HEAD, content or "")
    if kind == "rewind":
        if turn_id is not None and turn_id not in turns:
            raise NotFoundError(f"no turn {turn_id} in this thread")
        return turn_id, None
    if kind == "edit":
        turn = turns.get(turn_id or "")
        if turn is None:
            raise NotFoundError(f"no turn {turn_id} in this thread")
        if turn.role != USER:
            raise BadRequestError("only a user turn can be edited", field="turn_id")
        return head, TurnPlan(turn.parent_id, content or "", answered=run)
    if kind == "regenerate":
        answer = last_with_role(path, ASSISTANT)
        if answer is None or answer.parent_id is None:
            raise BadRequestError("the active path has no assistant turn to regenerate")
        return head, TurnPlan(answer.parent_id)
    if kind == "undo":
        question = last_with_role(path, USER)
        if question is None:
            raise BadRequestError("the active path has no user turn to undo")
        return question.parent_id, None
    if kind == "aside":
        return head, TurnPlan(HEAD, content or "", moves_head=False)
    raise AssertionError(f"unknown thread operation {kind!r}")
