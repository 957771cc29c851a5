"""``busd import``: register what existed before the bus as ordinary artifact events.

Two sources: the Parquet files under the artifact roots, and the rows of a legacy catalog (a
DuckDB file with a run table and an artifact table, mapped by a small TOML file). Either way
the result is events on the stream, so the stream stays the source of truth and a rebuild
gives the same catalog.

A second import is a no-op, three ways over: each event's id is a fingerprint of its content
and is sent as ``Nats-Msg-Id`` (JetStream drops a re-publish inside its duplicate window);
events whose id the exports already hold, and files a committed artifact already names, are
not published again (after the window); and busd itself answers an event id it committed
with the same payload as a ``duplicate``.

Rules for files (``import files``): one run per folder. The run id is ``import:`` and the
folder's path relative to the artifact root holding it (``import:.`` for the root itself; a
root other than the first adds its folder name: ``import:<root name>:<folder>``); an artifact
is named after its file's stem. A name with characters an identifier may not hold gets them
replaced by ``_`` and a hash of the original appended, so the mapping stays one to one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import msgspec

from busd import events as ev
from busd import model, validate
from busd.config import Settings
from busd.errors import BusdError, ConfigError, FileUnavailable, InvalidEvent, TransientError
from busd.manifest import reader_sql

DEFAULT_PRODUCER = model.IMPORT_PRODUCER
# below the 1 MiB payload limit with room for the run and the JSON around the artifacts
_PAYLOAD_BUDGET = 768 * 1024
_NOT_IDENT = re.compile(r"[^A-Za-z0-9._:/-]")

Progress = Callable[[str, int, int], None]  # phase, done, total


def no_progress(phase: str, done: int, total: int) -> None:
    return None


@dataclasses.dataclass
class Report:
    """What an import did, in events and in artifacts."""

    published: int = 0
    published_artifacts: int = 0
    already_there: int = 0  # events: held by the exports, or dropped by the duplicate window
    already_there_artifacts: int = 0
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (what, reason)
    seqs: list[int] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "published": {"events": self.published, "artifacts": self.published_artifacts},
            "already_there": {
                "events": self.already_there,
                "artifacts": self.already_there_artifacts,
            },
            "skipped": [{"item": what, "reason": why} for what, why in self.skipped],
            "last_seq": max(self.seqs, default=None),
        }


@dataclasses.dataclass
class Plan:
    """Events to publish; the report already counts what was found there or skipped."""

    events: list[model.ArtifactEvent]
    report: Report


@dataclasses.dataclass(frozen=True)
class Committed:
    """What the exports say busd committed: artifact paths and event ids."""

    paths: frozenset[str]
    event_ids: frozenset[str]


def committed(s: Settings) -> Committed:
    """Read from the exports in an in-memory DuckDB: the catalog file stays busd serve's."""
    paths: set[str] = set()
    ids: set[str] = set()
    con = duckdb.connect(":memory:")
    try:
        artifacts = reader_sql(s.exports_path, "artifacts")
        if artifacts is not None:
            for path, event_id in con.execute(f"SELECT path, event_id FROM {artifacts}").fetchall():
                paths.add(path)
                if event_id:
                    ids.add(event_id)
        runs = reader_sql(s.exports_path, "runs")
        if runs is not None:
            ids.update(e for (e,) in con.execute(f"SELECT event_id FROM {runs}").fetchall() if e)
    except duckdb.Error as exc:
        raise BusdError(
            f"cannot read the exports in {s.exports_path}: {str(exc).splitlines()[0]}"
        ) from None
    finally:
        con.close()
    return Committed(frozenset(paths), frozenset(ids))


def ident(text: str) -> str:
    """``text`` as an identifier; one that had to change gets a hash of the original."""
    clean = _NOT_IDENT.sub("_", text)
    if clean == text and 0 < len(clean) <= 200:
        return clean
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{clean[:150]}-{digest}"


