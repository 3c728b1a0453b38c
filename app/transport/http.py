"""The HTTP API under ``/api`` (PROTOCOL.md §5). Handlers are thin: parse, call the
engine, answer; every RuncastError becomes a JSON error by ``error_response``.

Every route but the health check is *guarded*: it gets a Gate for the request's principal
and reaches runs and threads only through it (``app.transport.gate``).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app import __version__
from app.access.policy import OPEN, Action, Resource, Role, Scope
from app.access.shares import Shares
from app.core.events import JsonObject, decode, encode
from app.engine.manager import Page, RunManager
from app.errors import (
    BadRequestError,
    CursorOutOfRangeError,
    MalformedError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    RuncastError,
    StoreError,
)
from app.store.base import Key, RunQuery
from app.transport import frames, wire
from app.transport.asyncapi import asyncapi_document
from app.transport.gate import Gate
from app.transport.openapi import ApiRoute, Operation, Param, openapi_document
from app.transport.sse import event_stream

logger = logging.getLogger(__name__)

MAX_PAGE = 10_000
MAX_LISTING = 1_000  # items in one page of a listing
METADATA_FILTER = "metadata."


class Json(JSONResponse):
    """A JSON response encoded with orjson."""

    def render(self, content: Any) -> bytes:
        return encode(content).encode()


def http_status(error: RuncastError) -> int:
    # A body that is not JSON or not an object is 400; a bad field is 422.
    if isinstance(error, MalformedError):
        return 400
    return wire.HTTP_STATUS.get(error.code, 500)


def error_response(error: RuncastError) -> Response:
    headers = {}
    if isinstance(error, RateLimitedError):
        headers["Retry-After"] = str(max(1, round(error.details["retry_after"] + 0.5)))
    return Json({"error": error.to_dict()}, status_code=http_status(error), headers=headers)


async def handle_runcast_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RuncastError)
    if isinstance(exc, StoreError):
        logger.error("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
    return error_response(exc)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "bad_request"}.get(exc.status_code, "internal")
    # Its headers too: a 405 says what the route allows (Allow, RFC 9110).
    return Json(
        {"error": {"code": code, "message": exc.detail}},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return Json({"error": {"code": "internal", "message": "internal error"}}, status_code=500)


def _manager(request: Request) -> RunManager:
    manager: RunManager = request.app.state.runtime.manager
    return manager


Handler = Callable[[Request, Gate], Awaitable[Response]]


def guarded(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint of a route that acts for the request's principal (set by the edge)."""

    async def endpoint(request: Request) -> Response:
        gate = Gate(request.scope["runcast.principal"], _manager(request))
        response = await handler(request, gate)
        assert gate.checked, f"{handler.__name__} answered without asking authorize"
        return response

    endpoint.__name__ = handler.__name__
    endpoint.__doc__ = handler.__doc__
    return endpoint


