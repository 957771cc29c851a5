"""The producer examples in examples/, run for real against a real nats-server and daemon.

Node: `npm install` of the real `nats` client into a temporary copy of examples/node (skipped
only when node/npm are missing outside CI). Python: the script as a subprocess against a
spawned `busd serve`. Shell: `bash -n`, shellcheck when installed, the exact `nats pub` command
line it runs (through a recording stand-in, its event published as-is and committed), and the
real `nats` CLI when one is on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Bus, sha256_file

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHELL = EXAMPLES / "shell" / "publish.sh"
NPM_INSTALL_TIMEOUT_S = 300


def artifacts(bus: Bus) -> list[tuple[object, ...]]:
    return bus.sql("SELECT run_id, name, rows FROM catalog.artifacts_f ORDER BY run_id, name")


def run(
    cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        text=True,
        capture_output=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# --- Node --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(node, a copy of examples/node with its dependencies installed)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        if os.environ.get("CI"):
            pytest.fail("node and npm are required in CI for the Node example")
        pytest.skip("node/npm not installed (this test fails instead when CI is set)")
    work = tmp_path_factory.mktemp("node-example") / "node"
    shutil.copytree(EXAMPLES / "node", work, ignore=shutil.ignore_patterns("node_modules"))
    try:
        out = run(
            [npm, "install", "--no-audit", "--no-fund", "--no-package-lock"],
            cwd=work,
            timeout=NPM_INSTALL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"npm install took longer than {NPM_INSTALL_TIMEOUT_S}s")
    assert out.returncode == 0, f"npm install failed:\n{out.stdout}\n{out.stderr}"
    assert (work / "node_modules" / "nats" / "package.json").is_file()
    yield node, work


def test_node_producer_publishes_and_busd_commits(bus: Bus, node_example: tuple[str, Path]) -> None:
    node, work = node_example
    fills = bus.parquet("node-run-1/fills.parquet", rows=4)
    positions = bus.parquet("node-run-1/positions.parquet", rows=2)
    cmd = [
        node,
        "producer.mjs",
        "--kind",
        "simulation",
        "--producer",
        "lab.node",
        "--rows",
        "fills=4",
        "fills=node-run-1/fills.parquet",  # relative: read from ARTIFACT_ROOT, sent as is
        f"positions={positions}",
    ]  # absolute
    env = {"NATS_URL": bus.url, "ARTIFACT_ROOT": str(bus.artifacts), "RUN_ID": "node-run-1"}
    out = run(cmd, cwd=work, env=env)
    assert out.returncode == 0, out.stderr
    ack = json.loads(out.stdout)
    assert ack["seq"] == 1 and ack["stream"] == "ARTIFACTS" and ack["duplicate"] is False
    assert ack["event_id"].startswith("node-run-1:")

    # the same files again: same event id, so JetStream drops it (Nats-Msg-Id was set)
    again = run(cmd, cwd=work, env=env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["duplicate"] is True

    bus.drain()
    assert artifacts(bus) == [("node-run-1", "fills", 4), ("node-run-1", "positions", 2)]
    assert bus.sql("SELECT producer, outcome, event_id FROM catalog.events_f") == [
        ("lab.node", "committed", ack["event_id"])
    ]
    assert bus.sql("SELECT sha256, bytes FROM catalog.artifacts_f WHERE name = 'fills'") == [
        (sha256_file(fills), fills.stat().st_size)
    ]


def test_node_producer_usage_errors_exit_2(bus: Bus, node_example: tuple[str, Path]) -> None:
    node, work = node_example
    path = bus.parquet("r/fills.parquet")
    env = {"NATS_URL": bus.url}
    for args in (
        ["--run-id", "has space", "--kind", "k", f"fills={path}"],
        ["--run-id", "r", "--kind", "k"],
        ["--run-id", "r", "--kind", "k", "--producer", "a..b", f"fills={path}"],
        ["--run-id", "r", "--kind", "k", f"fills={bus.root / 'missing.parquet'}"],
        ["--run-id", "r", "--kind", "k", "--no-such-flag", f"fills={path}"],
    ):
        out = run([node, "producer.mjs", *args], cwd=work, env=env)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.startswith("producer: "), out.stderr
    unreachable = run(
        [
            node,
            "producer.mjs",
            "--run-id",
            "r",
            "--kind",
            "k",
            "--server",
            "nats://127.0.0.1:1",
            f"fills={path}",
        ],
        cwd=work,
    )
    assert unreachable.returncode == 1 and "publish failed" in unreachable.stderr


# --- Python ------------------------------------------------------------------------------------


def test_python_producer_waits_for_the_commit(bus: Bus) -> None:
    fills = bus.parquet("py-run-1/fills.parquet", rows=7)
    outside = bus.root / "outside.parquet"
    outside.write_bytes(fills.read_bytes())
    script = str(EXAMPLES / "python" / "producer.py")
    daemon = bus.spawn("serve", "--config", str(bus.write_config()))
    try:
        out = run(
            [
                sys.executable,
                script,
                "--server",
                bus.url,
                "--run-id",
                "py-run-1",
                "--kind",
                "backtest",
                "--producer",
                "lab.python",
                "--param",
                "seed=7",
                "--wait",
                "--timeout",
                "60",
                f"fills={fills}",
            ],
            cwd=bus.root,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr + bus.log()
        result = json.loads(out.stdout)
        assert result["state"] == "done" and result["outcome"] == "committed"
        assert result["event_id"].startswith("py-run-1:")

        # rejected by busd (outside the artifact roots): exit 3 and the reason, one line
        bad = run(
            [
                sys.executable,
                script,
                "--server",
                bus.url,
                "--run-id",
                "py-run-2",
                "--kind",
                "backtest",
                "--producer",
                "lab.python",
                "--wait",
                f"fills={outside}",
            ],
            cwd=bus.root,
            timeout=120,
        )
        assert bad.returncode == 3, bad.stderr
        assert "path_outside_roots" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, bus.log()
    assert artifacts(bus) == [("py-run-1", "fills", 7)]
    assert bus.sql("SELECT producer, params FROM catalog.runs_d") == [("lab.python", '{"seed":7}')]


# --- Shell -------------------------------------------------------------------------------------


def test_shell_example_parses() -> None:
    out = run(["bash", "-n", str(SHELL)], cwd=EXAMPLES)
    assert out.returncode == 0, out.stderr
    assert os.access(SHELL, os.X_OK), "publish.sh should be executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shell_example_is_shellcheck_clean() -> None:
    out = run(["shellcheck", str(SHELL)], cwd=EXAMPLES)
    assert out.returncode == 0, out.stdout


def shell_args(bus: Bus) -> list[str]:
    bus.parquet("sh-run-1/fills.parquet", rows=5)
    positions = bus.parquet("sh-run-1/positions.parquet", rows=2)
    return [
        "--run-id",
        "sh-run-1",
        "--kind",
        "simulation",
        "--producer",
        "lab.shell",
        "--rows",
        "fills=5",
        "fills=sh-run-1/fills.parquet",
        f"positions={positions}",
    ]


def test_shell_example_runs_the_documented_nats_pub_and_busd_commits_its_event(
    bus: Bus, tmp_path: Path
) -> None:
    # A recording stand-in for `nats`: checks the exact command line the script runs; the
    # body it was handed is then published as-is, with the header it named, and committed.
    stand_in = tmp_path / "bin" / "nats"
    stand_in.parent.mkdir()
    stand_in.write_text('#!/bin/sh\nprintf \'%s\\0\' "$@" > "$NATS_ARGV_FILE"\n')
    stand_in.chmod(0o755)
    argv_file = tmp_path / "argv"
    env = {
        "PATH": f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}",
        "NATS_URL": bus.url,
        "ARTIFACT_ROOT": str(bus.artifacts),
        "NATS_ARGV_FILE": str(argv_file),
    }
    out = run(["bash", str(SHELL), *shell_args(bus)], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    event_id = out.stdout.strip()
    argv = argv_file.read_text().split("\0")[:-1]
    assert argv[:-1] == [
        "pub",
        "-J",
        "-H",
        f"Nats-Msg-Id:{event_id}",
        "--server",
        bus.url,
        "artifacts.lab.shell",
    ]
    body = json.loads(argv[-1])
    assert body["event_id"] == event_id and body["producer"] == "lab.shell"
    assert body["artifacts"][0]["path"] == "sh-run-1/fills.parquet"

    bus.publish(
        [argv[-1].encode()], subject="artifacts.lab.shell", headers=[{"Nats-Msg-Id": event_id}]
    )
    bus.drain()
    assert artifacts(bus) == [("sh-run-1", "fills", 5), ("sh-run-1", "positions", 2)]
    assert bus.sql("SELECT outcome, event_id FROM catalog.events_f") == [("committed", event_id)]


def test_shell_example_print_passes_busd_validate(bus: Bus, tmp_path: Path) -> None:
    args = shell_args(bus)
    out = run(
        ["bash", str(SHELL), "--print", *args],
        cwd=tmp_path,
        env={"ARTIFACT_ROOT": str(bus.artifacts)},
    )
    assert out.returncode == 0, out.stderr
    event = tmp_path / "event.json"
    event.write_text(out.stdout)
    cfg = str(bus.write_config())
    ok = bus.cli("validate", "--config", cfg, "--subject", "artifacts.lab.shell", str(event))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # a file changed after the event was built: busd would say so
    (bus.artifacts / "sh-run-1" / "fills.parquet").write_bytes(
        (bus.artifacts / "sh-run-1" / "positions.parquet").read_bytes()
    )
    bad = bus.cli("validate", "--config", cfg, str(event))
    assert bad.returncode == 3 and "mismatch" in bad.stdout, bad.stdout


def test_shell_example_usage_errors_exit_2(bus: Bus, tmp_path: Path) -> None:
    path = bus.parquet("r/fills.parquet")
    for args in (
        ["--run-id", "r"],
        ["--run-id", "r 1", "--kind", "k", f"fills={path}"],
        ["--run-id", "r", "--kind", "k", f"fills={path}", f"fills={path}"],
        ["--run-id", "r", "--kind", "k", "--rows", "other=1", f"fills={path}"],
        ["--run-id", "r", "--kind", "k", f"fills={tmp_path / 'missing.parquet'}"],
        ["--run-id", "r", "--kind", "k", "--producer", ".bad", f"fills={path}"],
    ):
        out = run(["bash", str(SHELL), "--print", *args], cwd=tmp_path)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stdout == ""


@pytest.mark.skipif(
    shutil.which("nats") is None,
    reason="the nats CLI (natscli) is not on PATH: it is not packaged in Debian, PyPI or npm",
)
def test_shell_example_with_the_real_nats_cli(bus: Bus, tmp_path: Path) -> None:
    env = {"NATS_URL": bus.url, "ARTIFACT_ROOT": str(bus.artifacts)}
    args = shell_args(bus)
    out = run(["bash", str(SHELL), *args], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    event_id = out.stdout.strip().splitlines()[-1]
    again = run(["bash", str(SHELL), *args], cwd=tmp_path, env=env)  # deduplicated by id
    assert again.returncode == 0, again.stderr
    bus.drain()
    assert artifacts(bus) == [("sh-run-1", "fills", 5), ("sh-run-1", "positions", 2)]
    assert bus.sql("SELECT outcome, event_id FROM catalog.events_f") == [("committed", event_id)]