def with_event_id(event: model.ArtifactEvent, prefix: str) -> model.ArtifactEvent:
    """The event with a stable id: ``prefix``, then a fingerprint of the rest of the event."""
    fingerprint = hashlib.sha256(
        ev.encode(msgspec.structs.replace(event, event_id=None))
    ).hexdigest()[:20]
    event_id = f"{prefix}:{fingerprint}"
    if len(event_id) > 200:
        event_id = f"import:{hashlib.sha256(prefix.encode()).hexdigest()[:32]}:{fingerprint}"
    return msgspec.structs.replace(event, event_id=event_id)


def chunks(artifacts: Sequence[model.Artifact]) -> Iterator[list[model.Artifact]]:
    """At most 1000 artifacts and well under 1 MiB of JSON per event."""
    chunk: list[model.Artifact] = []
    size = 0
    for art in artifacts:
        cost = len(art.name) + len(art.path.encode()) + 200
        if chunk and (len(chunk) == model.MAX_ARTIFACTS or size + cost > _PAYLOAD_BUDGET):
            yield chunk
            chunk, size = [], 0
        chunk.append(art)
        size += cost
    if chunk:
        yield chunk


def checked(
    art: model.Artifact, s: Settings, checksum: validate.ChecksumPolicy
) -> model.Artifact | str:
    """The artifact with what its file says (size, rows, checksum by policy), or why busd
    would not take it."""
    try:
        found = validate.check_artifact(art, s.roots, checksum)
    except InvalidEvent as exc:
        return f"{exc.reason.value}: {exc.detail}"
    except FileUnavailable as exc:
        return f"unavailable: {exc.detail}"
    return msgspec.structs.replace(
        art, path=found.path, rows=found.rows, bytes=found.bytes, sha256=found.sha256
    )


# ---------------------------------------------------------------------------------- files


def own_dirs(s: Settings) -> list[Path]:
    """busd's own folders under the data dir: never artifacts."""
    data = s.data_path.resolve()
    return [s.exports_path.resolve(), data / "nats"]


def parquet_files(folders: Iterable[Path], s: Settings) -> Iterator[Path]:
    """Parquet files under ``folders``, resolved, each once; busd's own files (exports, the
    embedded NATS store, the catalog and its spill folder) and hidden files (temporary files
    of busd and of most writers) left out."""
    skip = own_dirs(s)
    catalog = str(s.catalog_path.resolve())
    seen: set[str] = set()
    for folder in folders:
        for top, dirs, files in os.walk(folder):
            dirs[:] = sorted(
                d
                for d in dirs
                if not d.startswith(".")
                and not validate.inside(os.path.realpath(os.path.join(top, d)), skip)
                and not os.path.join(top, d).startswith(catalog)
            )
            for name in sorted(files):
                if name.startswith(".") or not name.endswith(".parquet"):
                    continue
                path = os.path.realpath(os.path.join(top, name))
                if path in seen or validate.inside(path, skip):
                    continue
                seen.add(path)
                yield Path(path)


def run_id_for(folder: Path, roots: Sequence[Path]) -> str | None:
    for i, root in enumerate(roots):
        if validate.inside(str(folder), [root]):
            rel = folder.relative_to(root).as_posix()
            return ident(f"import:{rel}" if i == 0 else f"import:{root.name}:{rel}")
    return None


def scan_roots(s: Settings, folders: Sequence[Path] | None) -> list[Path]:
    """The folders to scan: the given ones, which must lie inside an artifact root, or the
    roots themselves."""
    if not folders:
        return [r for r in s.roots if r.is_dir()]
    out = []
    for folder in folders:
        resolved = Path(os.path.realpath(folder))
        if not resolved.is_dir():
            raise ConfigError(f"ROOT {folder}: not a folder")
        if not validate.inside(str(resolved), s.roots):
            raise ConfigError(
                f"ROOT {folder}: not inside an artifact root (artifact_roots); "
                "busd would reject its files as path_outside_roots"
            )
        out.append(resolved)
    return out


