"""Wire models and frame encoding (PROTOCOL.md §2, §5, §7). Pure: no I/O.

Client frames are parsed into frozen pydantic models in strict mode (``"5"`` is not an
int). Server frames are built as JSON text directly; an ``events`` frame joins the
events' own encodings, so an event is serialized once however many clients receive it.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.core.events import Event, JsonObject, decode, encode
from app.engine.records import RecordPatch
from app.engine.threads import ThreadChange, ThreadChanged
from app.errors import BadRequestError, MalformedError, PayloadTooLargeError, RuncastError
from app.store.base import Key

PROTOCOL_VERSION: Final = 1
MAX_EVENTS_PER_FRAME: Final = 1000
# Deepest nesting of a client's JSON: far beyond any real input, and well inside what the
# JSON encoder writes back (a value it cannot encode must never get as far as an event).
MAX_JSON_DEPTH: Final = 64

# One table from error code to HTTP status; the only place that knows it.
HTTP_STATUS: Final[dict[str, int]] = {
    "bad_request": 422,
    "unknown_agent": 422,
    "cursor_out_of_range": 422,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "run_in_progress": 409,
    "conflict": 409,
    "not_waiting": 409,
    "payload_too_large": 413,
    "too_many_subscriptions": 429,
    "rate_limited": 429,
    "overloaded": 503,
    "internal": 500,
}

M = TypeVar("M", bound=BaseModel)

Id = Annotated[str, Field(min_length=1, max_length=200)]
Ref = str | int | float | None
Content = Annotated[str, Field(max_length=1_000_000)]
Title = Annotated[str, Field(max_length=1_000)]
Multitask = Literal["reject", "interrupt", "enqueue", "rollback"]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class _Op(_Model):
    ref: Ref = None


class SubscribeOp(_Op):
    op: Literal["subscribe"]
    run_id: Id
    after: Annotated[int, Field(ge=0)] | Literal["latest"] = 0
    epoch: str | None = None
    snapshot: bool = False
    presence: bool = True


class UnsubscribeOp(_Op):
    op: Literal["unsubscribe"]
    run_id: Id


class StartOp(_Op):
    op: Literal["start"]
    agent: Id
    input: JsonObject = Field(default_factory=dict)
    thread_id: Id | None = None
    multitask: Multitask = "reject"
    subscribe: bool = True
    title: Title | None = None
    metadata: JsonObject | None = None


class StopOp(_Op):
    op: Literal["stop"]
    run_id: Id


class RespondOp(_Op):
    op: Literal["respond"]
    run_id: Id
    request_id: Id
    value: Any = None


class WatchThreadOp(_Op):
    op: Literal["watch_thread"]
    thread_id: Id


class UnwatchThreadOp(_Op):
    op: Literal["unwatch_thread"]
    thread_id: Id


class _ThreadOp(_Op):
    thread_id: Id
    expected_revision: Annotated[int, Field(ge=0)] | None = None
    multitask: Multitask = "reject"


class SendOp(_ThreadOp):
    op: Literal["send"]
    content: Content
    agent: Id | None = None


class RewindOp(_ThreadOp):
    op: Literal["rewind"]
    turn_id: Id | None


class EditOp(_ThreadOp):
    op: Literal["edit"]
    turn_id: Id
    content: Content
    agent: Id | None = None
    run: bool = True


class AsideOp(_ThreadOp):
    op: Literal["aside"]
    content: Content
    agent: Id | None = None


class RegenerateOp(_ThreadOp):
    op: Literal["regenerate"]
    agent: Id | None = None


class UndoOp(_ThreadOp):
    op: Literal["undo"]


ThreadOp = SendOp | RewindOp | EditOp | RegenerateOp | UndoOp | AsideOp


class PingOp(_Op):
    op: Literal["ping"]


Op = (
    SubscribeOp
    | UnsubscribeOp
    | StartOp
    | StopOp
    | RespondOp
    | WatchThreadOp
    | UnwatchThreadOp
    | PingOp
    | ThreadOp
)

OPS: Final[dict[str, type[_Op]]] = {
    "subscribe": SubscribeOp,
    "unsubscribe": UnsubscribeOp,
    "start": StartOp,
    "stop": StopOp,
    "respond": RespondOp,
    "watch_thread": WatchThreadOp,
    "unwatch_thread": UnwatchThreadOp,
    "ping": PingOp,
    "send": SendOp,
    "rewind": RewindOp,
    "edit": EditOp,
    "regenerate": RegenerateOp,
    "undo": UndoOp,
    "aside": AsideOp,
}


# -- HTTP bodies ------------------------------------------------------------------------


class StartRunBody(_Model):
    agent: Id
    input: JsonObject = Field(default_factory=dict)
    thread_id: Id | None = None
    multitask: Multitask = "reject"
    title: Title | None = None
    metadata: JsonObject | None = None


class RespondBody(_Model):
    request_id: Id
    value: Any = None


class _ThreadBody(_Model):
    expected_revision: Annotated[int, Field(ge=0)] | None = None
    multitask: Multitask = "reject"


class SendBody(_ThreadBody):
    content: Content
    agent: Id | None = None


class RewindBody(_ThreadBody):
    turn_id: Id | None


class EditBody(_ThreadBody):
    turn_id: Id
    content: Content
    agent: Id | None = None
    run: bool = True


class AsideBody(_ThreadBody):
    content: Content
    agent: Id | None = None


class RegenerateBody(_ThreadBody):
    agent: Id | None = None


class UndoBody(_ThreadBody):
    pass


THREAD_BODIES: Final[dict[str, type[_ThreadBody]]] = {
    "messages": SendBody,
    "rewind": RewindBody,
    "edit": EditBody,
    "regenerate": RegenerateBody,
    "undo": UndoBody,
    "aside": AsideBody,
}


class CreateThreadBody(_Model):
    title: Title | None = None
    metadata: JsonObject = Field(default_factory=dict)


class PatchRunBody(_Model):
    """``title`` absent: unchanged, null: cleared. ``metadata``: a JSON Merge Patch."""

    title: Title | None = None
    metadata: JsonObject | None = None

    def patch(self) -> RecordPatch:
        return RecordPatch("title" in self.model_fields_set, self.title, self.metadata)


class PatchThreadBody(PatchRunBody):
    expected_revision: Annotated[int, Field(ge=0)] | None = None


class ShareBody(_Model):
    role: Literal["viewer", "operator"] = "viewer"
    expires_in: Annotated[int, Field(ge=1, le=30 * 86_400)] = 86_400


def check_input_size(value: JsonObject, limit: int) -> None:
    """Raises: PayloadTooLargeError (field ``input``) when ``value`` encodes larger."""
    size = len(encode(value))
    if size > limit:
        raise PayloadTooLargeError(size, limit, field="input")


def parse_model(model: type[M], obj: Any, what: str) -> M:
    """Validate ``obj`` against ``model``. Raises: BadRequestError (names the field)."""
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise BadRequestError.from_validation(exc, what) from None


def check_depth(obj: JsonObject, limit: int = MAX_JSON_DEPTH) -> None:
    """Raises: BadRequestError naming the field of ``obj`` whose value nests objects and
    arrays deeper than ``limit``. Iterative: a deep value costs no recursion."""
    for name, value in obj.items():
        level: list[Any] = [value]
        for _ in range(limit):
            level = [
                child
                for item in level
                if isinstance(item, dict | list)
                for child in (item.values() if isinstance(item, dict) else item)
                if isinstance(child, dict | list)
            ]
            if not level:
                break
        else:
            raise BadRequestError(f"{name}: JSON nested deeper than {limit} levels", field=name)


def read_ref(obj: Any) -> Ref:
    """The frame's ``ref`` if it is one a reply can echo, else None."""
    if isinstance(obj, dict):
        ref = obj.get("ref")
        if isinstance(ref, str | int | float) and not isinstance(ref, bool):
            return ref
    return None


