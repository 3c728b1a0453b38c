"""The OpenAPI document (app/transport/openapi.py) is valid OpenAPI 3.1, covers every
route of the app under /api with its methods, and says what a live server really
answers: real answers, successes and errors, validate against the schemas it declares
for their route and status."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate
from starlette.routing import Match, Route

from app import __version__
from app.config import Settings
from app.transport import http, wire
from app.transport.app import create_app
from app.transport.asyncapi import asyncapi_document
from app.transport.openapi import ApiRoute, openapi_document
from tests.conftest import Server
from tests.transport.helpers import TERMINAL, wait_status

CATCH_ALL = "/api/{rest:path}"
METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return openapi_document(__version__, http.routes)


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """``node``, or what its ``$ref`` points to in ``doc``."""
    while "$ref" in node:
        target: Any = doc
        for key in node["$ref"].removeprefix("#/").split("/"):
            target = target[key]
        node = target
    return node


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # raises OpenAPIValidationError, naming what is wrong
    # A second time through JSON: what the server sends is the same valid document.
    validate(json.loads(json.dumps(doc)))


def test_every_route_of_the_api_is_in_the_document_with_its_methods(
    doc: dict[str, Any], tmp_path: Path
) -> None:
    """Both ways, by the app's own router: each documented operation reaches a route of
    the app (never the catch-all), and each method of each route under /api is reached by
    a documented operation. (/ws is the AsyncAPI document's; /metrics and the page are
    not the JSON API.)"""
    app = create_app(Settings(db=tmp_path / "routes.db"))
    api = [r for r in app.routes if isinstance(r, Route) and r.path.startswith("/api")]
    assert all(isinstance(r, ApiRoute) for r in api if r.path != CATCH_ALL), [
        r.path for r in api if not isinstance(r, ApiRoute) and r.path != CATCH_ALL
    ]

    def route_of(method: str, path: str) -> Route:
        concrete = re.sub(r"\{[^}]+\}", "x_1", path)
        scope = {"type": "http", "method": method, "path": concrete}
        for route in api:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route
        raise AssertionError(f"{method} {path}: no route of the app")

    reached: set[tuple[str, str]] = set()
    for method, path, _ in operations(doc):
        route = route_of(method, path)
        assert route.path != CATCH_ALL, f"{method} {path} is documented but not routed"
        reached.add((method, route.path))
    served = {
        (method, route.path)
        for route in api
        if route.path != CATCH_ALL
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert served - reached == set(), f"routes missing from the document: {served - reached}"
    assert reached <= served
    # The thread operations: one documented path per operation, with its own body.
    for action, model in wire.THREAD_BODIES.items():
        body = doc["paths"][f"/api/threads/{{thread_id}}/{action}"]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"]["$ref"].endswith(model.__name__)


def test_each_operation_declares_its_errors_with_their_statuses(doc: dict[str, Any]) -> None:
    for method, path, op in operations(doc):
        responses = op["responses"]
        where = f"{method} {path}"
        assert op["operationId"] and op["summary"], where
        for code in ("forbidden", "rate_limited", "internal"):
            assert str(wire.HTTP_STATUS[code]) in responses, (where, code)
        if "{" in path:
            assert "404" in responses, where
        if "requestBody" in op:
            assert {"400", "413", "422"} <= set(responses), where
        for status, response in responses.items():
            schema = resolve(doc, response)["content"]["application/json"]["schema"]
            if "allOf" not in schema:  # an answer: a success, or health's 503
                assert int(status) < 400 or (path, status) == ("/api/health", "503"), where
                continue
            # Each error code appears under the status HTTP_STATUS gives it (400 is the
            # one exception: a body that is not a JSON object).
            codes = schema["allOf"][1]["properties"]["error"]["properties"]["code"]["enum"]
            for code in codes:
                assert wire.HTTP_STATUS[code] == int(status) or (
                    status == "400" and code == "bad_request"
                ), (where, status, code)
    # Only the health check is open, and it declares its 503.
    open_ops = [(m, p) for m, p, op in operations(doc) if op.get("security") == []]
    assert open_ops == [("GET", "/api/health")]
    assert "503" in doc["paths"]["/api/health"]["get"]["responses"]
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_every_body_has_an_example_that_its_model_accepts(doc: dict[str, Any]) -> None:
    for method, path, op in operations(doc):
        if "requestBody" in op:
            media = op["requestBody"]["content"]["application/json"]
            assert "example" in media, f"{method} {path}: no example body"
            model = getattr(wire, media["schema"]["$ref"].rsplit("/", 1)[1])
            wire.parse_model(model, media["example"], "example")
            # ... and the schema the document gives it does too.
            schema = {"allOf": [media["schema"]], "components": doc["components"]}
            jsonschema.Draft202012Validator(schema).validate(media["example"])


# -- what a live server answers -----------------------------------------------------------


class Checker:
    """Validates real answers against the schema the document declares for their route,
    method and status; remembers which it checked."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.checked: set[tuple[str, str, int]] = set()

    def __call__(self, method: str, path: str, response: httpx.Response) -> Any:
        op = self.doc["paths"][path][method.lower()]
        status = str(response.status_code)
        assert status in op["responses"], (
            f"{method} {path} answered {status}, which it does not declare: {response.text}"
        )
        declared = resolve(self.doc, op["responses"][status])
        media = response.headers["content-type"].split(";")[0]
        assert media in declared["content"], (method, path, status, media)
        for name, header in declared.get("headers", {}).items():
            assert not header.get("required") or name in response.headers, (path, name)
        body = response.json()
        # The document's components at the root, so that its $refs resolve.
        schema = {
            "allOf": [declared["content"][media]["schema"]],
            "components": self.doc["components"],
        }
        jsonschema.Draft202012Validator(schema).validate(body)
        self.checked.add((method, path, response.status_code))
        return body


