"""Connections and one function per query; each takes conn first and never commits.

Every object of ours lives in one schema (DATABASE_SCHEMA, `webhook_sync` by default), and
every statement names it: nothing depends on the role's `search_path`, and tables of the
same names elsewhere (a host's `public.trainings`) are never touched. A connection knows
its schema (`Connection.schema`), so two installs can share a database and a process. The
statements below are templates (`{schema}`, and the words of the vocabulary they filter
on), composed with psycopg2.sql once per schema, on first use, and kept as plain text:
running one costs what running a hand-written string costs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
from psycopg2 import sql

from webhook_sync import errors, host_sql, redaction, vocabulary
from webhook_sync.config import DEFAULT_DATABASE_SCHEMA
from webhook_sync.host_binding import HostBinding
from webhook_sync.training import MAX_USER_ID_LENGTH
from webhook_sync.vocabulary import (
    AppStatus,
    EventType,
    NotificationStatus,
    Outcome,
    ReplicateStatus,
    Source,
)

Row = dict[str, Any]

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
# The fields a status report refreshes (vocabulary.REFRESHED_COLUMNS); the only columns
# `receive_delivery` writes besides the statuses and the bookkeeping.
REFRESHED_COLUMNS = vocabulary.REFRESHED_COLUMNS
_REFRESHED = frozenset(REFRESHED_COLUMNS)
# What the driver raises when the connection itself is lost or the server cannot be
# reached: the database is unavailable, not the statement wrong.
CONNECTION_LOST_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)
# The driver's errors for a statement the server gave up on (statement_timeout,
# lock_timeout): part of CONNECTION_LOST_ERRORS (the database is unavailable for it, and a
# webhook is answered 503), yet the connection itself is still good for another statement.
TIMEOUT_ERRORS = (psycopg2.errors.QueryCanceled, psycopg2.errors.LockNotAvailable)
# What a statement raises against a database that `migrate` has not (fully) prepared: our
# schema itself may be missing (InvalidSchemaName), not only a table or a column.
NOT_MIGRATED_ERRORS = (
    psycopg2.errors.UndefinedTable,
    psycopg2.errors.UndefinedColumn,
    psycopg2.errors.InvalidSchemaName,
    # `receive_delivery` (sql/0008) not created yet.
    psycopg2.errors.UndefinedFunction,
)
# The channel is public contract for the default schema; another install (another schema
# in the same database) notifies on its own channel, so listeners never mix two installs.
DEFAULT_NOTIFY_CHANNEL = "training_status"
# The release before schemas kept its tables and its migrations record in `public`.
LEGACY_TABLES = ("trainings", "webhook_events", "training_transitions", "schema_migrations")
LEGACY_FIRST_MIGRATION = "0001_trainings.sql"
# That release's advisory lock key ("webhsync"); taken while tables move out of `public`,
# so that neither an old migrator nor another install's can run at the same time.
LEGACY_MIGRATION_LOCK_KEY = 0x7765_6268_7379_6E63 & 0x7FFF_FFFF_FFFF_FFFF


def notify_channel(schema: str) -> str:
    """The NOTIFY channel of the install in `schema`: `training_status` for the default
    schema, `<schema>_training_status` for any other."""
    if schema == DEFAULT_DATABASE_SCHEMA:
        return DEFAULT_NOTIFY_CHANNEL
    return f"{schema}_{DEFAULT_NOTIFY_CHANNEL}"


def migration_lock_key(schema: str) -> int:
    """The advisory lock key that serialises the migrators of one schema."""
    digest = hashlib.sha256(f"webhook-sync migrations {schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


# --- connections ---------------------------------------------------------------------


class Connection(psycopg2.extensions.connection):
    """A psycopg2 connection to the install in `schema`, with our statements for it."""

    def __init__(
        self,
        dsn: str,
        *args: Any,
        schema: str = DEFAULT_DATABASE_SCHEMA,
        host: HostBinding | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(dsn, *args, **kw)
        self.schema = schema
        # The platform's table each status change is mirrored to (HOST_*), if any.
        self.host = host
        self.statements = _STATEMENTS.setdefault((schema, host), {})
        # Names this session has PREPAREd (`_execute_prepared`); they live as long as it.
        self.prepared: set[str] = set()
        # Names whose prepared statement vanished (a pooler in transaction mode): these
        # statements are sent planned per call on this connection.
        self.unprepared: set[str] = set()
        # Names prepared before a migration changed their result type: DEALLOCATEd and
        # prepared again on their next call.
        self.stale: set[str] = set()


# Rendered statements by (schema, host binding), then by template; shared by every
# connection of that install.
_STATEMENTS: dict[tuple[str, HostBinding | None], dict[str, str]] = {}


def connection_factory(schema: str, host: HostBinding | None = None) -> Callable[..., Connection]:
    """The `connection_factory` for psycopg2.connect and its pools: connections to `schema`,
    mirroring status changes to `host` when given."""
    return functools.partial(Connection, schema=schema, host=host)


def _placeholders(schema: str, host: HostBinding | None) -> dict[str, sql.Composable]:
    """What the templates may name: our schema, and the fixed words they filter on (as
    literals, so that the planner matches them against the partial indexes)."""
    return {
        "schema": sql.Identifier(schema),
        "schema_name": sql.Literal(schema),
        "columns": sql.SQL(", ".join(TRAINING_COLUMNS)),
        "t_columns": sql.SQL(", ".join(f"t.{column}" for column in TRAINING_COLUMNS)),
        "training": sql.Literal(AppStatus.TRAINING),
        "track": sql.Literal(Source.TRACK),
        "applied": sql.Literal(Outcome.APPLIED),
        "pending": sql.Literal(Outcome.PENDING),
        "channel": sql.Literal(notify_channel(schema)),
        "lock_key": sql.Literal(migration_lock_key(schema)),
        "legacy_lock_key": sql.Literal(LEGACY_MIGRATION_LOCK_KEY),
        "legacy_first": sql.Literal(LEGACY_FIRST_MIGRATION),
        "status_change_ctes": sql.SQL(", ").join(
            cte.definition() for cte in status_change_ctes(schema, host)
        ),
        "status_change_counts": sql.SQL(", ").join(
            cte.count() for cte in status_change_ctes(schema, host)
        ),
        "n_pending": sql.Literal(NotificationStatus.PENDING),
        "n_delivered": sql.Literal(NotificationStatus.DELIVERED),
        "n_dead": sql.Literal(NotificationStatus.DEAD),
    }


def _sql(
    conn: Connection,
    template: str,
    more: Callable[[], Mapping[str, sql.Composable]] | None = None,
) -> str:
    """The template rendered for the connection's schema and binding, with the
    placeholders `more()` adds (composed on first use only: the cache is per schema and
    binding, so a template's text is enough as its key)."""
    try:
        return conn.statements[template]
    except KeyError:
        placeholders = _placeholders(conn.schema, conn.host)
        if more is not None:
            placeholders.update(more())
        rendered = sql.SQL(template).format(**placeholders).as_string(conn)
        conn.statements[template] = rendered
        return rendered


def render(
    conn: Connection,
    template: str,
    more: Callable[[], Mapping[str, sql.Composable]] | None = None,
) -> str:
    """A statement template of a module that keeps its own queries beside its table
    (budget, heartbeat, gauges, host_rows), rendered for the connection's schema like
    ours, with the placeholders `more()` adds on first use (a binding's names)."""
    return _sql(conn, template, more)


# Our defaults for a connection; a setting the URL (or libpq's environment variable) gives
# is theirs and wins. `options` is merged instead: ours first, so a `-c` of theirs wins.
_DEFAULT_PARAMS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
# The environment variables libpq reads for a setting the connection string leaves out.
_LIBPQ_ENV = {
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME",
    "options": "PGOPTIONS",
    "sslmode": "PGSSLMODE",
    "requiressl": "PGREQUIRESSL",
    "service": "PGSERVICE",
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
}


def dict_cursor(conn: Connection) -> psycopg2.extras.RealDictCursor:
    """A cursor whose rows are dicts by column name."""
    return _dict_cursor(conn)


def connection_params(
    url: str,
    application_name: str,
    statement_timeout_ms: int = 10_000,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Build psycopg2.connect() keyword arguments: the URL, plus our timeouts, keepalives,
    application name and statement timeout where neither the URL nor libpq's environment
    (`environ`, default os.environ) sets them, and `sslmode=require` only when nothing
    says how to use TLS and the effective host is not this machine. ConfigError (without
    the URL) when libpq cannot read the URL."""
    env = os.environ if environ is None else environ
    theirs = _parse_url(url)

    def given(key: str) -> str:
        return theirs.get(key) or env.get(_LIBPQ_ENV.get(key, ""), "")

    params: dict[str, Any] = {"dsn": url}
    params.update({key: value for key, value in _DEFAULT_PARAMS.items() if not given(key)})
    if not given("application_name"):
        params["application_name"] = application_name
    params["options"] = f"-c statement_timeout={int(statement_timeout_ms)} {given('options')}"
    params["options"] = params["options"].strip()
    # A service file may say how to use TLS and which host: it is theirs to say.
    says_tls = given("sslmode") or given("requiressl") or given("service")
    if not says_tls and not _is_local_host(given("host") or given("hostaddr")):
        params["sslmode"] = "require"
    return params


def _parse_url(url: str) -> dict[str, str]:
    """The settings libpq reads from the URL; ConfigError, redacted, when it cannot."""
    try:
        return psycopg2.extensions.parse_dsn(url)
    except psycopg2.Error as exc:
        raise errors.ConfigError(
            f"DATABASE_URL is not a valid connection URL: {redaction.error_message(exc, url)}"
        ) from exc


def _is_local_host(hosts: str) -> bool:
    """Whether libpq's `host` (a comma-separated list; empty means the default Unix socket)
    names only this machine: a socket directory, localhost or a loopback address."""
    for host in hosts.split(",") if hosts else [""]:
        if host in ("", "localhost") or host.startswith(("/", "@")):
            continue
        try:
            if ipaddress.ip_address(host).is_loopback:
                continue
        except ValueError:
            pass
        return False
    return True


def connect(
    url: str,
    application_name: str = "webhook-sync",
    statement_timeout_ms: int = 10_000,
    schema: str = DEFAULT_DATABASE_SCHEMA,
    host: HostBinding | None = None,
) -> Connection:
    """Open a connection to the install in `schema` (mirroring status changes to `host`);
    DatabaseUnavailableError (redacted: without the user, password, host or URL) when that
    fails."""
    params = connection_params(url, application_name, statement_timeout_ms)
    try:
        factory = connection_factory(schema, host)
        return psycopg2.connect(**params, connection_factory=factory)
    except psycopg2.Error as exc:
        raise connect_error(exc, url) from exc


def connect_error(exc: psycopg2.Error, url: str) -> errors.DatabaseUnavailableError:
    """The error to raise when opening a connection failed: its cause, redacted."""
    return errors.DatabaseUnavailableError(
        f"cannot connect to the database: {redaction.error_message(exc, url)}"
    )


def first_line(exc: BaseException) -> str:
    """The first line of a driver error, redacted: the cause, without the connection's user,
    password, host or URL."""
    return redaction.error_message(exc)


@contextlib.contextmanager
def autocommit(conn: Connection) -> Iterator[Connection]:
    """Run the block in autocommit: each statement is its own transaction, committed when
    it returns, with no BEGIN or COMMIT round trip. A connection already inside a
    transaction runs the block in it instead, and commits it at the end (`with conn:`)."""
    if conn.autocommit:
        yield conn
        return
    if conn.info.transaction_status != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
        with conn:
            yield conn
        return
    conn.autocommit = True
    try:
        yield conn
    finally:
        if not conn.closed:
            conn.autocommit = False


def _dict_cursor(conn: Connection) -> psycopg2.extras.RealDictCursor:
    return conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor)


def execute(conn: Connection, template: str, params: Mapping[str, Any] | None = None) -> int:
    """Run one statement template of a module that keeps its own queries (registry,
    outbox), rendered like ours; the number of rows it touched."""
    return _execute(conn, template, params)


def rows(conn: Connection, template: str, params: Mapping[str, Any] | None = None) -> list[Row]:
    """Run one statement template of a module that keeps its own queries, rendered like
    ours; its rows as dicts by column name."""
    with _dict_cursor(conn) as cur:
        cur.execute(_sql(conn, template), params)
        return [dict(row) for row in cur.fetchall()]


def scalar(conn: Connection, template: str, params: Mapping[str, Any] | None = None) -> Any:
    """Run one statement template of a module that keeps its own queries, rendered like
    ours; the first column of its first row."""
    return _scalar(conn, template, params)


def _execute(conn: Connection, template: str, params: Mapping[str, Any] | None = None) -> int:
    """Run one statement of ours; the number of rows it touched."""
    with conn.cursor() as cur:
        cur.execute(_sql(conn, template), params)
        return cur.rowcount


def _scalar(conn: Connection, template: str, params: Mapping[str, Any] | None = None) -> Any:
    """Run one statement of ours; the first column of its first row."""
    with conn.cursor() as cur:
        cur.execute(_sql(conn, template), params)
        return cur.fetchone()[0]


def select_now(conn: Connection) -> datetime:
    """The database clock at the start of the transaction (what our rows are stamped with)."""
    with conn.cursor() as cur:
        cur.execute("SELECT now()")
        return cur.fetchone()[0]


def select_clock(conn: Connection) -> datetime:
    """The database clock right now, whatever transaction is open."""
    with conn.cursor() as cur:
        cur.execute("SELECT clock_timestamp()")
        return cur.fetchone()[0]


# --- trainings -------------------------------------------------------------------------


_SELECT_TRAINING = "SELECT {columns} FROM {schema}.trainings WHERE id = %(id)s"


def select_training(conn: Connection, training_id: str) -> Row | None:
    """One training row, or None."""
    with _dict_cursor(conn) as cur:
        cur.execute(_sql(conn, _SELECT_TRAINING), {"id": training_id})
        row = cur.fetchone()
        return dict(row) if row else None


_SELECT_TRAININGS = (
    "SELECT {columns} FROM {schema}.trainings"
    " WHERE (%(ids)s::text[] IS NULL OR id = ANY(%(ids)s::text[]))"
    "  AND (%(stuck_before)s::timestamptz IS NULL"
    "   OR (training_status = {training} AND created_at < %(stuck_before)s::timestamptz))"
    " ORDER BY created_at, id LIMIT %(limit)s"
)


def select_trainings(
    conn: Connection,
    ids: Sequence[str] | None = None,
    *,
    stuck_before: datetime | None = None,
    limit: int = 1000,
) -> list[Row]:
    """Rows by id (all when ids is None), or those in `training` created before stuck_before."""
    with _dict_cursor(conn) as cur:
        cur.execute(
            _sql(conn, _SELECT_TRAININGS),
            {
                "ids": None if ids is None else list(ids),
                "stuck_before": stuck_before,
                "limit": limit,
            },
        )
        return [dict(row) for row in cur.fetchall()]


_INSERT_TRAINING = (
    "INSERT INTO {schema}.trainings (id, user_id, destination, training_status, updated_by)"
    " VALUES (%(id)s, %(user_id)s, %(destination)s, {training}, {track})"
    " ON CONFLICT (id) DO NOTHING RETURNING {columns}"
)


def insert_training(
    conn: Connection, training_id: str, user_id: str, destination: str | None
) -> Row | None:
    """Insert a training in the `training` state; None when the id already exists."""
    with _dict_cursor(conn) as cur:
        cur.execute(
            _sql(conn, _INSERT_TRAINING),
            {"id": training_id, "user_id": user_id, "destination": destination},
        )
        row = cur.fetchone()
        return dict(row) if row else None


@dataclass(frozen=True)
class StatusChangeCte:
    """One CTE of the delivery's statement (`receive_delivery`) that acts on a status
    change, composed by the process around the SQL function: `body` reads FROM
    `changed` (the updated row, with `transition_id`, `from_replicate_status` and
    `from_training_status`; one row when the status moved, none otherwise) — or FROM
    `refreshed` (the row, when a report filled in fields without moving the status) —
    and returns one row per thing it did. The statement returns that count as `<name>_count`, which
    also makes PostgreSQL run a plain SELECT body (a NOTIFY)."""

    name: str
    body: sql.Composable

    def definition(self) -> sql.Composable:
        """`name AS (body)`, for the WITH list."""
        return sql.SQL("{} AS ({})").format(sql.Identifier(self.name), self.body)

    def count(self) -> sql.Composable:
        """`(SELECT count(*) FROM name) AS name_count`, for the final SELECT."""
        return sql.SQL("(SELECT count(*) FROM {}) AS {}").format(
            sql.Identifier(self.name), sql.Identifier(f"{self.name}_count")
        )


def notify_cte(schema: str) -> StatusChangeCte:
    """The NOTIFY on the install's channel, sent at commit: the training's id and user id,
    its new statuses, and the change's position in the feed (`changes.py`): this
    transaction's id (what `training_transitions.xact_id` defaults to) and the transition's.

    PostgreSQL refuses a payload of 8,000 bytes or more, at commit, which would fail the
    change itself. Training ids and replicate statuses are bounded where they come in
    (200 and 64 characters); `trainings.user_id` is not bounded by the table, so a user
    id longer than training.MAX_USER_ID_LENGTH is sent as null (never cut: a wrong id is
    worse than none; the row and the feed hold it whole). Even with every character
    escaped as `\\uXXXX` the payload stays under 3,000 bytes."""
    return StatusChangeCte(
        "notified",
        sql.SQL(
            "SELECT pg_notify({channel}, json_build_object("
            "'id', id, 'user_id', CASE WHEN length(user_id) <= {max_user_id} THEN user_id END,"
            " 'training_status', training_status, 'replicate_status', replicate_status,"
            " 'position', pg_current_xact_id()::text || ':' || transition_id)::text)"
            " FROM changed"
        ).format(
            channel=sql.Literal(notify_channel(schema)),
            max_user_id=sql.Literal(MAX_USER_ID_LENGTH),
        ),
    )


@functools.cache
def status_change_ctes(schema: str, host: HostBinding | None) -> tuple[StatusChangeCte, ...]:
    """What every status change does besides the row and its transition, in order: the
    NOTIFY, the outbox's notifications, and with a binding the mirror into the
    platform's own table (`host_mirrored`) and, with HOST_COLUMNS, the refresh of those
    columns when a report fills in fields without a status change (`host_refreshed`)."""
    ctes = (notify_cte(schema), queue_notifications_cte(schema))
    if host is not None:
        ctes += (StatusChangeCte(host_sql.MIRROR_CTE_NAME, host_sql.mirror_body(host)),)
        if host.extra_columns:
            ctes += (StatusChangeCte(host_sql.REFRESH_CTE_NAME, host_sql.refresh_body(host)),)
    return ctes


# An instant as the notifications' JSON carries it: UTC, microseconds, whatever the
# session's TimeZone. The colons are quoted text: a bare `:MI` reads as a variable to
# pgbench, which the benchmarks run this statement with.
_UTC_JSON_TIME = 'to_char(({value}) AT TIME ZONE \'UTC\', \'YYYY-MM-DD"T"HH24":"MI":"SS.US"Z"\')'


def queue_notifications_cte(schema: str) -> StatusChangeCte:
    """The funnel's outbox write, reading FROM `changed`: when the status changed, one
    `notifications` row per configured, enabled endpoint that wants the change's event
    type, with the event's body (composed once per schema). The event id is drawn once per
    change, in a MATERIALIZED CTE: a subquery may be rescanned, once per endpoint, by
    whichever join order the planner picks, and would draw one id per row."""
    event_type = sql.SQL(
        "CASE u.training_status WHEN {completed} THEN {ev_completed}"
        " WHEN {failed} THEN {ev_failed} WHEN {canceled} THEN {ev_canceled}"
        " WHEN {training} THEN CASE WHEN u.replicate_status = {processing}"
        " THEN {ev_processing} END END"
    ).format(
        completed=sql.Literal(AppStatus.COMPLETED),
        failed=sql.Literal(AppStatus.FAILED),
        canceled=sql.Literal(AppStatus.CANCELED),
        training=sql.Literal(AppStatus.TRAINING),
        processing=sql.Literal(ReplicateStatus.PROCESSING),
        ev_completed=sql.Literal(EventType.COMPLETED),
        ev_failed=sql.Literal(EventType.FAILED),
        ev_canceled=sql.Literal(EventType.CANCELED),
        ev_processing=sql.Literal(EventType.PROCESSING),
    )
    body = sql.SQL(
        """INSERT INTO {schema}.notifications (
            event_id, endpoint_id, training_id, event_type, payload)
        WITH c AS MATERIALIZED (
            SELECT u.*, 'evt_' || replace(gen_random_uuid()::text, '-', '') AS event_id,
                   {event_type} AS event_type
            FROM changed AS u)
        SELECT c.event_id, e.id, c.id, c.event_type, jsonb_build_object(
            'type', c.event_type, 'id', c.event_id, 'created_at', {created_at},
            'training', jsonb_build_object(
                'id', c.id, 'user_id', c.user_id, 'training_status', c.training_status,
                'replicate_status', c.replicate_status, 'destination', c.destination,
                'version_id', c.version_id, 'weights_url', c.weights_url, 'error', c.error,
                'started_at', {started_at}, 'completed_at', {completed_at}))
        FROM c JOIN {schema}.notification_endpoints AS e
          ON e.configured AND e.disabled_at IS NULL AND c.event_type = ANY(e.events)
        RETURNING 1"""
    ).format(
        schema=sql.Identifier(schema),
        event_type=event_type,
        created_at=sql.SQL(_UTC_JSON_TIME.format(value="now()")),
        started_at=sql.SQL(_UTC_JSON_TIME.format(value="c.started_at")),
        completed_at=sql.SQL(_UTC_JSON_TIME.format(value="c.completed_at")),
    )
    return StatusChangeCte("queued", body)


# A status report applied by the SQL function `receive_delivery` (sql/0009), with the
# effects of a status change (`status_change_ctes`) reading FROM `changed`: the updated row,
# `transition_id`, `from_replicate_status` and `from_training_status`, one row iff the
# status moved. One statement, so one round trip; prepared once per connection. Its result
# is read by position (`Received`, then TRAINING_COLUMNS, then one count per effect): a
# tuple, not a dict built per row, since every delivery and every poll reads it.
_RECEIVE_DELIVERY = """
    WITH d AS MATERIALIZED (
        SELECT * FROM {schema}.receive_delivery(
            $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
    ), changed AS (
        SELECT {columns}, transition_id, from_replicate_status, from_training_status
        FROM d WHERE d.status_changed
    ), refreshed AS (
        SELECT {columns} FROM d WHERE d.fields_refreshed
    ), {status_change_ctes}
    SELECT outcome, reason, event_recorded, from_replicate_status, from_training_status,
           {columns}, {status_change_counts}
    FROM d
"""
# Where the training row and the effects' counts start in the statement's result.
_ROW_AT = 5
_COUNTS_AT = _ROW_AT + len(TRAINING_COLUMNS)
_RECEIVE_DELIVERY_NAME = "receive_delivery"
_RECEIVE_DELIVERY_TYPES = (
    "text, text, text, text, text, text, text, timestamptz, timestamptz,"
    " text, timestamptz, jsonb, boolean"
)


@functools.cache
def _effect_names(schema: str, host: HostBinding | None) -> tuple[str, ...]:
    """The names of `status_change_ctes`, in the order the statement returns their counts."""
    return tuple(cte.name for cte in status_change_ctes(schema, host))


class Received(NamedTuple):
    """What `receive_delivery` did: the function's outcome and reason, whether the inbox
    event's outcome was recorded, the statuses before, the training row (TRAINING_COLUMNS;
    NULL-padded when the training is not tracked) and each effect's row count by name."""

    outcome: str
    reason: str
    event_recorded: bool
    from_replicate_status: str | None
    from_training_status: str | None
    row: Row
    effects: dict[str, int]


def receive_delivery(
    conn: Connection,
    *,
    training_id: str,
    reported_status: str,
    source: Source,
    fields: Mapping[str, Any],
    event_id: str | None = None,
    signed_at: datetime | None = None,
    payload: Mapping[str, Any] | str | None = None,
    keep_untracked: bool = False,
) -> Received:
    """Apply a status report through the function `receive_delivery` in one round trip:
    with `payload` (a value, or JSON text stored as it is), store it as inbox event
    `event_id` (a duplicate of a finished
    event: outcome `duplicate`, nothing written); with `event_id` alone, record that stored
    event's outcome (unless another delivery finished it: `event_recorded` false). Locks
    the training, decides as `service.decide` does, writes the row and its transition, and
    runs every `status_change_ctes` effect when the status moved. `fields` may name only
    REFRESHED_COLUMNS (ValueError otherwise).

    Returns what it did (`Received`). HostTableRefusedError when the connection's bound
    table refused the mirror's write (the statement, and so the transaction, failed as a
    whole).
    """
    if not _REFRESHED.issuperset(fields):
        unknown = sorted(set(fields) - _REFRESHED)
        raise ValueError(f"receive_delivery cannot write {', '.join(unknown)}")
    params = (
        training_id,
        reported_status,
        source,
        *map(fields.get, REFRESHED_COLUMNS),
        event_id,
        signed_at,
        payload if payload is None or isinstance(payload, str) else psycopg2.extras.Json(payload),
        keep_untracked,
    )
    with conn.cursor() as cur:
        try:
            _execute_prepared(
                cur,
                conn,
                _RECEIVE_DELIVERY_NAME,
                _RECEIVE_DELIVERY_TYPES,
                _RECEIVE_DELIVERY,
                params,
            )
        except psycopg2.Error as exc:
            if conn.host is not None and host_sql.is_refusal(exc, conn.schema):
                raise errors.HostTableRefusedError(host_sql.refusal_reason(exc, conn.host)) from exc
            raise
        values = cur.fetchone()
    return Received(
        *values[:_ROW_AT],
        dict(zip(TRAINING_COLUMNS, values[_ROW_AT:_COUNTS_AT], strict=True)),
        dict(zip(_effect_names(conn.schema, conn.host), values[_COUNTS_AT:], strict=True)),
    )


def receive_delivery_statement(conn: Connection) -> str:
    """The server-side name the delivery's statement is prepared under on `conn`."""
    return _prepared_name(_RECEIVE_DELIVERY_NAME, _sql(conn, _RECEIVE_DELIVERY))


@functools.lru_cache(maxsize=64)
def _prepared_name(name: str, text: str) -> str:
    """A statement's server-side name: its name and a digest of its text (for the
    connection's schema and binding). A server session reached through a pooler in
    transaction mode may hold another install's or another release's statement of the same
    name; under a name of its text's own, an EXECUTE can only ever run that text."""
    return f"{name}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _execute_prepared(
    cur: psycopg2.extensions.cursor,
    conn: Connection,
    name: str,
    types: str,
    template: str,
    params: Sequence[Any],
) -> None:
    """Run a statement of ours as a server-side prepared statement: PREPARE on the
    connection's first use (psycopg2 has no protocol-level prepare), EXECUTE after, so
    its plan is not rebuilt per call. A prepared statement outlives a rolled-back
    transaction; a new connection (after a reconnect) prepares again.

    A connection whose prepared statement vanished between two calls is behind a pooler
    in transaction mode (PgBouncer: each transaction may reach another server session)
    or had it dropped (DISCARD ALL): it stops preparing and sends the statement planned
    per call from then on, still one round trip; outside a transaction the failed call
    is sent again that way at once (it wrote nothing). One whose result type a migration
    changed is prepared again, at once outside a transaction, else on its next call."""
    server_name = _prepared_name(name, _sql(conn, template))
    if server_name in conn.unprepared:
        cur.execute(_unprepared(conn, template, types), params)
        return
    if server_name not in conn.prepared:
        if server_name in conn.stale:
            cur.execute(f"DEALLOCATE {server_name}")
            conn.stale.discard(server_name)
        try:
            cur.execute(f"PREPARE {server_name} ({types}) AS {_sql(conn, template)}")
        except psycopg2.errors.DuplicatePreparedStatement as exc:
            # The server session already holds a statement of that name that this connection
            # never prepared: another client's, reached through a pooler in transaction
            # mode (its text is ours, as the name says, yet not prepared by us). Never
            # EXECUTE what we did not PREPARE.
            _stop_preparing(exc, cur, conn, server_name, template, types, params)
            return
        conn.prepared.add(server_name)
    try:
        cur.execute(_execute_statement(server_name, len(params)), params)
    except psycopg2.errors.InvalidSqlStatementName as exc:
        conn.prepared.discard(server_name)
        _stop_preparing(exc, cur, conn, server_name, template, types, params)
    except psycopg2.errors.FeatureNotSupported as exc:
        # "cached plan must not change result type": a migration replaced what the
        # statement reads (a function's result columns) since this session prepared it.
        # Every later EXECUTE would fail the same way: prepare it again.
        if exc.diag.source_function != "RevalidateCachedQuery":
            raise
        conn.prepared.discard(server_name)
        conn.stale.add(server_name)
        if not conn.autocommit:
            raise
        _execute_prepared(cur, conn, name, types, template, params)


# Cached as `_prepared_name` is: every delivery sends it.
@functools.lru_cache(maxsize=64)
def _execute_statement(server_name: str, count: int) -> str:
    """`EXECUTE name (%s, …)` for a prepared statement of `count` parameters."""
    return f"EXECUTE {server_name} ({', '.join(['%s'] * count)})"


def _stop_preparing(
    exc: psycopg2.Error,
    cur: psycopg2.extensions.cursor,
    conn: Connection,
    name: str,
    template: str,
    types: str,
    params: Sequence[Any],
) -> None:
    """Send `name` planned per call on this connection from now on; this call too when
    outside a transaction (the failed statement wrote nothing), else the caller's aborted
    transaction fails with `exc`."""
    conn.unprepared.add(name)
    if not conn.autocommit:
        raise exc
    cur.execute(_unprepared(conn, template, types), params)


def _unprepared(conn: Connection, template: str, types: str) -> str:
    """A prepared statement's text with `%s::type` for each `$n`, for psycopg2 to fill in
    (a `%` of an identifier in it, a host table's name, doubled so it stays itself)."""
    return _with_pyformat_params(_sql(conn, template), types)


# Cached as `_prepared_name` is: behind a pooler every delivery sends this text.
@functools.lru_cache(maxsize=64)
def _with_pyformat_params(prepared_text: str, types: str) -> str:
    text = prepared_text.replace("%", "%%")
    names = [kind.strip() for kind in types.split(",")]
    # Highest numbers first, so that $1 does not replace the start of $10.
    for number in range(len(names), 0, -1):
        text = text.replace(f"${number}", f"%s::{names[number - 1]}")
    return text


# --- the poller ------------------------------------------------------------------------

_CLAIM_DUE_TRAININGS = (
    "UPDATE {schema}.trainings SET lease_owner = %(owner)s,"
    " lease_expires_at = now() + make_interval(secs => %(lease)s)"
    " WHERE id IN ("
    "  SELECT id FROM {schema}.trainings"
    "  WHERE training_status = {training} AND next_check_at <= %(due_before)s"
    "    AND (lease_expires_at IS NULL OR lease_expires_at < now())"
    "    AND (%(ids)s::text[] IS NULL OR id = ANY(%(ids)s::text[]))"
    "  ORDER BY next_check_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
    # What a sweep needs of a claimed row: `created_at` bounds the list walk.
    " RETURNING id, created_at, replicate_created_at, next_check_at, check_failures,"
    " not_found_count"
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
    with _dict_cursor(conn) as cur:
        cur.execute(
            _sql(conn, _CLAIM_DUE_TRAININGS),
            {
                "owner": owner,
                "lease": lease_seconds,
                "due_before": due_before,
                "limit": limit,
                "ids": None if ids is None else list(ids),
            },
        )
        return sorted((dict(row) for row in cur.fetchall()), key=lambda r: r["next_check_at"])


_SELECT_DUE_SUMMARY = (
    "SELECT count(*), min(COALESCE(replicate_created_at,"
    "  created_at - make_interval(secs => %(margin)s)))"
    " FROM {schema}.trainings WHERE training_status = {training}"
    " AND next_check_at <= %(due_before)s"
    " AND (lease_expires_at IS NULL OR lease_expires_at < now())"
)


def select_due_summary(
    conn: Connection, *, due_before: datetime, margin_seconds: float
) -> tuple[int, datetime | None]:
    """How many unleased trainings in `training` are due, and the oldest Replicate creation
    time among them (our insert time less `margin_seconds` where it is not known yet)."""
    with conn.cursor() as cur:
        cur.execute(
            _sql(conn, _SELECT_DUE_SUMMARY), {"due_before": due_before, "margin": margin_seconds}
        )
        count, bound = cur.fetchone()
        return count, bound


_COUNT_DUE_TRAININGS = (
    "SELECT count(*) FROM {schema}.trainings WHERE training_status = {training}"
    " AND next_check_at <= now()"
    " AND (lease_expires_at IS NULL OR lease_expires_at < now())"
)


def count_due_trainings(conn: Connection) -> int:
    """How many trainings in `training` are due for a check and not leased."""
    return _scalar(conn, _COUNT_DUE_TRAININGS)


_UPDATE_CHECKED = (
    "UPDATE {schema}.trainings SET last_checked_at = now(),"
    " next_check_at = %(next_check_at)s,"
    " check_failures = 0, not_found_count = 0, needs_attention = NULL,"
    " replicate_created_at = COALESCE(%(created)s, replicate_created_at),"
    " lease_owner = NULL, lease_expires_at = NULL"
    " WHERE id = %(id)s AND lease_owner IS NOT DISTINCT FROM %(owner)s"
)


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
    params = {
        "id": training_id,
        "owner": owner,
        "next_check_at": next_check_at,
        "created": replicate_created_at,
    }
    return _execute(conn, _UPDATE_CHECKED, params) > 0


_UPDATE_CHECK_FAILED = (
    "UPDATE {schema}.trainings SET last_checked_at = now(),"
    " check_failures = check_failures + 1,"
    " not_found_count = not_found_count + CASE WHEN %(not_found)s THEN 1 ELSE 0 END,"
    " needs_attention = CASE WHEN %(not_found)s"
    "   AND not_found_count + 1 >= %(attention_after)s"
    "   THEN %(attention)s ELSE needs_attention END,"
    " next_check_at = now() + make_interval(secs => least(%(cap)s,"
    "   %(base)s * power(2, least(check_failures, 20))::float8)),"
    " lease_owner = NULL, lease_expires_at = NULL"
    " WHERE id = %(id)s AND lease_owner IS NOT DISTINCT FROM %(owner)s"
    " RETURNING id, check_failures, not_found_count, needs_attention, next_check_at"
)


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
            _sql(conn, _UPDATE_CHECK_FAILED),
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


_UPDATE_LEASE_EXPIRY = (
    "UPDATE {schema}.trainings"
    " SET lease_expires_at = now() + make_interval(secs => %(lease)s)"
    " WHERE id = ANY(%(ids)s) AND lease_owner = %(owner)s"
)


def update_lease_expiry(
    conn: Connection, owner: str, training_ids: Sequence[str], lease_seconds: float
) -> int:
    """Extend the leases `owner` still holds on these trainings to `lease_seconds` from now
    (database clock); return how many."""
    params = {"ids": list(training_ids), "owner": owner, "lease": lease_seconds}
    return _execute(conn, _UPDATE_LEASE_EXPIRY, params)


_RELEASE_LEASES = (
    "UPDATE {schema}.trainings SET lease_owner = NULL, lease_expires_at = NULL"
    " WHERE id = ANY(%(ids)s) AND lease_owner = %(owner)s"
)


def release_leases(conn: Connection, owner: str, training_ids: Sequence[str]) -> int:
    """Hand back the leases `owner` holds on these trainings, leaving them due; return how many."""
    return _execute(conn, _RELEASE_LEASES, {"ids": list(training_ids), "owner": owner})


_SELECT_TRACKED_PENDING_TRAINING_IDS = (
    "SELECT DISTINCT e.training_id FROM {schema}.webhook_events AS e"
    " JOIN {schema}.trainings AS t ON t.id = e.training_id"
    " WHERE e.outcome = {pending} LIMIT %(limit)s"
)


def select_tracked_pending_training_ids(conn: Connection, limit: int) -> list[str]:
    """Tracked trainings that still have inbox events waiting (`pending`) to be applied."""
    with conn.cursor() as cur:
        cur.execute(_sql(conn, _SELECT_TRACKED_PENDING_TRAINING_IDS), {"limit": limit})
        return [training_id for (training_id,) in cur.fetchall()]


# --- the inbox -------------------------------------------------------------------------

_INSERT_EVENT = (
    "INSERT INTO {schema}.webhook_events (webhook_id, training_id, source, signed_at, payload)"
    " VALUES (%(webhook_id)s, %(training_id)s, %(source)s, %(signed_at)s, %(payload)s)"
    " ON CONFLICT (webhook_id) DO NOTHING RETURNING webhook_id"
)


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
            _sql(conn, _INSERT_EVENT),
            {
                "webhook_id": webhook_id,
                "training_id": training_id,
                "source": source,
                "signed_at": signed_at,
                "payload": psycopg2.extras.Json(payload),
            },
        )
        return cur.fetchone() is not None


_SELECT_EVENT = (
    "SELECT webhook_id, training_id, source, received_at, signed_at, payload, outcome,"
    " error, attempts, processed_at FROM {schema}.webhook_events WHERE webhook_id = %(id)s"
)
_SELECT_EVENT_FOR_UPDATE = f"{_SELECT_EVENT} FOR UPDATE"


def select_event(conn: Connection, webhook_id: str, *, for_update: bool = False) -> Row | None:
    """One inbox row (optionally locked against a concurrent processor), or None."""
    template = _SELECT_EVENT_FOR_UPDATE if for_update else _SELECT_EVENT
    with _dict_cursor(conn) as cur:
        cur.execute(_sql(conn, template), {"id": webhook_id})
        row = cur.fetchone()
        return dict(row) if row else None


_UPDATE_EVENT_OUTCOME = (
    "UPDATE {schema}.webhook_events SET outcome = %(outcome)s, error = %(error)s,"
    " attempts = attempts + 1, processed_at = now() WHERE webhook_id = %(id)s"
)


def update_event_outcome(
    conn: Connection, webhook_id: str, outcome: Outcome, error: str | None = None
) -> None:
    """Record what processing an inbox event did (and the error, when it failed)."""
    _execute(conn, _UPDATE_EVENT_OUTCOME, {"id": webhook_id, "outcome": outcome, "error": error})


_SELECT_PENDING_EVENTS = (
    "SELECT webhook_id, training_id, source, payload FROM {schema}.webhook_events"
    " WHERE training_id = ANY(%(ids)s) AND outcome = {pending}"
    " ORDER BY received_at, webhook_id FOR UPDATE SKIP LOCKED"
)


def select_pending_events(conn: Connection, training_ids: Iterable[str]) -> list[Row]:
    """Inbox events waiting for these trainings to be tracked, oldest first, locked."""
    with _dict_cursor(conn) as cur:
        cur.execute(_sql(conn, _SELECT_PENDING_EVENTS), {"ids": list(training_ids)})
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
_SELECT_EVENTS = (
    "SELECT webhook_id, training_id, source, received_at, signed_at,"
    " payload->>'status' AS reported_status, outcome, error, attempts, processed_at"
    " FROM {schema}.webhook_events"
    " WHERE (%(training_id)s::text IS NULL OR training_id = %(training_id)s::text)"
    "  AND (%(outcome)s::text IS NULL OR outcome = %(outcome)s::text)"
    "  AND (%(since)s::timestamptz IS NULL OR received_at >= %(since)s::timestamptz)"
    "  AND (%(before)s::timestamptz IS NULL OR received_at < %(before)s::timestamptz)"
)
_SELECT_EVENTS_NEWEST_FIRST = (
    f"{_SELECT_EVENTS} ORDER BY received_at DESC, webhook_id DESC LIMIT %(limit)s"
)
_SELECT_EVENTS_OLDEST_FIRST = f"{_SELECT_EVENTS} ORDER BY received_at, webhook_id LIMIT %(limit)s"


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
    template = _SELECT_EVENTS_NEWEST_FIRST if newest_first else _SELECT_EVENTS_OLDEST_FIRST
    with _dict_cursor(conn) as cur:
        cur.execute(
            _sql(conn, template),
            {
                "training_id": training_id,
                "outcome": outcome,
                "since": received_since,
                "before": received_before,
                "limit": limit,
            },
        )
        return [dict(row) for row in cur.fetchall()]


_COUNT_EVENTS_BY_OUTCOME = "SELECT outcome, count(*) FROM {schema}.webhook_events GROUP BY outcome"


def count_events_by_outcome(conn: Connection) -> dict[str, int]:
    """How many inbox events hold each outcome (outcomes with none are absent)."""
    with conn.cursor() as cur:
        cur.execute(_sql(conn, _COUNT_EVENTS_BY_OUTCOME))
        return {outcome: count for outcome, count in cur.fetchall()}


_COUNT_EVENTS_RECEIVED_BEFORE = (
    "SELECT count(*) FROM {schema}.webhook_events WHERE received_at < %(cutoff)s"
)


def count_events_received_before(conn: Connection, cutoff: datetime) -> int:
    """How many inbox events were received before `cutoff`."""
    return _scalar(conn, _COUNT_EVENTS_RECEIVED_BEFORE, {"cutoff": cutoff})


# A bounded batch keeps each transaction (and its locks and WAL) small.
_DELETE_EVENTS_RECEIVED_BEFORE = (
    "DELETE FROM {schema}.webhook_events WHERE webhook_id IN ("
    " SELECT webhook_id FROM {schema}.webhook_events WHERE received_at < %(cutoff)s"
    " ORDER BY received_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
)


def delete_events_received_before(conn: Connection, cutoff: datetime, limit: int) -> int:
    """Delete up to `limit` inbox events received before `cutoff`; return how many."""
    return _execute(conn, _DELETE_EVENTS_RECEIVED_BEFORE, {"cutoff": cutoff, "limit": limit})


_COUNT_STUCK_TRAININGS = (
    "SELECT count(*) FROM {schema}.trainings"
    " WHERE training_status = {training} AND created_at < %(before)s"
)


def count_stuck_trainings(conn: Connection, created_before: datetime) -> int:
    """How many trainings are still `training` although created before `created_before`."""
    return _scalar(conn, _COUNT_STUCK_TRAININGS, {"before": created_before})


# --- migrations ------------------------------------------------------------------------

# At session level, not transaction level: a migrator holds it across its files' own
# transactions, so a second migrator of the schema waits for the whole run, then finds
# nothing pending. The wait has no statement timeout (the run's own statements keep theirs).
_NO_STATEMENT_TIMEOUT = "SET LOCAL statement_timeout = 0"
_LOCK_MIGRATIONS = "SELECT pg_advisory_lock({lock_key})"
_UNLOCK_MIGRATIONS = "SELECT pg_advisory_unlock({lock_key})"


def lock_migrations(conn: Connection) -> None:
    """Wait for the lock of this schema's migrators, then hold it past this transaction,
    until `unlock_migrations` or the end of the session."""
    _execute(conn, _NO_STATEMENT_TIMEOUT)
    _execute(conn, _LOCK_MIGRATIONS)


def unlock_migrations(conn: Connection) -> None:
    """Release the lock `lock_migrations` took."""
    _execute(conn, _UNLOCK_MIGRATIONS)


_SCHEMA_EXISTS = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = {schema_name})"
)
_CREATE_SCHEMA = "CREATE SCHEMA {schema}"


