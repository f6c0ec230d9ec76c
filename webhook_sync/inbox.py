"""The inbox use cases: store a verified delivery and apply it, re-apply stored events.

A delivery is one statement in autocommit, so one round trip and one commit: the SQL
function `receive_delivery` (sql/0009, called by `service.apply_delivery`) looks the event
up by its `webhook-id` (a duplicate of a finished one is answered at once, writing
nothing), locks the training, decides, stores the event with its outcome and applies the
report, and the statement around it runs a status change's effects. It is answered 2xx
only after that commit, so an accepted event is never lost, and if the database fails
mid-way nothing is half-written: the sender gets a 503 and retries. `make bench` measured
planning and round trips (it was BEGIN, two statements, COMMIT) as the dominant cost of a
delivery; the statement is prepared once per connection. Of two identical deliveries
racing, the second waits for the training's lock, then finds the event stored and
finished: a duplicate, answered without writing. An untracked training whose signed body
names its owner is adopted in a second transaction (rare: once per training), its event
waiting `received` meanwhile. A processing error that is not the database's is recorded on the
stored event (outcome `failed`), which is what makes it replayable.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg2

from webhook_sync import db, errors, redaction, registration, service
from webhook_sync.logs import log_event
from webhook_sync.training import Training, parse_training, payload_for_storage, stored_json
from webhook_sync.vocabulary import Outcome, Source


@dataclass(frozen=True)
class DeliveryResult:
    """What one delivery did: the answer's `result`, and the update behind it, if any."""

    result: Outcome  # applied | unchanged | duplicate | ignored | conflict | pending
    training_id: str
    update: service.ApplyResult | None = None


def receive_delivery(
    conn: db.Connection,
    *,
    webhook_id: str,
    payload: Mapping[str, Any],
    signed_at: datetime | None,
    source: Source = Source.WEBHOOK,
    owners: registration.Owners | None = None,
    clean: bool = False,
    body: bytes | None = None,
) -> DeliveryResult:
    """Store a verified delivery in the inbox and apply it, in one transaction (commits).
    `clean`: the payload is known to hold no NUL or lone surrogate (see
    `training.payload_for_storage`). `body`: the JSON text it was decoded from, stored as
    it is when nothing in it needs changing (`training.stored_json`).

    An untracked training whose signed body names its owner (`owners`) is tracked first,
    so the delivery is applied, not left pending. Raises InvalidTrainingError (nothing
    stored) when the payload is not a training, and lets psycopg2.OperationalError through
    when the database is unavailable.
    """
    training = parse_training(payload)
    # Owners are read from the signed body alone (pure): only then may an untracked
    # training be adopted, and only then does its event wait `received` for that.
    adoptable = owners is not None and owners.owner_of(payload, training) is not None
    try:
        with db.autocommit(conn):
            update = service.apply_delivery(
                conn,
                training,
                source,
                webhook_id=webhook_id,
                payload=(
                    payload_for_storage(payload, clean=clean)
                    if body is None
                    else stored_json(payload, body, clean=clean)
                ),
                signed_at=signed_at,
                keep_untracked=adoptable,
            )
        if update is None:
            return DeliveryResult(Outcome.DUPLICATE, training.id)
        if update.outcome == Outcome.PENDING and adoptable:
            with conn:
                registration.adopt_for_delivery(conn, owners, payload, training, source=source)
                update = service.apply_update(conn, training, source, event_id=webhook_id)
    except db.CONNECTION_LOST_ERRORS as exc:
        # A delivery that timed out (a row lock held past DB_STATEMENT_TIMEOUT_MS) wrote
        # nothing, being one statement; its connection still works, so the delivery is
        # kept `failed` for replay, as any other failure, before the 503.
        if isinstance(exc, db.TIMEOUT_ERRORS) and not conn.closed:
            record_failure(conn, webhook_id, training.id, payload, signed_at, source, exc)
        raise
    except Exception as exc:
        record_failure(conn, webhook_id, training.id, payload, signed_at, source, exc)
        raise
    if not update.event_recorded:
        return DeliveryResult(Outcome.DUPLICATE, training.id, update)
    return DeliveryResult(update.outcome, training.id, update)


