"""Server-Sent Events for one run (PROTOCOL.md §5): ``id`` is the index, ``event`` the
type, ``data`` the event's JSON; the stream ends after the terminal event."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from app.engine.run import LiveRun
from app.transport.wire import MAX_EVENTS_PER_FRAME

KEEPALIVE_S = 15.0


async def event_stream(run: LiveRun, cursor: int) -> AsyncIterator[str]:
    """Every event after ``cursor``, to the run's end, batched when the reader is behind.

    Cancellation: safe; the client went away and nothing is left behind.
    """

    yield "retry: 1000\n\n"
    while True:
        events = await run.read_page(cursor, MAX_EVENTS_PER_FRAME)
        if events:
            yield "".join(f"id: {e.index}\nevent: {e.type}\ndata: {e.json}\n\n" for e in events)
            cursor = events[-1].index
            continue
        if run.ended:
            return
        try:
            async with asyncio.timeout(KEEPALIVE_S):
                await run.wait_after(cursor)
        except TimeoutError:
            yield ": keepalive\n\n"
