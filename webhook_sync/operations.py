"""The operator's inbox tools: read durations and times, list inbox events, prune old ones
(and the outbox's finished notifications with them), and prune the transitions behind the
change feed."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from webhook_sync import changes, db, errors, outbox
from webhook_sync.logs import log_event
from webhook_sync.vocabulary import EVENT_OUTCOMES

PRUNE_BATCH_SIZE = 10_000
_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Longer ago than any event or training (and well inside what dates and timestamptz
# hold): a longer duration is a typing mistake, refused as a usage error.
MAX_DURATION = timedelta(days=36_500)


def parse_duration(text: str) -> timedelta:
    """Parse `30d`, `12h`, `90m`, `45s`, `2w` or a sum such as `1d12h`, longer than zero and
    at most MAX_DURATION; ValueError otherwise. The one rule of every duration the CLI
    reads (`import --since`, `prune`, `doctor`, and a WHEN given as a time ago)."""
    parts = _duration_parts(text)
    if not parts and text.strip().isdigit():
        # A bare number could mean any unit (and in a WHEN, a date such as 20261201).
        raise ValueError(
            f"a duration needs a unit (s, m, h, d or w), such as {text.strip()}s, got {text!r}"
        )
    if not parts:
        raise ValueError(f"expected a duration such as 30d, 12h or 90m, got {text!r}")
    seconds = sum(int(amount) * _UNIT_SECONDS[unit] for amount, unit in parts)
    if seconds <= 0:
        raise ValueError(f"the duration must be longer than zero, got {text!r}")
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(
            f"the duration must be at most {format_duration(MAX_DURATION)}, got {text!r}"
        )
    return timedelta(seconds=seconds)


def _duration_parts(text: str) -> list[tuple[str, str]]:
    """The (amount, unit) pairs of `text` when it is spelled as a duration (whatever its
    value), else none."""
    compact = text.strip().lower()
    if _DURATION.sub("", compact).strip():
        return []
    return _DURATION.findall(compact)


def format_duration(duration: timedelta) -> str:
    """Render a duration the way parse_duration reads it, in its largest whole unit."""
    seconds = int(duration.total_seconds())
    for unit in ("w", "d", "h", "m"):
        if seconds and seconds % _UNIT_SECONDS[unit] == 0:
            return f"{seconds // _UNIT_SECONDS[unit]}{unit}"
    return f"{seconds}s"


def parse_when(text: str, now: datetime) -> datetime:
    """Parse an ISO date or time (UTC unless it says otherwise) or a duration meaning that long
    before `now`; ValueError otherwise."""
    raw = text.strip()
    if _duration_parts(raw):
        # A duration out of range is that error, not "not an ISO time".
        return now - parse_duration(raw)
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(
            f"expected an ISO time such as 2026-11-28T12:00:00Z or a duration ago such as 2h,"
            f" got {text!r}"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def list_events(
    conn: db.Connection,
    *,
    training_id: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
) -> list[db.Row]:
    """The newest inbox events matching the filters (reads only)."""
    if outcome is not None and outcome not in EVENT_OUTCOMES:
        raise errors.WebhookSyncError(f"unknown outcome {outcome!r}")
    with conn:
        return db.select_events(
            conn,
            training_id=training_id,
            outcome=outcome,
            received_since=since,
            received_before=until,
            limit=limit,
        )


def prune_events(
    conn: db.Connection,
    older_than: timedelta,
    *,
    dry_run: bool = False,
    batch_size: int = PRUNE_BATCH_SIZE,
) -> int:
    """Delete inbox events received more than `older_than` ago, whatever their outcome, and
    return how many (commits once per batch; with dry_run only counts them).

    The cutoff comes from the database's clock so that every process agrees on it. The
    worker runs this daily with `Config.event_retention_days`.
    """
    rows = _Rows("events", db.count_events_received_before, db.delete_events_received_before)
    deleted, cutoff = _prune(conn, rows, older_than, dry_run, batch_size)
    if not dry_run:
        prune_notifications(conn, cutoff, batch_size)
    return deleted


def prune_transitions(
    conn: db.Connection,
    older_than: timedelta,
    *,
    dry_run: bool = False,
    batch_size: int = PRUNE_BATCH_SIZE,
) -> int:
    """Delete transitions (applied or refused) recorded more than `older_than` ago and
    return how many, like `prune_events`.

    The change feed reads these rows: a reader further behind than the retention loses
    the changes pruned meanwhile and must resync from the trainings table (see
    `changes`). The worker runs this daily with `Config.transition_retention_days`.
    """
    rows = _Rows(
        "transitions",
        changes.count_transitions_created_before,
        changes.delete_transitions_created_before,
    )
    return _prune(conn, rows, older_than, dry_run, batch_size)[0]


@dataclass(frozen=True)
class _Rows:
    """What a prune deletes: its name in the log, how to count and delete them by age."""

    name: str
    count: Callable[[db.Connection, datetime], int]
    delete: Callable[[db.Connection, datetime, int], int]


def _prune(
    conn: db.Connection, rows: _Rows, older_than: timedelta, dry_run: bool, batch_size: int
) -> tuple[int, datetime]:
    """Delete (with dry_run: count) `rows` older than `older_than` by the database's clock,
    one committed batch at a time; return how many, and the cutoff."""
    if older_than <= timedelta(0):
        raise errors.WebhookSyncError("the retention must be longer than zero")
    with conn:
        cutoff = db.select_now(conn) - older_than
        if dry_run:
            return rows.count(conn, cutoff), cutoff
    deleted = _delete_in_batches(conn, rows.delete, cutoff, batch_size)
    log_event(f"{rows.name}_pruned", deleted=deleted, cutoff=cutoff.isoformat())
    return deleted, cutoff


def prune_notifications(conn: db.Connection, cutoff: datetime, batch_size: int) -> int:
    """Delete delivered and dead notifications created before `cutoff` (pending ones are
    kept whatever their age), one committed batch at a time; return how many."""
    deleted = _delete_in_batches(conn, outbox.delete_finished_notifications, cutoff, batch_size)
    log_event("notifications_pruned", deleted=deleted, cutoff=cutoff.isoformat())
    return deleted


def _delete_in_batches(
    conn: db.Connection,
    delete: Callable[[db.Connection, datetime, int], int],
    cutoff: datetime,
    batch_size: int,
) -> int:
    """Run a bounded delete until a batch comes back short, one commit per batch."""
    deleted = 0
    while True:
        with conn:
            batch = delete(conn, cutoff, batch_size)
        deleted += batch
        if batch < batch_size:
            return deleted
