"""The catalog's schema: its DDL by version, the columns of each table as Arrow types, and
the SQL that derives ``artifacts_f`` and ``runs_d`` from the logs ("highest sequence wins")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from busd.sql import COMMITS_KEY, ID_KEY, MOVED_KEY, STAMP

DDL_V1 = """
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
    seq UBIGINT, event_id VARCHAR, payload_sha256 VARCHAR, subject VARCHAR,
    producer VARCHAR, run_id VARCHAR, outcome VARCHAR, reason VARCHAR, n_artifacts INTEGER,
    published_at TIMESTAMPTZ, committed_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS catalog.rejections_f (
    seq UBIGINT, subject VARCHAR, event_id VARCHAR, reason VARCHAR, detail VARCHAR,
    payload BLOB, deliveries INTEGER, published_at TIMESTAMPTZ, rejected_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS catalog.exports_d (
    name VARCHAR PRIMARY KEY, path VARCHAR, rows BIGINT, bytes BIGINT, catalog_seq UBIGINT,
    refreshed_at TIMESTAMPTZ, duration_ms DOUBLE);
CREATE TABLE IF NOT EXISTS catalog.artifact_log (
    run_id VARCHAR, name VARCHAR, seq UBIGINT, path VARCHAR, format VARCHAR, rows BIGINT,
    bytes BIGINT, sha256 VARCHAR, columns JSON, schema_hash VARCHAR, meta JSON,
    event_id VARCHAR, published_at TIMESTAMPTZ, committed_at TIMESTAMPTZ);
CREATE TABLE IF NOT EXISTS catalog.run_log (
    seq UBIGINT, run_id VARCHAR, kind VARCHAR, producer VARCHAR, status VARCHAR,
    started_at TIMESTAMPTZ, finished_at TIMESTAMPTZ, params JSON, code_version VARCHAR,
    parent_run_id VARCHAR, published_at TIMESTAMPTZ, event_id VARCHAR);
"""

# v2: the sequence that first committed each artifact key (exports partition on it)
DDL_V2 = """
ALTER TABLE catalog.artifacts_f ADD COLUMN first_seq UBIGINT;
UPDATE catalog.artifacts_f AS a SET first_seq = l.first_seq
FROM (SELECT run_id, name, min(seq) AS first_seq FROM catalog.artifact_log GROUP BY ALL) AS l
WHERE a.run_id = l.run_id AND a.name = l.name;
"""

# v3: a counter of the transactions that changed the catalog (``catalog.meta``, key
# ``commits``), and the count each export reflects. Freshness is judged by it: a late lower
# sequence or an event_id demotion changes the catalog without raising max(seq). It starts
# at 1 on an upgraded catalog so that exports written before it are refreshed once.
DDL_V3 = """
INSERT INTO catalog.meta VALUES ('commits', '1') ON CONFLICT DO NOTHING;
ALTER TABLE catalog.exports_d ADD COLUMN catalog_commit UBIGINT;
"""

# v4: the W3C trace context of an event's `traceparent` header (NULL without a valid
# one), per message and per run (the highest sequence's, like every run field).
DDL_V4 = """
ALTER TABLE catalog.events_f ADD COLUMN traceparent VARCHAR;
ALTER TABLE catalog.run_log ADD COLUMN traceparent VARCHAR;
ALTER TABLE catalog.runs_d ADD COLUMN traceparent VARCHAR;
"""

# v5: the identity of each artifact's file when it was checked (device, inode, times in ns;
# the size is `bytes`) and whether its SHA-256 was computed then. A replay skips the check of
# a file whose stat() still says the same. Machine-specific: `busd verify` leaves them out.
FILE_TYPES = (
    ("file_dev", "UBIGINT"),
    ("file_ino", "UBIGINT"),
    ("file_mtime_ns", "BIGINT"),
    ("file_ctime_ns", "BIGINT"),
    ("file_hashed", "BOOLEAN"),
)
FILE_COLUMNS = tuple(name for name, _ in FILE_TYPES)
DDL_V5 = "".join(
    f"ALTER TABLE catalog.{table} ADD COLUMN {name} {typ};\n"
    for table in ("artifact_log", "artifacts_f")
    for name, typ in FILE_TYPES
)

# v6: the catalog commit that last changed each runs_d and artifacts_f row, and in
# catalog.meta the last commit that moved such rows between parts of a partitioned export or
# removed them (`moved_commit`: a late lower sequence, a demotion) and the catalog's identity
# (`catalog_id`, new with each catalog: a replay's too). A partitioned export written at
# commit c then rewrites only the parts holding rows changed after c, also after a restart.
# Rows from before v6 have no commit: their exports are rewritten whole once (moved_commit).
DDL_V6 = f"""
ALTER TABLE catalog.runs_d ADD COLUMN {STAMP} UBIGINT;
ALTER TABLE catalog.artifacts_f ADD COLUMN {STAMP} UBIGINT;
INSERT INTO catalog.meta SELECT '{MOVED_KEY}', value FROM catalog.meta WHERE key = '{COMMITS_KEY}';
INSERT INTO catalog.meta VALUES ('{ID_KEY}', uuid()::VARCHAR);
"""

# v7: artifacts_f and runs_d without a primary key (rebuilt: DuckDB cannot drop one). The
# merge finds a batch's existing keys by a semi-join instead (see BATCH_ARTIFACTS below): an
# index lookup through ON CONFLICT cost more, and the index grew busd's memory with the
# catalog (25 MiB a million random keys).
DDL_V7 = "".join(
    f"""
CREATE TABLE catalog.{table}_v7 AS SELECT * FROM catalog.{table};
DROP TABLE catalog.{table};
ALTER TABLE catalog.{table}_v7 RENAME TO {table};
"""
    for table in ("artifacts_f", "runs_d")
)

MIGRATIONS: dict[int, str] = {
    1: DDL_V1,
    2: DDL_V2,
    3: DDL_V3,
    4: DDL_V4,
    5: DDL_V5,
    6: DDL_V6,
    7: DDL_V7,
}
EXPORTS_D_INSERT = "INSERT OR REPLACE INTO catalog.exports_d VALUES (?, ?, ?, ?, ?, ?, ?, ?)"

# Tables compared by `busd verify`, with the columns a replay cannot reproduce: wall-clock
# times, the identity of files as this machine saw them when it checked them, and the commit
# that changed a row (a replay commits in other batches).
COMPARED: dict[str, tuple[str, ...]] = {
    "runs_d": (STAMP,),
    "artifacts_f": ("committed_at", *FILE_COLUMNS, STAMP),
    "events_f": ("committed_at",),
    "rejections_f": ("rejected_at", "deliveries"),
}

TS = pa.timestamp("us", tz="UTC")
Columns = tuple[tuple[str, pa.DataType], ...]

EVENT_COLUMNS: Columns = (
    ("seq", pa.uint64()),
    ("event_id", pa.string()),
    ("payload_sha256", pa.string()),
    ("subject", pa.string()),
    ("producer", pa.string()),
    ("run_id", pa.string()),
    ("outcome", pa.string()),
    ("reason", pa.string()),
    ("n_artifacts", pa.int32()),
    ("published_at", TS),
    ("committed_at", TS),
    ("traceparent", pa.string()),
)
REJECTION_COLUMNS: Columns = (
    ("seq", pa.uint64()),
    ("subject", pa.string()),
    ("event_id", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("payload", pa.binary()),
    ("deliveries", pa.int32()),
    ("published_at", TS),
    ("rejected_at", TS),
)
ARTIFACT_LOG_COLUMNS: Columns = (
    ("run_id", pa.string()),
    ("name", pa.string()),
    ("seq", pa.uint64()),
    ("path", pa.string()),
    ("format", pa.string()),
    ("rows", pa.int64()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("columns", pa.string()),
    ("schema_hash", pa.string()),
    ("meta", pa.string()),
    ("event_id", pa.string()),
    ("published_at", TS),
    ("committed_at", TS),
    ("file_dev", pa.uint64()),
    ("file_ino", pa.uint64()),
    ("file_mtime_ns", pa.int64()),
    ("file_ctime_ns", pa.int64()),
    ("file_hashed", pa.bool_()),
)
RUN_LOG_COLUMNS: Columns = (
    ("seq", pa.uint64()),
    ("run_id", pa.string()),
    ("kind", pa.string()),
    ("producer", pa.string()),
    ("status", pa.string()),
    ("started_at", TS),
    ("finished_at", TS),
    ("params", pa.string()),
    ("code_version", pa.string()),
    ("parent_run_id", pa.string()),
    ("published_at", TS),
    ("event_id", pa.string()),
    ("traceparent", pa.string()),
)
DEMOTION_COLUMNS: Columns = (
    ("seq", pa.uint64()),
    ("outcome", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("payload", pa.binary()),
)

ARTIFACT_FIELDS = (
    "path",
    "format",
    "rows",
    "bytes",
    "sha256",
    "columns",
    "schema_hash",
    "meta",
    "event_id",
)
RUN_FIELDS = (
    "kind",
    "producer",
    "status",
    "started_at",
    "finished_at",
    "params",
    "code_version",
    "parent_run_id",
)

RUN_LAST = ("event_id", "traceparent")  # runs_d's last columns, the highest sequence's


def higher(seq_col: str, columns: Sequence[str]) -> str:
    """SELECT items that keep, per column, the value of the row with the higher sequence:
    the batch's (``b``) or the one already held (``a``)."""
    return ", ".join(
        f'CASE WHEN b.{seq_col} > a.{seq_col} THEN b.{c} ELSE a.{c} END AS "{c}"' for c in columns
    )


# The commit count of the transaction under way (it counts itself before anything merges):
# every row the SQL below writes records it, `changed_commit`.
COMMIT_NOW = f"(SELECT value::UBIGINT FROM catalog.meta WHERE key = '{COMMITS_KEY}')"

# After a change that moved rows between parts of a partitioned export or removed them.
MARK_MOVED = (
    f"UPDATE catalog.meta SET value = (SELECT value FROM catalog.meta WHERE key = "
    f"'{COMMITS_KEY}') WHERE key = '{MOVED_KEY}'"
)


# The usual path, incremental: the batch's rows per key (`batch_*`), the rows the derived
# tables already hold for those keys found by a semi-join that reads only the key columns
# (`old_*`, by rowid), those merged with the batch's ("highest sequence wins", versions and
# counts added up), deleted and inserted again, and the new keys inserted. No primary-key
# index: DuckDB's INSERT ... ON CONFLICT DO UPDATE cost 9 times a plain insert (330 ms for
# 5,000 keys at 1M rows, against 85 ms for the semi-join), and its indexes grew the memory
# with the catalog. `arg_max_null`, never `arg_max`: arg_max skips the rows whose value is
# NULL, so an event that leaves out a field (status, sha256, ...) would keep an earlier
# event's value only when the two share a batch, and a replay (bigger batches) would differ
# from the live catalog.
def _q(column: str) -> str:
    return f'"{column}"'


@dataclass(frozen=True)
class Merge:
    """How a batch merges into a derived table: its rows per key into ``batch_<kind>``,
    aggregated (``batch``) or, when no key appears twice in the batch, projected
    (``batch_unique``: the same rows without 17 aggregates); the rows already held for those
    keys are found by rowid (``old_<kind>``) and merged with the batch's (``merged``).
    :meth:`busd.catalog.Catalog._merge` runs them."""

    kind: str  # names the temporary tables
    table: str
    keys: str
    batch: str
    batch_unique: str
    merged: str


ARTIFACT_HIGHER = (*ARTIFACT_FIELDS, "published_at", "committed_at", *FILE_COLUMNS)
MERGE_ARTIFACTS = Merge(
    "artifacts",
    "catalog.artifacts_f",
    "run_id, name",
    batch=f"""
    CREATE OR REPLACE TEMP TABLE batch_artifacts AS
    SELECT run_id, name,
           {", ".join(f"arg_max_null({c}, seq) AS {_q(c)}" for c in ARTIFACT_HIGHER)},
           max(seq) AS seq, count(*)::INTEGER AS version, min(seq) AS first_seq,
           {COMMIT_NOW} AS {STAMP}
    FROM stage_artifacts WHERE seq IN (SELECT seq FROM fresh)
    GROUP BY run_id, name""",
    batch_unique=f"""
    CREATE OR REPLACE TEMP TABLE batch_artifacts AS
    SELECT run_id, name, {", ".join(ARTIFACT_HIGHER)}, seq, 1::INTEGER AS version,
           seq AS first_seq, {COMMIT_NOW} AS {STAMP}
    FROM stage_artifacts WHERE seq IN (SELECT seq FROM fresh)""",
    merged=f"""
    CREATE OR REPLACE TEMP TABLE merged_artifacts AS
    SELECT run_id, name,
           {higher("seq", ARTIFACT_HIGHER)},
           greatest(b.seq, a.seq) AS seq, a.version + b.version AS version,
           least(b.first_seq, a.first_seq) AS first_seq, b.{STAMP} AS {STAMP}
    FROM (SELECT * FROM catalog.artifacts_f WHERE rowid IN (SELECT rid FROM old_artifacts)) a
    JOIN batch_artifacts b USING (run_id, name)""",
)
# the batch's artifact keys no row held before, per run: runs_d.n_artifacts adds them
NEW_KEYS = """
    CREATE OR REPLACE TEMP TABLE new_keys AS
    SELECT run_id, count(*)::INTEGER AS n FROM {new} GROUP BY run_id"""

RUN_HIGHER = (*RUN_FIELDS, "last_published_at", *RUN_LAST)
MERGE_RUNS = Merge(
    "runs",
    "catalog.runs_d",
    "run_id",
    batch=f"""
    CREATE OR REPLACE TEMP TABLE batch_runs AS
    SELECT l.run_id, {", ".join(f"arg_max_null(l.{c}, l.seq) AS {_q(c)}" for c in RUN_FIELDS)},
           coalesce(any_value(n.n), 0) AS n_artifacts, min(l.seq) AS first_seq,
           max(l.seq) AS last_seq, arg_min(l.published_at, l.seq) AS first_published_at,
           arg_max_null(l.published_at, l.seq) AS last_published_at,
           {", ".join(f"arg_max_null(l.{c}, l.seq) AS {_q(c)}" for c in RUN_LAST)},
           {COMMIT_NOW} AS {STAMP}
    FROM stage_runs l LEFT JOIN new_keys n USING (run_id)
    WHERE l.seq IN (SELECT seq FROM fresh)
    GROUP BY l.run_id""",
    batch_unique=f"""
    CREATE OR REPLACE TEMP TABLE batch_runs AS
    SELECT l.run_id, {", ".join(f"l.{c}" for c in RUN_FIELDS)},
           coalesce(n.n, 0) AS n_artifacts, l.seq AS first_seq, l.seq AS last_seq,
           l.published_at AS first_published_at, l.published_at AS last_published_at,
           {", ".join(f"l.{c}" for c in RUN_LAST)}, {COMMIT_NOW} AS {STAMP}
    FROM stage_runs l LEFT JOIN new_keys n USING (run_id)
    WHERE l.seq IN (SELECT seq FROM fresh)""",
    merged=f"""
    CREATE OR REPLACE TEMP TABLE merged_runs AS
    SELECT run_id,
           {higher("last_seq", RUN_HIGHER)},
           CASE WHEN b.first_seq < a.first_seq THEN b.first_published_at
                ELSE a.first_published_at END AS first_published_at,
           least(b.first_seq, a.first_seq) AS first_seq,
           greatest(b.last_seq, a.last_seq) AS last_seq,
           a.n_artifacts + b.n_artifacts AS n_artifacts, b.{STAMP} AS {STAMP}
    FROM (SELECT * FROM catalog.runs_d WHERE rowid IN (SELECT rid FROM old_runs)) a
    JOIN batch_runs b USING (run_id)""",
)


# After a demotion (rare): recompute the affected keys from the logs.
DERIVE_ARTIFACTS = f"""
    INSERT INTO catalog.artifacts_f
    SELECT run_id, name, {", ".join(f"arg_max_null({c}, seq)" for c in ARTIFACT_FIELDS)},
           max(seq), count(*)::INTEGER, arg_max_null(published_at, seq),
           arg_max_null(committed_at, seq), min(seq),
           {", ".join(f"arg_max_null({c}, seq)" for c in FILE_COLUMNS)}, {COMMIT_NOW}
    FROM catalog.artifact_log SEMI JOIN touched_keys USING (run_id, name)
    GROUP BY run_id, name"""

DERIVE_RUNS = f"""
    INSERT INTO catalog.runs_d
    SELECT l.run_id, {", ".join(f"arg_max_null(l.{c}, l.seq)" for c in RUN_FIELDS)},
           coalesce(any_value(n.n), 0), min(l.seq), max(l.seq), arg_min(l.published_at, l.seq),
           arg_max_null(l.published_at, l.seq), arg_max_null(l.event_id, l.seq),
           arg_max_null(l.traceparent, l.seq), {COMMIT_NOW}
    FROM catalog.run_log l
    LEFT JOIN (SELECT run_id, count(*)::INTEGER AS n FROM catalog.artifacts_f
               WHERE run_id IN (SELECT run_id FROM touched_runs) GROUP BY run_id) n
      ON n.run_id = l.run_id
    WHERE l.run_id IN (SELECT run_id FROM touched_runs)
    GROUP BY l.run_id"""

# A whole catalog derived from its logs (a replay's end): the keys with one log row, nearly
# all of them, need none of the aggregates above (a third of their cost); ``touched_*`` then
# hold the keys logged more than once, which DERIVE_ARTIFACTS and DERIVE_RUNS derive.
DERIVE_ARTIFACTS_ONCE = f"""
    INSERT INTO catalog.artifacts_f
    SELECT run_id, name, {", ".join(ARTIFACT_FIELDS)}, seq, 1::INTEGER, published_at,
           committed_at, seq, {", ".join(FILE_COLUMNS)}, {COMMIT_NOW}
    FROM catalog.artifact_log ANTI JOIN touched_keys USING (run_id, name)"""

DERIVE_RUNS_ONCE = f"""
    INSERT INTO catalog.runs_d
    SELECT l.run_id, {", ".join(f"l.{c}" for c in RUN_FIELDS)}, coalesce(n.n, 0), l.seq,
           l.seq, l.published_at, l.published_at, {", ".join(f"l.{c}" for c in RUN_LAST)},
           {COMMIT_NOW}
    FROM catalog.run_log l ANTI JOIN touched_runs USING (run_id)
    LEFT JOIN (SELECT run_id, count(*)::INTEGER AS n FROM catalog.artifacts_f
               GROUP BY run_id) n USING (run_id)"""


def to_arrow(rows: Sequence[tuple[Any, ...]], columns: Columns) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in columns]
    return pa.table(
        {
            name: pa.array(values, type=typ)
            for (name, typ), values in zip(columns, cols, strict=True)
        }
    )
