"""Moving onto the bus: `busd import`, `busd orphans`, and a catalog only busd can write.

Real processes throughout: the commands run as subprocesses against a real nats-server, and
the real daemon commits what they publish.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import duckdb
import pytest
from support import Bus

LEGACY_MAP = """
producer = "legacy.catalog"

[runs]
table = "jobs"
run_id = "id"
kind = "job_type"
status = "state"
started_at = "started"
params = "settings"

[artifacts]
table = "outputs"
run_id = "job"
name = "label"
path = "file"
rows = "nrows"
"""


def run_json(bus: Bus, *args: str, timeout: float = 120) -> dict[str, Any]:
    out = bus.cli(*args, "--json", timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def legacy_catalog(bus: Bus) -> Path:
    """The old way: jobs wrote Parquet and rows into a shared DuckDB file themselves."""
    for job, files in {1: ("fills", "positions"), 2: ("fills",), 3: ("fills", "pnl")}.items():
        for name in files:
            bus.parquet(f"legacy/job-{job}/{name}.parquet", rows=job + 1)
    path = bus.root / "legacy.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE jobs (id INTEGER, job_type VARCHAR, state VARCHAR, "
        "started TIMESTAMP, settings VARCHAR)"
    )
    con.execute(
        "INSERT INTO jobs VALUES (1, 'simulation', 'done', '2026-11-01 10:00:00', "
        "'{\"seed\": 7}'), (2, 'backtest', 'done', NULL, NULL), "
        "(3, 'simulation', 'failed', '2026-11-02 08:30:00', '{\"seed\": 8}'), "
        "(4, 'simulation', 'done', NULL, NULL)"
    )
    con.execute("CREATE TABLE outputs (job INTEGER, label VARCHAR, file VARCHAR, nrows BIGINT)")
    for job, name in [(1, "fills"), (1, "positions"), (2, "fills"), (3, "fills"), (3, "pnl")]:
        con.execute(
            "INSERT INTO outputs VALUES (?, ?, ?, ?)",
            [job, name, f"legacy/job-{job}/{name}.parquet", job + 1],
        )
    # a row whose file was deleted long ago, and a job (4) whose only file is gone
    con.execute(
        "INSERT INTO outputs VALUES (2, 'gone', 'legacy/job-2/gone.parquet', 1), "
        "(4, 'fills', 'legacy/job-4/fills.parquet', 1)"
    )
    con.close()
    (bus.root / "map.toml").write_text(LEGACY_MAP)
    return path


def test_import_catalog_twice_gives_one_copy_and_verify_passes(bus: Bus) -> None:
    legacy = legacy_catalog(bus)
    cfg = str(bus.write_config())
    before = legacy.read_bytes()
    args = ("import", "catalog", str(legacy), "--map", "map.toml", "--config", cfg)
    first = run_json(bus, *args)
    assert first["published"] == {"events": 3, "artifacts": 5}
    skipped = {s["item"]: s["reason"] for s in first["skipped"]}
    assert len(skipped) == 2, skipped
    assert all(r.startswith("file_missing") for r in skipped.values()), skipped
    # again at once: JetStream's duplicate window drops every event
    again = run_json(bus, *args)
    assert again["published"]["events"] == 0
    assert again["already_there"] == {"events": 3, "artifacts": 5}
    bus.drain()
    # again once committed: the exports hold the event ids (as after the window)
    third = run_json(bus, *args)
    assert third["published"]["events"] == 0 and third["already_there"]["events"] == 3
    bus.drain()
    assert legacy.read_bytes() == before  # opened read-only
    runs = bus.sql(
        "SELECT run_id, kind, status, producer, started_at IS NOT NULL, "
        "params->>'seed', n_artifacts FROM catalog.runs_d ORDER BY run_id"
    )
    assert runs == [
        ("1", "simulation", "done", "legacy.catalog", True, "7", 2),
        ("2", "backtest", "done", "legacy.catalog", False, None, 1),
        ("3", "simulation", "failed", "legacy.catalog", True, "8", 2),
    ]
    arts = bus.sql("SELECT run_id, name, rows, version FROM catalog.artifacts_f ORDER BY ALL")
    assert arts == [
        ("1", "fills", 2, 1),
        ("1", "positions", 2, 1),
        ("2", "fills", 3, 1),
        ("3", "fills", 4, 1),
        ("3", "pnl", 4, 1),
    ]
    outcomes = bus.sql("SELECT outcome, count(*) FROM catalog.events_f GROUP BY ALL")
    assert outcomes == [("committed", 3)]
    verify = bus.cli("verify", "--config", cfg, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # and what the legacy catalog held is no orphan
    orphans = run_json(bus, "orphans", "--config", cfg)
    assert orphans["orphans"]["count"] == 0 and orphans["gone"]["count"] == 0


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m.replace('path = "file"\n', ""), "`path`"),
        (lambda m: m.replace('table = "jobs"', 'table = "no_such_jobs"'), "runs.table"),
        (lambda m: m.replace('rows = "nrows"', 'rows = "row_count"'), "artifacts.rows"),
        (lambda m: m.replace('kind = "job_type"\n', ""), "runs.kind"),
        (lambda m: m + 'colour = "blue"\n', "colour"),
        (lambda m: m.replace("[runs]", "[runz]"), "runz"),
    ],
)
def test_a_bad_map_exits_2_naming_the_key(bus: Bus, edit: Any, needle: str) -> None:
    legacy = legacy_catalog(bus)
    (bus.root / "bad.toml").write_text(edit(LEGACY_MAP))
    out = bus.cli(
        "import", "catalog", str(legacy), "--map", "bad.toml", "--config", str(bus.write_config())
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_import_catalog_that_is_not_there_exits_2(bus: Bus) -> None:
    (bus.root / "map.toml").write_text(LEGACY_MAP)
    out = bus.cli(
        "import",
        "catalog",
        "nowhere.duckdb",
        "--map",
        "map.toml",
        "--config",
        str(bus.write_config()),
    )
    assert out.returncode == 2 and "LEGACY" in out.stderr, out.stderr


def folder_tree(bus: Bus) -> None:
    bus.parquet("sims/a/fills.parquet", rows=5)
    bus.parquet("sims/a/positions.parquet", rows=2)
    bus.parquet("sims/b/fills.parquet", rows=7)
    bus.parquet("top.parquet", rows=1)
    bus.parquet("odd names/my file.parquet", rows=3)
    (bus.artifacts / "sims" / "a" / "notes.txt").write_text("not an artifact")
    (bus.artifacts / "sims" / "b" / "broken.parquet").write_bytes(b"PAR1 but not really")
    # a writer's temporary file, and busd-like leftovers, are never artifacts
    (bus.artifacts / "sims" / "b" / ".fills.parquet.tmp-42").write_bytes(b"x")
    shutil.copy(bus.artifacts / "top.parquet", bus.artifacts / "sims" / ".hidden.parquet")


def test_import_files_registers_a_folder_tree_once(bus: Bus) -> None:
    folder_tree(bus)
    # the whole test folder is a root: busd's own exports lie under it and must be left out
    bus.overrides["artifact_roots"] = [str(bus.root)]
    cfg = str(bus.write_config())
    bus.drain()  # the (empty) exports now exist under the root
    assert (bus.data / "exports" / "artifacts.parquet").exists()
    args = ("import", "files", "--min-age", "0", "--kind", "legacy.files", "--config", cfg)
    first = run_json(bus, *args)
    assert first["published"] == {"events": 4, "artifacts": 5}
    assert [s["item"] for s in first["skipped"]] == [
        str(bus.artifacts / "sims" / "b" / "broken.parquet")
    ]
    assert first["skipped"][0]["reason"].startswith("not_parquet")
    bus.drain()
    runs = bus.sql(
        "SELECT run_id, kind, producer, params->>'imported_from', n_artifacts "
        "FROM catalog.runs_d ORDER BY run_id"
    )
    odd = [r for r in runs if r[3] == "artifacts/odd names"]
    assert len(odd) == 1 and odd[0][0].startswith("import:artifacts/odd_names-")
    assert [r for r in runs if r not in odd] == [
        ("import:artifacts", "legacy.files", "busd.import", "artifacts", 1),
        ("import:artifacts/sims/a", "legacy.files", "busd.import", "artifacts/sims/a", 2),
        ("import:artifacts/sims/b", "legacy.files", "busd.import", "artifacts/sims/b", 1),
    ]
    arts = bus.sql(
        "SELECT run_id, name, rows, sha256 IS NOT NULL FROM catalog.artifacts_f "
        "WHERE run_id NOT LIKE '%odd%' ORDER BY ALL"
    )
    assert arts == [
        ("import:artifacts", "top", 1, True),
        ("import:artifacts/sims/a", "fills", 5, True),
        ("import:artifacts/sims/a", "positions", 2, True),
        ("import:artifacts/sims/b", "fills", 7, True),
    ]
    assert bus.sql("SELECT name FROM catalog.artifacts_f WHERE run_id LIKE '%odd%'")[0][
        0
    ].startswith("my_file-")
    # a second import: every file is named by a committed artifact already
    second = run_json(bus, *args)
    assert second["published"]["events"] == 0
    assert second["already_there"]["artifacts"] == 5
    # a file added since: only it is published, into its folder's run
    bus.parquet("sims/a/pnl.parquet", rows=4)
    third = run_json(bus, *args)
    assert third["published"] == {"events": 1, "artifacts": 1}
    bus.drain()
    assert bus.sql(
        "SELECT rows FROM catalog.artifacts_f WHERE run_id = "
        "'import:artifacts/sims/a' AND name = 'pnl'"
    ) == [(4,)]
    assert bus.sql("SELECT count(*) FROM catalog.artifacts_f") == [(6,)]
    verify = bus.cli("verify", "--config", cfg, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_import_files_leaves_fresh_files_and_refuses_folders_outside_the_roots(bus: Bus) -> None:
    bus.parquet("fresh/fills.parquet")
    cfg = str(bus.write_config())
    out = run_json(bus, "import", "files", "--config", cfg)  # default --min-age 60
    assert out["published"]["events"] == 0
    assert "still being written" in out["skipped"][0]["reason"]
    outside = bus.cli("import", "files", str(bus.root), "--config", cfg)
    assert outside.returncode == 2 and "ROOT" in outside.stderr, outside.stderr


def test_orphans_finds_exactly_the_files_left_unpublished(bus: Bus) -> None:
    bus.overrides["artifact_roots"] = [str(bus.root)]
    cfg = str(bus.write_config())
    published = [
        bus.parquet("team-ok/run-1/fills.parquet"),
        bus.parquet("team-ok/run-2/fills.parquet"),
    ]
    bypass = [
        bus.parquet("team-old/run-9/fills.parquet"),
        bus.parquet("team-old/run-9/positions.parquet"),
        bus.parquet("team-ok/run-3/scratch.parquet"),
    ]
    (bus.artifacts / "team-old" / ".partial.parquet").write_bytes(b"")
    for i, path in enumerate(published, 1):
        out = bus.cli(
            "submit",
            "--run-id",
            f"run-{i}",
            "--kind",
            "sim",
            "--producer",
            "team.ok",
            f"fills={path}",
            "--config",
            cfg,
        )
        assert out.returncode == 0, out.stderr
    bus.drain()
    report = run_json(bus, "orphans", "--config", cfg)
    assert report["committed_artifacts"] == 2
    assert report["orphans"]["count"] == 3
    assert {f["folder"]: f["files"] for f in report["orphans"]["folders"]} == {
        str(bypass[0].parent): [str(bypass[0]), str(bypass[1])],
        str(bypass[2].parent): [str(bypass[2])],
    }
    assert report["gone"] == {"count": 0, "artifacts": []}
    # a committed file deleted afterwards
    published[1].unlink()
    report = run_json(bus, "orphans", "--config", cfg)
    assert report["orphans"]["count"] == 3
    assert report["gone"] == {
        "count": 1,
        "artifacts": [
            {"run_id": "run-2", "name": "fills", "path": str(published[1]), "problem": "missing"}
        ],
    }
    text = bus.cli("orphans", "--config", cfg)
    assert text.returncode == 0
    assert f"{bypass[0].parent}/: 2" in text.stdout and "fills of run-2" in text.stdout


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def as_nobody(code: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"HOME": str(home), "PATH": "/usr/bin"},
        cwd=home,
        check=False,
    )


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to act as another user",
)
def test_only_busd_can_write_the_catalog_and_everyone_reads_the_exports(bus: Bus) -> None:
    # pytest's own temporary folders are private to root: this one is open, like /var/lib
    world = Path(tempfile.mkdtemp(prefix="busd-modes-"))
    try:
        world.chmod(0o755)
        data = world / "data"
        cfg = bus.write_config(data_dir=str(data))
        # busd with the unit's umask: what it creates is private unless it says otherwise
        done = subprocess.run(
            [
                "sh",
                "-c",
                'umask 027 && exec "$0" -m busd export --config "$1"',
                sys.executable,
                str(cfg),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=bus.root,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        data.chmod(0o755)  # the unit's ExecStartPre does this for the data dir
        catalog = data / "catalog.duckdb"
        assert mode(catalog) == 0o600
        assert mode(data / "exports") == 0o755
        assert mode(data / "exports" / "artifacts.parquet") == 0o644
        assert mode(data / "exports" / "_manifest.json") == 0o644
        write = as_nobody(f"import duckdb; duckdb.connect({str(catalog)!r})", world)
        assert write.returncode != 0
        assert "Permission denied" in write.stderr, write.stderr
        read_only = as_nobody(
            f"import duckdb; duckdb.connect({str(catalog)!r}, read_only=True)", world
        )
        assert read_only.returncode != 0 and "Permission denied" in read_only.stderr
        export = data / "exports" / "runs.parquet"
        read = as_nobody(
            'import duckdb; print(duckdb.connect().execute("SELECT count(*) '
            f"FROM read_parquet('{export}')\").fetchall()[0][0])",
            world,
        )
        assert read.returncode == 0, read.stderr
        assert read.stdout.strip() == "0"
    finally:
        shutil.rmtree(world, ignore_errors=True)
