"""Connections and one function per query; each takes conn first and never commits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from webhook_sync import errors
from webhook_sync.vocabulary import UNFINISHED_EVENT_OUTCOMES, Source

Row = dict[str, Any]
Connection = psycopg2.extensions.connection

# The columns the host platform reads, in display order (`status --json` uses these names).
TRAINING_COLUMNS = (
    "id",
    "user_id",
    "training_status",
    "replicate_status",
    "destination",
    "version_id",
    "weights_url",
    "error",
    "started_at",
    "completed_at",
    "created_at",
    "updated_at",
    "updated_by",
    "next_check_at",
    "last_checked_at",
    "check_failures",
    "needs_attention",
)
_COLUMNS_SQL = ", ".join(TRAINING_COLUMNS)
_LOCAL_HOSTS = {"", "localhost", "127.0.0.1", "::1"}
NOTIFY_CHANNEL = "training_status"
# Record an inbox event's outcome only while no other delivery of it has finished it, so
# that of two identical deliveries racing, exactly one reports the change it made.
_MARK_UNFINISHED_EVENT = (
    "UPDATE webhook_events SET outcome = %(event_outcome)s, error = NULL,"
    " attempts = attempts + 1, processed_at = now()"
    " WHERE webhook_id = %(event_id)s AND outcome = ANY(%(unfinished_outcomes)s)"
)


def connection_params(
    url: str, application_name: str, statement_timeout_ms: int = 10_000
) -> dict[str, Any]:
    """Build psycopg2.connect() keyword arguments: timeouts, keepalives and TLS off-box."""
    params: dict[str, Any] = {
        "dsn": url,
        "connect_timeout": 5,
        "application_name": application_name,
        "keepalives": 1,
        "keepalives_idle": 30,
        "keepalives_interval": 10,
        "keepalives_count": 3,
        "options": f"-c statement_timeout={int(statement_timeout_ms)}",
    }
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or ""])[0]
    is_local = host in _LOCAL_HOSTS or host.startswith("/")
    if not is_local and "sslmode" not in query:
        params["sslmode"] = "require"
    return params


def connect(
    url: str, application_name: str = "webhook-sync", statement_timeout_ms: int = 10_000
) -> Connection:
    """Open a connection; DatabaseUnavailableError (without the URL) when that fails."""
    try:
        return psycopg2.connect(**connection_params(url, application_name, statement_timeout_ms))
    except psycopg2.OperationalError as exc:
        raise errors.DatabaseUnavailableError(
            f"cannot connect to the database: {first_line(exc)}"
        ) from exc


def first_line(exc: BaseException) -> str:
    """The first line of a driver error, which names the cause without the connection string."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dict_cursor(conn: Connection) -> psycopg2.extras.RealDictCursor:
    return conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor)


def select_now(conn: Connection) -> datetime:
    """The database clock."""
    with conn.cursor() as cur:
        cur.execute("SELECT now()")
        return cur.fetchone()[0]


# --- trainings -------------------------------------------------------------------------


def select_training(conn: Connection, training_id: str) -> Row | None:
    """One training row, or None."""
    with _dict_cursor(conn) as cur:
        cur.execute(f"SELECT {_COLUMNS_SQL} FROM trainings WHERE id = %(id)s", {"id": training_id})
        row = cur.fetchone()
        return dict(row) if row else None


def select_trainings(
    conn: Connection,
    ids: Sequence[str] | None = None,
    *,
    stuck_before: datetime | None = None,
    limit: int = 1000,
) -> list[Row]:
    """Rows by id (all when ids is None), or those in `training` created before stuck_before."""
    conditions = ["TRUE"]
    params: dict[str, Any] = {"limit": limit}
    if ids is not None:
        conditions.append("id = ANY(%(ids)s)")
        params["ids"] = list(ids)
    if stuck_before is not None:
        conditions.append("training_status = 'training' AND created_at < %(stuck_before)s")
        params["stuck_before"] = stuck_before
    with _dict_cursor(conn) as cur:
        cur.execute(
            f"SELECT {_COLUMNS_SQL} FROM trainings WHERE {' AND '.join(conditions)}"
            " ORDER BY created_at, id LIMIT %(limit)s",
            params,
        )
        return [dict(row) for row in cur.fetchall()]


