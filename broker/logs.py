"""structlog configuration for the broker and the CLI (JSON lines or console, to stderr).

Nothing here logs key material, tokens or payloads: callers log ids, names and codes only.
"""

from __future__ import annotations

import logging
import sys

import structlog


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    return structlog.PrintLogger(sys.stderr)


def configure(*, level: str = "info", json: bool = True) -> None:
    """Configure structlog once for this process."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # sys.stderr is looked up per logger, not captured once: a CLI run in-process (tests)
        # must not keep writing to a stream that was replaced and closed since.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
