"""EventLog: a run's indexed, append-only event log (PROTOCOL.md §1).

Index ``i`` lives at position ``i - first_index`` of a list, so reading after a cursor is
a slice, never a scan. A long run keeps only a tail in memory: ``trim_before`` drops the
oldest events (the engine trims only what is on disk), and ``holds(cursor)`` says whether
a read after ``cursor`` can be served from memory. The log knows nothing of waiting:
``engine.run.LiveRun`` adds the wake-up.
"""

from __future__ import annotations

from collections.abc import Iterable

from app.core.events import Event, JsonObject


class EventLog:
    """The events of one run in one epoch, indexed from 1 with no gap; in memory, the
    events from ``first_index`` to ``last_index``."""

    __slots__ = ("_events", "epoch", "first_index")

    def __init__(self, epoch: str, events: Iterable[Event] = (), first_index: int = 1) -> None:
        if first_index < 1:
            raise ValueError(f"first_index must be >= 1, not {first_index}")
        self.epoch = epoch
        self.first_index = first_index
        self._events: list[Event] = []
        for event in events:
            self.add(event)

    @property
    def last_index(self) -> int:
        """Index of the newest event; 0 when the log is empty."""
        return self.first_index + len(self._events) - 1

    def __len__(self) -> int:
        return len(self._events)

    def next_event(self, type: str, data: JsonObject, ts: float) -> Event:
        """Build (and encode) the event that ``append`` would add, without adding it."""
        return Event(self.first_index + len(self._events), type, data, ts)

    def append(self, type: str, data: JsonObject, ts: float) -> Event:
        """Add an event at the next index and return it."""
        events = self._events
        event = Event(self.first_index + len(events), type, data, ts)
        events.append(event)
        return event

    def add(self, event: Event) -> None:
        """Add an already built event; its index must be the next one."""
        events = self._events
        if event.index != self.first_index + len(events):
            raise ValueError(f"event index {event.index} does not follow {self.last_index}")
        events.append(event)

    def take_back(self, event: Event) -> None:
        """Remove ``event``, the newest, appended and then refused before any reader could
        see it (in the same step, with no await between)."""
        if not self._events or self._events[-1] is not event:
            raise ValueError(f"event {event.index} is not the newest of the log")
        self._events.pop()

    def holds(self, cursor: int) -> bool:
        """True when every event after ``cursor`` is in memory."""
        first = self.first_index
        return first - 1 <= cursor < first + len(self._events)

    def trim_before(self, index: int) -> int:
        """Drop the events before ``index`` from memory; returns how many were dropped."""
        count = min(max(0, index - self.first_index), len(self._events))
        if count:
            del self._events[:count]
            self.first_index += count
        return count

    def read_after(self, cursor: int, limit: int | None = None) -> list[Event]:
        """Events with index > ``cursor``, oldest first, at most ``limit`` of them.

        Raises:
            ValueError: ``cursor`` is negative, past the last index, or before the tail
                held in memory (``holds(cursor)`` is false).
        """
        events = self._events
        start = cursor + 1 - self.first_index
        if cursor < 0 or start > len(events):
            raise ValueError(f"cursor {cursor} is outside 0..{self.last_index}")
        if start < 0:
            raise ValueError(f"events after {cursor} are no longer in memory")
        return events[start:] if limit is None else events[start : start + limit]

    def __getitem__(self, index: int) -> Event:
        """The event at ``index`` (1-based, as on the wire)."""
        if not self.first_index <= index <= self.last_index:
            raise IndexError(index)
        return self._events[index - self.first_index]