def insert_training(
    conn: Connection, training_id: str, user_id: str, destination: str | None
) -> Row | None:
    """Insert a training in the `training` state; None when the id already exists."""
    with _dict_cursor(conn) as cur:
        cur.execute(
            "INSERT INTO trainings (id, user_id, destination, training_status, updated_by)"
            " VALUES (%(id)s, %(user_id)s, %(destination)s, 'training', 'track')"
            f" ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS_SQL}",
            {"id": training_id, "user_id": user_id, "destination": destination},
        )
        row = cur.fetchone()
        return dict(row) if row else None


def update_status_if(
    conn: Connection,
    *,
    training_id: str,
    expected_replicate_status: str | None,
    expected_training_status: str,
    replicate_status: str | None,
    training_status: str,
    fields: Mapping[str, Any],
    source: str,
    status_changed: bool,
    reason: str,
    replicate_completed_at: datetime | None,
    event_id: str | None = None,
    event_outcome: str | None = None,
) -> tuple[Row, bool] | None:
    """Compare-and-set a training's status and fields; log and NOTIFY a status change and
    record the inbox event's outcome (if unfinished) in the same statement.

    Returns (row, event_recorded), or None when the row no longer holds the expected status
    (a racing writer changed it first)."""
    assignments = "".join(f", {column} = %(f_{column})s" for column in fields)
    params = {
        "id": training_id,
        "expected_replicate_status": expected_replicate_status,
        "expected_training_status": expected_training_status,
        "replicate_status": replicate_status,
        "training_status": training_status,
        "source": source,
        "status_changed": status_changed,
        "reason": reason,
        "replicate_completed_at": replicate_completed_at,
        "channel": NOTIFY_CHANNEL,
        "event_id": event_id,
        "event_outcome": event_outcome,
        "unfinished_outcomes": list(UNFINISHED_EVENT_OUTCOMES),
        **{f"f_{column}": value for column, value in fields.items()},
    }
    with _dict_cursor(conn) as cur:
        cur.execute(
            f"""
            WITH updated AS (
                UPDATE trainings
                SET replicate_status = %(replicate_status)s,
                    training_status = %(training_status)s,
                    updated_at = now(),
                    updated_by = %(source)s{assignments}
                WHERE id = %(id)s
                  AND replicate_status IS NOT DISTINCT FROM %(expected_replicate_status)s
                  AND training_status = %(expected_training_status)s
                RETURNING {_COLUMNS_SQL}
            ), logged AS (
                INSERT INTO training_transitions (
                    training_id, source, outcome, from_replicate_status, to_replicate_status,
                    from_training_status, to_training_status, reason, replicate_completed_at)
                SELECT id, %(source)s, 'applied', %(expected_replicate_status)s,
                       replicate_status, %(expected_training_status)s, training_status,
                       %(reason)s, %(replicate_completed_at)s
                FROM updated WHERE %(status_changed)s
            ), notified AS (
                SELECT pg_notify(%(channel)s, json_build_object(
                    'id', id, 'training_status', training_status,
                    'replicate_status', replicate_status)::text)
                FROM updated WHERE %(status_changed)s
            ), marked AS (
                {_MARK_UNFINISHED_EVENT} AND EXISTS (SELECT 1 FROM updated) RETURNING 1
            )
            SELECT updated.*, (SELECT count(*) FROM notified) AS notified,
                   (SELECT count(*) FROM marked) AS event_marked
            FROM updated
            """,
            params,
        )
        row = cur.fetchone()
        if row is None:
            return None
        result = dict(row)
        result.pop("notified")
        event_recorded = event_id is None or result.pop("event_marked") > 0
        result.pop("event_marked", None)
        return result, event_recorded


