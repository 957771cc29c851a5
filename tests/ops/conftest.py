"""Fixtures for the tests of ops/: the external tools, found or skipped (failed under CI)."""

from __future__ import annotations

import pytest
from opsfiles import find_tool


@pytest.fixture
def promtool() -> str:
    return find_tool("promtool", "prometheus")


@pytest.fixture
def prometheus_binary() -> str:
    return find_tool("prometheus", "prometheus")


@pytest.fixture
def systemd_analyze() -> str:
    return find_tool("systemd-analyze", "systemd")