async def _body(request: Request) -> Any:
    """The JSON object of the request body, within the size limit.

    Raises:
        PayloadTooLargeError, BadRequestError (not JSON, not an object: no field).
    """
    limit: int = request.app.state.runtime.settings.max_frame_bytes
    declared = request.headers.get("content-length")
    if declared is not None and _INDEX.fullmatch(declared) and int(declared) > limit:
        raise PayloadTooLargeError(int(declared), limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(size, limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = decode(raw) if raw else None
    except ValueError:
        raise MalformedError("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise MalformedError("request body must be a JSON object")
    wire.check_depth(body)
    return body


_INDEX = re.compile(r"[0-9]{1,18}")  # ASCII digits only: int() also takes "²", "1_0", " 1"


def _index(raw: str, name: str) -> int:
    """A non-negative integer written in ASCII digits. Raises: BadRequestError."""
    if not _INDEX.fullmatch(raw):
        raise BadRequestError(f"{name} must be a non-negative integer", field=name)
    return int(raw)


def _int_param(request: Request, name: str, default: int | None, *, lo: int = 0) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    value = _index(raw, name)
    if value < lo:
        raise BadRequestError(f"{name} must be >= {lo}", field=name)
    return value


async def health(request: Request) -> Response:
    """Public: the mode and the store's state, never an error text, a path or a secret."""
    runtime = request.app.state.runtime
    manager = runtime.manager
    degraded = manager.store_degraded
    body: dict[str, Any] = {
        "ok": not degraded,
        "server": __version__,
        "auth": "open" if runtime.authenticator.open_mode else "token",
        "store": "degraded" if degraded else "ok",
        "runs_in_memory": len(manager.runs),
        "connections": len(runtime.sessions),
    }
    return Json(body, status_code=503 if degraded else 200)


async def agents(request: Request, gate: Gate) -> Response:
    """Every registered agent: its name, its description and the JSON Schema of its
    input."""
    gate.server(Action.READ)
    return Json(
        {"agents": [agent.describe() for agent in request.app.state.runtime.registry.all()]}
    )


async def create_run(request: Request, gate: Gate) -> Response:
    """Start a run of ``agent`` on ``input``, in a new thread or in ``thread_id`` (by its
    ``multitask``). Subscribes no one: follow it by SSE, pages of events or ``/ws``."""
    body = wire.parse_model(wire.StartRunBody, await _body(request), "body")
    gate.start_in(body.thread_id)
    _check_input(request, body.input)
    run = await _manager(request).start(
        body.agent,
        body.input,
        thread_id=body.thread_id,
        multitask=body.multitask,
        title=body.title,
        metadata=body.metadata,
    )
    return Json(run.info(), status_code=201)


def _check_input(request: Request, value: Any) -> None:
    limit: int = request.app.state.runtime.settings.max_input_bytes
    wire.check_input_size(value, limit)


def _listing(request: Request) -> tuple[int, Key | None, list[tuple[str, str]]]:
    """A listing's ``limit`` (1..1,000; default 50), the key after ``cursor``, and its
    ``metadata.KEY=VALUE`` filters. Raises: BadRequestError (names the parameter)."""
    limit = _int_param(request, "limit", 50, lo=1)
    assert limit is not None
    cursor = request.query_params.get("cursor") or None
    before = None if cursor is None else wire.decode_cursor(cursor)
    metadata = []
    for name, value in request.query_params.multi_items():
        if name.startswith(METADATA_FILTER):
            key = name[len(METADATA_FILTER) :]
            if not key:
                raise BadRequestError("a metadata filter names a key", field=name)
            metadata.append((key, value))
    return min(limit, MAX_LISTING), before, metadata


def _has_metadata(metadata: JsonObject, filters: list[tuple[str, str]]) -> bool:
    return all(metadata.get(key) == value for key, value in filters)


def _page(name: str, page: Page) -> Response:
    cursor = None if page.next is None else wire.encode_cursor(page.next)
    return Json({name: page.items, "next_cursor": cursor})


async def list_runs(request: Request, gate: Gate) -> Response:
    """``GET /api/runs``: newest first, by cursor; only what the token may read."""
    gate.server(Action.READ)
    limit, before, metadata = _listing(request)
    params = request.query_params
    query = RunQuery(
        status=params.get("status") or None,
        thread_id=params.get("thread_id") or None,
        agent=params.get("agent") or None,
        metadata=metadata,
    )
    scope = gate.principal.scope
    if scope is not None and scope.kind == "run":
        try:
            run = await gate.run(scope.id, Action.READ)
        except NotFoundError:  # the share's run was deleted
            return _page("runs", Page([], None))
        info = run.info()
        key = (run.created_at, run.run_id)
        matches = (
            query.status in (None, info["status"])
            and query.thread_id in (None, run.thread_id)
            and query.agent in (None, run.agent)
            and _has_metadata(run.metadata, metadata)
            and (before is None or key < before)
        )
        return _page("runs", Page([info] if matches else [], None))
    if scope is not None:  # a thread's share lists that thread's runs
        if query.thread_id not in (None, scope.id):
            return _page("runs", Page([], None))
        query = RunQuery(query.status, scope.id, query.agent, metadata)
    return _page("runs", await _manager(request).list_runs(query, before=before, limit=limit))


async def list_threads(request: Request, gate: Gate) -> Response:
    """``GET /api/threads``: newest first, by cursor; only what the token may read."""
    gate.server(Action.READ)
    limit, before, metadata = _listing(request)
    scope = gate.principal.scope
    manager = _manager(request)
    if scope is not None and scope.kind == "run":
        return _page("threads", Page([], None))  # a run's share reaches no thread
    if scope is not None:
        try:
            thread = await gate.thread(scope.id, Action.READ)
        except NotFoundError:  # the share's thread was deleted
            return _page("threads", Page([], None))
        key = (thread.created_at, thread.thread_id)
        matches = _has_metadata(thread.metadata, metadata) and (before is None or key < before)
        return _page("threads", Page([manager.thread_info(thread)] if matches else [], None))
    return _page(
        "threads", await manager.list_threads(metadata=metadata, before=before, limit=limit)
    )


async def get_run(request: Request, gate: Gate) -> Response:
    """The run's RunInfo, live or read back from the store."""
    run = await gate.run(request.path_params["run_id"], Action.READ)
    return Json(run.info())


async def patch_run(request: Request, gate: Gate) -> Response:
    """``PATCH /api/runs/{id}``: title and metadata (a merge patch) → RunInfo."""
    run = await gate.run(request.path_params["run_id"], Action.CHANGE)
    body = wire.parse_model(wire.PatchRunBody, await _body(request), "body")
    run = await _manager(request).patch_run(run, body.patch())
    return Json(run.info())


async def delete_run(request: Request, gate: Gate) -> Response:
    """``DELETE /api/runs/{id}``: erase an ended run for good (PROTOCOL.md §10)."""
    run = await gate.run(request.path_params["run_id"], Action.DELETE)
    await _manager(request).delete_run(run.run_id)
    return Json({"deleted": True})


async def get_snapshot(request: Request, gate: Gate) -> Response:
    """The run's snapshot at index ``at`` (default: its last index)."""
    run = await gate.run(request.path_params["run_id"], Action.READ)
    at = _int_param(request, "at", None)
    return Json(await run.snapshot_frame(at))


async def get_events(request: Request, gate: Gate) -> Response:
    """At most ``limit`` events after ``after``, with the run's last index, status and
    epoch; with ``Accept: text/event-stream``, an SSE stream of them until the run ends
    (resumed by ``Last-Event-ID``)."""
    run = await gate.run(request.path_params["run_id"], Action.READ)
    after = _int_param(request, "after", 0)
    assert after is not None
    if "text/event-stream" in request.headers.get("accept", ""):
        last_event_id = request.headers.get("last-event-id")
        if last_event_id:
            after = _index(last_event_id, "Last-Event-ID")
        if after > run.last_index:
            raise CursorOutOfRangeError(after, run.last_index)
        principal = gate.principal
        authenticator = request.app.state.runtime.authenticator
        can_end = principal.share_id is not None or principal.expires_at is not None
        return StreamingResponse(
            event_stream(
                run,
                after,
                (lambda: authenticator.still_valid(principal, time.time())) if can_end else None,
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    limit = _int_param(request, "limit", 1000, lo=1)
    assert limit is not None
    events = await run.read_page(after, min(limit, MAX_PAGE))
    head = {"last_index": run.last_index, "status": run.status.value, "epoch": run.epoch}
    return Response(wire.with_events(head, events), media_type="application/json")


async def stop_run(request: Request, gate: Gate) -> Response:
    """Ask the run to stop. Stopping an ended run is not an error: ``stopping`` is
    false."""
    run = await gate.run(request.path_params["run_id"], Action.STOP)
    # Who asked: the token's name (never its secret); in open mode, just "http".
    by = "http" if gate.principal is OPEN else gate.principal.id
    return Json(_manager(request).stop(run, by=by))


async def respond(request: Request, gate: Gate) -> Response:
    """Answer the run's pending input request ``request_id`` with ``value``."""
    run = await gate.run(request.path_params["run_id"], Action.RESPOND)
    body = wire.parse_model(wire.RespondBody, await _body(request), "body")
    _manager(request).respond(run, body.request_id, body.value)
    return Json({})


async def create_thread(request: Request, gate: Gate) -> Response:
    """A new empty thread."""
    gate.server(Action.CREATE)
    body = wire.parse_model(wire.CreateThreadBody, await _body(request), "body")
    manager = _manager(request)
    thread = await manager.create_thread(body.metadata, title=body.title)
    return Json(manager.thread_info(thread), status_code=201)


async def get_thread(request: Request, gate: Gate) -> Response:
    """The thread's ThreadInfo with ``turns``: its active path, or every turn with
    ``all``."""
    thread = await gate.thread(request.path_params["thread_id"], Action.READ)
    all_turns = request.query_params.get("all", "").lower() in ("1", "true", "yes")
    return Json(await _manager(request).thread_view(thread, all_turns=all_turns))


async def patch_thread(request: Request, gate: Gate) -> Response:
    """``PATCH /api/threads/{id}``: title and metadata (a merge patch), one revision →
    ThreadInfo."""
    thread_id = request.path_params["thread_id"]
    gate.thread_id(thread_id, Action.CHANGE)
    body = wire.parse_model(wire.PatchThreadBody, await _body(request), "body")
    manager = _manager(request)
    thread = await manager.patch_thread(thread_id, body.patch(), body.expected_revision)
    return Json(manager.thread_info(thread))


async def delete_thread(request: Request, gate: Gate) -> Response:
    """``DELETE /api/threads/{id}``: erase it with its turns and runs (PROTOCOL.md §10)."""
    thread_id = request.path_params["thread_id"]
    gate.thread_id(thread_id, Action.DELETE)
    await _manager(request).delete_thread(thread_id)
    return Json({"deleted": True})


async def change_thread(request: Request, gate: Gate) -> Response:
    """``POST /api/threads/{id}/{messages,rewind,edit,regenerate,undo,aside}``: a thread
    operation (PROTOCOL.md §10), on disk when answered, with the run it started."""
    thread_id = request.path_params["thread_id"]
    action = request.path_params["action"]
    gate.thread_id(thread_id, Action.CHANGE)
    model = wire.THREAD_BODIES.get(action)
    if model is None:
        raise NotFoundError(f"no thread operation {action!r}")
    body = wire.parse_model(model, await _body(request), "body")
    kind = "send" if action == "messages" else action
    manager = _manager(request)
    thread, run = await manager.change_thread(thread_id, wire.thread_change(kind, body))
    view = await manager.thread_view(thread)
    return Json({"thread": view, "run": None if run is None else run.info()})


def _shares(request: Request) -> Shares:
    shares: Shares = request.app.state.runtime.shares
    return shares


async def _share(request: Request, gate: Gate, scope: Scope) -> Response:
    body = wire.parse_model(wire.ShareBody, await _body(request), "body")
    created = await _shares(request).create(
        gate.principal, scope, Role.parse(body.role), body.expires_in, time.time()
    )
    return Json(created, status_code=201)


async def share_run(request: Request, gate: Gate) -> Response:
    """A share of the run: a token that reaches this run only (PROTOCOL.md §13)."""
    run = await gate.run(request.path_params["run_id"], Action.SHARE)
    return await _share(request, gate, Scope("run", run.run_id))


async def share_thread(request: Request, gate: Gate) -> Response:
    """A share of the thread: a token that reaches the thread, its turns and its runs."""
    thread = await gate.thread(request.path_params["thread_id"], Action.SHARE)
    return await _share(request, gate, Scope("thread", thread.thread_id))


async def revoke_share(request: Request, gate: Gate) -> Response:
    """Revoke a share (its creator or an admin): its token, and every share made with it,
    stop working, and their connections close."""
    shares = _shares(request)
    share = await shares.get(request.path_params["share_id"])
    gate.allow(Action.REVOKE, Resource.share(share.share_id, share.created_by))
    await shares.revoke(share, time.time())
    await request.app.state.runtime.close_revoked()
    return Json({"revoked": True})


async def openapi(request: Request, gate: Gate) -> Response:
    """This document: generated from the route table and the models."""
    gate.server(Action.READ)
    return Json(_openapi())


async def asyncapi(request: Request, gate: Gate) -> Response:
    """The AsyncAPI 3 document of ``/ws``: every op, its reply and every server frame."""
    gate.server(Action.READ)
    return Json(_asyncapi())


@functools.cache
def _openapi() -> dict[str, Any]:
    return openapi_document(__version__, routes)


@functools.cache
def _asyncapi() -> dict[str, Any]:
    return asyncapi_document(__version__)


async def not_found(request: Request) -> Response:
    raise NotFoundError(f"no route {request.url.path}")


# -- the route table ----------------------------------------------------------------------
# Each route of the API with what the OpenAPI document says of it (app/transport/openapi.py
# builds the document from this table alone).

_COUNT: Final = {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}  # ASCII digits
_LISTING: Final = (
    Param("limit", {**_COUNT, "minimum": 1, "default": 50}, "page size; above 1,000: 1,000"),
    Param("cursor", {"type": "string"}, "the next_cursor of the page before"),
    Param(
        "metadata.KEY",
        {"type": "string"},
        "only items whose metadata KEY is this string; repeatable (all must match)",
    ),
)
_THREAD_EXAMPLES: Final[dict[str, JsonObject]] = {
    "messages": {"content": "What is runcast?", "agent": "echo"},
    "rewind": {"turn_id": None},
    "edit": {"turn_id": "turn_EDDZzmWTvOIlSZiru9gzFA", "content": "What is it for?"},
    "regenerate": {"agent": "echo", "multitask": "interrupt"},
    "undo": {"expected_revision": 3},
    "aside": {"content": "Critique the answer above", "agent": "echo"},
}
_SHARE: Final = {"role": "viewer", "expires_in": 3600}
_THREAD_OPERATIONS: Final = {
    "messages": "Send a user turn; a new run answers it",
    "rewind": "Move the head to a turn (null: before the first)",
    "edit": "Edit a user turn as a new sibling; a new run answers it, unless run is false",
    "regenerate": "Answer the last user turn again with a new run",
    "undo": "Move the head before the last user turn",
    "aside": "A side run on a branch of its own; the head does not move",
}

routes: list[Route] = [
    ApiRoute(
        "GET",
        "/api/health",
        health,
        Operation(
            "The server's mode and its store's state",
            frames.Health,
            also={503: frames.Health},
            open=True,
        ),
    ),
    ApiRoute("GET", "/api/agents", guarded(agents), Operation("Registered agents", frames.Agents)),
    ApiRoute(
        "POST",
        "/api/runs",
        guarded(create_run),
        Operation(
            "Start a run",
            frames.RunInfo,
            201,
            body=wire.StartRunBody,
            errors=("unknown_agent", "not_found", "run_in_progress", "overloaded"),
            example={"agent": "counter", "input": {"n": 3}, "metadata": {"project": "docs"}},
        ),
    ),
    ApiRoute(
        "GET",
        "/api/runs",
        guarded(list_runs),
        Operation(
            "List runs, newest first",
            frames.RunPage,
            params=(
                Param("status", {"type": "string"}, "only runs of this status"),
                Param("thread_id", {"type": "string"}, "only runs of this thread"),
                Param("agent", {"type": "string"}, "only runs of this agent"),
                *_LISTING,
            ),
        ),
    ),
    ApiRoute("GET", "/api/runs/{run_id}", guarded(get_run), Operation("A run", frames.RunInfo)),
    ApiRoute(
        "PATCH",
        "/api/runs/{run_id}",
        guarded(patch_run),
        Operation(
            "Change a run's title and metadata (a JSON Merge Patch)",
            frames.RunInfo,
            body=wire.PatchRunBody,
            example={"title": "A short count", "metadata": {"project": None}},
        ),
    ),
    ApiRoute(
        "DELETE",
        "/api/runs/{run_id}",
        guarded(delete_run),
        Operation("Delete an ended run for good", frames.Deleted, errors=("run_in_progress",)),
    ),
    ApiRoute(
        "GET",
        "/api/runs/{run_id}/snapshot",
        guarded(get_snapshot),
        Operation(
            "A run's snapshot at an index",
            frames.Snapshot,
            params=(Param("at", _COUNT, "the index (default: the last)"),),
            errors=("cursor_out_of_range",),
        ),
    ),
    ApiRoute(
        "GET",
        "/api/runs/{run_id}/events",
        guarded(get_events),
        Operation(
            "A run's events after a cursor: a page, or an SSE stream",
            frames.EventsPage,
            params=(
                Param("after", {**_COUNT, "default": 0}, "the cursor: the last index seen"),
                Param("limit", {**_COUNT, "minimum": 1, "default": 1000}, "above 10,000: 10,000"),
                Param(
                    "Last-Event-ID",
                    _COUNT,
                    "with Accept: text/event-stream, the cursor to resume after",
                    "header",
                ),
            ),
            errors=("cursor_out_of_range",),
            stream="Server-Sent Events (PROTOCOL.md §9): each event with its index as id",
        ),
    ),
    ApiRoute(
        "POST",
        "/api/runs/{run_id}/stop",
        guarded(stop_run),
        Operation("Stop a run", frames.Stopping),
    ),
    ApiRoute(
        "POST",
        "/api/runs/{run_id}/respond",
        guarded(respond),
        Operation(
            "Answer a run's input request",
            frames.Answered,
            body=wire.RespondBody,
            errors=("not_waiting",),
            example={"request_id": "req_kX2VJqgZ0m6M8aYpVq3w1Q", "value": "yes"},
        ),
    ),
    ApiRoute(
        "POST",
        "/api/runs/{run_id}/share",
        guarded(share_run),
        Operation("Share a run", frames.Share, 201, body=wire.ShareBody, example=_SHARE),
    ),
    ApiRoute(
        "POST",
        "/api/threads",
        guarded(create_thread),
        Operation(
            "Create a thread",
            frames.ThreadInfo,
            201,
            body=wire.CreateThreadBody,
            example={"title": "Questions about runcast", "metadata": {"project": "docs"}},
        ),
    ),
    ApiRoute(
        "GET",
        "/api/threads",
        guarded(list_threads),
        Operation("List threads, newest first", frames.ThreadPage, params=_LISTING),
    ),
    ApiRoute(
        "GET",
        "/api/threads/{thread_id}",
        guarded(get_thread),
        Operation(
            "A thread with its turns",
            frames.ThreadInfo,
            params=(Param("all", {"type": "boolean"}, "every turn of the tree"),),
        ),
    ),
    ApiRoute(
        "PATCH",
        "/api/threads/{thread_id}",
        guarded(patch_thread),
        Operation(
            "Change a thread's title and metadata (one revision)",
            frames.ThreadInfo,
            body=wire.PatchThreadBody,
            errors=("conflict",),
            example={"title": "Renamed", "expected_revision": 2},
        ),
    ),
    ApiRoute(
        "DELETE",
        "/api/threads/{thread_id}",
        guarded(delete_thread),
        Operation(
            "Delete a thread with its turns and runs, for good",
            frames.Deleted,
            errors=("run_in_progress",),
        ),
    ),
    ApiRoute(
        "POST",
        "/api/threads/{thread_id}/share",
        guarded(share_thread),
        Operation("Share a thread", frames.Share, 201, body=wire.ShareBody, example=_SHARE),
    ),
    ApiRoute(
        "POST",
        "/api/threads/{thread_id}/{action}",
        guarded(change_thread),
        Operation(
            "Thread operation",
            frames.ThreadChanged,
            errors=("conflict", "run_in_progress", "unknown_agent", "overloaded"),
            bodies=("action", wire.THREAD_BODIES),
            summaries=_THREAD_OPERATIONS,
            examples=_THREAD_EXAMPLES,
        ),
    ),
    ApiRoute(
        "DELETE",
        "/api/shares/{share_id}",
        guarded(revoke_share),
        Operation("Revoke a share", frames.Revoked),
    ),
    ApiRoute(
        "GET",
        "/api/openapi.json",
        guarded(openapi),
        Operation("The OpenAPI document of this API", frames.OpenApiDocument),
    ),
    ApiRoute(
        "GET",
        "/api/asyncapi.json",
        guarded(asyncapi),
        Operation("The AsyncAPI document of /ws", frames.AsyncApiDocument),
    ),
    Route("/api/{rest:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
]
