"""Pure core of runcast: events, the snapshot reducer, the event log. No I/O, no clock."""