def parse_op(text: str | bytes) -> tuple[Ref, _Op]:
    """Parse a client frame.

    Returns the ref (for the reply) and the op model.

    Raises:
        BadRequestError: not JSON, not an object, unknown op or a bad field. Its
            ``details["ref"]`` is not set; the caller replies with the ref it can read.
    """
    try:
        obj = decode(text)
    except ValueError:
        raise MalformedError("frame is not valid JSON") from None
    if not isinstance(obj, dict):
        raise MalformedError("frame must be a JSON object")
    check_depth(obj)
    op = obj.get("op")
    model = OPS.get(op) if isinstance(op, str) else None
    if model is None:
        known = ", ".join(OPS)
        what = "missing" if op is None else f"unknown op {op!r}"
        raise BadRequestError(f"op is {what}; expected one of {known}", field="op")
    return read_ref(obj), parse_model(model, obj, f"op {op}")


def thread_change(kind: str, model: _ThreadOp | _ThreadBody) -> ThreadChange:
    """The engine's ThreadChange for a thread op frame or body (``kind``: the operation)."""
    return ThreadChange(
        kind,
        agent=getattr(model, "agent", None),
        content=getattr(model, "content", None),
        turn_id=getattr(model, "turn_id", None),
        multitask=model.multitask,
        expected_revision=model.expected_revision,
        run=getattr(model, "run", True),
    )


