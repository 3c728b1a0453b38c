"""The AsyncAPI 3 document of ``/ws``, generated from the wire models: every client op
(``app.transport.wire.OPS``) and every server frame (``app.transport.frames``), so it
cannot drift from what the server accepts and sends."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.transport import frames, wire

_REF = "#/components/schemas/{model}"


def _summary(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else model.__name__


def asyncapi_document(version: str) -> dict[str, Any]:
    ops = {name: model for name, model in wire.OPS.items()}
    models: list[type[BaseModel]] = [*dict.fromkeys(ops.values()), *frames.SERVER_FRAMES]
    _, schema = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    messages: dict[str, Any] = {}
    for name, model in ops.items():
        messages[f"op_{name}"] = {
            "name": name,
            "title": f"op {name}",
            "summary": f'client frame {{"op": "{name}", ...}}; exactly one reply frame',
            "contentType": "application/json",
            "payload": {"$ref": _REF.format(model=model.__name__)},
        }
    for frame in frames.SERVER_FRAMES:
        messages[frame.__name__] = {
            "name": frame.__name__,
            "title": frame.__name__,
            "summary": _summary(frame),
            "contentType": "application/json",
            "payload": {"$ref": _REF.format(model=frame.__name__)},
        }

    def refs(names: list[str]) -> list[dict[str, str]]:
        return [{"$ref": f"#/channels/ws/messages/{name}"} for name in names]

    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "runcast WebSocket API",
            "version": version,
            "description": "One connection per client, multiplexing any number of runs. "
            "Every client frame with an op gets exactly one reply; events of a "
            "subscription arrive in order, each exactly once.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {"host": "127.0.0.1:8000", "protocol": "ws", "pathname": "/ws"},
        },
        "channels": {
            "ws": {
                "address": "/ws",
                "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
            }
        },
        "operations": {
            "receiveOps": {
                "action": "receive",
                "channel": {"$ref": "#/channels/ws"},
                "summary": "ops a client sends",
                "messages": refs([f"op_{name}" for name in ops]),
            },
            "sendFrames": {
                "action": "send",
                "channel": {"$ref": "#/channels/ws"},
                "summary": "frames the server sends",
                "messages": refs([frame.__name__ for frame in frames.SERVER_FRAMES]),
            },
        },
        "components": {"schemas": schema.get("$defs", {}), "messages": messages},
    }
