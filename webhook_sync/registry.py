"""The statements registration needs (one function per query, conn first, never commits):
trainings seen and not ours, discovery's high-water mark, pending events of untracked
trainings, the insert channel, and the API's pages. Templates are rendered by `db.render`
(db's per-schema cache), like every other statement of ours."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

from webhook_sync import db
from webhook_sync.config import DEFAULT_DATABASE_SCHEMA
from webhook_sync.vocabulary import Source

# The channel the insert trigger of 0004 notifies, the training's id as payload.
DEFAULT_INSERT_CHANNEL = "training_inserted"


def insert_channel(schema: str) -> str:
    """The channel a new training row is announced on: `training_inserted` for the default
    schema, `<schema>_training_inserted` for any other (as the trigger computes it)."""
    if schema == DEFAULT_DATABASE_SCHEMA:
        return DEFAULT_INSERT_CHANNEL
    return f"{schema}_{DEFAULT_INSERT_CHANNEL}"


def listen_for_inserts(conn: db.Connection) -> None:
    """LISTEN on this install's insert channel (an autocommit connection)."""
    with conn.cursor() as cur:
        cur.execute(f'LISTEN "{insert_channel(conn.schema)}"')


# --- trainings seen and not ours ------------------------------------------------------

_SELECT_KNOWN_IDS = (
    "SELECT id, false AS foreign FROM {schema}.trainings WHERE id = ANY(%(ids)s)"
    " UNION ALL"
    " SELECT id, true FROM {schema}.foreign_trainings WHERE id = ANY(%(ids)s)"
)


def select_known_ids(conn: db.Connection, ids: Sequence[str]) -> tuple[set[str], set[str]]:
    """Of these ids, (those we track, those we looked at and found not ours)."""
    tracked: set[str] = set()
    foreign: set[str] = set()
    for row in db.rows(conn, _SELECT_KNOWN_IDS, {"ids": list(ids)}):
        (foreign if row["foreign"] else tracked).add(row["id"])
    return tracked, foreign


_INSERT_FOREIGN_TRAINING = (
    "INSERT INTO {schema}.foreign_trainings (id, reason, replicate_created_at)"
    " VALUES (%(id)s, %(reason)s, %(created)s) ON CONFLICT (id) DO NOTHING"
)


def insert_foreign_training(
    conn: db.Connection, training_id: str, reason: str, replicate_created_at: datetime | None
) -> None:
    """Remember a training that is not ours, so it is never fetched for that again."""
    params = {"id": training_id, "reason": reason, "created": replicate_created_at}
    db.execute(conn, _INSERT_FOREIGN_TRAINING, params)


_DELETE_FOREIGN_SEEN_BEFORE = (
    "DELETE FROM {schema}.foreign_trainings WHERE id IN ("
    " SELECT id FROM {schema}.foreign_trainings WHERE seen_at < %(cutoff)s"
    " ORDER BY seen_at LIMIT %(limit)s)"
)


def delete_foreign_seen_before(conn: db.Connection, cutoff: datetime, limit: int) -> int:
    """Forget up to `limit` foreign trainings seen before `cutoff`; return how many."""
    params = {"cutoff": cutoff, "limit": limit}
    return db.execute(conn, _DELETE_FOREIGN_SEEN_BEFORE, params)


# --- discovery's high-water mark and its lock -----------------------------------------


def discovery_lock_key(schema: str) -> int:
    """The session advisory lock that lets one discovery of an install run at a time."""
    digest = hashlib.sha256(f"webhook-sync discovery {schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def try_lock_discovery(conn: db.Connection) -> bool:
    """Take the discovery lock for this session unless another holds it (no wait)."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_try_advisory_lock(%s)", (discovery_lock_key(conn.schema),))
        return bool(cur.fetchone()[0])


def unlock_discovery(conn: db.Connection) -> None:
    """Release the discovery lock this session holds."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock(%s)", (discovery_lock_key(conn.schema),))