def encode_cursor(key: Key) -> str:
    """The opaque ``cursor`` of a listing's next page: its key, URL-safe."""
    return base64.urlsafe_b64encode(encode(list(key)).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Key:
    """Raises: BadRequestError (field ``cursor``) for anything ``encode_cursor`` did not
    make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, item_id = decode(raw)
    except (ValueError, TypeError, binascii.Error):
        raise BadRequestError("cursor is not one this server gave", field="cursor") from None
    if (
        not isinstance(created_at, int | float)
        or isinstance(created_at, bool)
        or not math.isfinite(created_at)
        or not isinstance(item_id, str)
    ):
        raise BadRequestError("cursor is not one this server gave", field="cursor")
    return float(created_at), item_id


# -- server frames ----------------------------------------------------------------------


def welcome(server_version: str, connection_id: str, role: str = "admin") -> str:
    """The first frame; ``role`` (beyond PROTOCOL.md §2) is what the connection's token
    may do, so that a page can hide what it would be refused."""
    return encode(
        {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "server": server_version,
            "connection_id": connection_id,
            "role": role,
        }
    )


def reply_ok(ref: Ref, result: JsonObject) -> str:
    return encode({"type": "reply", "ref": ref, "ok": True, "result": result})


def reply_error(ref: Ref, error: RuncastError) -> str:
    return encode({"type": "reply", "ref": ref, "ok": False, "error": error.to_dict()})


def with_events(head: JsonObject, events: Sequence[Event]) -> str:
    """``head`` encoded with an ``events`` key added: the events' own JSON is joined, not
    re-encoded (an events frame, an HTTP page of events)."""
    body = ",".join([event.json for event in events])  # a list joins faster than a generator
    return f'{encode(head)[:-1]},"events":[{body}]}}'


def events_frame(run_id: str, epoch: str, events: Sequence[Event]) -> str:
    """One ``events`` frame."""
    return with_events({"type": "events", "run_id": run_id, "epoch": epoch}, events)


def snapshot_frame(snapshot: JsonObject) -> str:
    return encode({"type": "snapshot", **snapshot})


def reset_frame(run_id: str, epoch: str) -> str:
    return encode({"type": "reset", "run_id": run_id, "epoch": epoch})


def presence_frame(run_id: str, watchers: int) -> str:
    return encode({"type": "presence", "run_id": run_id, "watchers": watchers})


def deleted_frame(run_id: str) -> str:
    """The last frame of a subscription to a run that was deleted (PROTOCOL.md §10)."""
    return encode({"type": "deleted", "run_id": run_id})


def thread_frame(event: ThreadChanged) -> str:
    """A ``thread`` frame (PROTOCOL.md §6): what changed in a watched thread, with the
    RunInfo of the run it concerns, as the run is now."""
    frame: JsonObject = {
        "type": "thread",
        "thread_id": event.thread_id,
        "change": event.change,
        "revision": event.revision,
    }
    if event.run is not None:
        frame["run"] = event.run.info()
    return encode(frame)
