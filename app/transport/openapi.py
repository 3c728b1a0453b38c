"""The OpenAPI 3.1 document of the HTTP API, generated from the route table.

Every route of the API is an ``ApiRoute`` in ``app.transport.http.routes``, and its
``Operation``, declared next to it, says what the document says of it: a summary, its
query and header parameters, its body model, its answer model and status, and the error
codes it may answer beyond those every route may. Path parameters come from the route's
path, descriptions from the handler's docstring, statuses from ``wire.HTTP_STATUS`` and
every schema from the pydantic models that validate the bodies (``wire``) and describe
the answers (``frames``). Nothing here lists a path, so the document cannot drift from
what the server routes, accepts and answers.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from app.transport import frames, wire

REF = "#/components/schemas/{model}"

# What every route may answer: a foreign Host or Origin, or a token that does not reach
# what it asks for; too many requests from one address; a bug or a failing store.
EVERY_ROUTE = ("forbidden", "rate_limited", "internal")


@dataclass(frozen=True)
class Param:
    """A query or header parameter (path parameters come from the route's path)."""

    name: str
    schema: Mapping[str, Any]
    description: str = ""
    where: Literal["query", "header"] = "query"


@dataclass(frozen=True)
class Operation:
    """What the OpenAPI document says of one route.

    Attributes:
        summary: one line.
        answer: the model of a successful answer, given with ``status``.
        status: the status of a successful answer.
        body: the model of the JSON body, if the route takes one.
        params: its query and header parameters.
        errors: the error codes the route may answer beyond those implied (every route:
            ``EVERY_ROUTE``; a token: ``unauthorized``; a path parameter: ``not_found``;
            a parameter: ``bad_request``; a body: ``bad_request``, ``payload_too_large``).
        also: other answers that are not errors, by status (health's 503).
        open: needs no token.
        stream: a description of a ``text/event-stream`` answer the route also gives.
        bodies: ``(parameter, {value: body model})``: the route is documented as one path
            per value of that path parameter, each with its own body (thread operations).
        summaries: a summary per value of ``bodies`` (else ``summary: value``).
        example: an example of the body; ``examples``: one per value of ``bodies``.
    """

    summary: str
    answer: type[BaseModel]
    status: int = 200
    body: type[BaseModel] | None = None
    params: tuple[Param, ...] = ()
    errors: tuple[str, ...] = ()
    also: Mapping[int, type[BaseModel]] = field(default_factory=dict)
    open: bool = False
    stream: str | None = None
    bodies: tuple[str, Mapping[str, type[BaseModel]]] | None = None
    summaries: Mapping[str, str] = field(default_factory=dict)
    example: Mapping[str, Any] | None = None
    examples: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def models(self) -> list[type[BaseModel]]:
        """Every model the operation's schemas refer to."""
        found = [self.answer, *self.also.values()]
        if self.body is not None:
            found.append(self.body)
        if self.bodies is not None:
            found.extend(self.bodies[1].values())
        return found


Endpoint = Callable[[Request], Awaitable[Response]]


class ApiRoute(Route):
    """A route of the API: one method, and the ``Operation`` that documents it."""

    def __init__(self, method: str, path: str, endpoint: Endpoint, operation: Operation) -> None:
        super().__init__(path, endpoint, methods=[method])
        self.method = method
        self.operation = operation
        assert operation.bodies is None or operation.bodies[0] in self.param_convertors, (
            f"{path}: no path parameter {operation.bodies[0]}"
        )


def openapi_document(version: str, routes: Iterable[BaseRoute]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the ``ApiRoute``s among ``routes``, in their order."""
    api = [route for route in routes if isinstance(route, ApiRoute)]
    models: list[type[BaseModel]] = [frames.ErrorBody]
    for route in api:
        models.extend(route.operation.models())
    _, schemas = models_json_schema(
        [(model, "validation") for model in dict.fromkeys(models)], ref_template=REF
    )
    built = [(route, path, operation) for route in api for path, operation in _operations(route)]
    _link(built)
    paths: dict[str, dict[str, Any]] = {}
    for route, path, operation in built:
        paths.setdefault(path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "runcast HTTP API",
            "version": version,
            "description": "Runs, their events and snapshots, threads and shares over HTTP "
            "(PROTOCOL.md §8). Every error is "
            '`{"error": {"code", "message", ...}}`. The WebSocket API of `/ws` is '
            "described by the AsyncAPI document at `/api/asyncapi.json`.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            # One answer per error code (every code of HTTP_STATUS): a status that may
            # carry several codes is written out where it is answered.
            "responses": {
                code: _error_response(status, [code]) for code, status in wire.HTTP_STATUS.items()
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A server token (`--token`) or a share's token. A "
                    "server started without tokens is open: it needs none.",
                },
                "query_token": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "token",
                    "description": "The same token as `?token=`, on a GET (links, EventSource).",
                },
            },
        },
    }


def _link(built: list[tuple[ApiRoute, str, dict[str, Any]]]) -> None:
    """Links from each answer that creates something (201) to every operation whose path
    parameters its fields fill: a new run's ``run_id`` and ``thread_id`` to the run's and
    the thread's operations, a new share's ``share_id`` to its revocation."""
    for route, _, operation in built:
        if route.operation.status != 201:
            continue
        fields = route.operation.answer.model_fields
        links = {}
        for _, _, target in built:
            names = [p["name"] for p in target.get("parameters", ()) if p["in"] == "path"]
            if names and all(name in fields for name in names):
                links[target["operationId"]] = {
                    "operationId": target["operationId"],
                    "parameters": {name: f"$response.body#/{name}" for name in names},
                }
        if links:
            operation["responses"]["201"]["links"] = links


def _operations(route: ApiRoute) -> list[tuple[str, dict[str, Any]]]:
    """``(path, operation object)`` for the route: one, or one per value of ``bodies``."""
    op = route.operation
    if op.bodies is None:
        operation = _operation(route, route.path, route.endpoint.__name__, op.summary)
        return [(route.path, operation)]
    name, bodies = op.bodies
    found = []
    for value, body in bodies.items():
        path = route.path.replace(f"{{{name}}}", value)
        summary = op.summaries.get(value, f"{op.summary}: {value}")
        operation_id = f"{route.endpoint.__name__}_{value}"
        example = op.examples.get(value)
        operation = _operation(route, path, operation_id, summary, body, example)
        found.append((path, operation))
    return found


def _operation(
    route: ApiRoute,
    path: str,
    operation_id: str,
    summary: str,
    body: type[BaseModel] | None = None,
    example: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    op = route.operation
    body = body or op.body
    example = example or op.example
    path_params = [name for name in route.param_convertors if f"{{{name}}}" in path]
    found: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [_tag(route.path)],
    }
    description = inspect.getdoc(route.endpoint)
    if description:
        found["description"] = description
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in path_params
    ]
    parameters += [
        {
            "name": param.name,
            "in": param.where,
            "required": False,
            "schema": dict(param.schema),
            **({"description": param.description} if param.description else {}),
        }
        for param in op.params
    ]
    if parameters:
        found["parameters"] = parameters
    if body is not None:
        media: dict[str, Any] = {"schema": _ref(body)}
        if example is not None:
            media["example"] = dict(example)
        found["requestBody"] = {"required": True, "content": {"application/json": media}}
    if op.open:
        found["security"] = []
    elif route.method == "GET":
        found["security"] = [{"bearer": []}, {"query_token": []}]
    codes = list(EVERY_ROUTE)
    if not op.open:
        codes.append("unauthorized")
    if path_params:
        codes.append("not_found")
    if op.params or body is not None:
        codes.append("bad_request")
    if body is not None:
        codes.append("payload_too_large")
    codes.extend(op.errors)
    found["responses"] = _responses(route, body is not None, codes)
    return found


def _responses(route: ApiRoute, has_body: bool, codes: list[str]) -> dict[str, Any]:
    op = route.operation
    content: dict[str, Any] = {"application/json": {"schema": _ref(op.answer)}}
    if op.stream is not None:
        content["text/event-stream"] = {"schema": {"type": "string", "description": op.stream}}
    responses: dict[str, Any] = {
        str(op.status): {"description": _describe(op.answer), "content": content}
    }
    for status, model in op.also.items():
        responses[str(status)] = {
            "description": _describe(model),
            "content": {"application/json": {"schema": _ref(model)}},
        }
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys(codes):
        by_status.setdefault(wire.HTTP_STATUS[code], []).append(code)
    if has_body:
        # A body that is not JSON, or not an object, is 400 (``http.http_status``).
        by_status.setdefault(400, []).append("bad_request")
    for status in sorted(by_status):
        assert str(status) not in responses, f"{route.path}: {status} answers twice"
        errors = by_status[status]
        if len(errors) == 1:
            responses[str(status)] = {"$ref": f"#/components/responses/{errors[0]}"}
        else:
            responses[str(status)] = _error_response(status, errors)
    return responses


def _error_response(status: int, codes: list[str]) -> dict[str, Any]:
    """The answer of status ``status``: the error body, its ``code`` one of ``codes``."""
    schema = {
        "allOf": [
            {"$ref": REF.format(model=frames.ErrorBody.__name__)},
            {"properties": {"error": {"properties": {"code": {"enum": codes}}}}},
        ]
    }
    response: dict[str, Any] = {
        "description": "error: " + ", ".join(f"`{code}`" for code in codes),
        "content": {"application/json": {"schema": schema}},
    }
    headers = _ERROR_HEADERS.get(status)
    if headers is not None:
        response["headers"] = headers
    return response


_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": 'Bearer realm="runcast"',
            "required": True,
            "schema": {"type": "string"},
        }
    },
    429: {
        "Retry-After": {
            "description": "seconds to wait before asking again",
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    },
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _describe(model: type[BaseModel]) -> str:
    """The model's own docstring (not one it inherits) on one line, or its name."""
    return " ".join((model.__doc__ or "").split()) or model.__name__


def _tag(path: str) -> str:
    """``runs``, ``threads`` or ``shares``, by the path's first part; else ``server``."""
    first = path.removeprefix("/api/").split("/")[0]
    return first if first in ("runs", "threads", "shares") else "server"
