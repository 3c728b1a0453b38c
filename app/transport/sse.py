"""Server-Sent Events for one run (PROTOCOL.md §5): ``id`` is the index, ``event`` the
type, ``data`` the event's JSON; the stream ends after the terminal event, or as soon as
the reader's access ends (a share revoked or expired). A run deleted while its stream is
open (PROTOCOL.md §10) ends it with ``event: deleted`` and the frame
``{"type": "deleted", "run_id"}`` as its data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from app.engine.run import LiveRun
from app.transport.wire import MAX_EVENTS_PER_FRAME, deleted_frame

KEEPALIVE_S = 15.0
ACCESS_CHECK_S = 1.0  # how often a stream whose access can end checks it


async def event_stream(
    run: LiveRun, cursor: int, allowed: Callable[[], bool] | None = None
) -> AsyncIterator[str]:
    """Every event after ``cursor``, to the run's end, batched when the reader is behind.
    ``allowed``, when given, is asked before each send and at least every
    ``ACCESS_CHECK_S``: once it says no, the stream ends.

    Cancellation: safe; the client went away and nothing is left behind.
    """
    slice_s = KEEPALIVE_S if allowed is None else ACCESS_CHECK_S
    yield "retry: 1000\n\n"
    quiet_since = time.monotonic()
    while allowed is None or allowed():
        if run.deleted:
            yield f"event: deleted\ndata: {deleted_frame(run.run_id)}\n\n"
            return
        events = await run.read_page(cursor, MAX_EVENTS_PER_FRAME)
        if events:
            yield "".join(f"id: {e.index}\nevent: {e.type}\ndata: {e.json}\n\n" for e in events)
            cursor = events[-1].index
            quiet_since = time.monotonic()
            continue
        if run.deleted:
            continue
        if run.ended:
            return
        try:
            async with asyncio.timeout(slice_s):
                await run.wait_after(cursor)
        except TimeoutError:
            if time.monotonic() - quiet_since >= KEEPALIVE_S:
                yield ": keepalive\n\n"
                quiet_since = time.monotonic()
