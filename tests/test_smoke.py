"""A first end-to-end check: the server starts, greets, and runs a counter to its end."""

from __future__ import annotations

import json

import httpx
import websockets

from tests.conftest import Server


async def test_counter_streams_to_completion(server: Server) -> None:
    async with websockets.connect(server.ws_url) as ws:
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome" and welcome["protocol"] == 1
        await ws.send(json.dumps({"op": "start", "agent": "counter", "input": {"n": 50}, "ref": 1}))
        reply = json.loads(await ws.recv())
        assert reply["ok"] and reply["ref"] == 1
        events = []
        while (
            not events
            or events[-1]["type"] != "status"
            or events[-1]["data"]["status"] in ("running",)
        ):
            frame = json.loads(await ws.recv())
            if frame["type"] == "events":
                events.extend(frame["events"])
    assert [e["i"] for e in events] == list(range(1, 53))
    assert events[-1]["data"]["status"] == "completed"
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        info = (await http.get(f"/api/runs/{reply['result']['run']['run_id']}")).json()
    assert info["status"] == "completed" and info["last_index"] == 52
