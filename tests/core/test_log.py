"""app/core/log.py: EventLog indexes, cursors and their bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.events import Event
from app.core.log import EventLog


def filled(n: int, epoch: str = "ep") -> EventLog:
    log = EventLog(epoch)
    for k in range(1, n + 1):
        log.append("tick", {"n": k}, 100.0 + k)
    return log


def test_an_empty_log() -> None:
    log = EventLog("ep1")
    assert log.epoch == "ep1"
    assert log.first_index == 1
    assert log.last_index == 0
    assert len(log) == 0
    assert log.read_after(0) == []
    assert log.read_after(0, 10) == []


def test_append_assigns_1_2_3() -> None:
    log = EventLog("ep")
    appended = [log.append("tick", {"n": k}, 100.0 + k) for k in range(1, 6)]
    assert [event.index for event in appended] == [1, 2, 3, 4, 5]
    assert [event.data for event in appended] == [{"n": k} for k in range(1, 6)]
    assert [event.ts for event in appended] == [101.0, 102.0, 103.0, 104.0, 105.0]
    assert all(event.type == "tick" for event in appended)
    assert log.last_index == 5
    assert len(log) == 5
    assert log.read_after(0) == appended
    assert appended[2].json == '{"i":3,"type":"tick","data":{"n":3},"ts":103.0}'


def test_next_event_builds_without_adding() -> None:
    log = filled(2)
    event = log.next_event("status", {"status": "completed"}, 9.0)
    assert (event.index, event.type, event.data, event.ts) == (
        3,
        "status",
        {"status": "completed"},
        9.0,
    )
    assert log.last_index == 2
    log.add(event)
    assert log.last_index == 3
    assert log[3] is event


def test_take_back_removes_only_the_newest_event() -> None:
    log = filled(3)
    third = log[3]
    with pytest.raises(ValueError):
        log.take_back(log[2])
    log.take_back(third)
    assert (log.last_index, len(log)) == (2, 2)
    with pytest.raises(ValueError):
        log.take_back(third)  # gone already
    assert log.append("tick", {"n": 9}, 9.0).index == 3
    log.trim_before(4)
    with pytest.raises(ValueError):
        log.take_back(third)  # nothing held


def test_add_takes_the_next_index() -> None:
    log = EventLog("ep")
    first, second = Event(1, "a", {}, 1.0), Event(2, "b", {}, 2.0)
    log.add(first)
    log.add(second)
    assert log.read_after(0) == [first, second]
    assert log.append("c", {}, 3.0).index == 3


@pytest.mark.parametrize("index", [0, 1, 2, 4, 5, 100, -1])
def test_add_refuses_a_non_consecutive_index(index: int) -> None:
    log = filled(2)
    before = log.read_after(0)
    # Index 3 is the only one that may follow 2.
    with pytest.raises(ValueError, match=f"event index {index} does not follow 2"):
        log.add(Event(index, "x", {}, 1.0))
    assert log.read_after(0) == before
    assert log.last_index == 2


def test_a_log_built_from_events() -> None:
    events = [Event(k, "tick", {"n": k}, float(k)) for k in range(1, 4)]
    log = EventLog("ep", events)
    assert log.last_index == 3
    assert log.read_after(0) == events
    assert EventLog("ep", iter(events)).read_after(1) == events[1:]


@pytest.mark.parametrize(
    "indexes", [[2], [1, 3], [1, 2, 2], [0, 1]], ids=["starts at 2", "gap", "repeat", "zero"]
)
def test_a_log_built_from_events_with_a_gap_is_refused(indexes: list[int]) -> None:
    with pytest.raises(ValueError):
        EventLog("ep", [Event(i, "tick", {}, 1.0) for i in indexes])


def test_getitem_is_one_based() -> None:
    log = filled(3)
    assert [log[i].data["n"] for i in (1, 2, 3)] == [1, 2, 3]
    assert [log[i].index for i in (1, 2, 3)] == [1, 2, 3]


@pytest.mark.parametrize("index", [0, -1, -3, 4, 10])
def test_getitem_out_of_range(index: int) -> None:
    log = filled(3)
    with pytest.raises(IndexError):
        log[index]


def test_getitem_on_an_empty_log() -> None:
    with pytest.raises(IndexError):
        EventLog("ep")[1]


@pytest.mark.parametrize(
    ("cursor", "limit", "expected"),
    [
        (0, None, [1, 2, 3, 4, 5]),
        (2, None, [3, 4, 5]),
        (5, None, []),
        (0, 2, [1, 2]),
        (1, 3, [2, 3, 4]),
        (3, 10, [4, 5]),
        (4, 1, [5]),
        (2, 0, []),
        (5, 3, []),
    ],
)
def test_read_after_table(cursor: int, limit: int | None, expected: list[int]) -> None:
    log = filled(5)
    assert [event.index for event in log.read_after(cursor, limit)] == expected


@pytest.mark.parametrize("cursor", [-1, -100, 6, 7, 1000])
def test_read_after_out_of_range_cursor(cursor: int) -> None:
    log = filled(5)
    with pytest.raises(ValueError, match=f"cursor {cursor} is outside 0..5"):
        log.read_after(cursor)


def test_read_after_returns_a_copy() -> None:
    log = filled(3)
    events = log.read_after(0)
    events.clear()
    assert len(log) == 3
    assert [event.index for event in log.read_after(0)] == [1, 2, 3]


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=60),
    data=st.data(),
)
def test_read_after_any_cursor(n: int, data: st.DataObject) -> None:
    log = filled(n)
    cursor = data.draw(st.integers(min_value=0, max_value=n), label="cursor")
    limit = data.draw(st.none() | st.integers(min_value=0, max_value=70), label="limit")
    events = log.read_after(cursor, limit)
    stop = n if limit is None else min(n, cursor + limit)
    assert [event.index for event in events] == list(range(cursor + 1, stop + 1))
    assert all(event is log[event.index] for event in events)
    assert [event.data["n"] for event in events] == [event.index for event in events]
    # Paging by ``limit`` from any cursor reads the rest exactly once, in order.
    if limit:
        pages: list[int] = []
        at = cursor
        while at < n:
            page = log.read_after(at, limit)
            assert 0 < len(page) <= limit
            pages.extend(event.index for event in page)
            at = page[-1].index
        assert pages == list(range(cursor + 1, n + 1))


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=30),
    offset=st.integers(min_value=1, max_value=10**6),
    below=st.booleans(),
)
def test_read_after_any_cursor_out_of_range(n: int, offset: int, below: bool) -> None:
    log = filled(n)
    cursor = -offset if below else n + offset
    with pytest.raises(ValueError):
        log.read_after(cursor)
    with pytest.raises(ValueError):
        log.read_after(cursor, 1)
