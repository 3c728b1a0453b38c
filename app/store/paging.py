"""Keyset paging, one builder for every SQL store: a page of runs or threads, newest
first by (created_at, id), after a ``before`` key.

With no filter or an equality filter on an indexed column, a page is one range of an
index ending in (created_at, id), however deep the page; a metadata filter (a top-level
key whose value is that string) is checked on the rows of that range. A store gives its
dialect: how a parameter is written and how a metadata filter reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from app.store.base import Key, RunQuery


@dataclass(frozen=True, slots=True)
class Dialect:
    placeholder: Callable[[int], str]  # the n-th parameter (1-based): "?" or "$n"
    metadata_match: Callable[[str, str, str], str]  # (table, key param, value param) -> SQL


def page_query(
    dialect: Dialect,
    table: str,
    id_column: str,
    columns: str,
    equal: Sequence[tuple[str, Any]],
    metadata: Sequence[tuple[str, str]],
    before: Key | None,
    limit: int,
) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters of one page; ``equal`` filters (column, value) whose value
    is None are left out."""
    params: list[Any] = []

    def param(value: Any) -> str:
        params.append(value)
        return dialect.placeholder(len(params))

    where = [f"{column} = {param(value)}" for column, value in equal if value is not None]
    where += [dialect.metadata_match(table, param(key), param(value)) for key, value in metadata]
    if before is not None:
        where.append(f"(created_at, {id_column}) < ({param(before[0])}, {param(before[1])})")
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    sql = (
        f"SELECT {columns} FROM {table}{clause}"
        f" ORDER BY created_at DESC, {id_column} DESC LIMIT {param(limit)}"
    )
    return sql, tuple(params)


def run_page_query(
    dialect: Dialect, columns: str, query: RunQuery, before: Key | None, limit: int
) -> tuple[str, tuple[Any, ...]]:
    """A page of runs (its query plan is tested in each store's tests)."""
    equal = (("thread_id", query.thread_id), ("status", query.status), ("agent", query.agent))
    return page_query(dialect, "runs", "run_id", columns, equal, query.metadata, before, limit)


def thread_page_query(
    dialect: Dialect,
    columns: str,
    metadata: Sequence[tuple[str, str]],
    before: Key | None,
    limit: int,
) -> tuple[str, tuple[Any, ...]]:
    """A page of threads (its query plan is tested in each store's tests)."""
    return page_query(dialect, "threads", "thread_id", columns, (), metadata, before, limit)
