"""The HTTP API under ``/api`` (PROTOCOL.md §5). Handlers are thin: parse, call the
engine, answer; every RuncastError becomes a JSON error by ``error_response``.

Every route but the health check is *guarded*: it gets a Gate for the request's principal
and reaches runs and threads only through it (``app.transport.gate``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

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
from app.transport import wire
from app.transport.gate import Gate
from app.transport.openapi import openapi_document
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
    return Json({"error": {"code": code, "message": exc.detail}}, status_code=exc.status_code)


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
    gate.server(Action.READ)
    return Json(
        {"agents": [agent.describe() for agent in request.app.state.runtime.registry.all()]}
    )


async def create_run(request: Request, gate: Gate) -> Response:
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
    run = await gate.run(request.path_params["run_id"], Action.READ)
    at = _int_param(request, "at", None)
    return Json(await run.snapshot_frame(at))


async def get_events(request: Request, gate: Gate) -> Response:
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
    run = await gate.run(request.path_params["run_id"], Action.STOP)
    # Who asked: the token's name (never its secret); in open mode, just "http".
    by = "http" if gate.principal is OPEN else gate.principal.id
    return Json(_manager(request).stop(run, by=by))


async def respond(request: Request, gate: Gate) -> Response:
    run = await gate.run(request.path_params["run_id"], Action.RESPOND)
    body = wire.parse_model(wire.RespondBody, await _body(request), "body")
    _manager(request).respond(run, body.request_id, body.value)
    return Json({})


async def create_thread(request: Request, gate: Gate) -> Response:
    gate.server(Action.CREATE)
    body = wire.parse_model(wire.CreateThreadBody, await _body(request), "body")
    manager = _manager(request)
    thread = await manager.create_thread(body.metadata, title=body.title)
    return Json(manager.thread_info(thread), status_code=201)


async def get_thread(request: Request, gate: Gate) -> Response:
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
    """POST /api/threads/{id}/{messages,rewind,edit,regenerate,undo,aside} (§6)."""
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
    run = await gate.run(request.path_params["run_id"], Action.SHARE)
    return await _share(request, gate, Scope("run", run.run_id))


async def share_thread(request: Request, gate: Gate) -> Response:
    thread = await gate.thread(request.path_params["thread_id"], Action.SHARE)
    return await _share(request, gate, Scope("thread", thread.thread_id))


async def revoke_share(request: Request, gate: Gate) -> Response:
    shares = _shares(request)
    share = await shares.get(request.path_params["share_id"])
    gate.allow(Action.REVOKE, Resource.share(share.share_id, share.created_by))
    await shares.revoke(share, time.time())
    await request.app.state.runtime.close_revoked()
    return Json({"revoked": True})


async def openapi(request: Request, gate: Gate) -> Response:
    gate.server(Action.READ)
    return Json(openapi_document(__version__))


async def not_found(request: Request) -> Response:
    raise NotFoundError(f"no route {request.url.path}")


routes = [
    Route("/api/health", health),
    Route("/api/agents", guarded(agents)),
    Route("/api/runs", guarded(create_run), methods=["POST"]),
    Route("/api/runs", guarded(list_runs), methods=["GET"]),
    Route("/api/runs/{run_id}", guarded(get_run)),
    Route("/api/runs/{run_id}", guarded(patch_run), methods=["PATCH"]),
    Route("/api/runs/{run_id}", guarded(delete_run), methods=["DELETE"]),
    Route("/api/runs/{run_id}/snapshot", guarded(get_snapshot)),
    Route("/api/runs/{run_id}/events", guarded(get_events)),
    Route("/api/runs/{run_id}/stop", guarded(stop_run), methods=["POST"]),
    Route("/api/runs/{run_id}/respond", guarded(respond), methods=["POST"]),
    Route("/api/runs/{run_id}/share", guarded(share_run), methods=["POST"]),
    Route("/api/threads", guarded(create_thread), methods=["POST"]),
    Route("/api/threads", guarded(list_threads), methods=["GET"]),
    Route("/api/threads/{thread_id}", guarded(get_thread)),
    Route("/api/threads/{thread_id}", guarded(patch_thread), methods=["PATCH"]),
    Route("/api/threads/{thread_id}", guarded(delete_thread), methods=["DELETE"]),
    Route("/api/threads/{thread_id}/share", guarded(share_thread), methods=["POST"]),
    Route("/api/threads/{thread_id}/{action}", guarded(change_thread), methods=["POST"]),
    Route("/api/shares/{share_id}", guarded(revoke_share), methods=["DELETE"]),
    Route("/api/openapi.json", guarded(openapi)),
    Route("/api/{rest:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
]
