"""`webhook-sync events` and `prune` through the real command, on a real PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.operator_support import cli, event_ids, fixture, store_event
from webhook_sync import db, inbox, operations, service


def json_lines(output: str) -> list[dict[str, Any]]:
    """Decode one JSON object per line."""
    return [json.loads(line) for line in output.splitlines() if line.strip()]


# --- events ------------------------------------------------------------------------------


NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28T10:00:00.123456789Z", datetime(2026, 11, 28, 10, 0, 0, 123456, UTC)),
        ("2026-11-28T12:00:00+02:00", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),
        ("2026-11-28T10:00", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),
        ("2h", datetime(2026, 11, 28, 10, 0, tzinfo=UTC)),
    ],
)
def test_since_reads_iso_times_and_durations(text: str, expected: datetime) -> None:
    """--since takes an ISO time (Z, nine digits, an offset, or none meaning UTC) or a duration."""
    assert operations.parse_when(text, NOW) == expected


@pytest.fixture()
def filled_inbox(conn: db.Connection) -> dict[str, Any]:
    """An inbox with a delivery applied, one failed, and one pending for an untracked training."""
    succeeded = fixture("training-webhook-completed-event-succeeded.json")
    other = fixture("training-failed.json")
    with conn:
        service.track_training(conn, succeeded["id"], "user-1")
    inbox.receive_delivery(conn, webhook_id="msg_applied", payload=succeeded, signed_at=None)
    inbox.receive_delivery(conn, webhook_id="msg_pending", payload=other, signed_at=None)
    conn.autocommit = False
    store_event(conn, "msg_failed", succeeded, "failed", age="3 hours")
    return {"succeeded": succeeded, "other": other}


def test_events_lists_the_inbox_newest_first(database_url: str, filled_inbox: Any) -> None:
    """`events` shows a table of every event with its outcome, newest first."""
    result = cli(database_url, "events")
    lines = result.stdout.splitlines()

    assert result.returncode == 0, result.stderr
    assert lines[0].split() == [
        "received_at",
        "webhook_id",
        "training_id",
        "source",
        "reported_status",
        "outcome",
        "attempts",
        "error",
    ]
    assert [line.split()[2] for line in lines[1:]] == ["msg_pending", "msg_applied", "msg_failed"]
    assert "failed" in lines[3]
    assert lines[3].rstrip().endswith("boom")


def test_events_filters_combine(database_url: str, filled_inbox: Any) -> None:
    """--training, --outcome and --since narrow the list; --json prints one object a line."""
    training_id = filled_inbox["succeeded"]["id"]

    by_training = json_lines(
        cli(database_url, "events", "--training", training_id, "--json").stdout
    )
    failed = json_lines(cli(database_url, "events", "--outcome", "failed", "--json").stdout)
    recent = json_lines(cli(database_url, "events", "--since", "1h", "--json").stdout)

    assert [e["webhook_id"] for e in by_training] == ["msg_applied", "msg_failed"]
    assert [e["webhook_id"] for e in failed] == ["msg_failed"]
    assert failed[0]["error"] == "boom"
    assert failed[0]["reported_status"] == "succeeded"
    assert [e["webhook_id"] for e in recent] == ["msg_pending", "msg_applied"]
    assert recent[0]["outcome"] == "pending"
    assert set(recent[0]) == set(db.EVENT_COLUMNS)


def test_events_with_no_match(database_url: str) -> None:
    """An empty result says so and still succeeds."""
    result = cli(database_url, "events", "--outcome", "conflict")

    assert result.returncode == 0
    assert result.stdout.strip() == "no events match"


@pytest.mark.parametrize("args", [("--outcome", "lost"), ("--since", "soon"), ("--limit", "0")])
def test_events_wrong_usage_exits_2(database_url: str, args: tuple[str, ...]) -> None:
    """An unknown outcome, an unreadable time or a zero limit is a usage error."""
    result = cli(database_url, "events", *args)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("prune", "--older-than", "1000000d"),
        ("prune", "--older-than", "5300w"),
        ("events", "--since", "1000000d"),
        ("events", "--until", "99999999999s"),
        ("replay", "--failed", "--since", "1000000d"),
        ("import", "--since", "1000000d"),
        ("doctor", "--clock-tolerance", "1000000d"),
    ],
)
def test_an_out_of_range_duration_is_a_one_line_usage_error(
    database_url: str, args: tuple[str, ...]
) -> None:
    """A duration longer than any history is wrong usage: exit 2, one line, no traceback."""
    result = cli(database_url, *args)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "at most 36500d" in result.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("import", "--since", "90"), "a duration needs a unit (s, m, h, d or w), such as 90s"),
        (("doctor", "--clock-tolerance", "5"), "such as 5s"),
        (("events", "--since", "0d"), "longer than zero"),
    ],
)
def test_a_duration_without_a_unit_or_of_zero_is_a_usage_error(
    database_url: str, args: tuple[str, ...], said: str
) -> None:
    """A bare number could mean any unit, and nothing is zero long: exit 2, one line
    saying what is wrong."""
    result = cli(database_url, *args)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert said in result.stderr


def test_the_longest_duration_is_accepted(database_url: str) -> None:
    """A century is still a duration (it prunes nothing here)."""
    result = cli(database_url, "prune", "--older-than", "36500d", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert "would delete 0" in result.stdout


def test_events_without_database_is_a_clear_error() -> None:
    """No DATABASE_URL gives exit 1 and the setting's name."""
    result = cli("", "events")

    assert result.returncode == 1
    assert result.stderr.startswith("error: DATABASE_URL is not set")


