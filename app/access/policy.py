"""Roles, actions, resources and the one decision: ``authorize``.

A principal holds a role (viewer < operator < admin) and, for a share token, a scope: one
run, or one thread with its turns and runs. An action is a verb of PROTOCOL.md §8's role
table; each needs a least role. A resource is what the action touches: the server (list,
create), a run (with its thread), a thread, or a share (with its creator).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal

from app.errors import ForbiddenError


class Role(enum.IntEnum):
    """Each role includes the ones below it."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        """Raises: ValueError (not a role name)."""
        try:
            return cls[name.strip().upper()]
        except KeyError:
            raise ValueError(f"unknown role {name!r}; expected viewer, operator or admin") from None

    @property
    def label(self) -> str:
        return self.name.lower()


class Action(enum.StrEnum):
    READ = "read"  # subscribe, unsubscribe, watch_thread, ping, every GET
    START = "start"  # start a run (in a new thread: on the server; else on the thread)
    STOP = "stop"
    RESPOND = "respond"
    CHANGE = "change"  # a thread operation of §6, a PATCH
    CREATE = "create"  # a thread
    SHARE = "share"
    DELETE = "delete"
    REVOKE = "revoke"  # a share (its creator may, as may an admin)


LEAST_ROLE: Final[dict[Action, Role]] = {
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

ScopeKind = Literal["run", "thread"]


@dataclass(frozen=True, slots=True)
class Scope:
    """What a share token reaches: one run, or one thread (its turns and runs)."""

    kind: ScopeKind
    id: str


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking. ``id`` names them in a share's ``created_by`` (a server token's
    fingerprint, ``share:<id>``, or ``open``); it is never a secret. ``via``: the shares
    a share was made with (oldest first); revoking any of them ends it too."""

    id: str
    role: Role
    scope: Scope | None = None
    share_id: str | None = None
    expires_at: float | None = None
    via: tuple[str, ...] = ()


OPEN: Final = Principal("open", Role.ADMIN)


@dataclass(frozen=True, slots=True)
class Resource:
    kind: Literal["server", "run", "thread", "share"]
    id: str | None = None
    thread_id: str | None = None  # a run's thread
    created_by: str | None = None  # a share's creator

    @classmethod
    def run(cls, run_id: str, thread_id: str) -> Resource:
        return cls("run", run_id, thread_id)

    @classmethod
    def thread(cls, thread_id: str) -> Resource:
        return cls("thread", thread_id, thread_id)

    @classmethod
    def share(cls, share_id: str, created_by: str) -> Resource:
        return cls("share", share_id, created_by=created_by)


SERVER: Final = Resource("server")


def in_scope(principal: Principal, resource: Resource) -> bool:
    """True when ``resource`` is within the principal's scope (everything, without one)."""
    scope = principal.scope
    if scope is None:
        return True
    if resource.kind == "run":
        return (scope.kind == "run" and scope.id == resource.id) or (
            scope.kind == "thread" and scope.id == resource.thread_id
        )
    if resource.kind == "thread":
        return scope.kind == "thread" and scope.id == resource.id
    return False


def authorize(principal: Principal, action: Action, resource: Resource) -> None:
    """Allow ``principal`` to do ``action`` on ``resource``, or raise.

    The server itself (listing, a new thread) is outside every share's scope, except that
    reading the server means listing, which is filtered to the scope instead.

    Raises:
        ForbiddenError: the role is below what the action needs, or the resource is
            outside the principal's scope.
    """
    need = LEAST_ROLE[action]
    if principal.role < need:
        raise ForbiddenError(
            f"{action.value} needs the {need.label} role; this token is {principal.role.label}"
        )
    if resource.kind == "share":
        if principal.role >= Role.ADMIN or principal.id == resource.created_by:
            return
        raise ForbiddenError("only the creator of a share or an admin may revoke it")
    if resource.kind == "server" and action is Action.READ:
        return
    if not in_scope(principal, resource):
        what = "this server" if resource.kind == "server" else f"this {resource.kind}"
        raise ForbiddenError(f"this token does not reach {what}")
