"""The frame models (app/transport/frames.py) describe what the server really sends, and
the AsyncAPI document covers every op and every frame."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app.core.events import Event
from app.errors import CursorOutOfRangeError
from app.transport import frames, wire
from app.transport.asyncapi import asyncapi_document

RUN_INFO: dict[str, Any] = {
    "run_id": "run_1",
    "thread_id": "thr_1",
    "agent": "demo",
    "status": "running",
    "epoch": "ep",
    "last_index": 2,
    "created_at": 1.0,
    "updated_at": 2.0,
    "watchers": 1,
}

BUILT = [
    (frames.WelcomeFrame, wire.welcome("0.1.0", "conn_1", "operator")),
    (frames.ReplyOkFrame, wire.reply_ok("r1", {"run": RUN_INFO})),
    (frames.ReplyErrorFrame, wire.reply_error(7, CursorOutOfRangeError(9, 2))),
    (
        frames.EventsFrame,
        wire.events_frame("run_1", "ep", [Event(1, "text", {"text": "hi"}, 1.5)]),
    ),
    (
        frames.SnapshotFrame,
        wire.snapshot_frame({"run_id": "run_1", "index": 0, "epoch": "ep", "state": {}}),
    ),
    (frames.ResetFrame, wire.reset_frame("run_1", "ep2")),
    (frames.PresenceFrame, wire.presence_frame("run_1", 3)),
    (frames.DeletedFrame, wire.deleted_frame("run_1")),
    (
        frames.ReplyOkFrame,
        wire.reply_ok("r2", {"run": {**RUN_INFO, "title": "t", "metadata": {"k": "v"}}}),
    ),
]


@pytest.mark.parametrize(("model", "text"), BUILT, ids=[m.__name__ for m, _ in BUILT])
def test_each_frame_the_server_builds_fits_its_model(model: type[Any], text: str) -> None:
    model.model_validate(json.loads(text))


def test_a_frame_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError):
        frames.PresenceFrame.model_validate({"type": "presence", "run_id": "r", "watchers": -1})
    with pytest.raises(ValueError):
        frames.EventsFrame.model_validate({"type": "events", "run_id": "r", "epoch": "e"})


def test_the_asyncapi_document_covers_every_op_and_frame() -> None:
    doc = asyncapi_document("0.1.0")
    assert doc["asyncapi"].startswith("3.")
    messages = doc["channels"]["ws"]["messages"]
    assert {f"op_{name}" for name in wire.OPS} <= set(messages)
    assert {model.__name__ for model in frames.SERVER_FRAMES} <= set(messages)
    schemas = doc["components"]["schemas"]
    # Every $ref in the document resolves inside it.
    text = json.dumps(doc)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "')[1:]}:
        node: Any = doc
        for key in ref.removeprefix("#/").split("/"):
            assert key in node, ref
            node = node[key]
    assert set(schemas["SubscribeOp"]["properties"]) >= {"op", "run_id", "after", "epoch"}
