"""structlog set-up: JSON lines by default, a readable console when stderr is a TTY."""
from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_secrets: set[str] = set()
_level = logging.DEBUG  # structlog's own default, until configured


def enabled(level: int) -> bool:
    """Cheap check before building a log line on a hot path."""
    return level >= _level


def register_secret(value: str | None) -> None:
    """Never print this value: any log field containing it is masked."""
    if value and len(value) >= 6:
        _secrets.add(value)


def _redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    if _secrets:
        for key, value in event.items():
            if isinstance(value, str) and any(s in value for s in _secrets):
                for secret in _secrets:
                    value = value.replace(secret, "***")
                event[key] = value
    return event


def configure_logging(level: str = "INFO", stream: TextIO | None = None,
                      console: bool | None = None) -> None:
    stream = stream or sys.stderr
    if console is None:
        console = stream.isatty()
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"LOG_LEVEL={level!r} is not one of debug, info, warning, error")
    global _level
    _level = numeric
    renderer = (structlog.dev.ConsoleRenderer(colors=False) if console
                else structlog.processors.JSONRenderer())
    # Libraries (psycopg_pool, aiohttp) log through the standard library: the
    # same renderer makes their lines JSON too, instead of bare text on stderr.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[structlog.processors.add_log_level,
                           structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
                           _redact]))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