def create_schema(conn: Connection) -> None:
    """Create our schema unless it exists (a schema made beforehand by a database owner
    needs no CREATE privilege on the database)."""
    if not _scalar(conn, _SCHEMA_EXISTS):
        _execute(conn, _CREATE_SCHEMA)


_MIGRATIONS_TABLE_EXISTS = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables"
    " WHERE schemaname = {schema_name} AND tablename = 'schema_migrations')"
)


def migrations_table_exists(conn: Connection) -> bool:
    """True when our schema holds its migrations record."""
    return _scalar(conn, _MIGRATIONS_TABLE_EXISTS)


_CREATE_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS {schema}.schema_migrations ("
    " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
)


def create_migrations_table(conn: Connection) -> None:
    """Create our migrations record unless it exists."""
    _execute(conn, _CREATE_MIGRATIONS_TABLE)


_SELECT_APPLIED_MIGRATIONS = "SELECT name FROM {schema}.schema_migrations"


def select_applied_migrations(conn: Connection) -> set[str]:
    """Names of applied migrations (empty when our schema or its record does not exist)."""
    if not migrations_table_exists(conn):
        return set()
    with conn.cursor() as cur:
        cur.execute(_sql(conn, _SELECT_APPLIED_MIGRATIONS))
        return {name for (name,) in cur.fetchall()}


