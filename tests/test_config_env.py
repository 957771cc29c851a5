"""Configuration from the environment (README "Configuration"): list keys from one value or
many, secrets kept verbatim, secrets from files (``BUSD_<SECTION>_<KEY>_FILE`` and systemd's
``$CREDENTIALS_DIRECTORY``), and a busy metrics port named as such."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Bus

from busd import config
from busd.embedded import EmbeddedServer
from busd.errors import ConfigError

PASSWORD = "a,b"  # a comma: a plain string, never a list


@pytest.fixture
def auth_nats(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(
        "127.0.0.1",
        0,
        tmp_path / "auth-nats",
        extra_config=(f"authorization {{ user: busd, password: {json.dumps(PASSWORD)} }}\n"),
    )
    server.start()
    yield server
    server.stop()


def status(bus: Bus, url: str, env: dict[str, str]) -> tuple[int, str]:
    cfg = bus.write_config(nats={"url": url, "connect_timeout_s": 2})
    out = bus.cli("status", "--json", "--config", str(cfg), env=env, timeout=60)
    return out.returncode, out.stdout + out.stderr


def test_a_single_artifact_root_from_the_environment(bus: Bus, tmp_path: Path) -> None:
    root = tmp_path / "elsewhere"
    root.mkdir()
    event = bus.event("r", artifacts=[{"name": "fills", "path": "fills.parquet"}])
    (root / "fills.parquet").write_bytes(bus.parquet("x/fills.parquet").read_bytes())
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))
    cfg = bus.write_config()
    out = bus.cli(
        "validate", "--config", str(cfg), str(path), env={"BUSD_ARTIFACT_ROOTS": str(root)}
    )
    assert out.returncode == 0, out.stderr
    assert f"{path}: ok" in out.stdout


@pytest.mark.parametrize(
    ("name", "raw", "key", "expected"),
    [
        ("BUSD_ARTIFACT_ROOTS", "/data/a", "artifact_roots", ("/data/a",)),
        ("BUSD_ARTIFACT_ROOTS", "/data/a,/data/b", "artifact_roots", ("/data/a", "/data/b")),
        ("BUSD_ARTIFACT_ROOTS", " /data/a , /data/b ", "artifact_roots", ("/data/a", "/data/b")),
        (
            "BUSD_ARTIFACT_ROOTS",
            '["/data/a,1", "/data/b"]',
            "artifact_roots",
            ("/data/a,1", "/data/b"),
        ),
        ("BUSD_NATS_SUBJECTS", "artifacts.>", "nats.subjects", ("artifacts.>",)),
        ("BUSD_NATS_SUBJECTS", "a.>,b.>", "nats.subjects", ("a.>", "b.>")),
        ("BUSD_NATS_PASSWORD", "a,b", "nats.password", "a,b"),
        ("BUSD_NATS_PASSWORD", '["x"]', "nats.password", '["x"]'),
        ("BUSD_NATS_PASSWORD", " padded ", "nats.password", " padded "),
        ("BUSD_NATS_URL", "nats://a:4222,nats://b:4222", "nats.url", "nats://a:4222,nats://b:4222"),
        ("BUSD_CONSUMER_BATCH_MAX", "7", "consumer.batch_max", 7),
        ("BUSD_HA_ENABLED", "true", "ha.enabled", True),
    ],
)
def test_values_are_parsed_by_the_type_of_their_key(
    name: str, raw: str, key: str, expected: object
) -> None:
    env = {name: raw}
    if "PASSWORD" in name:
        env["BUSD_NATS_USER"] = "u"
    s = config.load(env=env)
    value: object = s
    for part in key.split("."):
        value = getattr(value, part)
    assert value == expected


def test_a_malformed_json_list_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="BUSD_NATS_SUBJECTS"):
        config.load(env={"BUSD_NATS_SUBJECTS": '["a.>"'})


def test_password_with_a_comma_reaches_the_server(bus: Bus, auth_nats: EmbeddedServer) -> None:
    code, out = status(
        bus, auth_nats.url, {"BUSD_NATS_USER": "busd", "BUSD_NATS_PASSWORD": PASSWORD}
    )
    assert code == 0, out
    assert json.loads(out)["nats"]["connected"] is True
    code, out = status(bus, auth_nats.url, {"BUSD_NATS_USER": "busd", "BUSD_NATS_PASSWORD": "a"})
    assert code == 1 and "refused" in out, out


def test_secrets_from_files_and_systemd_credentials(
    bus: Bus, auth_nats: EmbeddedServer, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    code, out = status(
        bus,
        auth_nats.url,
        {
            "BUSD_NATS_USER_FILE": str(_file(tmp_path, "busd")),
            "BUSD_NATS_PASSWORD_FILE": str(secret),
        },
    )
    assert code == 0, out

    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "nats.user").write_text("busd")
    (creds / "nats.password").write_text(PASSWORD + "\n")
    code, out = status(bus, auth_nats.url, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert code == 0, out

    # the environment overrides a credential; a credential overrides busd.toml
    (creds / "nats.password").write_text("wrong")
    code, out = status(
        bus,
        auth_nats.url,
        {"CREDENTIALS_DIRECTORY": str(creds), "BUSD_NATS_PASSWORD_FILE": str(secret)},
    )
    assert code == 0, out
    code, out = status(bus, auth_nats.url, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert code == 1, out


def _file(folder: Path, text: str) -> Path:
    path = folder / f"value-{len(list(folder.iterdir()))}"
    path.write_text(text)
    return path


def test_credentials_override_the_toml(tmp_path: Path) -> None:
    toml = tmp_path / "busd.toml"
    toml.write_text('[nats]\nuser = "u"\npassword = "from-toml"\n')
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "nats.password").write_text("from-credential\n")
    (creds / "unrelated.key").write_text("not busd's")
    s = config.load(str(toml), env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert s.nats.password == "from-credential"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"BUSD_NATS_PASSWORD_FILE": "MISSING"}, "BUSD_NATS_PASSWORD_FILE"),
        (
            {"BUSD_NATS_PASSWORD_FILE": "SECRET", "BUSD_NATS_PASSWORD": "x"},
            "BUSD_NATS_PASSWORD_FILE",
        ),
        ({"BUSD_NATS_NOPE_FILE": "SECRET"}, "BUSD_NATS_NOPE_FILE"),
    ],
)
def test_bad_secret_files_exit_2_naming_the_variable(
    bus: Bus, tmp_path: Path, env: dict[str, str], needle: str
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x\n")
    env = {
        k: v.replace("MISSING", str(tmp_path / "nowhere")).replace("SECRET", str(secret))
        for k, v in env.items()
    }
    out = bus.cli(
        "status",
        "--config",
        str(bus.write_config()),
        env={"BUSD_NATS_USER": "u", **env},
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr and "x\n" not in out.stderr


def test_a_busy_metrics_port_exits_2_naming_the_key(bus: Bus) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        cfg = bus.write_config(metrics={"listen": f"127.0.0.1:{port}"})
        out = bus.cli("serve", "--config", str(cfg), timeout=60)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "metrics.listen" in lines[0], out.stderr
    assert "unexpected" not in lines[0]


def test_connect_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError, match=r"nats\.connect_timeout_s"):
        config.load(env={"BUSD_NATS_CONNECT_TIMEOUT_S": "0"})
