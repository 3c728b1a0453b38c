"""Models of what the server sends: every WebSocket frame and the objects inside them.

The server builds its frames as JSON text directly (``app.transport.wire``: an events
frame joins events encoded once); these models describe the same shapes, for the
generated API documents, and the tests hold the two together by validating real frames
against them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal[
    "queued", "running", "requires_action", "completed", "failed", "stopped", "interrupted"
]


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Event(_Frame):
    """One entry of a run's log (PROTOCOL.md §1)."""

    i: int = Field(ge=1, description="index: 1, 2, 3, ... with no gap in an epoch")
    type: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    data: dict[str, Any]
    ts: float = Field(description="Unix seconds when the server appended it")


class RunInfo(_Frame):
    """A run: its thread, agent, status, epoch and last index, its watchers and title."""

    run_id: str
    thread_id: str
    agent: str
    status: Status
    epoch: str
    last_index: int = Field(ge=0)
    created_at: float
    updated_at: float
    watchers: int = Field(ge=0)
    title: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class Turn(_Frame):
    """One message of a thread's tree of turns."""

    turn_id: str
    parent_id: str | None
    role: Literal["user", "assistant"]
    content: str
    run_id: str | None
    status: str
    created_at: float


class ThreadInfo(_Frame):
    """A thread: its revision, head and active run (PROTOCOL.md §10)."""

    thread_id: str
    revision: int = Field(ge=0)
    head: str | None
    active_run_id: str | None
    metadata: dict[str, Any]
    created_at: float
    updated_at: float
    title: str | None = None
    turns: list[Turn] | None = Field(None, description="with a thread's read: the turns")


class Error(BaseModel):
    """The ``error`` object: ``code`` for programs, ``message`` for people, and details
    (``field``, ``active_run_id``, ``last_index``, ``retry_after``, ...) as extra keys."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class Snapshot(_Frame):
    """The state of a run folded up to ``index`` (PROTOCOL.md §2)."""

    run_id: str
    index: int = Field(ge=0)
    epoch: str
    state: dict[str, Any]


class WelcomeFrame(_Frame):
    type: Literal["welcome"]
    protocol: Literal[1]
    server: str
    connection_id: str
    role: Literal["viewer", "operator", "admin"] = Field(
        description="what the connection's token may do"
    )


class ReplyOkFrame(_Frame):
    type: Literal["reply"]
    ref: str | int | float | None
    ok: Literal[True]
    result: dict[str, Any]


class ReplyErrorFrame(_Frame):
    type: Literal["reply"]
    ref: str | int | float | None
    ok: Literal[False]
    error: Error


class EventsFrame(_Frame):
    type: Literal["events"]
    run_id: str
    epoch: str
    events: list[Event] = Field(min_length=1, max_length=1000)


class SnapshotFrame(Snapshot):
    type: Literal["snapshot"]


class ResetFrame(_Frame):
    type: Literal["reset"]
    run_id: str
    epoch: str


class PresenceFrame(_Frame):
    type: Literal["presence"]
    run_id: str
    watchers: int = Field(ge=0)


class ThreadFrame(_Frame):
    type: Literal["thread"]
    thread_id: str
    change: Literal["run_started", "run_ended", "updated", "deleted"]
    run: RunInfo | None = None
    revision: int | None = None


class DeletedFrame(_Frame):
    type: Literal["deleted"]
    run_id: str


SERVER_FRAMES: tuple[type[_Frame], ...] = (
    WelcomeFrame,
    ReplyOkFrame,
    ReplyErrorFrame,
    EventsFrame,
    SnapshotFrame,
    ResetFrame,
    PresenceFrame,
    ThreadFrame,
    DeletedFrame,
)


# -- answers of the HTTP API (PROTOCOL.md §8) ---------------------------------------------
# What the routes of ``app.transport.http`` answer, for the OpenAPI document; the tests
# validate real answers of a live server against them.


class Health(_Frame):
    """``GET /api/health``: the mode and the store's state (503 while it is degraded)."""

    ok: bool
    server: str
    auth: Literal["open", "token"]
    store: Literal["ok", "degraded"]
    runs_in_memory: int = Field(ge=0)
    connections: int = Field(ge=0)


class AgentInfo(_Frame):
    """A registered agent."""

    name: str
    description: str
    input_schema: dict[str, Any] = Field(description="the JSON Schema of the agent's input")


class Agents(_Frame):
    """Every registered agent."""

    agents: list[AgentInfo]


class RunPage(_Frame):
    """A page of runs, newest first; ``next_cursor`` asks for the next one (null: the
    last page)."""

    runs: list[RunInfo]
    next_cursor: str | None


class ThreadPage(_Frame):
    """A page of threads, newest first; ``next_cursor`` asks for the next one (null: the
    last page)."""

    threads: list[ThreadInfo]
    next_cursor: str | None


class EventsPage(_Frame):
    """The events after a cursor, with the run's last index, status and epoch."""

    last_index: int = Field(ge=0)
    status: Status
    epoch: str
    events: list[Event]


class Stopping(_Frame):
    """Whether the run is being stopped, and its status at the time of asking."""

    stopping: bool
    status: Status


class Answered(_Frame):
    """``{}``: the input request was answered."""


class Deleted(_Frame):
    """``{"deleted": true}``: it is erased for good."""

    deleted: Literal[True]


class Revoked(_Frame):
    """``{"revoked": true}``."""

    revoked: Literal[True]


class ThreadChanged(_Frame):
    """A thread operation's result: the thread with its turns, and the run it started."""

    thread: ThreadInfo
    run: RunInfo | None


class Share(_Frame):
    """A new share: its token (shown once) and the page's link that carries it."""

    share_id: str
    token: str
    role: Literal["viewer", "operator"]
    expires_at: float
    url: str


class ErrorBody(_Frame):
    """Every error answer of the HTTP API."""

    error: Error


class OpenApiDocument(BaseModel):
    """An OpenAPI 3.1 document."""

    model_config = ConfigDict(extra="allow")

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]


class AsyncApiDocument(BaseModel):
    """An AsyncAPI 3 document."""

    model_config = ConfigDict(extra="allow")

    asyncapi: str
    info: dict[str, Any]
    channels: dict[str, Any]
