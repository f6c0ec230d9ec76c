"""One line per event on stdout, as key=value pairs or JSON, stamped in UTC (RFC 3339)."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

LOGGER_NAME = "webhook_sync"
# What a value may not hold bare: it would end the value or the line. One regex search per
# value, where a generator over the four characters cost ~4 times as much (every delivery
# logs ~10 values).
_NEEDS_QUOTES = re.compile(r'[ "=\n]')


class KeyValueFormatter(logging.Formatter):
    """Formats `log_event` records as `ts level event key=value ...`."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [
            format_time(record),
            record.levelname.lower(),
            record.getMessage(),
        ]
        parts += [f"{key}={format_value(value)}" for key, value in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """Formats `log_event` records as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": format_time(record),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def format_time(record: logging.LogRecord) -> str:
    """The record's time in UTC as RFC 3339 with milliseconds and its offset, whatever the
    machine's time zone: `2026-12-01T06:03:02.123+00:00`."""
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def format_value(value: Any) -> str:
    """Render one value so that a line stays one line and splits cleanly on spaces."""
    if value is None:
        return "-"
    if isinstance(value, float):
        # The shortest text that reads back as the same float: callers round what they
        # want rounded (a sweep's 0.004 s must not print as 0.0).
        return repr(value)
    text = str(value)
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


def configure(level: str = "INFO", fmt: str = "kv") -> None:
    """Send the package's log lines to stdout in the chosen format (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    logger.handlers[:] = [handler]


# Looked up once: `logging.getLogger` takes the logging module's lock on every call, and a
# delivery logs at least once.
_LOGGER = logging.getLogger(LOGGER_NAME)


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with its fields; callers never pass secrets or whole payloads."""
    _LOGGER.log(level, event, extra={"fields": fields})