def insert_refused_transition(
    conn: Connection,
    *,
    training_id: str,
    source: str,
    outcome: str,
    from_replicate_status: str | None,
    to_replicate_status: str,
    training_status: str,
    reason: str,
    event_id: str | None = None,
) -> bool:
    """Record a refused report (a regression or a contradiction) without touching the row,
    and the inbox event's outcome (if unfinished); False when the event was already done."""
    with conn.cursor() as cur:
        cur.execute(
            "WITH logged AS (INSERT INTO training_transitions (training_id, source, outcome,"
            " from_replicate_status, to_replicate_status, from_training_status,"
            " to_training_status, reason)"
            " VALUES (%(id)s, %(source)s, %(outcome)s, %(from)s, %(to)s,"
            " %(training_status)s, %(training_status)s, %(reason)s)),"
            f" marked AS ({_MARK_UNFINISHED_EVENT} RETURNING 1)"
            " SELECT count(*) FROM marked",
            {
                "id": training_id,
                "source": source,
                "outcome": outcome,
                "from": from_replicate_status,
                "to": to_replicate_status,
                "training_status": training_status,
                "reason": reason,
                "event_id": event_id,
                "event_outcome": outcome,
                "unfinished_outcomes": list(UNFINISHED_EVENT_OUTCOMES),
            },
        )
        return event_id is None or cur.fetchone()[0] > 0


def select_transitions(conn: Connection, training_id: str) -> list[Row]:
    """Every recorded decision about one training, oldest first."""
    with _dict_cursor(conn) as cur:
        cur.execute(
            "SELECT id, training_id, source, outcome, from_replicate_status,"
            " to_replicate_status, from_training_status, to_training_status, reason,"
            " replicate_completed_at, created_at"
            " FROM training_transitions WHERE training_id = %(id)s ORDER BY id",
            {"id": training_id},
        )
        return [dict(row) for row in cur.fetchall()]


# --- the poller ------------------------------------------------------------------------

# What a sweep needs of a claimed row: `created_at` bounds the list walk.
_CLAIMED_COLUMNS = (
    "id, created_at, replicate_created_at, next_check_at, check_failures, not_found_count"
)


def claim_due_trainings(
    conn: Connection,
    *,
    owner: str,
    lease_seconds: float,
    due_before: datetime,
    limit: int,
    ids: Sequence[str] | None = None,
) -> list[Row]:
    """Lease up to `limit` trainings (among `ids`, if given) in `training` whose check is
    due (oldest check first) and whose lease is free or expired, measured by the database
    clock; skips rows another sweep is claiming right now."""
    among = " AND id = ANY(%(ids)s)" if ids is not None else ""
    with _dict_cursor(conn) as cur:
        cur.execute(
            "UPDATE trainings SET lease_owner = %(owner)s,"
            " lease_expires_at = now() + make_interval(secs => %(lease)s)"
            " WHERE id IN ("
            "  SELECT id FROM trainings"
            "  WHERE training_status = 'training' AND next_check_at <= %(due_before)s"
            f"    AND (lease_expires_at IS NULL OR lease_expires_at < now()){among}"
            "  ORDER BY next_check_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
            f" RETURNING {_CLAIMED_COLUMNS}",
            {
                "owner": owner,
                "lease": lease_seconds,
                "due_before": due_before,
                "limit": limit,
                "ids": list(ids or ()),
            },
        )
        return sorted((dict(row) for row in cur.fetchall()), key=lambda r: r["next_check_at"])


def select_due_summary(
    conn: Connection, *, due_before: datetime, margin_seconds: float
) -> tuple[int, datetime | None]:
    """How many unleased trainings in `training` are due, and the oldest Replicate creation
    time among them (our insert time less `margin_seconds` where it is not known yet)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), min(COALESCE(replicate_created_at,"
            "  created_at - make_interval(secs => %(margin)s)))"
            " FROM trainings WHERE training_status = 'training'"
            " AND next_check_at <= %(due_before)s"
            " AND (lease_expires_at IS NULL OR lease_expires_at < now())",
            {"due_before": due_before, "margin": margin_seconds},
        )
        count, bound = cur.fetchone()
        return count, bound


def count_due_trainings(conn: Connection) -> int:
    """How many trainings in `training` are due for a check and not leased."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM trainings WHERE training_status = 'training'"
            " AND next_check_at <= now()"
            " AND (lease_expires_at IS NULL OR lease_expires_at < now())"
        )
        return cur.fetchone()[0]


