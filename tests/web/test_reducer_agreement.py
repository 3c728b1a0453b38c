"""The page's reducer (``applyEvent`` of static/runcast.js, run in Chromium) agrees with
the server's (``app.core.snapshot``) on every standard event type of PROTOCOL.md §1.

The page opens a run from the server's snapshot and folds the live events onto it, so
the two reducers must give the same state for any sequence, from the start or from any
snapshot on. Random sequences (seeded, so a failure repeats) cover every standard type,
`state` merge patches (deletions, nested objects, arrays, keys such as ``__proto__``),
tool calls answered, failed, answered twice or never, results for unknown ids, usage
counters (integers and floats, non-numbers ignored) and unknown types.
"""

from __future__ import annotations

import json
import random
from typing import Any

from app.core import snapshot
from app.core.events import Event, JsonObject

SEQUENCES = 300
KEYS = ("a", "b", "c", "items", "nested", "__proto__", "toString", "constructor", "ü")
TOOL_IDS = ("call_1", "call_2", "call_3")
STATUSES = ("running", "requires_action", "completed", "failed", "stopped", "interrupted")

# The page's reducer, loaded from the page's own server; the events go as JSON text, so
# that keys such as "__proto__" reach it as JSON has them.
FOLD_IN_PAGE = """
async ([text]) => {
  const { applyEvent, initialState } = await import("/runcast.js");
  const results = [];
  for (const { start, events } of JSON.parse(text)) {
    const state = start === null ? initialState() : start;
    const states = events.map((event) => JSON.stringify(applyEvent(state, event)));
    results.push(states);
  }
  return results;
}
"""


def json_value(rng: random.Random, depth: int) -> Any:
    kind = rng.choice(("null", "int", "float", "str", "bool", "list", "obj", "obj"))
    if depth <= 0 and kind in ("list", "obj"):
        kind = "str"
    if kind == "null":
        return None
    if kind == "int":
        return rng.randint(-5, 100)
    if kind == "float":
        return rng.choice((0.5, 1.25, -3.75, 1e-3))
    if kind == "str":
        return rng.choice(("", "x", "héllo", "null", "line\nbreak"))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "list":
        return [json_value(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return patch(rng, depth - 1)


def patch(rng: random.Random, depth: int) -> JsonObject:
    """A JSON Merge Patch: nulls delete, objects merge, anything else replaces."""
    return {rng.choice(KEYS): json_value(rng, depth) for _ in range(rng.randint(0, 4))}


def random_event(rng: random.Random) -> tuple[str, JsonObject]:
    type = rng.choice(
        (
            "text",
            "text",
            "thinking",
            "status",
            "tool_call",
            "tool_result",
            "tool_result",
            "usage",
            "input_required",
            "input_received",
            "state",
            "state",
            "state",
            "tick",
        )
    )
    data: JsonObject
    if type in ("text", "thinking"):
        data = {"text": rng.choice(("", "a", "bc ", "ü\n", "null"))} if rng.random() < 0.95 else {}
    elif type == "status":
        data = {"status": rng.choice(STATUSES)}
        if rng.random() < 0.4:
            data["error"] = rng.choice(({"code": "boom", "message": "it broke"}, None, "text"))
        if rng.random() < 0.2:
            data["reason"] = "crash"
    elif type == "tool_call":
        data = {"id": rng.choice(TOOL_IDS), "name": "search", "args": patch(rng, 2)}
        for key in ("id", "name", "args"):
            if rng.random() < 0.1:
                del data[key]
    elif type == "tool_result":
        data = {"id": rng.choice((*TOOL_IDS, "unknown"))}
        if rng.random() < 0.1:
            del data["id"]
        roll = rng.random()
        if roll < 0.4:
            data["output"] = json_value(rng, 2)
        elif roll < 0.7:
            data["error"] = rng.choice(("timeout", {"code": "tool_error", "message": "no"}))
        elif roll < 0.8:
            data["error"] = None
            data["output"] = json_value(rng, 1)
        elif roll < 0.9:
            data["output"] = None
            data["error"] = "both"
    elif type == "usage":
        data = {
            rng.choice(("input_tokens", "output_tokens", "toString", "__proto__")): rng.choice(
                (1, 7, 0.5, 2.25, "many", True, None, [1])
            )
            for _ in range(rng.randint(0, 3))
        }
    elif type == "input_required":
        data = {"request_id": f"req_{rng.randint(1, 3)}", "prompt": "name?"}
        if rng.random() < 0.3:
            data["schema"] = {"type": "string"}
    elif type == "input_received":
        data = {"request_id": f"req_{rng.randint(1, 3)}", "value": json_value(rng, 1)}
    elif type == "state":
        data = patch(rng, 3)
    else:
        data = {"n": rng.randint(1, 10)}
    return type, data


def random_events(rng: random.Random) -> list[Event]:
    return [
        Event(i, *random_event(rng), ts=1_700_000_000 + i) for i in range(1, rng.randint(1, 60) + 1)
    ]


def server_states(events: list[Event]) -> list[JsonObject]:
    """The server's state after each event (a JSON copy of each)."""
    state = snapshot.initial_state()
    states = []
    for event in events:
        snapshot.apply(state, event.type, event.data)
        states.append(json.loads(json.dumps(state)))
    return states


def test_the_page_and_the_server_fold_every_sequence_alike(open_tab: Any) -> None:
    rng = random.Random(14)
    cases: list[dict[str, Any]] = []
    expected: list[list[JsonObject]] = []
    for _ in range(SEQUENCES):
        events = random_events(rng)
        states = server_states(events)
        # From the start, and from the server's snapshot at a random index k (as the page
        # opens a run): the page folds the events after k onto the snapshot.
        k = rng.randint(0, len(events) - 1)
        wire = [e.to_dict() for e in events]
        cases.append({"start": None, "events": wire})
        cases.append({"start": states[k - 1] if k else None, "events": wire[k:]})
        expected += [states, states[k:]]

    tab = open_tab("/")
    results = tab.page.evaluate(FOLD_IN_PAGE, [json.dumps(cases)])
    assert len(results) == len(cases)
    for case, page_states, server in zip(cases, results, expected, strict=True):
        for position, (text, want) in enumerate(zip(page_states, server, strict=True)):
            got = json.loads(text)
            assert got == want, (
                f"after event {case['events'][position]} of {case['events']}:\n"
                f"page   {got}\nserver {want}"
            )


def test_the_generator_reaches_every_standard_type() -> None:
    rng = random.Random(14)
    seen = {event.type for _ in range(SEQUENCES) for event in random_events(rng)}
    assert seen >= {
        "status",
        "text",
        "thinking",
        "tool_call",
        "tool_result",
        "usage",
        "input_required",
        "input_received",
        "state",
    }
