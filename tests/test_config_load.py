"""Loading the settings, in process (``config.load`` with an explicit environment): where the
file comes from, the precedence busd.toml < environment < flags, unknown or misspelt keys and
wrong types as errors that name the key, and the defaults when there is no file.

The CLI's exit code 2 on a bad config is in ``test_cli.py``; how a value of the environment is
read (list keys, secrets, ``_FILE`` variables, systemd credentials) in ``test_config_env.py``;
the nats CLI's own variables and contexts in the NATS settings tests.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from busd import config
from busd.errors import ConfigError


@pytest.fixture(autouse=True)
def _empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test in its own directory: no ``./busd.toml`` unless the test writes one."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def toml_file(tmp_path: Path, text: str, name: str = "busd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def value_of(settings: config.Settings, key: str) -> Any:
    value: Any = settings
    for part in key.split("."):
        value = getattr(value, part)
    return value


# ---- which file --------------------------------------------------------------------------------
def test_no_file_runs_on_the_defaults() -> None:
    assert config.find_config(None, {}) is None
    settings = config.load(env={})
    assert settings == config.Settings()
    assert settings.data_dir == "data" and settings.artifact_roots == ("data",)
    assert settings.consumer.batch_max == 500 and settings.consumer.ack_wait_s == 60.0
    assert settings.verify.checksum == "if_given"
    assert settings.metrics.listen == "127.0.0.1:9464"  # loopback, never all interfaces
    assert (settings.nats.stream, settings.nats.consumer) == ("ARTIFACTS", "busd")
    assert settings.exports == () and settings.ha.enabled is False


def test_find_config_order(tmp_path: Path) -> None:
    flag = toml_file(tmp_path, "", "flag.toml")
    from_env = toml_file(tmp_path, "", "env.toml")
    Path("busd.toml").write_text("")
    assert config.find_config(str(flag), {"BUSD_CONFIG": str(from_env)}) == flag
    assert config.find_config(None, {"BUSD_CONFIG": str(from_env)}) == from_env
    assert config.find_config(None, {"BUSD_CONFIG": ""}) == Path("busd.toml")
    assert config.find_config(None, {}) == Path("busd.toml")


def test_a_named_file_that_is_not_there_is_an_error(tmp_path: Path) -> None:
    Path("busd.toml").write_text("")  # never a fallback for a file that was asked for
    with pytest.raises(ConfigError, match=r"^--config nowhere\.toml: no such file$"):
        config.find_config("nowhere.toml", {})
    with pytest.raises(ConfigError, match=r"^BUSD_CONFIG=nowhere\.toml: no such file$"):
        config.find_config(None, {"BUSD_CONFIG": "nowhere.toml"})
    with pytest.raises(ConfigError, match="no such file"):
        config.load(str(tmp_path / "nowhere.toml"), env={})
    with pytest.raises(ConfigError, match="no such file"):
        config.load(env={"BUSD_CONFIG": str(tmp_path)})  # a directory is not a config file


def test_the_local_busd_toml_and_busd_config_are_read(tmp_path: Path) -> None:
    Path("busd.toml").write_text('data_dir = "local"\n')
    assert config.load(env={}).data_dir == "local"
    other = toml_file(tmp_path, 'data_dir = "from-env"\n')
    assert config.load(env={"BUSD_CONFIG": str(other)}).data_dir == "from-env"


def test_load_reads_the_process_environment_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):  # this process's own settings, if any, stay out of it
        if name.startswith(("BUSD_", "NATS_")) or name in (
            "CREDENTIALS_DIRECTORY",
            "XDG_CONFIG_HOME",
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))  # no nats context selected
    monkeypatch.setenv("BUSD_CONSUMER_BATCH_MAX", "9")
    assert config.load().consumer.batch_max == 9
    assert config.load(env={}).consumer.batch_max == 500  # an explicit env is the only one


# ---- precedence: busd.toml < environment < flags -----------------------------------------------
LAYERED = [  # key, in busd.toml, its variable, from the environment, from a flag, expected
    ("data_dir", '"toml"', "BUSD_DATA_DIR", "env", "flag", ["toml", "env", "flag"]),
    ("consumer.batch_max", "7", "BUSD_CONSUMER_BATCH_MAX", "8", 9, [7, 8, 9]),
    ("consumer.ack_wait_s", "5.5", "BUSD_CONSUMER_ACK_WAIT_S", "6", 7.5, [5.5, 6.0, 7.5]),
    (
        "verify.checksum",
        '"never"',
        "BUSD_VERIFY_CHECKSUM",
        "always",
        "if_given",
        ["never", "always", "if_given"],
    ),
    ("nats.stream", '"T"', "BUSD_NATS_STREAM", "E", "F", ["T", "E", "F"]),
    ("ha.enabled", "true", "BUSD_HA_ENABLED", "false", True, [True, False, True]),
    (
        "artifact_roots",
        '["/t1", "/t2"]',
        "BUSD_ARTIFACT_ROOTS",
        "/e",
        ["/f1", "/f2"],
        [("/t1", "/t2"), ("/e",), ("/f1", "/f2")],
    ),
]


def nested(key: str, value: Any) -> dict[str, Any]:
    section, _, name = key.rpartition(".")
    return {section: {name: value}} if section else {name: value}


def in_toml(key: str, text: str) -> str:
    section, _, name = key.rpartition(".")
    return f"[{section}]\n{name} = {text}\n" if section else f"{name} = {text}\n"


@pytest.mark.parametrize(
    ("key", "toml", "var", "env", "flag", "expected"), LAYERED, ids=[row[0] for row in LAYERED]
)
def test_toml_then_environment_then_flags(
    tmp_path: Path, key: str, toml: str, var: str, env: str, flag: Any, expected: list[Any]
) -> None:
    path = str(toml_file(tmp_path, in_toml(key, toml)))
    from_toml, from_env, from_flag = expected
    assert value_of(config.load(path, env={}), key) == from_toml
    assert value_of(config.load(path, env={var: env}), key) == from_env
    assert (
        value_of(config.load(path, env={var: env}, overrides=nested(key, flag)), key) == from_flag
    )
    assert value_of(config.load(path, env={}, overrides=nested(key, flag)), key) == from_flag
    assert value_of(config.load(env={var: env}, overrides=nested(key, flag)), key) == from_flag


def test_layers_merge_key_by_key_within_a_section(tmp_path: Path) -> None:
    path = str(
        toml_file(
            tmp_path,
            "[consumer]\nbatch_max = 7\nack_wait_s = 5\nstall_s = 50\n[verify]\nfile_wait_s = 3\n",
        )
    )
    settings = config.load(
        path, env={"BUSD_CONSUMER_BATCH_MAX": "8"}, overrides={"consumer": {"stall_s": 60}}
    )
    assert (
        settings.consumer.batch_max,
        settings.consumer.ack_wait_s,
        settings.consumer.stall_s,
    ) == (8, 5.0, 60.0)
    assert settings.verify.file_wait_s == 3.0  # a section no other layer names stays whole
    assert settings.consumer.max_deliver == 10  # and a key no layer names is the default


def test_a_list_from_a_later_layer_replaces_the_earlier_list(tmp_path: Path) -> None:
    path = str(
        toml_file(tmp_path, 'artifact_roots = ["/a", "/b"]\n[nats]\nsubjects = ["x.>", "y.>"]\n')
    )
    settings = config.load(
        path, env={"BUSD_NATS_SUBJECTS": '["z.>"]'}, overrides={"artifact_roots": ["/c"]}
    )
    assert settings.artifact_roots == ("/c",)
    assert settings.nats.subjects == ("z.>",)


def test_variables_that_are_not_keys_are_not_read() -> None:
    env = {
        "BUSD_CONFIG": "",
        "BUSD_TEST_ANYTHING": "1",
        "NOT_BUSD_DATA_DIR": "x",
        "HOME_BUSD_DATA_DIR": "y",
    }
    assert config.load(env=env) == config.Settings()


def test_the_settings_are_frozen() -> None:
    settings = config.load(env={})
    with pytest.raises(AttributeError):
        settings.data_dir = "elsewhere"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        settings.consumer.batch_max = 1  # type: ignore[misc]


# ---- unknown and misspelt keys: errors naming the key ------------------------------------------
@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("bogus = 1\n", "unknown key bogus"),
        ("data_dirs = 'x'\n", "unknown key data_dirs"),
        ("[consumers]\nbatch_max = 5\n", "unknown key consumers"),
        ("[consumer]\nbatchmax = 5\n", "unknown key consumer.batchmax"),
        ("[consumer]\nbatch_max = 5\nack_wait = 5\n", "unknown key consumer.ack_wait"),
        ("[verify]\nchecksums = 'always'\n", "unknown key verify.checksums"),
        ("[nats]\nurls = 'nats://x:4222'\n", "unknown key nats.urls"),
        ("[ha]\nenable = true\n", "unknown key ha.enable"),
        (
            "[[exports]]\nname = 'x'\nsql = 'SELECT 1'\ndepends = ['runs']\n",
            "unknown key exports[0].depends",
        ),
    ],
    ids=[
        "top",
        "top-misspelt",
        "section",
        "in-section",
        "in-section-among-good",
        "verify",
        "nats",
        "ha",
        "exports",
    ],
)
def test_unknown_keys_in_the_file(tmp_path: Path, toml: str, message: str) -> None:
    path = toml_file(tmp_path, toml)
    with pytest.raises(ConfigError) as caught:
        config.load(str(path), env={})
    assert str(caught.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bogus": 1}, "unknown key bogus"),
        ({"consumer": {"nope": 1}}, "unknown key consumer.nope"),
        ({"metric": {"listen": ""}}, "unknown key metric"),
    ],
)
def test_unknown_keys_in_the_flags(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(env={}, overrides=overrides)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("BUSD_BOGUS", "bogus"),
        ("BUSD_DATADIR", "datadir"),
        ("BUSD_CONSUMER_NOPE", "consumer.nope"),
        ("BUSD_CONSUMER_BATCHMAX", "consumer.batchmax"),
        ("BUSD_VERIFY_CHECKSUMS_FILE", "verify.checksums"),
    ],
)
def test_unknown_keys_in_the_environment(name: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(env={name: "1"})
    assert str(caught.value) == f"environment variable {name}: unknown key {key}"


# ---- wrong types: errors naming the key --------------------------------------------------------
@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("data_dir = 3\n", "data_dir"),
        ("artifact_roots = '/data'\n", "artifact_roots"),
        ("log_format = 'xml'\n", "log_format"),
        ("export_partition_seqs = 'many'\n", "export_partition_seqs"),
        ("consumer = 5\n", "consumer"),
        ("[consumer]\nbatch_max = 'many'\n", "consumer.batch_max"),
        ("[consumer]\nbatch_max = 2.5\n", "consumer.batch_max"),
        ("[consumer]\nbatch_max = true\n", "consumer.batch_max"),
        ("[ha]\nenabled = 'maybe'\n", "ha.enabled"),
        ("[nats]\nsubjects = ['a.>', 2]\n", "nats.subjects[1]"),
        ("[[exports]]\nname = 'x'\n", "exports[0]"),
    ],
    ids=[
        "str",
        "list",
        "literal",
        "int",
        "section",
        "int-str",
        "int-float",
        "int-bool",
        "bool",
        "list-item",
        "missing-field",
    ],
)
def test_wrong_types_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = toml_file(tmp_path, toml)
    with pytest.raises(ConfigError) as caught:
        config.load(str(path), env={})
    assert str(caught.value).startswith(f"{path}: bad value for {key}: ")


def test_a_wrong_type_from_the_environment_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^bad value for consumer\.batch_max: "):
        config.load(env={"BUSD_CONSUMER_BATCH_MAX": "lots"})
    with pytest.raises(ConfigError, match=r"^bad value for ha\.enabled: "):
        config.load(env={"BUSD_HA_ENABLED": "maybe"})


def test_a_wrong_type_from_the_flags_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^bad value for verify\.file_wait_s: "):
        config.load(env={}, overrides={"verify": {"file_wait_s": "soon"}})


def test_numbers_as_text_are_numbers() -> None:
    """The environment is text: "7" is 7 for an int key (from any layer, like the flags')."""
    settings = config.load(
        env={"BUSD_CONSUMER_ACK_WAIT_S": "2.5"}, overrides={"consumer": {"batch_max": "7"}}
    )
    assert (settings.consumer.batch_max, settings.consumer.ack_wait_s) == (7, 2.5)


def test_a_list_key_from_the_environment_must_hold_strings() -> None:
    with pytest.raises(ConfigError) as caught:
        config.load(env={"BUSD_ARTIFACT_ROOTS": "[1, 2]"})
    assert str(caught.value) == (
        "environment variable BUSD_ARTIFACT_ROOTS: expected a JSON array of strings"
    )
    with pytest.raises(ConfigError, match=r"^bad value for artifact_roots: needs at least"):
        config.load(env={"BUSD_ARTIFACT_ROOTS": " , "})  # no value at all: not the default


def test_every_key_of_every_section_can_come_from_the_environment() -> None:
    """The variable names are derived from the settings' own fields: each one is accepted."""
    sections: dict[str, type[msgspec.Struct]] = {
        "nats": config.NatsSettings,
        "consumer": config.ConsumerSettings,
        "verify": config.VerifySettings,
        "catalog": config.CatalogSettings,
        "metrics": config.MetricsSettings,
        "ha": config.HaSettings,
        "lineage": config.LineageSettings,
    }
    names = [
        f"BUSD_{section}_{field.name}".upper()
        for section, struct in sections.items()
        for field in msgspec.structs.fields(struct)
    ]
    names += [
        f"BUSD_{field.name}".upper()
        for field in msgspec.structs.fields(config.Settings)
        if field.name not in (*sections, "exports")
    ]
    assert "BUSD_EXPORT_PARTITION_SEQS" in names and "BUSD_NATS_BIND_ONLY" in names
    for name in names:
        try:
            config.load(env={name: "1"})
        except ConfigError as exc:  # a bad value, maybe, but never an unknown key
            assert "unknown key" not in str(exc), exc


def test_the_catalog_memory_limit_reaches_duckdb(tmp_path: Path) -> None:
    """catalog.memory_limit_mb is DuckDB's memory_limit; spills go next to the catalog file,
    not to ./.tmp (the main database is in memory)."""
    from busd.catalog import Catalog

    s = config.load(env={"BUSD_CATALOG_MEMORY_LIMIT_MB": "96", "BUSD_DATA_DIR": str(tmp_path)})
    catalog = Catalog(s.catalog_path, memory_limit_mb=s.catalog.memory_limit_mb)
    try:
        limit, temp = catalog.con.execute(
            "SELECT current_setting('memory_limit'), current_setting('temp_directory')"
        ).fetchone() or ("", "")
    finally:
        catalog.close()
    assert limit.replace(" ", "") in ("96.0MiB", "96MiB")
    assert temp == f"{s.catalog_path}.tmp"
    assert config.load(env={}).catalog.memory_limit_mb == 128