def reprocess_event(
    conn: db.Connection,
    webhook_id: str,
    source: Source = Source.REPLAY,
    owners: registration.Owners | None = None,
) -> DeliveryResult:
    """Apply a stored inbox event again, whatever its outcome was, in one transaction
    (commits).

    An untracked training is adopted first, as a live delivery's would be, when the stored
    payload was verified before it was stored (`is_signed`) and names its owner
    (`owners`): its signed `webhook` URL, or the destination pattern. The training's other
    waiting events are applied with it, oldest first, this one last as `source`.
    Raises WebhookSyncError when no such event is stored, InvalidTrainingError when its
    payload is not a training (the event is marked failed).
    """
    with conn:
        event = db.select_event(conn, webhook_id, for_update=True)
        if event is None:
            raise errors.WebhookSyncError(f"no inbox event with webhook-id {webhook_id}")
        try:
            training = parse_training(event["payload"])
        except errors.InvalidTrainingError as exc:
            db.update_event_outcome(conn, webhook_id, Outcome.FAILED, str(exc))
            raise
        if (
            owners is not None
            and is_signed(event)
            and db.select_training(conn, training.id) is None
        ):
            registration.adopt_for_delivery(
                conn, owners, event["payload"], training, source=source, held_event=webhook_id
            )
        return _apply_event(conn, webhook_id, training, source)


def is_signed(event: Mapping[str, Any]) -> bool:
    """Whether a stored event's payload is what Replicate signed, so its `webhook` URL may
    name an owner: every `webhook` event (the web process stores only verified
    deliveries), and a replay stored with its signature time, which only a verified
    `replay --verify` gives. A replayed file nobody verified is not."""
    return event["source"] == Source.WEBHOOK or event["signed_at"] is not None


# What one training's data can raise while it is applied (a value PostgreSQL refuses,
# text the driver cannot encode): that training fails alone (its waiting events stay
# pending; a sweep's row backs off) and the others go on.
ROW_ERRORS = (errors.WebhookSyncError, psycopg2.Error, ValueError)


def apply_pending_each(conn: db.Connection, training_ids: list[str]) -> int:
    """Apply the inbox events waiting for these tracked trainings, each training in its own
    transaction (commits per training); return how many events were applied. One the
    database refuses stays pending (logged) and stops none of the others; a lost
    connection is raised."""
    applied: list[service.ApplyResult] = []
    for training_id in training_ids:
        apply = functools.partial(_apply_pending_into, conn, training_id, applied)
        isolated(conn, training_id, apply, "pending_apply_failed")
    return len(applied)


def _apply_pending_into(
    conn: db.Connection, training_id: str, applied: list[service.ApplyResult]
) -> None:
    applied.extend(service.apply_pending_events(conn, [training_id]))


def isolated(
    conn: db.Connection, training_id: str, work: Callable[[], object], failure_event: str
) -> bool:
    """Run one training's work in its own transaction (commits); True when done. A value
    the database refuses (or text the driver cannot encode) fails that training alone,
    logged as `failure_event`, and returns False; a lost connection is raised."""
    try:
        with conn:
            work()
    except db.CONNECTION_LOST_ERRORS:
        raise
    except ROW_ERRORS as exc:
        log_event(failure_event, logging.WARNING, training_id=training_id, error=db.first_line(exc))
        return False
    return True


def _apply_event(
    conn: db.Connection, webhook_id: str, training: Training, source: Source
) -> DeliveryResult:
    update = service.apply_update(conn, training, source)
    db.update_event_outcome(conn, webhook_id, update.outcome)
    return DeliveryResult(update.outcome, training.id, update)


def record_failure(
    conn: db.Connection,
    webhook_id: str,
    training_id: str | None,
    payload: Mapping[str, Any],
    signed_at: datetime | None,
    source: Source,
    exc: BaseException,
) -> None:
    """Keep a delivery whose processing failed, with the error, so it can be replayed."""
    # Stored and shown by `events`: a driver error's text passes the redactor first.
    message = f"{type(exc).__name__}: {redaction.redact_error_text(exc)}"[:1000]
    try:
        with conn:
            db.insert_event(
                conn,
                webhook_id=webhook_id,
                training_id=training_id,
                payload=payload_for_storage(payload),
                signed_at=signed_at,
                source=source,
            )
            db.update_event_outcome(conn, webhook_id, Outcome.FAILED, message)
    except Exception as db_exc:
        # Recording failed too (the database, or the payload itself): the sender's retry is
        # now the only copy, and the original error, re-raised by the caller, is what counts.
        log_event(
            "event_failure_not_recorded",
            logging.WARNING,
            webhook_id=webhook_id,
            training_id=training_id,
            error=db.first_line(db_exc),
        )
