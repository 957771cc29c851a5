"""The TypeScript package `artifact-bus` (clients/typescript), against a real nats-server and a
real `busd serve`.

The package is installed from its lock file (`npm ci`) and built with `tsc` once per session
(again only when a source is newer than dist/). Its own tests, written with node's test runner,
run here with the environment telling them where the bus is: ARTIFACT_BUS_TEST_NATS_URL,
ARTIFACT_BUS_TEST_ROOT (busd's artifact root), ARTIFACT_BUS_TEST_BUSD (busd's command line)
and ARTIFACT_BUS_TEST_CONFIG. Without node/npm the tests skip, except under CI where that is a
failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from support import BUSD, Bus, wait_for

from busd.errors import Outcome, Reason
from busd.producer import OutboxEntry

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "clients" / "typescript"
NPM_TIMEOUT_S = 600
NODE_TEST_TIMEOUT_S = 600
INPUTS = ("src", "test", "scripts", "tsconfig.json", "package.json", "package-lock.json")


# --- building the package ----------------------------------------------------------------------


def tools() -> tuple[str, str]:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        if os.environ.get("CI"):
            pytest.fail("node and npm are required in CI for the TypeScript client")
        pytest.skip("node/npm not installed (this test fails instead when CI is set)")
    return node, npm


def newest(paths: Iterator[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.is_file()), default=0.0)


def tree(*names: str) -> Iterator[Path]:
    for name in names:
        path = PKG / name
        if path.is_dir():
            yield from path.rglob("*")
        else:
            yield path


def run(
    cmd: list[str], *, cwd: Path = PKG, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        env={**clean_env(), **(env or {})},
        text=True,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def clean_env() -> dict[str, str]:
    """The environment without anything that would steer the package under test."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ARTIFACT_BUS_", "NATS_")) and k != "ARTIFACT_ROOT"
    }


@pytest.fixture(scope="session")
def node() -> str:
    """node, with clients/typescript installed from its lock file and built."""
    node, npm = tools()
    with open(PKG / ".build.lock", "w") as lock:  # other sessions in this tree wait their turn
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = PKG / "node_modules" / ".package-lock.json"
        locked = (PKG / "package-lock.json").stat().st_mtime
        if not marker.is_file() or marker.stat().st_mtime < locked:
            try:
                out = run([npm, "ci", "--no-audit", "--no-fund"], timeout=NPM_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"npm ci took longer than {NPM_TIMEOUT_S}s")
            assert out.returncode == 0, f"npm ci failed:\n{out.stdout}\n{out.stderr}"
        dist = PKG / "dist"
        if not dist.is_dir() or newest(dist.rglob("*")) < newest(tree(*INPUTS)):
            out = run([npm, "run", "build"], timeout=NPM_TIMEOUT_S)
            assert out.returncode == 0, f"npm run build failed:\n{out.stdout}\n{out.stderr}"
            (dist / ".built").touch()  # tsc leaves an unchanged output's time alone
    assert (dist / "src" / "index.js").is_file() and (dist / "src" / "index.d.ts").is_file()
    return node


