"""``busd import catalog``: the rows of a legacy catalog (a DuckDB file with a run table and an
artifact table, opened read-only) mapped by a small TOML file to ordinary artifact events;
the rest of the import (ids, skipping what is there, publishing) is :mod:`busd.migrate`'s."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import msgspec

from busd import model
from busd.config import Settings
from busd.errors import BusdError, ConfigError
from busd.migrate import (
    DEFAULT_PRODUCER,
    Plan,
    Progress,
    Report,
    add_event,
    checked,
    chunks,
    committed,
    ident,
    no_progress,
    with_event_id,
)
from busd.sql import quote_ident

RUN_KEYS = (
    "table",
    "run_id",
    "kind",
    "producer",
    "status",
    "started_at",
    "finished_at",
    "params",
    "code_version",
    "parent_run_id",
)
ARTIFACT_KEYS = ("table", "run_id", "name", "path", "rows", "bytes", "sha256", "meta")
TOP_KEYS = ("producer", "kind", "status", "path_base", "runs", "artifacts")
REQUIRED = {"runs": ("table", "run_id"), "artifacts": ("table", "run_id", "name", "path")}
_TEXT_TYPES = ("VARCHAR", "JSON")


@dataclasses.dataclass(frozen=True)
class LegacyMap:
    """Which legacy table and column gives each field of an event (``MAP.toml``)."""

    runs: dict[str, str] | None
    artifacts: dict[str, str]
    producer: str
    kind: str | None
    status: str | None
    path_base: str | None


def load_map(  # noqa: C901 - one flat check per key of the map
    path: Path, *, producer: str | None = None
) -> LegacyMap:
    """Read and check the map; a missing or unknown key is exit 2 naming it."""
    where = f"--map {path}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: not TOML: {exc}") from None

    def table(section: str, keys: Sequence[str]) -> dict[str, str] | None:
        value = data.get(section)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: `{section}` must be a table ([{section}])")
        for key, column in value.items():
            if key not in keys:
                raise ConfigError(
                    f"{where}: unknown key `{section}.{key}` (known: {', '.join(keys)})"
                )
            if not isinstance(column, str) or not column:
                raise ConfigError(f"{where}: `{section}.{key}` must be a column name")
        for key in REQUIRED[section]:
            if key not in value:
                raise ConfigError(f"{where}: [{section}] is missing the required key `{key}`")
        return dict(value)

    for key, value in data.items():
        if key not in TOP_KEYS:
            raise ConfigError(f"{where}: unknown key `{key}` (known: {', '.join(TOP_KEYS)})")
        if key not in ("runs", "artifacts") and not isinstance(value, str):
            raise ConfigError(f"{where}: `{key}` must be a string")
    artifacts = table("artifacts", ARTIFACT_KEYS)
    if artifacts is None:
        raise ConfigError(f"{where}: the required table [artifacts] is missing")
    runs = table("runs", RUN_KEYS)
    kind = data.get("kind")
    if (runs is None or "kind" not in runs) and kind is None:
        raise ConfigError(
            f"{where}: missing the required key `runs.kind` (a column) or "
            "`kind` (one kind for every run)"
        )
    return LegacyMap(
        runs,
        artifacts,
        producer or data.get("producer") or DEFAULT_PRODUCER,
        kind,
        data.get("status"),
        data.get("path_base"),
    )


def _table_sql(name: str) -> str:
    return ".".join(quote_ident(part) for part in name.split("."))


def _select(
    con: duckdb.DuckDBPyConnection,
    where: str,
    section: str,
    columns: dict[str, str],
    fields: Sequence[str],
    json_fields: Sequence[str],
    order: str,
) -> list[dict[str, Any]]:
    """The mapped columns of a legacy table, as dicts keyed by field; a table or column
    that is not there is exit 2 naming the key."""
    table = columns["table"]
    try:
        described = con.execute(f"DESCRIBE SELECT * FROM {_table_sql(table)}").fetchall()
    except duckdb.Error:
        raise ConfigError(
            f"{where}: `{section}.table` = {table!r}: no such table in the legacy catalog"
        ) from None
    types = {row[0]: str(row[1]) for row in described}
    items = []
    for field in fields:
        column = columns.get(field)
        if column is None:
            continue
        if column not in types:
            raise ConfigError(
                f"{where}: `{section}.{field}` = {column!r}: no such column in table {table}"
            )
        expr = quote_ident(column)
        if field in json_fields and types[column] not in _TEXT_TYPES:
            expr = f"to_json({expr})"
        elif field in (
            "run_id",
            "name",
            "path",
            "parent_run_id",
            "kind",
            "status",
            "producer",
            "code_version",
            "sha256",
        ):
            expr = f"CAST({expr} AS VARCHAR)"
        items.append(f"{expr} AS {quote_ident(field)}")
    cur = con.execute(f"SELECT {', '.join(items)} FROM {_table_sql(table)} ORDER BY {order}")
    names = [d[0] for d in cur.description or []]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _json_object(value: Any, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    parsed = json.loads(value) if isinstance(value, str) else value
    if not isinstance(parsed, dict):
        raise ValueError(f"{what} is not a JSON object")
    return parsed


def _timestamp(value: Any, what: str) -> dt.datetime | None:
    """A legacy time; one without a time zone is taken as UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    elif isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime(value.year, value.month, value.day)
    if not isinstance(value, dt.datetime):
        raise ValueError(f"{what} is not a time: {value!r}")
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def read_legacy(
    legacy: Path, mapping: LegacyMap, map_path: Path
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Runs and, per run id, artifact rows of a legacy catalog, opened read-only."""
    if not legacy.is_file():
        raise ConfigError(f"LEGACY {legacy}: no such file")
    where = f"--map {map_path}"
    try:
        con = duckdb.connect(str(legacy), read_only=True)
    except duckdb.Error as exc:
        text = str(exc).splitlines()[0]
        if "lock" in text.lower():
            raise BusdError(f"LEGACY {legacy}: in use by another process: {text}") from None
        raise ConfigError(f"LEGACY {legacy}: cannot open it as DuckDB: {text}") from None
    try:
        runs = (
            _select(con, where, "runs", mapping.runs, RUN_KEYS[1:], ("params",), "1")
            if mapping.runs is not None
            else []
        )
        arts = _select(
            con, where, "artifacts", mapping.artifacts, ARTIFACT_KEYS[1:], ("meta",), "1, 2"
        )
    finally:
        con.close()
    by_run: dict[str, list[dict[str, Any]]] = {}
    for row in arts:
        if row["run_id"] is not None:
            by_run.setdefault(row["run_id"], []).append(row)
    if mapping.runs is None:
        runs = [{"run_id": r} for r in sorted(by_run)]
    return runs, by_run


def plan_catalog(
    s: Settings, legacy: Path, mapping: LegacyMap, map_path: Path, progress: Progress = no_progress
) -> Plan:
    """One event per legacy run (more past 1000 artifacts) with the artifacts of its files
    busd would take."""
    report = Report()
    known = committed(s)
    runs, by_run = read_legacy(legacy, mapping, map_path)
    base = Path(mapping.path_base) if mapping.path_base else s.roots[0]
    events: list[model.ArtifactEvent] = []
    seen: set[str] = set()
    for i, row in enumerate(runs):
        progress("reading the legacy catalog", i, len(runs))
        run_id = row["run_id"]
        if run_id is None or run_id in seen:
            continue
        seen.add(run_id)
        rows = by_run.get(run_id, [])
        if not rows:
            report.skipped.append((f"run {run_id}", "no artifacts"))
            continue
        try:
            run = model.Run(
                run_id=run_id,
                kind=row.get("kind") or mapping.kind or "",
                status=row.get("status") or mapping.status,
                started_at=_timestamp(row.get("started_at"), "started_at"),
                finished_at=_timestamp(row.get("finished_at"), "finished_at"),
                params=_json_object(row.get("params"), "params"),
                code_version=row.get("code_version"),
                parent_run_id=row.get("parent_run_id"),
            )
            arts = [
                model.Artifact(
                    name=a["name"] or "",
                    path=str(base / a["path"]) if a["path"] else "",
                    rows=a.get("rows"),
                    bytes=a.get("bytes"),
                    sha256=str(a["sha256"]).lower() if a.get("sha256") else None,
                    meta=_json_object(a.get("meta"), "meta"),
                )
                for a in rows
            ]
        except (ValueError, TypeError) as exc:
            report.skipped.append((f"run {run_id}", f"schema: {exc}"))
            continue
        producer = ident(row.get("producer") or mapping.producer)
        prefix = ident(f"import:{run_id}")
        for chunk in chunks(arts):
            event = with_event_id(
                model.ArtifactEvent(
                    schema_version=model.SCHEMA_VERSION, run=run, artifacts=chunk, producer=producer
                ),
                prefix,
            )
            if event.event_id in known.event_ids:
                add_event(event, known, events, report)
                continue
            good: list[model.Artifact] = []
            for art in chunk:
                found = checked(art, s, s.verify.checksum)
                if isinstance(found, str):
                    report.skipped.append((f"{art.name} of run {run_id}: {art.path}", found))
                else:
                    # the legacy's own facts stay in the event: busd checks them again
                    good.append(art)
            if not good:
                continue
            if len(good) < len(chunk):
                event = with_event_id(msgspec.structs.replace(event, artifacts=good), prefix)
            add_event(event, known, events, report)
    progress("reading the legacy catalog", len(runs), len(runs))
    return Plan(events, report)
