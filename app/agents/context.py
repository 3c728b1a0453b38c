"""RunContext: everything an agent can do to its run, and nothing more.

An agent is ``async def agent(ctx: RunContext) -> None``. It writes events through the
methods below; stop cancels it (``CancelledError`` at its next await).
"""

from __future__ import annotations

import asyncio
from typing import Any

from app.core import events as ev
from app.core.events import JsonObject, RunStatus
from app.core.ids import new_request_id
from app.engine.run import LiveRun

# Yield to the event loop after this many events in a row, so that an agent emitting
# as fast as it can does not starve readers, other runs or the flusher. This sets the
# batch a reader finds when it wakes: 1,000 (one full frame) against 64 cut server CPU per
# delivered event at 50 watchers from 0.58 to 0.24 µs and doubled the delivered rate
# (runcast bench fanout, side by side); a burst holds the loop for about 3 ms.
_YIELD_EVERY = 1000


class RunContext:
    """The handle an agent writes its run through.

    An agent that raises ends its run ``failed``. Clients then see only
    ``{"code": "agent_error", "message": "the agent failed"}`` in the terminal event: an
    exception's text may hold anything (a key, a path, a customer's data), so it goes to
    the server's log, never to clients. To tell clients why, raise
    ``app.errors.AgentError(code, message)``: its code and message are shown as they are,
    e.g. ``raise AgentError("quota_exceeded", "the monthly quota is used up")``.
    """

    def __init__(self, run: LiveRun, history: list[JsonObject] | None = None) -> None:
        self._run = run
        self.input: JsonObject = run.input
        self.history: list[JsonObject] = history or []
        self._since_yield = 0

    @property
    def run_id(self) -> str:
        return self._run.run_id

    @property
    def thread_id(self) -> str:
        return self._run.thread_id

    async def emit(self, type: str, data: JsonObject | None = None) -> int:
        """Append an event of any type; returns its index.

        ``status`` is reserved to the server: the run's lifecycle drives it.

        Raises:
            ValueError: ``type`` is ``status``, or not 1..64 of ``A-Z a-z 0-9 _ . : -``.
            TypeError: ``data`` is not a JSON object.
            PayloadTooLargeError: the event's JSON is over the server's
                ``max_event_bytes``.
            (Nothing is appended when it raises.)
        """
        if type == ev.STATUS:
            raise ValueError("agents do not emit 'status' events; the server does")
        if type.__class__ is not str or type not in ev.CHECKED_TYPES:
            ev.check_event_type(type)
        if data is not None and not isinstance(data, dict):
            raise TypeError(f"event data must be a JSON object, not {data.__class__.__name__}")
        event = self._run.append(type, {} if data is None else data)
        self._since_yield += 1
        if self._since_yield >= _YIELD_EVERY:
            self._since_yield = 0
            await asyncio.sleep(0)
            await self._run.throttle()
        return event.index

    async def text(self, text: str) -> int:
        return await self.emit(ev.TEXT, {"text": text})

    async def thinking(self, text: str) -> int:
        return await self.emit(ev.THINKING, {"text": text})

    async def tool_call(self, id: str, name: str, args: JsonObject | None = None) -> int:
        return await self.emit(ev.TOOL_CALL, {"id": id, "name": name, "args": args or {}})

    async def tool_result(
        self, id: str, output: Any = None, error: JsonObject | str | None = None
    ) -> int:
        data: JsonObject = {"id": id}
        if error is not None:
            data["error"] = error
        else:
            data["output"] = output
        return await self.emit(ev.TOOL_RESULT, data)

    async def usage(self, **counters: int | float) -> int:
        return await self.emit(ev.USAGE, dict(counters))

    async def state(self, patch: JsonObject) -> int:
        """Merge ``patch`` into the run's ``data`` (JSON Merge Patch)."""
        return await self.emit(ev.STATE, patch)

    async def request_input(self, prompt: str, schema: JsonObject | None = None) -> Any:
        """Put the run in ``requires_action`` until a client answers; returns the value.

        Cancellation: a stop while waiting cancels this call; the run ends ``stopped``.
        """
        run = self._run
        assert run.pending_input is None, "request_input while another request is pending"
        request_id = new_request_id()
        data: JsonObject = {"request_id": request_id, "prompt": prompt}
        if schema is not None:
            data["schema"] = schema
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        run.pending_input = (request_id, answer)
        try:
            run.append(ev.INPUT_REQUIRED, data)
            run.append(ev.STATUS, ev.status_data(RunStatus.REQUIRES_ACTION))
            return await answer
        finally:
            run.pending_input = None
