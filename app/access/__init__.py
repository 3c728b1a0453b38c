"""Access: who may do what (PROTOCOL.md §8).

``policy`` holds the decision, ``authorize(principal, action, resource)``, asked by every
HTTP route and WebSocket op before it acts; ``tokens`` turns a presented secret into a
``Principal`` (a server token with a role, or a signed share scoped to one run or thread).
Decisions only: the one I/O of this layer is the share table, through the store.
"""
