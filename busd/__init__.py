"""busd: one durable JetStream consumer that keeps a DuckDB data catalog honest."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("busd")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
