"""The outbox's tables, one function per query: the endpoints (synced from NOTIFY_URLS), the
notifications the funnel queues (`db.queue_notifications_cte`), their claims, results,
retries and retention. Each takes conn first and never commits.

A notification is `pending` until its endpoint answers 2xx (`delivered`) or it is given up
(`dead`: older than NOTIFY_MAX_AGE after a failed attempt, or its endpoint answered 410).
A claim leases rows by the database clock and skips locked ones, so any number of
notifiers deliver each row once at a time; a row is claimable only while no earlier row
of the same training and endpoint is pending, which keeps each pair in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from psycopg2 import sql

from webhook_sync import db

NOTIFICATION_COLUMNS = (
    "id",
    "event_id",
    "training_id",
    "event_type",
    "endpoint",
    "status",
    "attempts",
    "created_at",
    "next_attempt_at",
    "last_attempt_at",
    "last_status_code",
    "last_error",
    "delivered_at",
)


# --- endpoints -----------------------------------------------------------------------

_UPSERT_ENDPOINTS = (
    "INSERT INTO {schema}.notification_endpoints (url, events)"
    " SELECT url, %(events)s::text[] FROM unnest(%(urls)s::text[]) AS u(url)"
    " ON CONFLICT (url) DO UPDATE SET events = EXCLUDED.events, configured = true,"
    " updated_at = now()"
    " WHERE (notification_endpoints.events, notification_endpoints.configured)"
    " IS DISTINCT FROM (EXCLUDED.events, true)"
)
_UNCONFIGURE_ENDPOINTS = (
    "UPDATE {schema}.notification_endpoints SET configured = false, updated_at = now()"
    " WHERE configured AND NOT url = ANY(%(urls)s::text[])"
)


def sync_endpoints(conn: db.Connection, urls: Sequence[str], events: Sequence[str]) -> None:
    """Make the endpoints table say what NOTIFY_URLS and NOTIFY_EVENTS say: the funnel
    queues for configured endpoints only. An endpoint left out keeps its row (its
    notifications name it, and the pending ones are still delivered); a disabled one
    stays disabled."""
    params = {"urls": list(urls), "events": list(events)}
    db.execute(conn, _UPSERT_ENDPOINTS, params)
    db.execute(conn, _UNCONFIGURE_ENDPOINTS, params)


_SELECT_ENDPOINTS = (
    "SELECT id, url, events, configured, disabled_at, disabled_reason"
    " FROM {schema}.notification_endpoints ORDER BY id"
)


def select_endpoints(conn: db.Connection) -> list[db.Row]:
    """Every endpoint ever configured, with its state."""
    return db.rows(conn, _SELECT_ENDPOINTS)


_DISABLE_ENDPOINT = (
    "WITH disabled AS (UPDATE {schema}.notification_endpoints"
    " SET disabled_at = now(), disabled_reason = %(reason)s, updated_at = now()"
    " WHERE id = %(id)s RETURNING id)"
    " UPDATE {schema}.notifications SET status = {n_dead}, last_error = %(reason)s,"
    " lease_owner = NULL, lease_expires_at = NULL"
    " WHERE endpoint_id IN (SELECT id FROM disabled) AND status = {n_pending}"
)


def disable_endpoint(conn: db.Connection, endpoint_id: int, reason: str) -> int:
    """Disable an endpoint (it answered 410 Gone) and give up its pending notifications;
    return how many were given up."""
    return db.execute(conn, _DISABLE_ENDPOINT, {"id": endpoint_id, "reason": reason})


# --- delivery ------------------------------------------------------------------------

_CLAIM_NOTIFICATIONS = (
    "WITH due AS ("
    " SELECT n.id FROM {schema}.notifications AS n"
    " JOIN {schema}.notification_endpoints AS e ON e.id = n.endpoint_id"
    " WHERE n.status = {n_pending} AND n.next_attempt_at <= now()"
    "  AND (n.lease_expires_at IS NULL OR n.lease_expires_at <= now())"
    "  AND e.disabled_at IS NULL"
    "  AND NOT EXISTS (SELECT 1 FROM {schema}.notifications AS earlier"
    "   WHERE earlier.training_id = n.training_id AND earlier.endpoint_id = n.endpoint_id"
    "    AND earlier.status = {n_pending} AND earlier.id < n.id)"
    " ORDER BY n.next_attempt_at, n.id LIMIT %(limit)s FOR UPDATE OF n SKIP LOCKED)"
    " UPDATE {schema}.notifications AS n SET lease_owner = %(owner)s,"
    " lease_expires_at = now() + make_interval(secs => %(lease)s),"
    " attempts = n.attempts + 1, last_attempt_at = now()"
    " FROM due, {schema}.notification_endpoints AS e"
    " WHERE n.id = due.id AND e.id = n.endpoint_id"
    " RETURNING n.id, n.event_id, n.training_id, n.event_type, n.payload, n.attempts,"
    " n.created_at, n.endpoint_id, e.url"
)


def claim_notifications(
    conn: db.Connection, owner: str, limit: int, lease_seconds: float
) -> list[db.Row]:
    """Lease up to `limit` due notifications to `owner` for `lease_seconds` (database clock)
    and count the attempt: rows not leased by anyone else, of an enabled endpoint, with no
    earlier pending row of the same training and endpoint."""
    params = {"owner": owner, "limit": limit, "lease": lease_seconds}
    rows = db.rows(conn, _CLAIM_NOTIFICATIONS, params)
    return sorted(rows, key=lambda row: row["id"])


_MARK_DELIVERED = (
    "UPDATE {schema}.notifications SET status = {n_delivered}, delivered_at = clock_timestamp(),"
    " last_status_code = %(code)s, last_error = NULL, lease_owner = NULL,"
    " lease_expires_at = NULL WHERE id = %(id)s AND status = {n_pending}"
    " RETURNING extract(epoch FROM delivered_at - created_at)::float8 AS lag_seconds"
)


def mark_delivered(conn: db.Connection, notification_id: int, status_code: int) -> float | None:
    """Record a 2xx answer (whoever holds the lease: the endpoint has it either way); return
    the lag from the status change to now in seconds, or None when it was not pending."""
    rows = db.rows(conn, _MARK_DELIVERED, {"id": notification_id, "code": status_code})
    return rows[0]["lag_seconds"] if rows else None


_MARK_FAILED = (
    "UPDATE {schema}.notifications SET last_status_code = %(code)s, last_error = %(error)s,"
    " lease_owner = NULL, lease_expires_at = NULL,"
    " next_attempt_at = now() + make_interval(secs => %(delay)s),"
    " status = CASE WHEN now() - coalesce(retried_at, created_at)"
    "  >= make_interval(secs => %(max_age)s)"
    "  THEN {n_dead} ELSE {n_pending} END"
    " WHERE id = %(id)s AND status = {n_pending} AND lease_owner = %(owner)s RETURNING status"
)


def mark_failed(
    conn: db.Connection,
    notification_id: int,
    owner: str,
    *,
    status_code: int | None,
    error: str,
    retry_in_seconds: float,
    max_age_seconds: float,
) -> str | None:
    """Record a failed attempt: `dead` when the notification is older than `max_age_seconds`,
    else due again in `retry_in_seconds`. Only while `owner` still holds the lease; returns
    the new status, or None when the lease was lost."""
    rows = db.rows(
        conn,
        _MARK_FAILED,
        {
            "id": notification_id,
            "owner": owner,
            "code": status_code,
            "error": error,
            "delay": retry_in_seconds,
            "max_age": max_age_seconds,
        },
    )
    return rows[0]["status"] if rows else None


# Measured by the database clock, which also judges what is due: a notifier whose own
# clock runs ahead would otherwise wake early and find nothing, again and again.
_SELECT_SECONDS_TO_NEXT_ATTEMPT = (
    "SELECT extract(epoch FROM min(next_attempt_at) - now())::float8"
    " FROM {schema}.notifications WHERE status = {n_pending} AND next_attempt_at > now()"
)


def select_seconds_to_next_attempt(conn: db.Connection) -> float | None:
    """Seconds until the next retry in the future falls due (None: none scheduled)."""
    return db.scalar(conn, _SELECT_SECONDS_TO_NEXT_ATTEMPT)


def listen(conn: db.Connection) -> None:
    """Subscribe an autocommit connection to the funnel's NOTIFY channel (sent with every
    status change, after its notifications are queued in the same transaction)."""
    with conn.cursor() as cur:
        cur.execute(sql.SQL("LISTEN {}").format(sql.Identifier(db.notify_channel(conn.schema))))


# --- the operator's tools --------------------------------------------------------------

_SELECT_NOTIFICATIONS = (
    "SELECT n.id, n.event_id, n.training_id, n.event_type, e.url AS endpoint, n.status,"
    " n.attempts, n.created_at, n.next_attempt_at, n.last_attempt_at, n.last_status_code,"
    " n.last_error, n.delivered_at"
    " FROM {schema}.notifications AS n"
    " JOIN {schema}.notification_endpoints AS e ON e.id = n.endpoint_id"
    " WHERE (%(status)s::text IS NULL OR n.status = %(status)s::text)"
    "  AND (%(training_id)s::text IS NULL OR n.training_id = %(training_id)s::text)"
    " ORDER BY n.id DESC LIMIT %(limit)s"
)


def select_notifications(
    conn: db.Connection,
    *,
    status: str | None = None,
    training_id: str | None = None,
    limit: int = 100,
) -> list[db.Row]:
    """The newest notifications matching every given filter."""
    params = {"status": status, "training_id": training_id, "limit": limit}
    return db.rows(conn, _SELECT_NOTIFICATIONS, params)


# A retried row is due at once and its NOTIFY_MAX_AGE counts from the retry; the endpoint
# of a row retried after a 410 is enabled again (the operator asked for it).
_RETRY_NOTIFICATIONS = (
    "WITH retried AS (UPDATE {schema}.notifications SET status = {n_pending},"
    " next_attempt_at = now(), retried_at = now(), lease_owner = NULL,"
    " lease_expires_at = NULL"
    " WHERE CASE WHEN %(id)s::bigint IS NOT NULL THEN id = %(id)s::bigint"
    "  ELSE status = {n_dead} AND (%(since)s::timestamptz IS NULL"
    "   OR coalesce(last_attempt_at, created_at) >= %(since)s::timestamptz) END"
    " RETURNING id, endpoint_id),"
    " enabled AS (UPDATE {schema}.notification_endpoints SET disabled_at = NULL,"
    " disabled_reason = NULL, updated_at = now()"
    " WHERE id IN (SELECT endpoint_id FROM retried) AND disabled_at IS NOT NULL RETURNING url)"
    " SELECT (SELECT count(*) FROM retried) AS retried,"
    " (SELECT array_agg(url) FROM enabled) AS enabled"
)


def retry_notifications(
    conn: db.Connection,
    *,
    notification_id: int | None = None,
    dead_since: datetime | None = None,
) -> tuple[int, list[str]]:
    """Make one notification (by id, whatever its status: a delivered one is sent again), or
    every dead one (last attempted at or after `dead_since`), due now; return how many,
    and the URLs of the endpoints this enabled again."""
    params = {"id": notification_id, "since": dead_since}
    row = db.rows(conn, _RETRY_NOTIFICATIONS, params)[0]
    return row["retried"], list(row["enabled"] or [])


# A bounded batch keeps each transaction small; pending rows are never pruned.
_DELETE_FINISHED_NOTIFICATIONS = (
    "DELETE FROM {schema}.notifications WHERE id IN ("
    " SELECT id FROM {schema}.notifications WHERE created_at < %(cutoff)s"
    " AND status <> {n_pending} ORDER BY created_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
)


def delete_finished_notifications(conn: db.Connection, cutoff: datetime, limit: int) -> int:
    """Delete up to `limit` delivered or dead notifications created before `cutoff`."""
    return db.execute(conn, _DELETE_FINISHED_NOTIFICATIONS, {"cutoff": cutoff, "limit": limit})
