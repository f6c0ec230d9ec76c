"""Log lines: UTC timestamps with their offset, floats as they are, one line per event."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from webhook_sync import logs, sweep

# 2026-12-01T06:03:02.123 UTC, in seconds since the epoch.
CREATED = 1796104982.123


def record(event: str = "sweep", **fields: object) -> logging.LogRecord:
    """A record as `log_event` makes it, created at CREATED."""
    made = logging.LogRecord(logs.LOGGER_NAME, logging.INFO, __file__, 1, event, None, None)
    made.created = CREATED
    made.fields = fields
    return made


@pytest.fixture()
def far_from_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is nine hours from UTC for the test."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("far_from_utc")
@pytest.mark.parametrize("formatter", [logs.KeyValueFormatter(), logs.JsonFormatter()])
def test_timestamps_are_utc_rfc3339_with_their_offset(formatter: logging.Formatter) -> None:
    """Both formats stamp the record in UTC with `+00:00`, whatever the local time zone."""
    line = formatter.format(record())
    stamp = json.loads(line)["ts"] if line.startswith("{") else line.split(" ")[0]

    assert stamp == "2026-12-01T06:03:02.123+00:00"
    assert datetime.fromisoformat(stamp) == datetime.fromtimestamp(CREATED, UTC)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0.004, "0.004"), (12.5, "12.5"), (1234.56789, "1234.56789"), (3.0, "3.0"), (7, "7")],
)
def test_numbers_keep_their_digits(value: float, text: str) -> None:
    """A float is written as the shortest text that reads back as itself, not cut to 0.0."""
    rendered = logs.format_value(value)

    assert rendered == text
    assert float(rendered) == value


def test_a_short_sweep_logs_its_duration() -> None:
    """A sweep that took 4 ms logs `duration=0.004`, not `duration=0.0`."""
    fields = sweep.SweepResult(duration=0.0042).log_fields()

    line = logs.KeyValueFormatter().format(record(**fields))

    assert " duration=0.004 " in f"{line} "


def test_values_that_would_split_a_line_are_quoted() -> None:
    """Spaces, quotes, `=` and newlines are JSON-quoted; None is `-`; the line stays one line."""
    line = logs.KeyValueFormatter().format(
        record("event", error='bad "x"\nnext', empty="", missing=None, plain="ok")
    )

    assert line.endswith(' error="bad \\"x\\"\\nnext" empty="" missing=- plain=ok')
    assert "\n" not in line


@pytest.fixture()
def package_logger() -> Iterator[None]:
    """The package logger's handlers and level are put back after the test."""
    logger = logging.getLogger(logs.LOGGER_NAME)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.usefixtures("package_logger")
def test_log_event_writes_one_line_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """`configure` then `log_event`: exactly one line on stdout with the event and fields."""
    logs.configure("INFO", "json")
    logs.log_event("sweep", checked=3, duration=0.25)

    lines = capsys.readouterr().out.splitlines()

    assert len(lines) == 1
    payload = json.loads(lines[0])
    assert payload["event"] == "sweep"
    assert (payload["level"], payload["checked"], payload["duration"]) == ("info", 3, 0.25)