async def test_live_answers_fit_their_declared_schemas(server: Server, doc: dict[str, Any]) -> None:
    check = Checker(doc)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:

        async def call(method: str, path: str, concrete: str, **kw: Any) -> Any:
            async with asyncio.timeout(10):
                response = await client.request(method, concrete, **kw)
            return check(method, path, response)

        await call("GET", "/api/health", "/api/health")
        await call("GET", "/api/agents", "/api/agents")
        served = await call("GET", "/api/openapi.json", "/api/openapi.json")
        assert served == json.loads(json.dumps(doc))
        served = await call("GET", "/api/asyncapi.json", "/api/asyncapi.json")
        assert served == json.loads(json.dumps(asyncapi_document(__version__)))

        # A run, start to end, and everything about it.
        body = {"agent": "counter", "input": {"n": 3}, "title": "t", "metadata": {"k": "v"}}
        run = await call("POST", "/api/runs", "/api/runs", json=body)
        run_id = run["run_id"]
        await wait_status(client, run_id, TERMINAL)
        await call("GET", "/api/runs/{run_id}", f"/api/runs/{run_id}")
        await call("GET", "/api/runs", "/api/runs", params={"limit": 1, "metadata.k": "v"})
        await call("GET", "/api/runs/{run_id}/events", f"/api/runs/{run_id}/events")
        await call("GET", "/api/runs/{run_id}/snapshot", f"/api/runs/{run_id}/snapshot")
        await call("GET", "/api/runs/{run_id}/snapshot", f"/api/runs/{run_id}/snapshot?at=2")
        await call("POST", "/api/runs/{run_id}/stop", f"/api/runs/{run_id}/stop")
        await call(
            "PATCH", "/api/runs/{run_id}", f"/api/runs/{run_id}", json={"metadata": {"k": None}}
        )
        share = await call("POST", "/api/runs/{run_id}/share", f"/api/runs/{run_id}/share", json={})
        await call("DELETE", "/api/shares/{share_id}", f"/api/shares/{share['share_id']}")

        # A thread, an operation that starts a run, one that starts none.
        thread = await call("POST", "/api/threads", "/api/threads", json={"title": "x"})
        thread_id = thread["thread_id"]
        changed = await call(
            "POST",
            "/api/threads/{thread_id}/messages",
            f"/api/threads/{thread_id}/messages",
            json={"content": "hello", "agent": "echo"},
        )
        await wait_status(client, changed["run"]["run_id"], TERMINAL)
        await call(
            "POST",
            "/api/threads/{thread_id}/rewind",
            f"/api/threads/{thread_id}/rewind",
            json={"turn_id": None},
        )
        await call("GET", "/api/threads/{thread_id}", f"/api/threads/{thread_id}?all=true")
        await call("GET", "/api/threads", "/api/threads", params={"limit": 5})
        await call(
            "PATCH",
            "/api/threads/{thread_id}",
            f"/api/threads/{thread_id}",
            json={"title": "y", "expected_revision": 0},
        )  # stale: 409 conflict
        await call(
            "POST",
            "/api/threads/{thread_id}/share",
            f"/api/threads/{thread_id}/share",
            json={"role": "viewer"},
        )
        await call("DELETE", "/api/runs/{run_id}", f"/api/runs/{run_id}")

        # Errors, each with the status the document gives it.
        await call("GET", "/api/runs/{run_id}", "/api/runs/run_nope")  # 404
        await call("POST", "/api/runs", "/api/runs", json={"agent": "nope"})  # 422
        await call("POST", "/api/runs", "/api/runs", content=b"[1]")  # 400
        await call(
            "GET", "/api/runs/{run_id}/events", f"/api/runs/{thread_id}/events?after=x"
        )  # 404: the gate looks the run up first
        await call("GET", "/api/runs", "/api/runs", params={"limit": "0"})  # 422
        await call("POST", "/api/runs", "/api/runs", content=b"{" + b" " * 2_000_000 + b"}")  # 413
        waiting = await call("POST", "/api/runs", "/api/runs", json={"agent": "ask"})
        await call(
            "POST",
            "/api/runs/{run_id}/respond",
            f"/api/runs/{run_id}/respond",
            json={"request_id": "req_nope"},
        )  # 404: deleted above
        await wait_status(client, waiting["run_id"], {"requires_action"})
        await call("DELETE", "/api/runs/{run_id}", f"/api/runs/{waiting['run_id']}")  # 409: live
        await call(
            "POST",
            "/api/runs/{run_id}/respond",
            f"/api/runs/{waiting['run_id']}/respond",
            json={"request_id": "req_nope"},
        )  # 409 not_waiting
        await call("POST", "/api/runs/{run_id}/stop", f"/api/runs/{waiting['run_id']}/stop")
        await call(
            "DELETE", "/api/threads/{thread_id}", f"/api/threads/{waiting['thread_id']}"
        )  # 409 while its run ends, or 200

    statuses = {status for _, _, status in check.checked}
    assert {200, 201, 400, 404, 409, 413, 422} <= statuses, statuses
    assert len({(m, p) for m, p, _ in check.checked}) >= 20


async def test_in_token_mode_only_the_open_operations_answer_without_a_token(
    server_factory: Any, doc: dict[str, Any]
) -> None:
    """The document's ``security`` is what the edge does: every operation but the open
    ones answers 401, with its declared schema and WWW-Authenticate."""
    server: Server = await server_factory(tokens=("admin:admin-secret-0123456789",))
    check = Checker(doc)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as client:
        for method, path, op in operations(doc):
            concrete = re.sub(r"\{[^}]+\}", "x_1", path)
            async with asyncio.timeout(10):
                response = await client.request(method, concrete)
            check(method, path, response)
            assert (response.status_code == 401) == (op.get("security") != []), (method, path)
