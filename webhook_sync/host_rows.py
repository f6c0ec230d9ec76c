"""The platform's bound table (HOST_TABLE) outside the funnel: its rows in flight that we
do not track yet, tracked in one statement that also counts those we cannot track for
want of a user id; and its rows still in flight whose training we track as finished,
corrected in one statement (conn first, never commits).

The statements are composed from the connection's binding (`db.Connection.host`) with
`psycopg2.sql.Identifier` for every name, once per (schema, binding), and kept as text
like the rest of ours. Adoption only reads the host's table (an ACCESS SHARE lock, no
row locks), so the platform's own writes never wait on it; the reconciliation
locks only the rows it writes, for one short statement.
"""

from __future__ import annotations

from psycopg2 import sql

from webhook_sync import db, host_sql
from webhook_sync.host_binding import HostBinding
from webhook_sync.training import MAX_ID_LENGTH, MAX_USER_ID_LENGTH
from webhook_sync.vocabulary import AppStatus

# One read of the host's table per sweep: its rows in flight with a training id we do
# not track (`untracked`, an anti-join) are both adopted and, where they lack a user id,
# counted. The adoption is bounded: a table that holds more new rows in flight than
# `limit` gives the rest to the next sweep. The user id is read as text whatever its type
# (int, uuid, text), as our `trainings.user_id` stores it; a row without a training id or
# a user id cannot be tracked and is left alone. ON CONFLICT: a racing sweep (or the
# platform's own `track`) that inserted the row first wins, and only rows inserted here
# are returned, so each training is adopted once. `track` is the source: the row's status
# was not reported by Replicate yet. Ids longer than any other entry point takes
# (training.MAX_ID_LENGTH, MAX_USER_ID_LENGTH) are left alone: a NOTIFY carries both.
# Rows without a user id are counted, never read out: no value of the host's leaves the
# table. Each adopted row says whether an inbox event waits for it (`waiting`), so that
# only those are applied one by one. The LEFT JOIN returns the count even when nothing
# was adopted (one row, id NULL).
_INSERT_IN_FLIGHT = (
    "WITH untracked AS (SELECT h.{training_id}::text AS id, h.{user_id}::text AS user_id"
    "  FROM {host_table} AS h"
    "  WHERE h.{status} = %(in_flight)s"
    "   AND h.{training_id} IS NOT NULL AND h.{training_id}::text <> ''"
    "   AND NOT EXISTS (SELECT 1 FROM {schema}.trainings AS t"
    "    WHERE t.id = h.{training_id}::text)),"
    " adopted AS (INSERT INTO {schema}.trainings (id, user_id, training_status, updated_by)"
    "  SELECT u.id, u.user_id, {training}, {track} FROM untracked AS u"
    "  WHERE u.user_id IS NOT NULL AND u.user_id <> ''"
    "   AND length(u.id) <= {max_id} AND length(u.user_id) <= {max_user_id}"
    "  LIMIT %(limit)s"
    "  ON CONFLICT (id) DO NOTHING RETURNING id, user_id),"
    " without_user_id AS (SELECT count(*) AS n FROM untracked AS u"
    "  WHERE u.user_id IS NULL OR u.user_id = '')"
    " SELECT a.id, a.user_id, w.n AS without_user_id,"
    "  EXISTS (SELECT 1 FROM {schema}.webhook_events AS e"
    "   WHERE e.training_id = a.id AND e.outcome = {pending}) AS waiting"
    " FROM without_user_id AS w LEFT JOIN adopted AS a ON true"
)
# A host row still holding the in-flight spelling whose training we track as finished is
# written exactly as the mirror writes a status change (host_sql.assignments, from our
# row): a binding set after the training finished, a row the app (re)inserted or reset
# after our change, or a change made by a process without the binding. Driven from the
# host's rows in flight (few, and what an index on the status serves), bounded by
# trainings: `limit` of ours per statement, every in-flight host row of each written.
# Only the in-flight spelling is ever replaced: any other value (one of ours, or a state
# of the app's own such as 'deleted') is the app's, and is left alone; the WHERE is
# checked again on a row the app changes meanwhile. A finished status of ours is final
# (status.py), so what is written cannot be overtaken by a later change of ours.
_UPDATE_IN_FLIGHT_FINISHED = (
    "WITH {ours} AS (SELECT t.* FROM {schema}.trainings AS t"
    " WHERE t.training_status = ANY(%(finished)s)"
    "  AND t.id IN (SELECT h.{training_id}::text FROM {host_table} AS h"
    "   WHERE h.{status} = %(in_flight)s)"
    " LIMIT %(limit)s)"
    " UPDATE {host_table} SET {assignments} FROM {ours}"
    " WHERE {host_table}.{training_id} = {ours_id} AND {host_table}.{status} = %(in_flight)s"
    "{not_touched_since}"
    " RETURNING {ours_id}, {ours_status}"
)
# The alias of our row in the reconciliation, which host_sql.assignments reads from.
_RECONCILED = "ours"
_FINISHED = [str(status) for status in AppStatus if status != AppStatus.TRAINING]


