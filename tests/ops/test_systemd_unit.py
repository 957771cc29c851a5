"""ops/systemd/busd.service: the directives operators rely on, checked by systemd itself.

`systemd-analyze verify` and `systemd-analyze security --offline` read unit files without a
running systemd, so they work in a container. verify also insists that ExecStart's binary
exists; it checks a copy whose ExecStart points at an executable that does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from opsfiles import CONFIG_EXAMPLE, UNIT

from busd import config
from busd.errors import ExitCode

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections → key → every value in order (systemd keys may repeat, unlike INI)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"directive outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line}"
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def one(unit: Unit, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing"
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times"
    return values[0]


REQUIRED = {
    "Type": "notify",
    "NotifyAccess": "main",
    "WatchdogSec": "30",
    "Restart": "on-failure",
    "RestartSec": "2",
    "RestartPreventExitStatus": "2",
    "TimeoutStopSec": "90",
    "User": "busd",
    "Group": "busd",
    "StateDirectory": "busd",
    "WorkingDirectory": "/var/lib/busd",
    "ExecStart": "/opt/busd/venv/bin/busd serve --config /etc/busd/busd.toml",
    "ProtectSystem": "strict",
    "ReadWritePaths": "/var/lib/busd",
    "NoNewPrivileges": "yes",
    "PrivateTmp": "yes",
    "ProtectHome": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "no",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
}


@pytest.mark.parametrize(("key", "value"), REQUIRED.items(), ids=list(REQUIRED))
def test_service_directive(unit: Unit, key: str, value: str) -> None:
    assert one(unit, "Service", key) == value


def test_environment_sets_data_dir(unit: Unit) -> None:
    assert "BUSD_DATA_DIR=/var/lib/busd/data" in unit["Service"]["Environment"]


def test_data_dir_is_inside_the_writable_paths(unit: Unit) -> None:
    writable = one(unit, "Service", "ReadWritePaths").split()
    env = dict(v.split("=", 1) for v in unit["Service"]["Environment"])
    data_dir = Path(env["BUSD_DATA_DIR"])
    assert any(data_dir.is_relative_to(w) for w in writable)


def test_stop_timeout_covers_the_shutdown_grace(unit: Unit) -> None:
    grace_s = config.ConsumerSettings().shutdown_grace_s
    assert int(one(unit, "Service", "TimeoutStopSec")) >= 2 * grace_s


def test_restart_prevented_exactly_for_bad_configuration(unit: Unit) -> None:
    assert one(unit, "Service", "RestartPreventExitStatus") == str(int(ExitCode.USAGE))


def test_installs_into_multi_user(unit: Unit) -> None:
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_example_config_loads_with_the_units_environment(unit: Unit) -> None:
    env = dict(v.split("=", 1) for v in unit["Service"]["Environment"])
    settings = config.load(str(CONFIG_EXAMPLE), env=env)
    assert settings.data_dir == env["BUSD_DATA_DIR"]
    assert settings.metrics.listen == "127.0.0.1:9464"
    # The example's own value, without the unit's override, is the same directory.
    assert config.load(str(CONFIG_EXAMPLE), env={}).data_dir == env["BUSD_DATA_DIR"]


def test_exec_start_matches_the_cli(unit: Unit) -> None:
    args = one(unit, "Service", "ExecStart").split()[1:]
    assert args[:2] == ["serve", "--config"]
    done = subprocess.run(
        [sys.executable, "-m", "busd", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--config" in done.stdout


CREDENTIAL_EXAMPLE = re.compile(r"(?m)^#(LoadCredential=([^:\s]+):(\S+))$")


def test_credential_examples_name_config_keys() -> None:
    examples = CREDENTIAL_EXAMPLE.findall(UNIT.read_text(encoding="utf-8"))
    names = [name for _, name, _ in examples]
    assert "nats.password" in names
    for _, name, source in examples:
        found = config._key_type(name.replace(".", "_", 1))
        assert found is not None and found[0] == name, f"{name} is not a busd key"
        assert source.startswith("/etc/busd/"), source


def test_credentials_from_the_example_reach_the_settings(tmp_path: Path) -> None:
    # What systemd does with the example lines: a copy of each file in $CREDENTIALS_DIRECTORY
    # under the credential's name.
    folder = tmp_path / "credentials"
    folder.mkdir()
    for _, name, _ in CREDENTIAL_EXAMPLE.findall(UNIT.read_text(encoding="utf-8")):
        (folder / name).write_text(f"secret-of-{name}\n", encoding="utf-8")
    settings = config.load(env={"CREDENTIALS_DIRECTORY": str(folder)})
    assert settings.nats.user == "secret-of-nats.user"
    assert settings.nats.password == "secret-of-nats.password"  # one trailing newline dropped


def verifiable_copy(tmp_path: Path) -> Path:
    """The unit as shipped, with ExecStart pointing at a binary that exists and the commented
    examples (LoadCredential=) switched on, so systemd checks them too."""
    true = shutil.which("true")
    assert true
    text = UNIT.read_text(encoding="utf-8")
    text, n = re.subn(r"(?m)^ExecStart=\S+", f"ExecStart={true}", text)
    assert n == 1
    text, n = CREDENTIAL_EXAMPLE.subn(r"\1", text)
    assert n >= 1
    copy = tmp_path / "busd.service"
    copy.write_text(text, encoding="utf-8")
    return copy


def test_systemd_analyze_verify(systemd_analyze: str, tmp_path: Path) -> None:
    copy = verifiable_copy(tmp_path)
    done = subprocess.run(
        [systemd_analyze, "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # An unknown key or a bad value is only a warning (exit 0): any output is a failure.
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


def test_systemd_analyze_security_exposure(systemd_analyze: str, tmp_path: Path) -> None:
    copy = verifiable_copy(tmp_path)
    done = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for busd\.service: ([0-9.]+)", done.stdout)
    assert found, done.stdout + done.stderr
    # 0 is a perfect sandbox, 10 none; a Python daemon that talks TCP lands near 1.5.
    assert float(found.group(1)) <= 2.0, done.stdout
