"""DuckDB helpers shared by the catalog and the exports (base layer): SQL literals, the
first row of a query, and the catalog's commit counter, which judges export freshness."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb

COMMITS_KEY = "commits"
# the last commit that moved rows of runs_d or artifacts_f between export parts, or removed some
MOVED_KEY = "moved_commit"
ID_KEY = "catalog_id"  # new with each catalog (a replay's too)
# one event, a checkpoint or an export refresh that does not fit DuckDB's memory limit may
# take up to this many times it, for itself alone
STRETCH = 8
STAMP = "changed_commit"  # in runs_d and artifacts_f: the commit that last changed the row


def first_row(
    con: duckdb.DuckDBPyConnection, sql: str, params: Sequence[Any] | None = None
) -> tuple[Any, ...] | None:
    """The first row, reading the result to its end: a result left open (``fetchone``)
    makes DuckDB refuse the next ``register`` on that connection."""
    rows = con.execute(sql, params or []).fetchall()
    return tuple(rows[0]) if rows else None


def commit_count(con: duckdb.DuckDBPyConnection) -> int:
    """How many transactions have changed the catalog (as of ``con``'s snapshot)."""
    row = first_row(con, "SELECT value FROM catalog.meta WHERE key = ?", [COMMITS_KEY])
    return int(row[0]) if row else 0


def meta_value(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
    """A value of ``catalog.meta`` (as of ``con``'s snapshot); None when it has none."""
    row = first_row(con, "SELECT value FROM catalog.meta WHERE key = ?", [key])
    return str(row[0]) if row and row[0] is not None else None


def sql_str(text: str | Path) -> str:
    """A SQL string literal (paths and names are data, never SQL)."""
    return "'" + str(text).replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def stretched(base_mb: int, times: int = STRETCH) -> Iterator[int]:
    """The memory limits to try after ``base_mb`` did not fit: doubled each time, up to
    ``times`` times it (none when there is no limit to stretch)."""
    limit = base_mb
    while 0 < limit < base_mb * times:
        limit = min(limit * 2, base_mb * times)
        yield limit


def set_memory_limit(con: duckdb.DuckDBPyConnection, mb: int) -> None:
    """DuckDB's memory limit (one for every connection of the database)."""
    con.execute(f"SET memory_limit = '{int(mb)}MiB'")