def node_test(
    node: str,
    files: list[str],
    env: dict[str, str] | None = None,
) -> tuple[dict[str, int], str]:
    """Run `node --test` on compiled test files; return the summary counts and the output."""
    cmd = [node, "--test", "--test-reporter=tap", *(f"dist/test/{f}.test.js" for f in files)]
    try:
        out = run(cmd, env=env, timeout=NODE_TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        partial = exc.stdout if isinstance(exc.stdout, str) else ""
        pytest.fail(f"node --test {files} took longer than {NODE_TEST_TIMEOUT_S}s:\n{partial}")
    text = out.stdout + out.stderr
    summary = re.findall(r"^# (tests|pass|fail|skipped|cancelled|todo) (\d+)$", text, re.M)
    counts = {k: int(v) for k, v in summary}
    assert out.returncode == 0 and counts.get("fail") == 0, text[-6000:]
    return counts, text


# --- the package itself ------------------------------------------------------------------------


def test_package_is_a_real_npm_package() -> None:
    meta = json.loads((PKG / "package.json").read_text())
    assert meta["name"] == "artifact-bus" and meta["version"] == "0.1.0"
    assert meta["type"] == "module"
    assert meta["main"].startswith("./dist/") and meta["types"].endswith(".d.ts")
    assert meta["exports"]["."]["types"] == meta["types"]
    assert meta["scripts"]["build"].startswith("tsc")
    assert meta["scripts"]["test"].startswith("node --test")
    assert "gen-types" in meta["scripts"]
    deps = meta["dependencies"]
    for name in ("@nats-io/transport-node", "@nats-io/jetstream"):
        assert deps[name].lstrip("^~").startswith("3."), (name, deps[name])
    assert "hyparquet" in deps and "nats" not in deps
    assert {"typescript", "json-schema-to-typescript"} <= set(meta["devDependencies"])
    lock = json.loads((PKG / "package-lock.json").read_text())
    assert lock["lockfileVersion"] >= 3
    assert lock["packages"][""]["dependencies"] == deps
    assert json.loads((PKG / "tsconfig.json").read_text())["compilerOptions"]["strict"] is True
    ignored = (PKG / ".gitignore").read_text().split()
    assert "node_modules/" in ignored and "dist/" in ignored


def test_generated_types_match_the_schema(node: str) -> None:
    committed = (PKG / "src" / "event.generated.ts").read_text()
    out = run([node, "scripts/gen-types.mjs", "--stdout"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == committed, (
        "src/event.generated.ts drifted from the schema: "
        "run `npm run gen-types` in clients/typescript"
    )


def test_reasons_and_outcomes_match_python(node: str) -> None:
    script = (
        "import('./dist/src/index.js').then((m) => "
        "console.log(JSON.stringify({reasons: m.REASONS, outcomes: m.OUTCOMES})))"
    )
    out = run([node, "--input-type=module", "-e", script])
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["reasons"] == [r.value for r in Reason]
    assert got["outcomes"] == [o.value for o in Outcome]
    declared = (PKG / "dist" / "src" / "reasons.d.ts").read_text()
    assert "export type Reason" in declared


def test_node_unit_suite(node: str, tmp_path: Path) -> None:
    counts, text = node_test(node, ["unit"], env={"TMPDIR": str(tmp_path)})
    assert counts.get("pass", 0) >= 10 and counts.get("skipped") == 0, text[-3000:]
    # its scratch folders are gone with it (a few were left in the system's /tmp each run)
    assert list(tmp_path.glob("artifact-bus-test-*")) == [], text[-3000:]


def test_inbox_prefix_within_the_shipped_permissions(node: str, tmp_path: Path) -> None:
    """The package on nats-server running ops/nats/nats-server.conf, as user lab-simulation:
    stored with `inboxPrefix: "_INBOX_lab-simulation"`, never acked on the common `_INBOX`."""
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "ops"))  # the shipped file's test helpers
    import test_nats_conf as conf

    with conf.running_server(tmp_path) as server:

        async def declare(s: Any) -> None:
            await conf.declare_stream(await s.connect("busd", conf.BUSD_PASSWORD))

        conf.run(server, declare)
        env = {
            "ARTIFACT_BUS_TEST_PERMS_URL": server.url,
            "ARTIFACT_BUS_TEST_PERMS_PASSWORD": conf.LAB_PASSWORD,
        }
        counts, text = node_test(node, ["perms"], env=env)
    assert counts.get("pass") == 2 and counts.get("skipped") == 0, text[-3000:]


# --- against busd serve ------------------------------------------------------------------------


@contextlib.contextmanager
def serving(bus: Bus, config: Path) -> Iterator[subprocess.Popen[str]]:
    daemon = bus.spawn("serve", "--config", str(config))
    try:
        yield daemon
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(30)
            raise AssertionError("busd serve did not stop within 60s\n" + bus.log()) from None
        assert code == 0, bus.log()


def config_for(bus: Bus) -> Path:
    return bus.write_config(
        nats={"url": bus.url, "connect_timeout_s": 2},
        verify={"settle_s": 0.5, "file_wait_s": 0, "checksum": "if_given"},
    )


def live_env(bus: Bus, config: Path, **extra: str) -> dict[str, str]:
    return {
        "ARTIFACT_BUS_TEST_NATS_URL": bus.url,
        "ARTIFACT_BUS_TEST_ROOT": str(bus.artifacts),
        "ARTIFACT_BUS_TEST_BUSD": json.dumps(BUSD),
        "ARTIFACT_BUS_TEST_CONFIG": str(config),
        **extra,
    }


def query(bus: Bus, config: Path, sql: str) -> list[dict[str, Any]]:
    out = bus.cli("query", "--config", str(config), "--json", sql)
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def test_typescript_producer_against_busd_serve(bus: Bus, node: str) -> None:
    config = config_for(bus)
    with serving(bus, config):
        counts, text = node_test(node, ["bus", "crosscheck"], env=live_env(bus, config))
    assert counts.get("skipped") == 0 and counts.get("pass", 0) >= 10, text[-3000:]

    # the catalog itself, now that busd let go of it
    events = bus.sql("SELECT run_id, outcome, reason FROM catalog.events_f ORDER BY seq")
    assert sorted(r for r, o, _ in events if o == "rejected") == [
        "ts-atomic",
        "ts-outside",
        "ts-rows",
    ]
    assert {(r, reason) for r, o, reason in events if o == "rejected"} == {
        ("ts-atomic", "path_outside_roots"),
        ("ts-outside", "path_outside_roots"),
        ("ts-rows", "rows_mismatch"),
    }
    committed = [r for r, o, _ in events if o == "committed"]
    assert len(committed) == len(set(committed)), "a run committed twice"
    assert set(committed) == {
        "ts-run-1",
        "ts-slices",
        "ts-run-2",
        "ts-run-3",
        "ts-run-4",
        "xc-same",
        "xc-py",
        "xc-ts",
    }
    same = bus.sql(
        "SELECT name, rows, bytes, sha256, columns, schema_hash "
        "FROM catalog.artifacts_f WHERE run_id IN ('xc-py', 'xc-ts') "
        "ORDER BY name, run_id"
    )
    assert len(same) == 4 and same[0] == same[1] and same[2] == same[3]


def test_outbox_through_a_nats_outage(bus: Bus, node: str, tmp_path: Path) -> None:
    config = config_for(bus)
    work = tmp_path / "work"
    work.mkdir()
    env = live_env(bus, config, ARTIFACT_BUS_TEST_WORK=str(work))
    with serving(bus, config):
        bus.server.stop()  # NATS goes away; busd serve waits for it
        py_file = bus.parquet("py-outage/fills.parquet", rows=3)
        start = time.monotonic()
        kept = bus.cli(
            "submit",
            "--config",
            str(config),
            "--run-id",
            "py-outage",
            "--kind",
            "k",
            "--producer",
            "lab.py",
            "--outbox",
            str(work / "py-outbox"),
            f"fills={py_file}",
        )
        assert kept.returncode == 0, kept.stderr
        assert json.loads(kept.stdout)["state"] == "outbox"
        assert time.monotonic() - start < 30

        down, text = node_test(node, ["outage"], env={**env, "ARTIFACT_BUS_TEST_PHASE": "down"})
        assert down.get("pass") == 2, text[-3000:]
        # what the TypeScript package kept reads as busd's own outbox entries
        for folder in ("ts-outbox", "ts-for-busd"):
            files = sorted((work / folder).glob("*.json"))
            assert len(files) == 1, folder
            entry = msgspec.json.decode(files[0].read_bytes(), type=OutboxEntry)
            assert entry.subject == "artifacts.lab.ts"
            assert json.loads(entry.payload)["event_id"] == entry.headers["Nats-Msg-Id"]

        bus.server.start()  # NATS is back, on the same port
        up, text = node_test(node, ["outage"], env={**env, "ARTIFACT_BUS_TEST_PHASE": "up"})
        assert up.get("pass") == 2, text[-3000:]

        # busd's own flush sends what the TypeScript package kept, once
        flushed = bus.cli("outbox", "flush", "--config", str(config), str(work / "ts-for-busd"))
        assert flushed.returncode == 0, flushed.stderr
        assert json.loads(flushed.stdout)["sent"] == 1
        again = bus.cli("outbox", "flush", "--config", str(config), str(work / "ts-for-busd"))
        assert json.loads(again.stdout)["sent"] == 0
        wait_for(
            lambda: query(bus, config, "SELECT rows FROM artifacts WHERE run_id = 'ts-outage-2'"),
            timeout=90,
            what="ts-outage-2 in the artifacts export",
        )
        # nothing left to send anywhere
        assert not [
            p for d in ("ts-outbox", "py-outbox", "ts-for-busd") for p in (work / d).glob("*.json")
        ]
        rows = query(bus, config, "SELECT run_id, name, rows FROM artifacts ORDER BY run_id")
    ids = json.loads((work / "event-ids.json").read_text())
    assert rows == [
        {"run_id": "py-outage", "name": "fills", "rows": 3},
        {"run_id": "ts-outage", "name": "fills", "rows": 5},
        {"run_id": "ts-outage-2", "name": "fills", "rows": 3},
    ]
    events = bus.sql("SELECT run_id, outcome, event_id FROM catalog.events_f ORDER BY seq")
    assert sorted((r, o) for r, o, _ in events) == [
        ("py-outage", "committed"),
        ("ts-outage", "committed"),
        ("ts-outage-2", "committed"),
    ]
    assert {r: e for r, _, e in events if r.startswith("ts-")} == ids  # ts-required never sent
