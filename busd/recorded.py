"""Checks a catalog recorded, reused by a replay: a file is not read again when ``stat``
still gives the identity recorded when it was checked for the same event (git's index rule,
:func:`busd.validate.unchanged`)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb

from busd import log
from busd.catalog.schema import FILE_COLUMNS
from busd.config import Settings
from busd.model import ArtifactEvent
from busd.sql import sql_str
from busd.validate import CheckedArtifact, unchanged

_RECORDED = ("seq", "name", "path", "format", "rows", "bytes", "sha256", "columns", "schema_hash")
_ROW_GROUP = 8192  # rows of the snapshot read per batch: a batch's range is one or two groups


class RecordedChecks:
    """What a catalog recorded about the files of the events a replay folds again.

    :meth:`snapshot` copies, once, the artifact rows that carry a file identity (from
    ``catalog.artifact_log``, or the artifacts export: the highest sequence of each key)
    into a Parquet file ordered by sequence, so that the catalog is not held open during the
    replay; :meth:`checks` reads the rows of a batch's sequences from it and keeps the
    checks whose files ``stat`` says are unchanged. The reads and the ``stat`` calls run on
    a thread of their own: one that makes no progress within the check timeout (a hung
    filesystem) is left behind, and from then on every file is checked by the checker,
    which copes with that."""

    def __init__(self, s: Settings, path: Path) -> None:
        self.path = path
        self.roots = s.roots
        self.checksum = s.verify.checksum
        self.timeout_s = s.verify.check_timeout_s
        self.off = False  # a lookup stalled or failed: everything is checked from then on
        self._con = duckdb.connect(":memory:")
        self._sql = (
            f"SELECT {', '.join(_RECORDED + FILE_COLUMNS)} FROM read_parquet({sql_str(path)}) "
            "WHERE seq BETWEEN ? AND ?"
        )

    @classmethod
    def snapshot(
        cls, s: Settings, con: duckdb.DuckDBPyConnection, source: str, folder: Path
    ) -> RecordedChecks:
        """Copy the rows of ``source`` (a table or ``read_parquet(...)``) that carry a file
        identity into ``folder``; a source without the columns (older than them) gives
        nothing to reuse."""
        path = folder / f".replay-{uuid.uuid4().hex[:8]}.recorded.parquet"
        columns = ", ".join(_RECORDED + FILE_COLUMNS)
        try:
            con.execute(
                f"COPY (SELECT {columns} FROM {source} WHERE file_dev IS NOT NULL "
                f"ORDER BY seq) TO {sql_str(path)} (FORMAT parquet, ROW_GROUP_SIZE {_ROW_GROUP})"
            )
        except duckdb.BinderException:  # written before the identity columns existed
            con.execute(
                f"COPY (SELECT {columns} FROM (SELECT NULL::UBIGINT AS seq) WHERE false) "
                f"TO {sql_str(path)} (FORMAT parquet)"
            )
        return cls(s, path)

    def close(self) -> None:
        with contextlib.suppress(duckdb.Error):
            self._con.close()
        self.path.unlink(missing_ok=True)

    async def checks(
        self, events: Sequence[tuple[int, ArtifactEvent]]
    ) -> list[list[CheckedArtifact] | None]:
        if self.off or not events:
            return [None] * len(events)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[list[CheckedArtifact] | None]] = loop.create_future()

        def settle(result: Any, failed: BaseException | None) -> None:
            if not done.done():
                if failed is None:
                    done.set_result(result)
                else:
                    done.set_exception(failed)

        def run() -> None:
            try:
                result, failed = self._lookup(events), None
            except Exception as exc:  # noqa: BLE001 - reported on the loop
                result, failed = None, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(settle, result, failed)

        threading.Thread(target=run, name="busd-recorded", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(done), self.timeout_s)
        except (TimeoutError, duckdb.Error, OSError) as exc:
            self.off = True
            log.get().warning(
                "reusing recorded file checks stopped; every file is checked from here on",
                why=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                first_seq=events[0][0],
            )
            return [None] * len(events)

    def _lookup(
        self, events: Sequence[tuple[int, ArtifactEvent]]
    ) -> list[list[CheckedArtifact] | None]:
        seqs = [seq for seq, _ in events]
        recorded = {
            (row[0], row[1]): _check_of(row)
            for row in self._con.execute(self._sql, [min(seqs), max(seqs)]).fetchall()
        }
        out: list[list[CheckedArtifact] | None] = []
        for seq, event in events:
            kept: list[CheckedArtifact] = []
            for art in event.artifacts:
                before = recorded.get((seq, art.name))
                now = None if before is None else unchanged(art, before, self.roots, self.checksum)
                if now is None:
                    break
                kept.append(now)
            out.append(kept if len(kept) == len(event.artifacts) else None)
        return out


def _check_of(row: tuple[Any, ...]) -> CheckedArtifact:
    """A snapshot row (``_RECORDED``, then ``FILE_COLUMNS``) as the check it records."""
    _, name, path, fmt, rows, size, sha256, columns, schema_hash, dev, ino, mt, ct, hashed = row
    return CheckedArtifact(
        name, path, fmt, rows, size, sha256, columns, schema_hash, None, dev, ino, mt, ct, hashed
    )