# Unqualified names in a migration file then land in our schema (and resolve only there):
# the files need not name the schema, and 0001/0002 stay as they were merged.
_SET_LOCAL_SEARCH_PATH = "SET LOCAL search_path TO {schema}"


def execute_migration(conn: Connection, script: str) -> None:
    """Run one migration file's SQL inside our schema (the rest of this transaction only)."""
    _execute(conn, _SET_LOCAL_SEARCH_PATH)
    with conn.cursor() as cur:
        cur.execute(script)


_INSERT_MIGRATION = "INSERT INTO {schema}.schema_migrations (name) VALUES (%(name)s)"


def insert_migration(conn: Connection, name: str) -> None:
    """Record a migration as applied."""
    _execute(conn, _INSERT_MIGRATION, {"name": name})


# Our migrations record in `public` has a `name` column and our first file in it; a Rails
# or dbmate `schema_migrations(version)` has neither, and is never touched.
_LEGACY_RECORD_EXISTS = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute"
    " WHERE attrelid = to_regclass('public.schema_migrations') AND attname = 'name'"
    " AND NOT attisdropped)"
)
_LEGACY_RECORD_IS_OURS = (
    "SELECT EXISTS (SELECT 1 FROM public.schema_migrations WHERE name = {legacy_first})"
)
_LOCK_LEGACY_MIGRATIONS = "SELECT pg_advisory_xact_lock({legacy_lock_key})"
_MOVE_LEGACY_TABLES = (
    "ALTER TABLE public.trainings SET SCHEMA {schema};"
    " ALTER TABLE public.webhook_events SET SCHEMA {schema};"
    " ALTER TABLE public.training_transitions SET SCHEMA {schema};"
    " ALTER TABLE public.schema_migrations SET SCHEMA {schema}"
)


def move_legacy_tables(conn: Connection) -> bool:
    """Move the tables the release before schemas made in `public` (with their rows,
    indexes, constraints and owned sequences) into our schema, when they are there; True
    when they were moved. Holds that release's migration lock until the transaction ends."""
    _execute(conn, _LOCK_LEGACY_MIGRATIONS)
    if not (_scalar(conn, _LEGACY_RECORD_EXISTS) and _scalar(conn, _LEGACY_RECORD_IS_OURS)):
        return False
    _execute(conn, _MOVE_LEGACY_TABLES)
    return True
