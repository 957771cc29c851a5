"""The sweep over every committed artifact's file goes a slice at a time (busd/exports/sweep.py):
a refresh never waits for a sweep of a catalog larger than one slice, and a pass over several
slices still finds every missing file."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import committed_batch

from busd.catalog import Catalog
from busd.exports import Exporter, sweep
from busd.manifest import read_manifest


def test_a_large_catalog_is_swept_in_slices_between_refreshes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweep, "SWEEP_ROWS", 10)
    catalog = Catalog(tmp_path / "c.duckdb")
    try:
        for seq in range(1, 51):  # files that are not there: every one is missing
            catalog.commit(committed_batch(seq * 7, f"r{seq}"))
        folder = tmp_path / "exports"
        exporter = Exporter(catalog.cursor(), folder, ())
        files = exporter.files
        assert files.sweep_due() and not files.sweep_due(inline=True)
        exporter.refresh(["runs", "artifacts"])
        assert read_manifest(folder).artifacts_missing.checked_at is None  # not swept inline
        calls = 0
        while calls < 100:
            files.sweep()
            calls += 1
            if not files.sweep_due():
                break
        assert 5 <= calls < 20  # 50 rows, about 10 a slice
        missing = read_manifest(folder).artifacts_missing
        assert missing.count == 50 and missing.checked_at is not None
        assert files.missing_count == 50

        # one slice holds it all: the refresh sweeps inline again
        monkeypatch.setattr(sweep, "SWEEP_ROWS", 1000)
        fresh = Exporter(catalog.cursor(), folder, ())
        assert fresh.files.sweep_due(inline=True)
        fresh.refresh(["runs", "artifacts"])
        assert not fresh.files.sweep_due() and fresh.files.missing_count == 50
    finally:
        catalog.close()
