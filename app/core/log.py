"""EventLog: a run's indexed, append-only event log (PROTOCOL.md §1).

Index ``i`` lives at position ``i - first_index`` of a list, so reading after a cursor is
a slice, never a scan. The log knows nothing of waiting: ``engine.run.LiveRun`` adds the
wake-up.
"""

from __future__ import annotations

from collections.abc import Iterable

from app.core.events import Event, JsonObject


class EventLog:
    """The events of one run in one epoch, indexed from 1 with no gap."""

    __slots__ = ("_events", "epoch", "first_index")

    def __init__(self, epoch: str, events: Iterable[Event] = ()) -> None:
        self.epoch = epoch
        self.first_index = 1
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
        return Event(self.last_index + 1, type, data, ts)

    def append(self, type: str, data: JsonObject, ts: float) -> Event:
        """Add an event at the next index and return it."""
        event = self.next_event(type, data, ts)
        self._events.append(event)
        return event

    def add(self, event: Event) -> None:
        """Add an already built event; its index must be the next one."""
        if event.index != self.last_index + 1:
            raise ValueError(f"event index {event.index} does not follow {self.last_index}")
        self._events.append(event)

    def read_after(self, cursor: int, limit: int | None = None) -> list[Event]:
        """Events with index > ``cursor``, oldest first, at most ``limit`` of them.

        Raises:
            ValueError: ``cursor`` is negative or past the last index.
        """
        if cursor < 0 or cursor > self.last_index:
            raise ValueError(f"cursor {cursor} is outside 0..{self.last_index}")
        start = cursor + 1 - self.first_index
        stop = len(self._events) if limit is None else start + limit
        return self._events[start:stop]

    def __getitem__(self, index: int) -> Event:
        """The event at ``index`` (1-based, as on the wire)."""
        if not self.first_index <= index <= self.last_index:
            raise IndexError(index)
        return self._events[index - self.first_index]