def update_checked(
    conn: Connection,
    training_id: str,
    *,
    owner: str | None,
    next_check_at: datetime,
    replicate_created_at: datetime | None = None,
) -> bool:
    """After a successful check: schedule the next one, reset the failure counts, keep
    Replicate's creation time and free the lease, only while `owner` still holds it (None:
    only while nobody does)."""
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE trainings SET last_checked_at = now(),"
            " next_check_at = %(next_check_at)s,"
            " check_failures = 0, not_found_count = 0, needs_attention = NULL,"
            " replicate_created_at = COALESCE(%(created)s, replicate_created_at),"
            " lease_owner = NULL, lease_expires_at = NULL"
            " WHERE id = %(id)s AND lease_owner IS NOT DISTINCT FROM %(owner)s",
            {
                "id": training_id,
                "owner": owner,
                "next_check_at": next_check_at,
                "created": replicate_created_at,
            },
        )
        return cur.rowcount > 0


def update_check_failed(
    conn: Connection,
    training_id: str,
    *,
    owner: str | None,
    retry_base_seconds: float,
    retry_cap_seconds: float,
    not_found: bool,
    attention_after: int,
    attention: str,
) -> Row | None:
    """After a failed check: count it, schedule a retry with exponential backoff, set
    `needs_attention` after `attention_after` 404s in a row, and free the lease."""
    with _dict_cursor(conn) as cur:
        cur.execute(
            "UPDATE trainings SET last_checked_at = now(),"
            " check_failures = check_failures + 1,"
            " not_found_count = not_found_count + CASE WHEN %(not_found)s THEN 1 ELSE 0 END,"
            " needs_attention = CASE WHEN %(not_found)s"
            "   AND not_found_count + 1 >= %(attention_after)s"
            "   THEN %(attention)s ELSE needs_attention END,"
            " next_check_at = now() + make_interval(secs => least(%(cap)s,"
            "   %(base)s * power(2, least(check_failures, 20))::float8)),"
            " lease_owner = NULL, lease_expires_at = NULL"
            " WHERE id = %(id)s AND lease_owner IS NOT DISTINCT FROM %(owner)s"
            " RETURNING id, check_failures, not_found_count, needs_attention, next_check_at",
            {
                "id": training_id,
                "owner": owner,
                "not_found": not_found,
                "attention_after": attention_after,
                "attention": attention,
                "base": retry_base_seconds,
                "cap": retry_cap_seconds,
            },
        )
        row = cur.fetchone()
        return dict(row) if row else None


def update_lease_expiry(
    conn: Connection, owner: str, training_ids: Sequence[str], lease_seconds: float
) -> int:
    """Extend the leases `owner` still holds on these trainings to `lease_seconds` from now
    (database clock); return how many."""
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE trainings SET lease_expires_at = now() + make_interval(secs => %(lease)s)"
            " WHERE id = ANY(%(ids)s) AND lease_owner = %(owner)s",
            {"ids": list(training_ids), "owner": owner, "lease": lease_seconds},
        )
        return cur.rowcount


def release_leases(conn: Connection, owner: str, training_ids: Sequence[str]) -> int:
    """Hand back the leases `owner` holds on these trainings, leaving them due; return how many."""
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE trainings SET lease_owner = NULL, lease_expires_at = NULL"
            " WHERE id = ANY(%(ids)s) AND lease_owner = %(owner)s",
            {"ids": list(training_ids), "owner": owner},
        )
        return cur.rowcount


