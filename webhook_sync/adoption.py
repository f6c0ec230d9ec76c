"""Adoption from the platform's own table: each sweep tracks what is in flight there.

With a binding (HOST_TABLE, `db.Connection.host`), every row of the host's table whose
status column holds its spelling of `training` and whose training id we do not know yet
is tracked under its user id — the post-mortem's `getAllInProgressTrainings()`, done for
the platform, with no code on its side. One statement finds and inserts them
(`host_rows`), at most `limit` per sweep; the webhooks already waiting for them in the
inbox (`pending`) are applied at once. A new row is due at once (its `next_check_at` is
its insert time), so the sweep that adopted it checks it at Replicate, and the insert
trigger wakes every worker's listener (`wakeup`) too.

A binding this role cannot read (no SELECT privilege, a table dropped since the start
check) fails only this step: it is logged and counted, and the sweep goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg2

from webhook_sync import db, host_rows, inbox, metrics
from webhook_sync.logs import log_event

# New host rows tracked per sweep: the rest wait for the next one (one interval later).
MAX_PER_SWEEP = 1000
HOW = "host_table"


@dataclass(frozen=True)
class HostAdoption:
    """What one adoption from the host's table did."""

    adopted: int = 0
    pending_applied: int = 0


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
            adopted = host_rows.insert_in_flight_trainings(conn, limit)
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
    if not adopted:
        return HostAdoption()
    metrics.count_adoptions(HOW, len(adopted))
    for row in adopted:
        log_event(
            "training_adopted",
            logging.DEBUG,
            training_id=row["id"],
            user_id=row["user_id"],
            how=HOW,
        )
    ids = [row["id"] for row in adopted]
    pending_applied = inbox.apply_pending_each(conn, ids)
    log_event(
        "training_adopted_from_host",
        table=host.qualified_table,
        count=len(adopted),
        pending_applied=pending_applied,
        limited=len(adopted) >= limit,
    )
    return HostAdoption(adopted=len(adopted), pending_applied=pending_applied)
