"""The sweep over every committed artifact's file, a slice at a time.

A catalog of millions of artifacts takes minutes to sweep (a stat per file, and Python per
row); done in one call on the export thread, it would hold every refresh, and so every ack,
that long. A pass is therefore cut into slices of ``first_seq`` of about ``SWEEP_ROWS`` rows
each (a range DuckDB finds by the row groups' min/max, as a part of a partitioned export): a
refresh sweeps inline only a catalog that fits in one slice, and the daemon's sweep loop
takes a slice at a time between refreshes. Rows that move to a slice already looked at (a
late lower sequence) are looked at by the next pass.
"""

from __future__ import annotations

import dataclasses

import duckdb

from busd.manifest import MissingFiles

SWEEP_EVERY_S = 60.0  # every committed artifact's file is checked at most this often,
SWEEP_SHARE = 30  # ... and for at most 1/30 of the export thread's time
SWEEP_ROWS = 20_000  # committed artifacts a sweep looks at per call


@dataclasses.dataclass
class Pass:
    """A sweep under way: the slice of ``first_seq`` it looks at next, and what it found."""

    before: MissingFiles  # the report when it began
    at: int  # the next slice starts at this first_seq ...
    last: int  # ... and the pass ends past this one (the highest when it began)
    width: int  # first_seq values per slice: about SWEEP_ROWS rows
    first: bool = True  # the first slice also takes the rows without a first_seq
    took: float = 0.0  # seconds its slices took
    # per artifact name, run_id -> (path, why) of committed files that cannot be read
    missing: dict[str, dict[str, tuple[str, str]]] = dataclasses.field(default_factory=dict)

    def where(self) -> str:
        where = f"first_seq >= {self.at} AND first_seq < {self.at + self.width}"
        return where + " OR first_seq IS NULL" if self.first else where

    def advance(self, rows: int, seconds: float) -> None:
        """Past the slice just looked at (``rows`` rows): the next one about SWEEP_ROWS."""
        self.at += self.width
        self.first = False
        self.took += seconds
        wanted = self.width * SWEEP_ROWS // max(rows, 1)
        self.width = max(1, min(self.width * 4, max(self.width // 4, wanted)))

    def done(self) -> bool:
        return self.at > self.last


def begin_pass(cur: duckdb.DuckDBPyConnection, before: MissingFiles) -> Pass:
    low, high, rows = cur.execute(
        "SELECT coalesce(min(first_seq), 0), coalesce(max(first_seq), 0), count(*) "
        "FROM catalog.artifacts_f"
    ).fetchall()[0]
    width = max(1, (int(high) - int(low) + 1) * SWEEP_ROWS // max(int(rows), 1))
    return Pass(before, int(low), int(high), width)


def small(cur: duckdb.DuckDBPyConnection) -> bool:
    """The catalog is swept in one slice."""
    row = cur.execute("SELECT count(*) FROM catalog.artifacts_f").fetchall()
    return int(row[0][0]) <= SWEEP_ROWS


def no_longer_committed(cur: duckdb.DuckDBPyConnection, paths: list[str]) -> list[str]:
    """Those of ``paths`` no committed artifact names any more."""
    if not paths:
        return []
    rows = cur.execute(
        "SELECT DISTINCT path FROM catalog.artifacts_f WHERE path IN (SELECT unnest(?::VARCHAR[]))",
        [paths],
    ).fetchall()
    return sorted(set(paths) - {str(r[0]) for r in rows})