def insert_in_flight_trainings(conn: db.Connection, limit: int) -> tuple[list[db.Row], int]:
    """Track up to `limit` rows of the bound table whose status is the host's spelling of
    `training` and whose training id we do not know yet, under their user id, in one
    statement; return the rows inserted (`id`, `user_id`, and `waiting`: whether an
    inbox event waits for it) and how many such rows have no user id (NULL or empty), so
    that adoption leaves them alone. The connection must carry a binding."""
    host = _host(conn)
    with db.dict_cursor(conn) as cur:
        cur.execute(
            _statement(conn, host, _INSERT_IN_FLIGHT),
            {"in_flight": host.in_flight_value, "limit": limit},
        )
        rows = cur.fetchall()
    adopted = [
        {"id": r["id"], "user_id": r["user_id"], "waiting": r["waiting"]}
        for r in rows
        if r["id"] is not None
    ]
    return adopted, rows[0]["without_user_id"]


def update_in_flight_finished(conn: db.Connection, limit: int) -> list[tuple[str, str]]:
    """Write, as the mirror would, every row of the bound table that still holds the
    host's spelling of `training` while we track its training as finished, for up to
    `limit` of our trainings; return (training id, our status) for each host row
    written. Raises what the host's table raises (host_sql.is_refusal tells a refusal).
    The connection must carry a binding."""
    host = _host(conn)
    with conn.cursor() as cur:
        cur.execute(
            _statement(conn, host, _UPDATE_IN_FLIGHT_FINISHED),
            {"in_flight": host.in_flight_value, "finished": _FINISHED, "limit": limit},
        )
        return [(training_id, status) for training_id, status in cur.fetchall()]


def _not_touched_since(host: HostBinding) -> sql.Composable:
    """With an updated-at column bound, the reconciliation leaves a host row the app has
    written since our change: an app that retrains by resetting its row to `training`
    before it stores the new training id must not see the old result written back (the
    new id would then land on a row that is no longer in flight, and never be adopted).
    Without that column nothing tells a reset from a row never mirrored."""
    if host.updated_at_column is None:
        return sql.SQL("")
    column = sql.SQL("{}.{}").format(host_sql.table(host), sql.Identifier(host.updated_at_column))
    return sql.SQL(" AND ({column} IS NULL OR {column} <= {ours_updated_at})").format(
        column=column, ours_updated_at=sql.Identifier(_RECONCILED, "updated_at")
    )


def _host(conn: db.Connection) -> HostBinding:
    if conn.host is None:
        raise ValueError("the connection has no host binding (HOST_TABLE)")
    return conn.host


def _statement(conn: db.Connection, host: HostBinding, template: str) -> str:
    """The template rendered by db.render, with the binding's names and ours."""

    def binding_placeholders() -> dict[str, sql.Composable]:
        return {
            "host_table": host_sql.table(host),
            "training_id": sql.Identifier(host.training_id_column),
            "user_id": sql.Identifier(host.user_id_column),
            "status": sql.Identifier(host.status_column),
            "ours": sql.Identifier(_RECONCILED),
            "ours_id": sql.Identifier(_RECONCILED, "id"),
            "ours_status": sql.Identifier(_RECONCILED, "training_status"),
            "assignments": host_sql.assignments(host, _RECONCILED),
            "not_touched_since": _not_touched_since(host),
            "max_id": sql.Literal(MAX_ID_LENGTH),
            "max_user_id": sql.Literal(MAX_USER_ID_LENGTH),
        }

    return db.render(conn, template, binding_placeholders)
