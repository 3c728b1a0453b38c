"""Rows for the store tests, the same for either store: runs, events, threads with their
turns and shares, and a listing's worth of threads and runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from app.core.events import Event
from app.core.turns import Turn
from app.store.base import Key, RunQuery, RunRecord, RunWrite, ShareRecord, Store, ThreadRecord


def record(
    run_id: str,
    *,
    thread_id: str = "thr_1",
    status: str = "queued",
    last_index: int = 0,
    created_at: float = 10.0,
    epoch: str = "e1",
    agent: str = "demo",
    metadata: dict[str, Any] | None = None,
    content: str = "x",
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        thread_id=thread_id,
        agent=agent,
        input={"prompt": "héllo ✓", "tokens": 3},
        status=status,
        epoch=epoch,
        last_index=last_index,
        snapshot={"status": status, "message": {"content": content}, "usage": {"t": 1.5}},
        created_at=created_at,
        updated_at=created_at + 1,
        title=f"title of {run_id}",
        metadata=metadata or {},
    )


T0 = 1_763_773_200.5  # a time of today's size whose fraction must be kept


def events(first: int, last: int) -> list[Event]:
    """Text that JSON escapes (quotes, U+2028, NUL), numbers and times kept exactly."""
    return [
        Event(i, "text", {"text": f'tök {i} "quoted" \u2028 \u0000', "n": i / 3}, T0 + i)
        for i in range(first, last + 1)
    ]


def ended_events(text: str) -> list[Event]:
    return [
        Event(1, "status", {"status": "running"}, 1.0),
        Event(2, "text", {"text": text}, 2.0),
        Event(3, "status", {"status": "completed"}, 3.0),
    ]


async def thread(store: Store, thread_id: str = "thr_1") -> ThreadRecord:
    written = ThreadRecord(thread_id, {"title": "t", "tags": ["a"]}, 1.0, 2.0)
    await store.create_thread(written)
    return written


def turns_of(thread_id: str, run_id: str, text: str) -> tuple[Turn, Turn]:
    question = Turn(f"turn_q_{thread_id}", thread_id, None, "user", text, None, "completed", 1.0)
    answer = Turn(
        f"turn_a_{thread_id}", thread_id, question.turn_id, "assistant", "", run_id, "queued", 1.0
    )
    return question, answer


async def make_thread(store: Store, thread_id: str, text: str) -> tuple[str, str]:
    """A thread with a user turn answered by an ended run, shared twice; (run_id,
    assistant turn id)."""
    run_id = f"run_of_{thread_id}"
    question, answer = turns_of(thread_id, run_id, text)
    run = record(run_id, thread_id=thread_id, status="completed", last_index=3, content=text)
    await store.write_thread(
        ThreadRecord(thread_id, {"s": text}, 1.0, 1.0, 1, answer.turn_id, title=text),
        [question, answer],
        [RunWrite(run, ended_events(text), keyframes=[(2, '{"k": 1}')])],
    )
    share = ShareRecord(f"shr_{thread_id}", "run", run_id, "viewer", "open", 1.0, 9e9)
    await store.create_share(share)
    await store.create_share(
        ShareRecord(f"shr_t_{thread_id}", "thread", thread_id, "viewer", "open", 1.0, 9e9)
    )
    return run_id, answer.turn_id


async def fill(store: Store, threads: int, runs_per_thread: int) -> None:
    """``threads`` threads, red and blue by turns, each with ``runs_per_thread`` ended
    runs; every third thread shares its creation time with the one before (ties, broken
    by id)."""
    for t in range(threads):
        thread_id = f"thr_{t:03d}"
        created = float(t - t % 3 // 2)
        await store.create_thread(
            ThreadRecord(thread_id, {"team": "red" if t % 2 else "blue"}, created, created)
        )
        await store.write(
            [
                RunWrite(
                    record(
                        f"run_{t:03d}_{r}",
                        thread_id=thread_id,
                        created_at=created + r / 10,
                        status=("completed", "failed")[r % 2],
                        agent=("echo", "demo")[t % 2],
                        metadata={"r": str(r), "n": r},
                    )
                )
                for r in range(runs_per_thread)
            ]
        )


Query = tuple[str, tuple[Any, ...]]


def page_queries(
    thread_page_query: Callable[[Sequence[tuple[str, str]], Key | None, int], Query],
    run_page_query: Callable[[RunQuery, Key | None, int], Query],
) -> list[tuple[str, Query]]:
    """The pages of a listing (``fill(store, 30, 3)``) whose query plan each store tests,
    in its dialect: (table, (sql, parameters)), from the start and after a cursor, by
    every filter."""
    after: Key = (10.0, "thr_010")
    return [
        ("threads", thread_page_query([], None, 50)),
        ("threads", thread_page_query([], after, 50)),
        ("threads", thread_page_query([("team", "red")], after, 50)),
        ("runs", run_page_query(RunQuery(), None, 50)),
        ("runs", run_page_query(RunQuery(), after, 50)),
        ("runs", run_page_query(RunQuery(status="completed"), after, 50)),
        ("runs", run_page_query(RunQuery(thread_id="thr_003"), after, 50)),
        ("runs", run_page_query(RunQuery(status="failed", thread_id="thr_003"), None, 50)),
        ("runs", run_page_query(RunQuery(agent="echo"), after, 50)),
        ("runs", run_page_query(RunQuery(metadata=[("r", "1")]), after, 50)),
    ]
