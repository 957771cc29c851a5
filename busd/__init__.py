"""busd: one durable JetStream consumer that keeps a DuckDB data catalog honest.

The producer API is importable from the top: ``from busd import ArtifactBus, build_event``.
"""

from __future__ import annotations

from typing import Any


def _installed_version() -> str:
    # importlib.metadata costs 50 ms to import: only when the version is asked for (a
    # file-check worker never does)
    from importlib.metadata import PackageNotFoundError, version

    # the full distribution, or the light one for producers (clients/python)
    for distribution in ("busd", "busd-producer"):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return "0.0.0"  # a source tree without install


__version__: str  # looked up on first use, by __getattr__ below

_PRODUCER_API = ("ArtifactBus", "build_event", "describe", "submit_sync")
__all__ = ["__version__", *_PRODUCER_API]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()["__version__"] = found = _installed_version()
        return found
    # Lazy, so `busd schema` and friends do not pay for importing nats and pyarrow.
    if name in _PRODUCER_API:
        from busd import producer

        return getattr(producer, name)
    raise AttributeError(name)
