"""Structured logging: JSON lines when not on a terminal (journald), readable on a terminal."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import structlog

_level = logging.INFO
_json = False


def configure(fmt: str = "auto", level: int = logging.INFO) -> None:
    global _level, _json
    _level = level
    json_lines = _json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def debug_enabled() -> bool:
    """For a hot loop: skip building a debug line's fields when debug lines are dropped."""
    return _level <= logging.DEBUG


def crashed(exc: BaseException) -> None:
    """An exception no layer names (a bug): its traceback, for the journal, as one JSON line
    (a terminal gets the one-line message only)."""
    if _json:
        trace = "".join(traceback.format_exception(exc))
        get().error("unexpected error", error=f"{type(exc).__name__}: {exc}", traceback=trace)


def get(name: str = "busd") -> Any:
    return structlog.get_logger(name)
