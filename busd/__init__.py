"""busd: one durable JetStream consumer that keeps a DuckDB data catalog honest.

The producer API is importable from the top: ``from busd import ArtifactBus, build_event``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any


def _installed_version() -> str:
    # the full distribution, or the light one for producers (clients/python)
    for distribution in ("busd", "busd-producer"):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return "0.0.0"  # a source tree without install


__version__ = _installed_version()

_PRODUCER_API = ("ArtifactBus", "build_event", "describe", "submit_sync")
__all__ = ["__version__", *_PRODUCER_API]


def __getattr__(name: str) -> Any:
    # Lazy, so `busd schema` and friends do not pay for importing nats and pyarrow.
    if name in _PRODUCER_API:
        from busd import producer

        return getattr(producer, name)
    raise AttributeError(name)