def plan_files(
    s: Settings,
    folders: Sequence[Path] | None,
    *,
    producer: str,
    kind: str,
    status: str | None,
    min_age_s: float,
    progress: Progress = no_progress,
) -> Plan:
    """One event per folder (more past 1000 files) for the Parquet files no committed
    artifact names yet."""
    report = Report()
    known = committed(s)
    roots = s.roots
    by_folder: dict[Path, list[Path]] = {}
    for path in parquet_files(scan_roots(s, folders), s):
        if str(path) in known.paths:
            report.already_there_artifacts += 1
            continue
        by_folder.setdefault(path.parent, []).append(path)
    todo = [p for paths in by_folder.values() for p in paths]
    total = sum(_size(p) for p in todo)
    done = 0
    now = time.time()
    events: list[model.ArtifactEvent] = []
    for folder, paths in sorted(by_folder.items()):
        run_id = run_id_for(folder, roots)
        arts: list[model.Artifact] = []
        for path in paths:
            size = _size(path)
            done += size
            if run_id is None:
                report.skipped.append((str(path), "path_outside_roots"))
                continue
            try:
                age = now - path.stat().st_mtime
            except OSError as exc:
                report.skipped.append((str(path), f"file_unreadable: {exc.strerror}"))
                continue
            if age < min_age_s:
                report.skipped.append(
                    (
                        str(path),
                        f"changed {age:.0f}s ago (less than "
                        f"--min-age {min_age_s:g}s): still being "
                        "written?",
                    )
                )
                continue
            art = checked(model.Artifact(name=ident(path.stem), path=str(path)), s, "always")
            progress("reading files", done, total)
            if isinstance(art, str):
                report.skipped.append((str(path), art))
            else:
                arts.append(art)
        if run_id is None:
            continue
        rel = folder.relative_to(next(r for r in roots if validate.inside(str(folder), [r])))
        run = model.Run(
            run_id=run_id, kind=kind, status=status, params={"imported_from": rel.as_posix()}
        )
        for chunk in chunks(arts):
            event = with_event_id(
                model.ArtifactEvent(
                    schema_version=model.SCHEMA_VERSION, run=run, artifacts=chunk, producer=producer
                ),
                run_id,
            )
            add_event(event, known, events, report)
    progress("reading files", total, total)
    return Plan(events, report)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def add_event(
    event: model.ArtifactEvent, known: Committed, events: list[model.ArtifactEvent], report: Report
) -> None:
    what = f"run {event.run.run_id}"
    if event.event_id in known.event_ids:
        report.already_there += 1
        report.already_there_artifacts += len(event.artifacts)
        return
    try:  # the checks busd applies to the event itself
        ev.decode(ev.encode(event))
    except InvalidEvent as exc:
        report.skipped.append((what, f"{exc.reason.value}: {exc.detail}"))
        return
    events.append(event)


# ------------------------------------------------------------------------------ publishing


async def publish(
    nc: Any, plan: Plan, *, timeout_s: float = 10.0, progress: Progress = no_progress
) -> Report:
    """Publish each event with ``Nats-Msg-Id`` = its id and wait for its PubAck; one the
    duplicate window dropped counts as already there."""
    js = nc.jetstream()
    report = plan.report
    for i, event in enumerate(plan.events):
        progress("publishing", i, len(plan.events))
        subject = f"artifacts.{event.producer or DEFAULT_PRODUCER}"
        try:
            ack = await js.publish(
                subject,
                ev.encode(event),
                headers={"Nats-Msg-Id": event.event_id or ""},
                timeout=timeout_s,
            )
        except Exception as exc:  # noqa: BLE001 - nats-py raises many kinds
            raise TransientError(
                f"publish to {subject} failed after {report.published} "
                f"events (run the import again to go on): "
                f"{exc or type(exc).__name__}"
            ) from None
        if ack.duplicate:
            report.already_there += 1
            report.already_there_artifacts += len(event.artifacts)
        else:
            report.published += 1
            report.published_artifacts += len(event.artifacts)
            report.seqs.append(int(ack.seq))
    progress("publishing", len(plan.events), len(plan.events))
    return report


__all__ = [
    "Committed",
    "Plan",
    "Report",
    "committed",
    "ident",
    "parquet_files",
    "plan_files",
    "publish",
]
