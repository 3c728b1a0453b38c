"""Transport: WebSocket sessions, HTTP routes, SSE, and the ASGI app."""
