"""runcast: a WebSocket-first realtime server for long-running agent runs."""

__version__ = "0.1.0"
