"""busd: one durable JetStream consumer that keeps a DuckDB data catalog honest.

The producer API is importable from the top: ``from busd import ArtifactBus, build_event``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("busd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

_PRODUCER_API = ("ArtifactBus", "build_event", "describe", "submit_sync")
__all__ = ["__version__", *_PRODUCER_API]


def __getattr__(name: str) -> Any:
    # Lazy, so `busd schema` and friends do not pay for importing nats and pyarrow.
    if name in _PRODUCER_API:
        from busd import producer

        return getattr(producer, name)
    raise AttributeError(name)