def select_tracked_pending_training_ids(conn: Connection, limit: int) -> list[str]:
    """Tracked trainings that still have inbox events waiting (`pending`) to be applied."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT DISTINCT e.training_id FROM webhook_events AS e"
            " JOIN trainings AS t ON t.id = e.training_id"
            " WHERE e.outcome = 'pending' LIMIT %(limit)s",
            {"limit": limit},
        )
        return [training_id for (training_id,) in cur.fetchall()]


# --- the inbox -------------------------------------------------------------------------


def insert_event(
    conn: Connection,
    *,
    webhook_id: str,
    training_id: str | None,
    payload: Mapping[str, Any],
    signed_at: datetime | None,
    source: Source = Source.WEBHOOK,
) -> bool:
    """Store a delivery in the inbox; False when that webhook-id is already there."""
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO webhook_events (webhook_id, training_id, source, signed_at, payload)"
            " VALUES (%(webhook_id)s, %(training_id)s, %(source)s, %(signed_at)s, %(payload)s)"
            " ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id",
            {
                "webhook_id": webhook_id,
                "training_id": training_id,
                "source": source,
                "signed_at": signed_at,
                "payload": psycopg2.extras.Json(payload),
            },
        )
        return cur.fetchone() is not None


def insert_event_returning_training(
    conn: Connection,
    *,
    webhook_id: str,
    training_id: str,
    payload: Mapping[str, Any],
    signed_at: datetime | None,
    source: Source = Source.WEBHOOK,
) -> tuple[bool, str | None, Row | None]:
    """Store a delivery and read its training in one round trip.

    Returns (inserted, outcome of the already stored event or None, training row or None).
    """
    with _dict_cursor(conn) as cur:
        cur.execute(
            "WITH inserted AS (INSERT INTO webhook_events"
            " (webhook_id, training_id, source, signed_at, payload)"
            " VALUES (%(webhook_id)s, %(training_id)s, %(source)s, %(signed_at)s, %(payload)s)"
            " ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id)"
            " SELECT (SELECT count(*) FROM inserted) AS inserted_count,"
            " (SELECT outcome FROM webhook_events WHERE webhook_id = %(webhook_id)s)"
            f" AS stored_outcome, {', '.join('t.' + c for c in TRAINING_COLUMNS)}"
            " FROM (SELECT 1) AS one LEFT JOIN trainings AS t ON t.id = %(training_id)s",
            {
                "webhook_id": webhook_id,
                "training_id": training_id,
                "source": source,
                "signed_at": signed_at,
                "payload": psycopg2.extras.Json(payload),
            },
        )
        result = dict(cur.fetchone())
    inserted = result.pop("inserted_count") > 0
    stored_outcome = result.pop("stored_outcome")
    return inserted, stored_outcome, (result if result["id"] is not None else None)


def mark_event_if_unfinished(conn: Connection, webhook_id: str, outcome: str) -> bool:
    """Record an inbox event's outcome unless another delivery already finished it."""
    with conn.cursor() as cur:
        cur.execute(
            f"{_MARK_UNFINISHED_EVENT} RETURNING 1",
            {
                "event_id": webhook_id,
                "event_outcome": outcome,
                "unfinished_outcomes": list(UNFINISHED_EVENT_OUTCOMES),
            },
        )
        return cur.fetchone() is not None


def select_event(conn: Connection, webhook_id: str, *, for_update: bool = False) -> Row | None:
    """One inbox row (optionally locked against a concurrent processor), or None."""
    lock = " FOR UPDATE" if for_update else ""
    with _dict_cursor(conn) as cur:
        cur.execute(
            "SELECT webhook_id, training_id, source, received_at, signed_at, payload, outcome,"
            f" error, attempts, processed_at FROM webhook_events WHERE webhook_id = %(id)s{lock}",
            {"id": webhook_id},
        )
        row = cur.fetchone()
        return dict(row) if row else None


def update_event_outcome(
    conn: Connection, webhook_id: str, outcome: str, error: str | None = None
) -> None:
    """Record what processing an inbox event did (and the error, when it failed)."""
    with conn.cursor() as cur:
        cur.execute(
            "UPDATE webhook_events SET outcome = %(outcome)s, error = %(error)s,"
            " attempts = attempts + 1, processed_at = now() WHERE webhook_id = %(id)s",
            {"id": webhook_id, "outcome": outcome, "error": error},
        )


