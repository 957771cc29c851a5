"""Structured logging: JSON lines when not on a terminal (journald), readable on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_level = logging.INFO


def configure(fmt: str = "auto", level: int = logging.INFO) -> None:
    global _level
    _level = level
    json_lines = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
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


def get(name: str = "busd") -> Any:
    return structlog.get_logger(name)
