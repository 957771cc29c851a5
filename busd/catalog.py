"""The DuckDB catalog (contract §5): schema, migrations, and one transaction per batch.

The catalog is a fold over the stream in sequence order. It is idempotent: a stream sequence
already in ``events_f`` is never applied twice, and for every key the row from the highest
sequence wins whatever order redeliveries arrive in. Only the writer thread touches
:class:`Catalog`; everything is inserted as Arrow tables, never row by row.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from busd.errors import CatalogLocked, FatalStorageError, StorageError

SCHEMA_VERSION = 1

_DDL_V1 = """
CREATE SCHEMA IF NOT EXISTS catalog;
CREATE TABLE IF NOT EXISTS catalog.meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS catalog.runs_d (
    run_id VARCHAR PRIMARY KEY, kind VARCHAR, producer VARCHAR, status VARCHAR,
    started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, params JSON, code_version VARCHAR,
    parent_run_id VARCHAR, n_artifacts INTEGER, first_seq UBIGINT, last_seq UBIGINT,
    first_published_at TIMESTAMPTZ, last_published_at TIMESTAMPTZ, event_id VARCHAR);
CREATE TABLE IF NOT EXISTS catalog.artifacts_f (
    run_id VARCHAR, name VARCHAR, path VARCHAR, format VARCHAR, rows BIGINT, bytes BIGINT,
    sha256 VARCHAR, columns JSON, schema_hash VARCHAR, meta JSON, event_id VARCHAR, seq UBIGINT,
    version INTEGER, published_at TIMESTAMPTZ, committed_at TIMESTAMPTZ,
    PRIMARY KEY (run_id, name));
