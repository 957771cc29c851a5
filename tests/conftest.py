"""Shared fixtures; the helpers they use live in ``support.py``."""

from support import (
    bus,
    nats_server,
    pytest_addoption,
    pytest_collection_modifyitems,
    pytest_configure,
)

__all__ = [
    "bus",
    "nats_server",
    "pytest_addoption",
    "pytest_collection_modifyitems",
    "pytest_configure",
]
