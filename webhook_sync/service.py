"""Use cases: apply a status report, track a training. Every status change goes through
`apply_update` (or `apply_delivery`, which stores the delivery in the same statement),
both performed by the SQL function `receive_delivery`; callers own the transaction."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from webhook_sync import db, errors, host_sql, metrics, status
from webhook_sync.logs import log_event
from webhook_sync.training import Training, parse_training
from webhook_sync.vocabulary import Outcome, Source

_SOURCES = frozenset(Source)


@dataclass(frozen=True)
class ApplyResult:
    """What one report did to a training row."""

    outcome: Outcome  # applied | unchanged | ignored | conflict | pending (not tracked)
    training_id: str
    reason: str
    old_status: str | None = None  # Replicate status before
    new_status: str | None = None  # Replicate status after
    old_training_status: str | None = None
    new_training_status: str | None = None
    row: dict[str, Any] | None = None
    # False when the inbox event named by the caller had already been finished by another
    # delivery of the same webhook-id: this one is then a duplicate.
    event_recorded: bool = True
    # Rows each status-change CTE of the funnel touched, by name (`notified`, `queued`,
    # `host_mirrored` with a binding); empty when no guarded update ran.
    effects: Mapping[str, int] = field(default_factory=dict)

    @property
    def status_changed(self) -> bool:
        """True when the report moved the row's status forward."""
        return self.outcome == Outcome.APPLIED


def apply_update(
    conn: db.Connection, training: Training, source: Source, *, event_id: str | None = None
) -> ApplyResult:
    """Apply one report of Replicate's status to its row, never backwards; writes the row,
    the transition log and a status change's effects (NOTIFY, outbox, host table) in one
    statement, in the caller's transaction. Does not commit.

    `event_id` names a stored inbox event whose outcome is recorded in the same statement,
    unless another delivery of it already finished it (`event_recorded`).
    """
    result = _receive(conn, training, source, event_id=event_id)
    assert result is not None  # only a delivery that stores its payload is a duplicate
    return result


def apply_check(
    conn: db.Connection,
    training: Training,
    *,
    next_check_at: datetime,
    lease_owner: str | None = None,
) -> ApplyResult:
    """Apply what Replicate answered about a training (source `poll`) and record the check:
    its next one at `next_check_at`, the failure counts reset, Replicate's creation time
    kept and the lease freed, the record only while `lease_owner` holds the lease (None:
    while nobody does). The one path of the sweep, the wake-up, `sync`, discovery and
    `import`; in the caller's transaction, does not commit."""
    update = apply_update(conn, training, Source.POLL)
    db.update_checked(
        conn,
        training.id,
        owner=lease_owner,
        next_check_at=next_check_at,
        replicate_created_at=training.created_at,
    )
    return update


def apply_delivery(
    conn: db.Connection,
    training: Training,
    source: Source,
    *,
    webhook_id: str,
    payload: Mapping[str, Any] | str,
    signed_at: datetime | None,
    keep_untracked: bool = False,
) -> ApplyResult | None:
    """Store a verified delivery (`payload`: its value, or the JSON text to store) as inbox
    event `webhook_id` and apply it, as `apply_update` does, in the same single statement.
    None when that event was stored and finished already: a duplicate, which wrote
    nothing. With `keep_untracked`, the event of an untracked training stays `received`
    (the caller adopts it), else it waits `pending`.
    Does not commit."""
    return _receive(
        conn,
        training,
        source,
        event_id=webhook_id,
        payload=payload,
        signed_at=signed_at,
        keep_untracked=keep_untracked,
    )


def _receive(
    conn: db.Connection,
    training: Training,
    source: Source,
    *,
    event_id: str | None,
    payload: Mapping[str, Any] | str | None = None,
    signed_at: datetime | None = None,
    keep_untracked: bool = False,
) -> ApplyResult | None:
    if source not in _SOURCES:
        raise ValueError(f"unknown source {source!r}")
    started = time.monotonic()
    try:
        received = db.receive_delivery(
            conn,
            training_id=training.id,
            reported_status=training.status,
            source=source,
            fields={column: getattr(training, column) for column in db.REFRESHED_COLUMNS},
            event_id=event_id,
            signed_at=signed_at,
            payload=payload,
            keep_untracked=keep_untracked,
        )
    except errors.HostTableRefusedError as exc:
        # Nothing of ours is written either: the statement fails as a whole and the change
        # is retried (the sender's retry, the next sweep, a replay).
        _observe_host_refusal(exc, training.id, source)
        raise
    outcome = received.outcome
    if outcome == Outcome.DUPLICATE:
        return None
    if outcome == Outcome.PENDING:
        return ApplyResult(
            Outcome.PENDING, training.id, received.reason, event_recorded=received.event_recorded
        )
    row = received.row
    result = ApplyResult(
        Outcome(outcome),
        training.id,
        received.reason,
        old_status=received.from_replicate_status,
        new_status=row["replicate_status"],
        old_training_status=received.from_training_status,
        new_training_status=row["training_status"],
        row=row,
        event_recorded=received.event_recorded,
        effects=received.effects,
    )
    _log_result(result, source, started)
    _observe_terminal(result, training, source)
    _observe_host_mirror(conn, result, source)
    return result


