"""structlog: JSON lines (a console renderer on a TTY), with contextvars, so every line about a
task carries ``task_uuid``, ``tenant`` and ``conn`` where they are bound. API keys, presigned
URL signatures and image bytes are never logged."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import TextIO

import structlog

__all__ = ["LogOutput", "configure_logging", "log_output", "processors"]


@dataclass(frozen=True, slots=True)
class LogOutput:
    """Where and how lines go, for writers that skip structlog's processors (gateway.audit):
    JSON lines of the same shape on the same stream, or None before configure_logging."""

    json: bool
    level: int
    stream: TextIO


_output: LogOutput | None = None


def log_output() -> LogOutput | None:
    return _output


def processors(renderer: structlog.typing.Processor) -> list[structlog.typing.Processor]:
    """The gateway's structlog chain, ending in ``renderer`` (bench.audit measures it)."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]


def configure_logging(level: str = "info", *, json: bool | None = None) -> None:
    global _output
    json = not sys.stderr.isatty() if json is None else json
    number = logging.getLevelNamesMapping()[level.upper()]
    _output = LogOutput(json, number, sys.stderr)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=processors(renderer),
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
