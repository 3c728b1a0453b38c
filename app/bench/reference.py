"""A bare ``websockets`` broadcaster: the reference the fanout scenario measures runcast
against (``python -m app.bench.reference``)."""

from __future__ import annotations

import asyncio
import time

import orjson

# -- the reference server ----------------------------------------------------------------


async def _reference_serve() -> None:
    """A bare broadcaster on the ``websockets`` library: each client sends a hello
    ``{"n", "k", "batch"}``; once ``k`` clients have, every one of them is sent the same
    pre-encoded ``events`` frames of ``batch`` events each, ``n`` events in all."""
    from websockets.asyncio.server import ServerConnection, serve

    waiting: list[asyncio.Future[list[bytes]]] = []
    loop = asyncio.get_running_loop()

    def frames(n: int, batch: int) -> list[bytes]:
        events = [
            orjson.dumps({"i": i, "type": "tick", "data": {"n": i}, "ts": round(time.time(), 6)})
            for i in range(1, n + 1)
        ]
        head = b'{"type":"events","run_id":"ref","epoch":"ref","events":['
        return [
            head + b",".join(events[start : start + batch]) + b"]}" for start in range(0, n, batch)
        ]

    async def handler(ws: ServerConnection) -> None:
        hello = orjson.loads(await ws.recv(decode=False))
        future: asyncio.Future[list[bytes]] = loop.create_future()
        waiting.append(future)
        if len(waiting) == hello["k"]:
            built = frames(hello["n"], hello["batch"])
            for each in waiting:
                each.set_result(built)
            waiting.clear()
        for frame in await future:
            await ws.send(frame, text=True)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        print(port, flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(_reference_serve())