_SELECT_DISCOVERY_MARK = "SELECT newest_created_at FROM {schema}.discovery_marks WHERE id"


def select_discovery_mark(conn: db.Connection) -> datetime | None:
    """Replicate's creation time of the newest training any discovery listed, or None."""
    rows = db.rows(conn, _SELECT_DISCOVERY_MARK, {})
    return rows[0]["newest_created_at"] if rows else None


_UPSERT_DISCOVERY_MARK = (
    "INSERT INTO {schema}.discovery_marks (id, newest_created_at) VALUES (true, %(newest)s)"
    " ON CONFLICT (id) DO UPDATE SET discovered_at = now(), newest_created_at ="
    " GREATEST(discovery_marks.newest_created_at, EXCLUDED.newest_created_at)"
)


def update_discovery_mark(conn: db.Connection, newest_created_at: datetime | None) -> None:
    """Move the mark forward to `newest_created_at` (never back)."""
    db.execute(conn, _UPSERT_DISCOVERY_MARK, {"newest": newest_created_at})


# --- the inbox's untracked trainings --------------------------------------------------

_SELECT_UNTRACKED_PENDING = (
    "SELECT DISTINCT ON (e.training_id) e.training_id, e.payload"
    " FROM {schema}.webhook_events AS e"
    " WHERE e.outcome = {pending} AND e.training_id IS NOT NULL AND e.source = %(source)s"
    " AND NOT EXISTS (SELECT 1 FROM {schema}.trainings AS t WHERE t.id = e.training_id)"
    " AND NOT EXISTS (SELECT 1 FROM {schema}.foreign_trainings AS f"
    "  WHERE f.id = e.training_id)"
    " ORDER BY e.training_id, e.received_at DESC LIMIT %(limit)s"
)


def select_untracked_pending(conn: db.Connection, limit: int) -> list[db.Row]:
    """Untracked trainings with verified deliveries waiting and not yet judged foreign:
    each one's newest payload (`training_id`, `payload`). Replays are left out: their
    payload may come from a file nobody signed."""
    return db.rows(conn, _SELECT_UNTRACKED_PENDING, {"limit": limit, "source": Source.WEBHOOK})


# --- the insert wake-up ---------------------------------------------------------------

_UPDATE_DUE_NOW = (
    "UPDATE {schema}.trainings SET next_check_at = now()"
    " WHERE id = ANY(%(ids)s) AND training_status = {training} AND next_check_at > now()"
)


def update_due_now(conn: db.Connection, training_ids: Sequence[str]) -> int:
    """Make these trainings (still in `training`) due for a check now; return how many moved."""
    return db.execute(conn, _UPDATE_DUE_NOW, {"ids": list(training_ids)})


# --- the API's pages ------------------------------------------------------------------

_SELECT_TRAINING_PAGE = (
    "SELECT {columns} FROM {schema}.trainings"
    " WHERE (%(user_id)s::text IS NULL OR user_id = %(user_id)s::text)"
    " AND (%(status)s::text IS NULL OR training_status = %(status)s::text)"
    " AND (%(after_created)s::timestamptz IS NULL"
    "  OR (created_at, id) < (%(after_created)s::timestamptz, %(after_id)s::text))"
    " ORDER BY created_at DESC, id DESC LIMIT %(limit)s"
)


def select_training_page(
    conn: db.Connection,
    *,
    user_id: str | None,
    status: str | None,
    after: tuple[datetime, str] | None,
    limit: int,
) -> list[db.Row]:
    """Up to `limit` rows, newest first, after the (created_at, id) position `after`."""
    params = {
        "user_id": user_id,
        "status": status,
        "after_created": after[0] if after else None,
        "after_id": after[1] if after else None,
        "limit": limit,
    }
    return db.rows(conn, _SELECT_TRAINING_PAGE, params)
