"""app/access/policy.py: the role table of PROTOCOL.md §8, walked for every action, role,
scope and resource against an expectation written here from the protocol's text."""

from __future__ import annotations

import itertools

import pytest

from app.access.policy import (
    OPEN,
    SERVER,
    Action,
    Principal,
    Resource,
    Role,
    Scope,
    authorize,
)
from app.errors import ForbiddenError

# PROTOCOL.md §8: viewer reads; operator also starts, stops, responds, changes threads,
# creates and shares (and revokes its own shares); admin also deletes and revokes any share.
NEEDS: dict[Action, Role] = {
    Action.READ: Role.VIEWER,
    Action.START: Role.OPERATOR,
    Action.STOP: Role.OPERATOR,
    Action.RESPOND: Role.OPERATOR,
    Action.CHANGE: Role.OPERATOR,
    Action.CREATE: Role.OPERATOR,
    Action.SHARE: Role.OPERATOR,
    Action.DELETE: Role.ADMIN,
    Action.REVOKE: Role.OPERATOR,
}

# The world: run R1 in thread T1 (the one shared), R3 also in T1, R2 in thread T2.
RESOURCES: dict[str, Resource] = {
    "server": SERVER,
    "the run": Resource.run("R1", "T1"),
    "another run": Resource.run("R2", "T2"),
    "a run of the shared thread": Resource.run("R3", "T1"),
    "the thread": Resource.thread("T1"),
    "another thread": Resource.thread("T2"),
    "a share by the same creator": Resource.share("S9", "ME"),
    "a share by another creator": Resource.share("S9", "SOMEONE"),
}
SCOPES: dict[str, Scope | None] = {
    "no scope": None,
    "run share": Scope("run", "R1"),
    "thread share": Scope("thread", "T1"),
}
# What each scope reaches, by the protocol: a run share that run only; a thread share the
# thread and its runs. The server (listing) is read by all, filtered by the routes.
REACHES: dict[str, set[str]] = {
    "no scope": {
        "server",
        "the run",
        "another run",
        "a run of the shared thread",
        "the thread",
        "another thread",
    },
    "run share": {"the run"},
    "thread share": {"the run", "a run of the shared thread", "the thread"},
}


def expected(role: Role, scope: str, action: Action, resource: str) -> bool:
    if role < NEEDS[action]:
        return False
    if resource.startswith("a share"):
        # Revoking: its creator, or an admin (scope aside: a share has no thread or run).
        return role is Role.ADMIN or resource == "a share by the same creator"
    if resource == "server" and action is Action.READ:
        return True
    return resource in REACHES[scope]


def test_authorize_follows_the_role_table() -> None:
    wrong = []
    for role, scope, action, resource in itertools.product(Role, SCOPES, Action, RESOURCES):
        share_id = None if SCOPES[scope] is None else "S1"
        principal = Principal("ME", role, SCOPES[scope], share_id=share_id)
        try:
            authorize(principal, action, RESOURCES[resource])
            allowed = True
        except ForbiddenError as exc:
            assert exc.code == "forbidden"
            assert exc.message
            allowed = False
        if allowed != expected(role, scope, action, resource):
            wrong.append(f"{role.label} / {scope} / {action} / {resource}: allowed={allowed}")
    assert not wrong, "\n".join(wrong)


def test_the_table_covers_every_action() -> None:
    assert set(NEEDS) == set(Action)


def test_a_role_refusal_names_the_role_needed_and_held() -> None:
    with pytest.raises(ForbiddenError, match=r"operator.*viewer"):
        authorize(Principal("v", Role.VIEWER), Action.STOP, Resource.run("R1", "T1"))


def test_the_open_principal_may_do_anything() -> None:
    for action, resource in itertools.product(Action, RESOURCES.values()):
        authorize(OPEN, action, resource)


@pytest.mark.parametrize(
    ("text", "role"),
    [
        ("viewer", Role.VIEWER),
        ("operator", Role.OPERATOR),
        ("admin", Role.ADMIN),
        ("ADMIN", Role.ADMIN),
        (" Operator ", Role.OPERATOR),
    ],
)
def test_role_parse(text: str, role: Role) -> None:
    assert Role.parse(text) is role
    assert role.label == text.strip().lower()


@pytest.mark.parametrize("text", ["", "root", "admins", "1", "view er", "VIEWER:"])
def test_role_parse_refuses_other_names(text: str) -> None:
    with pytest.raises(ValueError, match="viewer, operator or admin"):
        Role.parse(text)


def test_roles_include_the_ones_below() -> None:
    assert Role.VIEWER < Role.OPERATOR < Role.ADMIN
