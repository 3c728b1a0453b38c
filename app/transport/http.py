"""The HTTP API under ``/api`` (PROTOCOL.md §5). Handlers are thin: parse, call the
engine, answer; every RuncastError becomes a JSON error by ``error_response``."""

from __future__ import annotations

import logging
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app import __version__
from app.core.events import decode, encode
from app.engine.manager import RunManager
from app.errors import (
    BadRequestError,
    CursorOutOfRangeError,
    MalformedError,
    NotFoundError,
    PayloadTooLargeError,
    RuncastError,
)
from app.transport import wire
from app.transport.openapi import openapi_document
from app.transport.sse import event_stream

logger = logging.getLogger(__name__)

MAX_PAGE = 10_000


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
    return Json({"error": error.to_dict()}, status_code=http_status(error))


async def handle_runcast_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RuncastError)
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


async def _body(request: Request) -> Any:
    """The JSON object of the request body, within the size limit.

    Raises:
        PayloadTooLargeError, BadRequestError (not JSON, not an object: no field).
    """
    limit: int = request.app.state.runtime.settings.max_frame_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
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
    return body


def _int_param(request: Request, name: str, default: int | None, *, lo: int = 0) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"{name} must be an integer", field=name) from None
    if value < lo:
        raise BadRequestError(f"{name} must be >= {lo}", field=name)
    return value


async def health(request: Request) -> Response:
    runtime = request.app.state.runtime
    manager = runtime.manager
    error = manager.flusher.last_error
    body: dict[str, Any] = {
        "ok": True,
        "server": __version__,
        "store": "degraded" if error else "ok",
        "runs_in_memory": len(manager.runs),
        "connections": len(runtime.sessions),
    }
    if error:
        body["store_error"] = error
    return Json(body)


async def agents(request: Request) -> Response:
    return Json(
        {"agents": [agent.describe() for agent in request.app.state.runtime.registry.all()]}
    )


async def create_run(request: Request) -> Response:
    body = wire.parse_model(wire.StartRunBody, await _body(request), "body")
    run = await _manager(request).start(
        body.agent, body.input, thread_id=body.thread_id, multitask=body.multitask
    )
    return Json(run.info(), status_code=201)


async def list_runs(request: Request) -> Response:
    limit = _int_param(request, "limit", 50, lo=1)
    assert limit is not None
    runs = await _manager(request).list_runs(
        status=request.query_params.get("status") or None,
        thread_id=request.query_params.get("thread_id") or None,
        limit=min(limit, 1000),
    )
    return Json({"runs": runs})


async def get_run(request: Request) -> Response:
    run = await _manager(request).get(request.path_params["run_id"])
    return Json(run.info())


async def get_snapshot(request: Request) -> Response:
    run = await _manager(request).get(request.path_params["run_id"])
    at = _int_param(request, "at", None)
    return Json(await run.snapshot_frame(at))


async def get_events(request: Request) -> Response:
    run = await _manager(request).get(request.path_params["run_id"])
    after = _int_param(request, "after", 0)
    assert after is not None
    if "text/event-stream" in request.headers.get("accept", ""):
        last_event_id = request.headers.get("last-event-id")
        if last_event_id:
            if not last_event_id.isdigit():
                raise BadRequestError("Last-Event-ID must be an index", field="Last-Event-ID")
            after = int(last_event_id)
        if after > run.last_index:
            raise CursorOutOfRangeError(after, run.last_index)
        return StreamingResponse(
            event_stream(run, after),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    limit = _int_param(request, "limit", 1000, lo=1)
    assert limit is not None
    events = await run.read_page(after, min(limit, MAX_PAGE))
    head = {"last_index": run.last_index, "status": run.status.value, "epoch": run.epoch}
    return Response(wire.with_events(head, events), media_type="application/json")


async def stop_run(request: Request) -> Response:
    manager = _manager(request)
    run = await manager.get(request.path_params["run_id"])
    return Json(manager.stop(run, by="http"))


async def respond(request: Request) -> Response:
    manager = _manager(request)
    run = await manager.get(request.path_params["run_id"])
    body = wire.parse_model(wire.RespondBody, await _body(request), "body")
    manager.respond(run, body.request_id, body.value)
    return Json({})


async def create_thread(request: Request) -> Response:
    body = wire.parse_model(wire.CreateThreadBody, await _body(request), "body")
    manager = _manager(request)
    thread = await manager.create_thread(body.metadata)
    return Json(manager.thread_info(thread), status_code=201)


async def get_thread(request: Request) -> Response:
    manager = _manager(request)
    thread = await manager.get_thread(request.path_params["thread_id"])
    all_turns = request.query_params.get("all", "").lower() in ("1", "true", "yes")
    return Json(await manager.thread_view(thread, all_turns=all_turns))


async def change_thread(request: Request) -> Response:
    """POST /api/threads/{id}/{messages,rewind,edit,regenerate,undo} (PROTOCOL.md §6)."""
    action = request.path_params["action"]
    model = wire.THREAD_BODIES.get(action)
    if model is None:
        raise NotFoundError(f"no thread operation {action!r}")
    body = wire.parse_model(model, await _body(request), "body")
    kind = "send" if action == "messages" else action
    manager = _manager(request)
    thread, run = await manager.change_thread(
        request.path_params["thread_id"], wire.thread_change(kind, body)
    )
    view = await manager.thread_view(thread)
    return Json({"thread": view, "run": None if run is None else run.info()})


async def openapi(request: Request) -> Response:
    return Json(openapi_document(__version__))


async def not_found(request: Request) -> Response:
    raise NotFoundError(f"no route {request.url.path}")


routes = [
    Route("/api/health", health),
    Route("/api/agents", agents),
    Route("/api/runs", create_run, methods=["POST"]),
    Route("/api/runs", list_runs, methods=["GET"]),
    Route("/api/runs/{run_id}", get_run),
    Route("/api/runs/{run_id}/snapshot", get_snapshot),
    Route("/api/runs/{run_id}/events", get_events),
    Route("/api/runs/{run_id}/stop", stop_run, methods=["POST"]),
    Route("/api/runs/{run_id}/respond", respond, methods=["POST"]),
    Route("/api/threads", create_thread, methods=["POST"]),
    Route("/api/threads/{thread_id}", get_thread),
    Route("/api/threads/{thread_id}/{action}", change_thread, methods=["POST"]),
    Route("/api/openapi.json", openapi),
    Route("/api/{rest:path}", not_found, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
]
