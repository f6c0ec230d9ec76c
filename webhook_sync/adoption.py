"""Adoption from the platform's own table: each sweep tracks what is in flight there, and
corrects what is left in flight there after it finished here.

With a binding (HOST_TABLE, `db.Connection.host`), every row of the host's table whose
status column holds its spelling of `training` and whose training id we do not know yet
is tracked under its user id — the post-mortem's `getAllInProgressTrainings()`, done for
the platform, with no code on its side. One statement finds and inserts them, at most
`limit` per sweep, and counts those without a user id (`host_rows`); the webhooks
already waiting for them in the inbox (`pending`) are applied at once. A new row is
due at once (its `next_check_at` is its insert time), so the sweep that adopted it
checks it at Replicate, and the insert trigger wakes every worker's listener (`wakeup`)
too. Rows in flight with a training id
but no user id cannot be adopted: they are counted and logged once per sweep
(`host_rows_without_user_id`, the count only).

Reconciliation: a host row still holding the in-flight spelling while we track its
training as finished (the binding set after it finished, a row the app (re)inserted or
reset after our change, a change made by a process without the binding) is never
written by the mirror, which runs only on a status change of ours. Each sweep writes
such rows exactly as the mirror would (one bounded statement, `host_rows`), logs
`host_rows_reconciled` and counts them; a row holding any other value is the app's and
is left alone.

A binding this role cannot read (no SELECT privilege, a table dropped since the start
check) fails only the adoption: it is logged, and the sweep goes on. A reconciliation
the host's table refuses is logged (`host_table_refused`) and counted like the mirror's,
and the sweep goes on.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import psycopg2

from webhook_sync import db, host_rows, host_sql, inbox, metrics
from webhook_sync.logs import log_event

# New host rows tracked per sweep: the rest wait for the next one (one interval later).
MAX_PER_SWEEP = 1000
# Our finished trainings whose host rows are corrected per sweep: the rest, next sweep.
MAX_RECONCILED_PER_SWEEP = 1000
HOW = "host_table"
# The `source` of a refused reconciliation in host_table_refused and its counter.
RECONCILE = "reconcile"


@dataclass(frozen=True)
class HostAdoption:
    """What one adoption from the host's table did."""

    adopted: int = 0
    pending_applied: int = 0
    # In flight there with a training id we do not track, but no user id.
    without_user_id: int = 0


def adopt_in_flight(conn: db.Connection, limit: int = MAX_PER_SWEEP) -> HostAdoption:
    """Track the host's rows in flight that we do not know yet (commits), then apply the
    inbox events that waited for them (commits per training). Nothing to do without a
    binding. A lost connection is raised; any other database error is logged, and
    nothing is adopted."""
    host = conn.host
    if host is None:
        return HostAdoption()
    try:
        with conn:
            adopted, without_user_id = host_rows.insert_in_flight_trainings(conn, limit)
    except db.CONNECTION_LOST_ERRORS:
        raise
    except psycopg2.Error as exc:
        log_event(
            "host_adoption_failed",
            logging.WARNING,
            table=host.qualified_table,
            error=db.first_line(exc),
        )
        return HostAdoption()
    if without_user_id:
        log_event(
            "host_rows_without_user_id",
            logging.WARNING,
            table=host.qualified_table,
            count=without_user_id,
        )
    if not adopted:
        return HostAdoption(without_user_id=without_user_id)
    metrics.count_adoptions(HOW, len(adopted))
    for row in adopted:
        log_event(
            "training_adopted",
            logging.DEBUG,
            training_id=row["id"],
            user_id=row["user_id"],
            how=HOW,
        )
    waiting = [row["id"] for row in adopted if row["waiting"]]
    pending_applied = inbox.apply_pending_each(conn, waiting)
    log_event(
        "training_adopted_from_host",
        table=host.qualified_table,
        count=len(adopted),
        pending_applied=pending_applied,
        limited=len(adopted) >= limit,
    )
    return HostAdoption(
        adopted=len(adopted), pending_applied=pending_applied, without_user_id=without_user_id
    )


def reconcile_finished(conn: db.Connection, limit: int = MAX_RECONCILED_PER_SWEEP) -> int:
    """Write, as the mirror would, the host's rows still in flight whose training we track
    as finished, for up to `limit` trainings (commits); return how many host rows were
    written. Nothing to do without a binding. A lost connection is raised; a refusal of
    the host's table is logged and counted, any other database error logged, and 0
    returned."""
    host = conn.host
    if host is None:
        return 0
    try:
        with conn:
            written = host_rows.update_in_flight_finished(conn, limit)
    except db.TIMEOUT_ERRORS as exc:
        # A lock the app holds on one of the rows past the statement (or lock) timeout:
        # the connection is fine, and the next sweep tries again.
        _log_reconcile_failed(host.qualified_table, exc)
        return 0
    except db.CONNECTION_LOST_ERRORS:
        raise
    except psycopg2.Error as exc:
        if not host_sql.is_refusal(exc, conn.schema):
            _log_reconcile_failed(host.qualified_table, exc)
            return 0
        metrics.count_host_refusal(RECONCILE)
        reason = host_sql.refusal_reason(exc, host)
        log_event("host_table_refused", logging.WARNING, source=RECONCILE, reason=reason)
        return 0
    if not written:
        return 0
    for training_id, status in written:
        log_event("host_row_reconciled", logging.DEBUG, training_id=training_id, status=status)
    for status, count in sorted(Counter(status for _, status in written).items()):
        metrics.count_host_rows_reconciled(status, count)
    log_event(
        "host_rows_reconciled",
        table=host.qualified_table,
        count=len(written),
        limited=len({training_id for training_id, _ in written}) >= limit,
    )
    return len(written)


def _log_reconcile_failed(table: str, exc: psycopg2.Error) -> None:
    log_event("host_reconcile_failed", logging.WARNING, table=table, error=db.first_line(exc))