def decide(row: dict[str, Any], training: Training) -> tuple[status.Decision, dict[str, Any]]:
    """What a report does to a row (pure): the decision, and the fields it writes (none
    when refused). The specification of what the SQL function `receive_delivery` decides
    for `apply_update` (a hypothesis test holds the two together); `replay --dry-run`
    shows it."""
    current = status.effective_replicate_status(row["replicate_status"], row["training_status"])
    decision = status.decide(current, training.status)
    if decision.refused:
        return decision, {}
    changes = _changed_fields(row, training)
    overwritten = [column for column in changes if row.get(column) is not None]
    refused = status.decide_fields(current, overwritten)
    if refused is not None:
        return refused, {}
    return decision, changes


def _changed_fields(row: dict[str, Any], training: Training) -> dict[str, Any]:
    """Fields the report knows and the row lacks or holds differently (never erased)."""
    changes = {}
    for column in db.REFRESHED_COLUMNS:
        value = getattr(training, column)
        if value is not None and value != row.get(column):
            changes[column] = value
    return changes


def _log_result(result: ApplyResult, source: Source, started: float) -> None:
    metrics.count_transition(source, result.outcome)
    log_event(
        "training_update",
        training_id=result.training_id,
        source=source,
        outcome=result.outcome,
        old=result.old_status,
        new=result.new_status,
        app_status=result.new_training_status,
        reason=result.reason if result.outcome != Outcome.APPLIED else None,
        ms=round((time.monotonic() - started) * 1000, 1),
    )


def reached_terminal(result: ApplyResult) -> bool:
    """True when this update moved the row to a terminal status."""
    return result.status_changed and status.is_terminal(result.new_status)


def _observe_terminal(result: ApplyResult, training: Training, source: Source) -> None:
    """The delivery-gap telemetry: how late each source brings a terminal status, and a
    missed webhook (logged and counted) whenever the poller got there first."""
    if not reached_terminal(result):
        return
    lag = None
    if training.completed_at is not None and result.row is not None:
        lag = (result.row["updated_at"] - training.completed_at).total_seconds()
    metrics.observe_terminal_update(source, result.new_status or "", lag)
    if source == Source.POLL:
        log_event(
            "missed_webhook",
            training_id=training.id,
            source=source,
            new=result.new_status,
            replicate_completed_at=training.completed_at,
        )


def _observe_host_refusal(
    exc: errors.HostTableRefusedError, training_id: str, source: Source
) -> None:
    """Log and count a change the platform's bound table refused."""
    metrics.count_host_refusal(source)
    fields = {"training_id": training_id, "source": source, "reason": str(exc)}
    log_event("host_table_refused", logging.WARNING, **fields)


def _observe_host_mirror(conn: db.Connection, result: ApplyResult, source: Source) -> None:
    """A status change that found no row of its training in the platform's bound table:
    logged and counted, not an error (the platform may have deleted the row; ours and the
    transition are written all the same)."""
    if conn.host is None or not result.status_changed:
        return
    if result.effects.get(host_sql.MIRROR_CTE_NAME, 0) == 0:
        metrics.count_host_row_missing(source)
        fields = {"training_id": result.training_id, "source": source}
        log_event(
            "host_row_missing", logging.WARNING, host_table=conn.host.qualified_table, **fields
        )


def track_training(
    conn: db.Connection, training_id: str, user_id: str, destination: str | None = None
) -> tuple[dict[str, Any], bool]:
    """Register a training in the `training` state (idempotent) and apply any webhooks that
    arrived before it was tracked; return (row, created). Does not commit."""
    if not training_id.strip() or not user_id.strip():
        raise errors.WebhookSyncError("training id and user id must not be empty")
    created = db.insert_training(conn, training_id, user_id, destination) is not None
    if created:
        log_event("training_tracked", training_id=training_id, source=Source.TRACK)
    apply_pending_events(conn, [training_id])
    row = db.select_training(conn, training_id)
    assert row is not None  # inserted above or already present
    return row, created


def apply_pending_events(
    conn: db.Connection, training_ids: list[str], *, held_event: str | None = None
) -> list[ApplyResult]:
    """Apply inbox events that were waiting for these trainings to be tracked, each with
    its own source (a delivery or a replay), except `held_event`, which the caller is
    applying itself (a replay of that very event). Does not commit."""
    results = []
    for event in db.select_pending_events(conn, training_ids):
        if event["webhook_id"] == held_event:
            continue
        try:
            training = parse_training(event["payload"])
        except errors.InvalidTrainingError as exc:
            db.update_event_outcome(conn, event["webhook_id"], Outcome.FAILED, str(exc))
            continue
        source = Source(event["source"])
        results.append(apply_update(conn, training, source, event_id=event["webhook_id"]))
    return results
