"""The platform's bound table (HOST_TABLE), read: its rows in flight that we do not track
yet, tracked in one statement (conn first, never commits).

The statement is composed from the connection's binding (`db.Connection.host`) with
`psycopg2.sql.Identifier` for every name, once per (schema, binding), and kept as text
like the rest of ours. It only reads the host's table (an ACCESS SHARE lock, no row
locks), so the platform's own writes never wait on it.
"""

from __future__ import annotations

from psycopg2 import sql

from webhook_sync import db, host_sql
from webhook_sync.host_binding import HostBinding
from webhook_sync.vocabulary import AppStatus, Source

# The anti-join is bounded: a table that holds more new rows in flight than `limit`
# gives the rest to the next sweep. The user id is read as text whatever its type (int,
# uuid, text), as our `trainings.user_id` stores it; a row without a training id or a
# user id cannot be tracked and is left alone. ON CONFLICT: a racing sweep (or the
# platform's own `track`) that inserted the row first wins, and only rows inserted here
# are returned, so each training is adopted once. `track` is the source: the row's
# status was not reported by Replicate yet.
_INSERT_IN_FLIGHT = (
    "INSERT INTO {schema}.trainings (id, user_id, training_status, updated_by)"
    " SELECT h.{training_id}::text, h.{user_id}::text, {training}, {track}"
    " FROM {host_table} AS h"
    " WHERE h.{status} = %(in_flight)s"
    "  AND h.{training_id} IS NOT NULL AND h.{training_id}::text <> ''"
    "  AND h.{user_id} IS NOT NULL AND h.{user_id}::text <> ''"
    "  AND NOT EXISTS (SELECT 1 FROM {schema}.trainings AS t"
    "   WHERE t.id = h.{training_id}::text)"
    " LIMIT %(limit)s"
    " ON CONFLICT (id) DO NOTHING RETURNING id, user_id"
)


def insert_in_flight_trainings(conn: db.Connection, limit: int) -> list[db.Row]:
    """Track up to `limit` rows of the bound table whose status is the host's spelling of
    `training` and whose training id we do not know yet, under their user id; return the
    rows inserted (`id`, `user_id`). The connection must carry a binding."""
    host = conn.host
    if host is None:
        raise ValueError("the connection has no host binding (HOST_TABLE)")
    with db.dict_cursor(conn) as cur:
        cur.execute(
            _statement(conn, host, _INSERT_IN_FLIGHT),
            {"in_flight": host.in_flight_value, "limit": limit},
        )
        return [dict(row) for row in cur.fetchall()]


def _statement(conn: db.Connection, host: HostBinding, template: str) -> str:
    """The template composed for the connection's schema and binding (first use only;
    the connection's statement cache is per schema and binding already)."""
    try:
        return conn.statements[template]
    except KeyError:
        composed = sql.SQL(template).format(
            schema=sql.Identifier(conn.schema),
            host_table=host_sql.table(host),
            training_id=sql.Identifier(host.training_id_column),
            user_id=sql.Identifier(host.user_id_column),
            status=sql.Identifier(host.status_column),
            training=sql.Literal(AppStatus.TRAINING),
            track=sql.Literal(Source.TRACK),
        )
        rendered = conn.statements[template] = composed.as_string(conn)
        return rendered
