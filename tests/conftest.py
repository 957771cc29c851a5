"""The fixtures and pytest hooks of the suite; the helpers they use live in ``support.py``
(a nats-server, a busd world, systemd's notify socket), ``faultfs.py`` (a fault filesystem)
and ``hostile.py`` (the hostile-input world)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultfs import FaultFS, mounted, usable
from hostile import COUNTS, World, build_world
from support import Bus, FakeSystemd, notify_socket

from busd.embedded import EmbeddedServer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run long soak and chaos tests")


def pytest_configure(config: pytest.Config) -> None:
    from hypothesis import settings

    settings.register_profile("long", max_examples=2000, deadline=None)
    if config.getoption("--long"):
        settings.load_profile("long")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long run: use --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ---- a real nats-server and busd's world around it ---------------------------------------------
@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer("127.0.0.1", 0, tmp_path / "nats-store")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bus(tmp_path: Path, nats_server: EmbeddedServer) -> Iterator[Bus]:
    b = Bus(tmp_path, nats_server)
    b.artifacts.mkdir(parents=True, exist_ok=True)
    b.init()
    yield b
    b.reap()


# ---- systemd's notify socket -------------------------------------------------------------------
@pytest.fixture
def fake_systemd() -> Iterator[FakeSystemd]:
    with notify_socket(timeout_s=5) as fake:
        yield fake


# ---- files that fail the way storage fails -----------------------------------------------------
@pytest.fixture
def faultfs(bus: Bus) -> Iterator[FaultFS]:
    """``bus.artifacts`` seen through a fault filesystem, which is busd's artifact root."""
    why = usable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"FUSE is needed here: {why}")
        pytest.skip(f"FUSE unavailable: {why}")
    with mounted(bus.artifacts, bus.root / "mnt", bus.root / "faultfs.log") as fs:
        bus.overrides = {**bus.overrides, "artifact_roots": [str(fs.mountpoint)]}
        yield fs


@pytest.fixture
def slow_disk(bus: Bus) -> Iterator[FaultFS]:
    """A writable fault filesystem (``disk.set(rel, fsync_s=N)`` slows each fsync of a file)
    for busd's data dir or a second instance's: its mount point is ``disk.mountpoint``."""
    why = usable()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"FUSE is needed here: {why}")
        pytest.skip(f"FUSE unavailable: {why}")
    (bus.root / "disk").mkdir()
    with mounted(
        bus.root / "disk", bus.root / "slow", bus.root / "slowfs.log", writable=True
    ) as disk:
        yield disk


# ---- hostile input -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """An artifact root full of good, odd and hostile files, shared by a module's tests."""
    return build_world(tmp_path_factory.mktemp("hostile").resolve())


@pytest.fixture(scope="module")
def hostile_counts() -> Iterator[None]:
    """Print how many hostile payloads a module sent (``-s`` shows it)."""
    yield
    if COUNTS:
        print("\nhostile payloads:", dict(sorted(COUNTS.items())))
    COUNTS.clear()