CREATE TABLE IF NOT EXISTS catalog.events_f (
    seq UBIGINT PRIMARY KEY, event_id VARCHAR, payload_sha256 VARCHAR, subject VARCHAR,
    producer VARCHAR, run_id VARCHAR, outcome VARCHAR, reason VARCHAR, n_artifacts INTEGER,
    published_at TIMESTAMPTZ, committed_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS catalog.rejections_f (
    seq UBIGINT PRIMARY KEY, subject VARCHAR, event_id VARCHAR, reason VARCHAR, detail VARCHAR,
    payload BLOB, deliveries INTEGER, published_at TIMESTAMPTZ, rejected_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS catalog.exports_d (
    name VARCHAR PRIMARY KEY, path VARCHAR, rows BIGINT, bytes BIGINT, catalog_seq UBIGINT,
    refreshed_at TIMESTAMPTZ, duration_ms DOUBLE);
"""

MIGRATIONS: dict[int, str] = {1: _DDL_V1}

_TS = pa.timestamp("us", tz="UTC")

EVENT_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("seq", pa.uint64()), ("event_id", pa.string()), ("payload_sha256", pa.string()),
    ("subject", pa.string()), ("producer", pa.string()), ("run_id", pa.string()),
    ("outcome", pa.string()), ("reason", pa.string()), ("n_artifacts", pa.int32()),
    ("published_at", _TS), ("committed_at", _TS),
)
REJECTION_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("seq", pa.uint64()), ("subject", pa.string()), ("event_id", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("payload", pa.binary()),
    ("deliveries", pa.int32()), ("published_at", _TS), ("rejected_at", _TS),
)
ARTIFACT_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("run_id", pa.string()), ("name", pa.string()), ("path", pa.string()),
    ("format", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()),
    ("sha256", pa.string()), ("columns", pa.string()), ("schema_hash", pa.string()),
    ("meta", pa.string()), ("event_id", pa.string()), ("seq", pa.uint64()),
    ("published_at", _TS), ("committed_at", _TS),
)
RUN_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("run_id", pa.string()), ("kind", pa.string()), ("producer", pa.string()),
    ("status", pa.string()), ("started_at", _TS), ("finished_at", _TS), ("params", pa.string()),
    ("code_version", pa.string()), ("parent_run_id", pa.string()), ("seq", pa.uint64()),
    ("published_at", _TS), ("event_id", pa.string()),
)


_ARTIFACT_WINNERS = ("path", "format", "rows", "bytes", "sha256", "columns", "schema_hash", "meta",
                     "event_id", "published_at", "committed_at")
_RUN_WINNERS = ("kind", "producer", "status", "started_at", "finished_at", "params",
                "code_version", "parent_run_id", "last_published_at", "event_id")


@dataclass
class Batch:
    """Rows of one batch, column-ordered as the ``*_COLUMNS`` tuples above."""

    events: list[tuple[Any, ...]] = field(default_factory=list)
    rejections: list[tuple[Any, ...]] = field(default_factory=list)
    artifacts: list[tuple[Any, ...]] = field(default_factory=list)
    runs: list[tuple[Any, ...]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.events)


@dataclass(frozen=True, slots=True)
class Known:
    """What the catalog already holds for a stream sequence."""

    outcome: str
    reason: str | None


def to_arrow(
    rows: Sequence[tuple[Any, ...]], columns: Sequence[tuple[str, pa.DataType]]
) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in columns]
    return pa.table({name: pa.array(values, type=typ)
                     for (name, typ), values in zip(columns, cols, strict=True)})


def _from_higher_seq(table: str, seq_col: str, columns: Sequence[str]) -> str:
    """SET items where each column keeps the value of the row with the higher sequence."""
    return ", ".join(
        f"{c} = CASE WHEN EXCLUDED.{seq_col} > {table}.{seq_col} "
        f"THEN EXCLUDED.{c} ELSE {table}.{c} END"
        for c in columns)


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


class Catalog:
    """The read-write catalog. Not thread-safe: one writer thread owns it."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # The file is attached under another name: a database called "catalog" (the file's
        # stem) would make the schema name `catalog` ambiguous.
        self.con = duckdb.connect(":memory:")
        mode = " (READ_ONLY)" if read_only else ""
        try:
            self.con.execute(f"ATTACH '{_sql_path(path)}' AS busd{mode}")
            self.con.execute("USE busd")
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise CatalogLocked(
                    f"the catalog {path} is in use by another process (is a busd serve running?)"
                ) from None
            raise StorageError(f"cannot open the catalog {path}: {exc}") from None
        self.con.execute("SET preserve_insertion_order = false")
        if not read_only:
            self.migrate()

    def close(self) -> None:
        self.con.close()

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A second connection to the same database, for a reader on another thread."""
        cur = self.con.cursor()
        cur.execute("USE busd")
        return cur

    def migrate(self) -> int:
        current = self.schema_version()
        for version in sorted(MIGRATIONS):
            if version > current:
                self.con.execute("BEGIN")
                self.con.execute(MIGRATIONS[version])
                self.con.execute(
                    "INSERT OR REPLACE INTO catalog.meta VALUES ('schema_version', ?)",
                    [str(version)])
                self.con.execute("COMMIT")
        return self.schema_version()

    def schema_version(self) -> int:
        exists = self.con.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = 'catalog' AND table_name = 'meta'").fetchone()
        if not exists or not exists[0]:
            return 0
        row = self.con.execute(
            "SELECT value FROM catalog.meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def catalog_seq(self) -> int:
        row = self.con.execute("SELECT coalesce(max(seq), 0) FROM catalog.events_f").fetchone()
        return int(row[0]) if row else 0

    def known(self, seqs: Sequence[int]) -> dict[int, Known]:
        """Outcomes already recorded for these stream sequences (a redelivery)."""
        if not seqs:
            return {}
        rows = self.con.execute(
            "SELECT seq, outcome, reason FROM catalog.events_f WHERE seq BETWEEN ? AND ?",
            [min(seqs), max(seqs)]).fetchall()
        wanted = set(seqs)
        return {int(s): Known(o, r) for s, o, r in rows if s in wanted}

    def committed_ids(self, event_ids: Iterable[str]) -> dict[str, str]:
        """event_id → payload hash, for event ids that already committed."""
        ids = list(set(event_ids))
        if not ids:
            return {}
        rows = self.con.execute(
            "SELECT event_id, any_value(payload_sha256) FROM catalog.events_f "
            "WHERE outcome = 'committed' AND event_id IN (SELECT unnest(?::VARCHAR[])) "
            "GROUP BY event_id", [ids]).fetchall()
        return {str(e): str(h) for e, h in rows}

    def commit(self, batch: Batch, committed_at: dt.datetime) -> None:
        """Apply one batch in one transaction; a sequence already applied is skipped."""
        if not batch:
            return
        con = self.con
        events = to_arrow(batch.events, EVENT_COLUMNS)
        rejections = to_arrow(batch.rejections, REJECTION_COLUMNS)
        artifacts = to_arrow(batch.artifacts, ARTIFACT_COLUMNS)
        runs = to_arrow(batch.runs, RUN_COLUMNS)
        try:
            con.register("stage_events", events)
            con.register("stage_rejections", rejections)
            con.register("stage_artifacts", artifacts)
            con.register("stage_runs", runs)
            con.execute("BEGIN")
            # Sequences already applied (a redelivery racing its own first delivery) are
            # dropped here, so nothing below ever counts one twice.
            con.execute("""
                CREATE OR REPLACE TEMP TABLE fresh AS
                SELECT seq FROM stage_events
                WHERE seq NOT IN (SELECT seq FROM catalog.events_f
                                  WHERE seq BETWEEN (SELECT min(seq) FROM stage_events)
                                                AND (SELECT max(seq) FROM stage_events))""")
            con.execute("INSERT INTO catalog.events_f SELECT * FROM stage_events "
                        "WHERE seq IN (SELECT seq FROM fresh)")
            con.execute("INSERT INTO catalog.rejections_f SELECT * FROM stage_rejections "
                        "WHERE seq IN (SELECT seq FROM fresh)")
            con.execute(f"""
                INSERT INTO catalog.artifacts_f
                SELECT run_id, name,
                       arg_max(path, seq), arg_max(format, seq), arg_max(rows, seq),
                       arg_max(bytes, seq), arg_max(sha256, seq), arg_max(columns, seq),
                       arg_max(schema_hash, seq), arg_max(meta, seq), arg_max(event_id, seq),
                       max(seq) AS last_seq, count(*)::INTEGER, arg_max(published_at, seq),
                       ?::TIMESTAMPTZ
                FROM stage_artifacts WHERE seq IN (SELECT seq FROM fresh)
                GROUP BY run_id, name
                ON CONFLICT (run_id, name) DO UPDATE SET
                  {_from_higher_seq("artifacts_f", "seq", _ARTIFACT_WINNERS)},
                  seq = greatest(EXCLUDED.seq, artifacts_f.seq),
                  version = artifacts_f.version + EXCLUDED.version""", [committed_at])
            con.execute(f"""
                INSERT INTO catalog.runs_d
                SELECT run_id, arg_max(kind, seq), arg_max(producer, seq), arg_max(status, seq),
                       arg_max(started_at, seq), arg_max(finished_at, seq), arg_max(params, seq),
                       arg_max(code_version, seq), arg_max(parent_run_id, seq), 0,
                       min(seq), max(seq) AS last_seq, arg_min(published_at, seq),
                       arg_max(published_at, seq), arg_max(event_id, seq)
                FROM stage_runs WHERE seq IN (SELECT seq FROM fresh)
                GROUP BY run_id
                ON CONFLICT (run_id) DO UPDATE SET
                  {_from_higher_seq("runs_d", "last_seq", _RUN_WINNERS)},
                  first_published_at = CASE WHEN EXCLUDED.first_seq < runs_d.first_seq
                      THEN EXCLUDED.first_published_at ELSE runs_d.first_published_at END,
                  first_seq = least(EXCLUDED.first_seq, runs_d.first_seq),
                  last_seq = greatest(EXCLUDED.last_seq, runs_d.last_seq)""")
            con.execute("""
                UPDATE catalog.runs_d SET n_artifacts = counts.n
                FROM (SELECT run_id, count(*)::INTEGER AS n FROM catalog.artifacts_f
                      WHERE run_id IN (SELECT DISTINCT run_id FROM stage_runs)
                      GROUP BY run_id) AS counts
                WHERE runs_d.run_id = counts.run_id""")
            con.execute("COMMIT")
        except duckdb.FatalException as exc:
            raise FatalStorageError(f"catalog: {exc}") from exc
        except duckdb.Error as exc:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            if "fatal" in str(exc).lower() or "invalidated" in str(exc).lower():
                raise FatalStorageError(f"catalog: {exc}") from exc
            raise StorageError(f"catalog commit failed: {exc}") from exc
        finally:
            for name in ("stage_events", "stage_rejections", "stage_artifacts", "stage_runs"):
                con.unregister(name)

    def record_exports(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Upsert rows of ``exports_d`` (name, path, rows, bytes, catalog_seq, at, ms)."""
        if not rows:
            return
        self.con.execute("BEGIN")
        self.con.executemany(
            "INSERT OR REPLACE INTO catalog.exports_d VALUES (?, ?, ?, ?, ?, ?, ?)", list(rows))
        self.con.execute("COMMIT")
