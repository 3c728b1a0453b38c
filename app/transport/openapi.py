"""The OpenAPI document of the HTTP API, built from the same pydantic models that
validate the bodies, so it cannot drift from what the server accepts."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.transport import wire


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": model.model_json_schema()}},
    }


def _ok(description: str, status: str = "200") -> dict[str, Any]:
    return {
        status: {"description": description, "content": {"application/json": {}}},
        "default": {"description": 'error: {"error": {code, message, ...}}'},
    }


def _param(name: str, where: str = "path", type_: str = "string") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": {"type": type_}}


def _listing(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    """The parameters of a listing: its filters, ``limit``, ``cursor`` and metadata."""
    metadata = {
        "name": "metadata.KEY",
        "in": "query",
        "required": False,
        "description": "only items whose metadata KEY is this string; repeatable (all match)",
        "schema": {"type": "string"},
    }
    return [*extra, _param("limit", "query", "integer"), _param("cursor", "query"), metadata]


def _delete(what: str, parameter: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": f"Delete a {what} for good (admin)",
        "parameters": [parameter],
        "responses": _ok('{"deleted": true}'),
    }


def openapi_document(version: str) -> dict[str, Any]:
    run_id = _param("run_id")
    thread_id = _param("thread_id")
    return {
        "openapi": "3.1.0",
        "info": {"title": "runcast", "version": version},
        "paths": {
            "/api/health": {"get": {"summary": "Health", "responses": _ok("health")}},
            "/api/agents": {"get": {"summary": "Registered agents", "responses": _ok("agents")}},
            "/api/runs": {
                "post": {
                    "summary": "Start a run",
                    "requestBody": _body(wire.StartRunBody),
                    "responses": _ok("RunInfo", "201"),
                },
                "get": {
                    "summary": "List runs, newest first (a page and its next_cursor)",
                    "parameters": _listing(
                        _param("status", "query"),
                        _param("thread_id", "query"),
                        _param("agent", "query"),
                    ),
                    "responses": _ok('{"runs": [RunInfo], "next_cursor"}'),
                },
            },
            "/api/runs/{run_id}": {
                "get": {"summary": "RunInfo", "parameters": [run_id], "responses": _ok("RunInfo")},
                "patch": {
                    "summary": "Change a run's title and metadata (a JSON Merge Patch)",
                    "parameters": [run_id],
                    "requestBody": _body(wire.PatchRunBody),
                    "responses": _ok("RunInfo"),
                },
                "delete": _delete("run", run_id),
            },
            "/api/runs/{run_id}/snapshot": {
                "get": {
                    "summary": "Snapshot at an index",
                    "parameters": [run_id, _param("at", "query", "integer")],
                    "responses": _ok("snapshot"),
                }
            },
            "/api/runs/{run_id}/events": {
                "get": {
                    "summary": "Events after a cursor (JSON page, or SSE stream)",
                    "parameters": [
                        run_id,
                        _param("after", "query", "integer"),
                        _param("limit", "query", "integer"),
                        _param("Last-Event-ID", "header", "integer"),
                    ],
                    "responses": _ok("events"),
                }
            },
            "/api/runs/{run_id}/stop": {
                "post": {"summary": "Stop a run", "parameters": [run_id], "responses": _ok("stop")}
            },
            "/api/runs/{run_id}/respond": {
                "post": {
                    "summary": "Answer a run's input request",
                    "parameters": [run_id],
                    "requestBody": _body(wire.RespondBody),
                    "responses": _ok("answered"),
                }
            },
            "/api/threads": {
                "post": {
                    "summary": "Create a thread",
                    "requestBody": _body(wire.CreateThreadBody),
                    "responses": _ok("ThreadInfo", "201"),
                },
                "get": {
                    "summary": "List threads, newest first (a page and its next_cursor)",
                    "parameters": _listing(),
                    "responses": _ok('{"threads": [ThreadInfo], "next_cursor"}'),
                },
            },
            "/api/threads/{thread_id}": {
                "get": {
                    "summary": "ThreadInfo with turns",
                    "parameters": [thread_id, _param("all", "query", "boolean")],
                    "responses": _ok("ThreadInfo"),
                },
                "patch": {
                    "summary": "Change a thread's title and metadata (one revision)",
                    "parameters": [thread_id],
                    "requestBody": _body(wire.PatchThreadBody),
                    "responses": _ok("ThreadInfo"),
                },
                "delete": _delete("thread with its turns and runs", thread_id),
            },
            **{
                f"/api/threads/{{thread_id}}/{action}": {
                    "post": {
                        "summary": f"Thread operation {action} (PROTOCOL.md §6)",
                        "parameters": [thread_id],
                        "requestBody": _body(model),
                        "responses": _ok('{"thread": ThreadInfo, "run": RunInfo | null}'),
                    }
                }
                for action, model in wire.THREAD_BODIES.items()
            },
        },
    }