# --- prune -------------------------------------------------------------------------------


@pytest.fixture()
def aged_inbox(conn: db.Connection) -> None:
    """Events received 40 days, 20 days, 2 days and a minute ago, with mixed outcomes."""
    payload = fixture("training-get-processing.json")
    for webhook_id, outcome, age in (
        ("msg_40d", "applied", "40 days"),
        ("msg_20d", "failed", "20 days"),
        ("msg_2d", "pending", "2 days"),
        ("msg_now", "applied", "1 minute"),
    ):
        store_event(conn, webhook_id, payload, outcome, age=age)


def test_prune_defaults_to_the_retention_setting(
    database_url: str, conn: db.Connection, aged_inbox: None
) -> None:
    """Without --older-than, prune deletes what is older than EVENT_RETENTION_DAYS (30)."""
    result = cli(database_url, "prune")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "deleted 1 inbox event(s) received more than 30d ago",
        "deleted 0 transition(s) recorded more than 90d ago",
    ]
    assert event_ids(conn) == ["msg_20d", "msg_2d", "msg_now"]


def test_prune_follows_event_retention_days(
    database_url: str, conn: db.Connection, aged_inbox: None
) -> None:
    """EVENT_RETENTION_DAYS=10 also removes a failed event 20 days old."""
    result = cli(database_url, "prune", "--json", EVENT_RETENTION_DAYS="10")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "deleted": 2,
        "matched": 2,
        "older_than": "10d",
        "transitions_deleted": 0,
        "transitions_matched": 0,
        "transitions_older_than": "90d",
        "dry_run": False,
    }
    assert event_ids(conn) == ["msg_2d", "msg_now"]


def test_prune_older_than_and_dry_run(
    database_url: str, conn: db.Connection, aged_inbox: None
) -> None:
    """--dry-run only counts; --older-than 12h then deletes all but the newest."""
    dry = cli(database_url, "prune", "--older-than", "12h", "--dry-run")
    kept = event_ids(conn)
    real = cli(database_url, "prune", "--older-than", "12h")

    assert dry.returncode == 0
    assert dry.stdout.splitlines()[0] == "would delete 3 inbox event(s) received more than 12h ago"
    assert kept == ["msg_20d", "msg_2d", "msg_40d", "msg_now"]
    assert real.stdout.splitlines()[0] == "deleted 3 inbox event(s) received more than 12h ago"
    assert event_ids(conn) == ["msg_now"]


@pytest.mark.parametrize("value", ["30", "0d", "3 parsecs", "-1d"])
def test_prune_refuses_a_bad_duration(
    database_url: str, conn: db.Connection, aged_inbox: None, value: str
) -> None:
    """A duration without a unit, zero or nonsense is a usage error and deletes nothing."""
    result = cli(database_url, "prune", "--older-than", value)

    assert result.returncode == 2
    assert any(
        said in result.stderr
        for said in ("expected a duration", "longer than zero", "needs a unit")
    )
    assert len(event_ids(conn)) == 4


def test_prune_events_works_in_batches(conn: db.Connection, aged_inbox: None) -> None:
    """The worker's entry point deletes across several small batches and returns the total."""
    deleted = operations.prune_events(conn, timedelta(hours=1), batch_size=2)

    assert deleted == 3
    assert event_ids(conn) == ["msg_now"]


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30d", 30 * 86400),
        ("12h", 43200),
        ("90m", 5400),
        ("45s", 45),
        ("1d12h", 129600),
        ("2w", 1209600),
    ],
)
def test_durations_read_as_documented(text: str, seconds: int) -> None:
    """parse_duration reads each documented form, and format_duration writes it back."""
    duration = operations.parse_duration(text)

    assert duration == timedelta(seconds=seconds)
    assert operations.parse_duration(operations.format_duration(duration)) == duration