def select_pending_events(conn: Connection, training_ids: Iterable[str]) -> list[Row]:
    """Inbox events waiting for these trainings to be tracked, oldest first, locked."""
    with _dict_cursor(conn) as cur:
        cur.execute(
            "SELECT webhook_id, training_id, payload FROM webhook_events"
            " WHERE training_id = ANY(%(ids)s) AND outcome = 'pending'"
            " ORDER BY received_at, webhook_id FOR UPDATE SKIP LOCKED",
            {"ids": list(training_ids)},
        )
        return [dict(row) for row in cur.fetchall()]


# --- the operator's tools: events, prune, doctor ---------------------------------------

EVENT_COLUMNS = (
    "webhook_id",
    "training_id",
    "source",
    "received_at",
    "signed_at",
    "reported_status",
    "outcome",
    "error",
    "attempts",
    "processed_at",
)


def select_events(
    conn: Connection,
    *,
    training_id: str | None = None,
    outcome: str | None = None,
    received_since: datetime | None = None,
    received_before: datetime | None = None,
    limit: int | None = 100,
    newest_first: bool = True,
) -> list[Row]:
    """Inbox events matching every given filter, with the status each one reported."""
    conditions = ["TRUE"]
    params: dict[str, Any] = {
        "training_id": training_id,
        "outcome": outcome,
        "since": received_since,
        "before": received_before,
        "limit": limit,
    }
    if training_id is not None:
        conditions.append("training_id = %(training_id)s")
    if outcome is not None:
        conditions.append("outcome = %(outcome)s")
    if received_since is not None:
        conditions.append("received_at >= %(since)s")
    if received_before is not None:
        conditions.append("received_at < %(before)s")
    order = "DESC" if newest_first else "ASC"
    with _dict_cursor(conn) as cur:
        cur.execute(
            "SELECT webhook_id, training_id, source, received_at, signed_at,"
            " payload->>'status' AS reported_status, outcome, error, attempts, processed_at"
            f" FROM webhook_events WHERE {' AND '.join(conditions)}"
            f" ORDER BY received_at {order}, webhook_id {order} LIMIT %(limit)s",
            params,
        )
        return [dict(row) for row in cur.fetchall()]


def count_events_by_outcome(conn: Connection) -> dict[str, int]:
    """How many inbox events hold each outcome (outcomes with none are absent)."""
    with conn.cursor() as cur:
        cur.execute("SELECT outcome, count(*) FROM webhook_events GROUP BY outcome")
        return {outcome: count for outcome, count in cur.fetchall()}


def count_events_received_before(conn: Connection, cutoff: datetime) -> int:
    """How many inbox events were received before `cutoff`."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM webhook_events WHERE received_at < %(cutoff)s",
            {"cutoff": cutoff},
        )
        return cur.fetchone()[0]


def delete_events_received_before(conn: Connection, cutoff: datetime, limit: int) -> int:
    """Delete up to `limit` inbox events received before `cutoff`; return how many."""
    with conn.cursor() as cur:
        # A bounded batch keeps each transaction (and its locks and WAL) small.
        cur.execute(
            "DELETE FROM webhook_events WHERE webhook_id IN ("
            " SELECT webhook_id FROM webhook_events WHERE received_at < %(cutoff)s"
            " ORDER BY received_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)",
            {"cutoff": cutoff, "limit": limit},
        )
        return cur.rowcount


def count_stuck_trainings(conn: Connection, created_before: datetime) -> int:
    """How many trainings are still `training` although created before `created_before`."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM trainings"
            " WHERE training_status = 'training' AND created_at < %(before)s",
            {"before": created_before},
        )
        return cur.fetchone()[0]


# --- migrations ------------------------------------------------------------------------


def select_applied_migrations(conn: Connection) -> set[str]:
    """Names of applied migrations (empty when the bookkeeping table does not exist yet)."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not cur.fetchone()[0]:
            return set()
        cur.execute("SELECT name FROM schema_migrations")
        return {name for (name,) in cur.fetchall()}
