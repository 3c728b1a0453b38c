"""Durable storage: the Store protocol, its SQLite implementation (one node, the default)
and its PostgreSQL one (several nodes sharing one database)."""

from __future__ import annotations

from pathlib import Path

from app.store.base import Store

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_store(db: str | Path) -> Store:
    """The store ``db`` names, not opened yet: a ``postgresql://`` (or ``postgres://``)
    URL gives a :class:`~app.store.postgres.PostgresStore`, anything else is the path of
    a SQLite file.

    Raises:
        ValueError: a PostgreSQL URL given as a ``Path``, which has lost its ``//``.
    """
    if isinstance(db, str) and db.startswith(POSTGRES_SCHEMES):
        from app.store.postgres import PostgresStore  # asyncpg loads only when it is used

        return PostgresStore(db)
    if str(db).startswith(tuple(scheme.rstrip("/") for scheme in POSTGRES_SCHEMES)):
        raise ValueError(f"{db}: give a PostgreSQL URL as a string, not a path")
    from app.store.sqlite import SqliteStore

    return SqliteStore(db)
