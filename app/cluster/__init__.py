"""Several nodes (PROTOCOL.md §9): the Redis broker and the run manager of a node."""
