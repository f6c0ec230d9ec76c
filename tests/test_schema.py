"""A schema of our own on a real PostgreSQL: beside a host's tables, two installs in one
database, the upgrade from the release that lived in `public`, and statements that name
the schema whatever the connection's search_path says."""

from __future__ import annotations

import itertools
import select
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg2.extras
import pytest

from tests.support import select_transitions, wait_until
from tests.web_support import SECRET, WEBHOOK_PATH, signed_delivery, training_payload
from webhook_sync import db, inbox, migrations, service, web
from webhook_sync.config import Config
from webhook_sync.vocabulary import Source

OTHER = "ws_two"
TID = "zz4ibbonubfz7carwiefibzgga"
# The host platform's own tables, as a Rails app on the same database has them.
HOST_TABLES_SQL = """
CREATE TABLE public.schema_migrations (version text PRIMARY KEY);
INSERT INTO public.schema_migrations VALUES ('20240101000000'), ('20240202000000');
CREATE TABLE public.trainings (
    id serial PRIMARY KEY, title text NOT NULL, status text DEFAULT 'draft'
);
CREATE INDEX trainings_title_idx ON public.trainings (title);
INSERT INTO public.trainings (title) VALUES ('onboarding'), ('safety');
"""


# What PostgreSQL knows about one schema, query by query.
CATALOG_QUERIES = {
    "relations": "SELECT c.relname, c.relkind FROM pg_class AS c"
    " JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE n.nspname = %(schema)s ORDER BY 1",
    "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default"
    " FROM information_schema.columns WHERE table_schema = %(schema)s ORDER BY 1, 2",
    "indexes": "SELECT indexdef FROM pg_indexes WHERE schemaname = %(schema)s ORDER BY 1",
    "functions": "SELECT p.proname FROM pg_proc AS p"
    " JOIN pg_namespace AS n ON n.oid = p.pronamespace WHERE n.nspname = %(schema)s ORDER BY 1",
}


def catalog_of(conn: db.Connection, schema: str) -> dict[str, Any]:
    """Everything PostgreSQL knows about one schema's relations, columns, indexes and
    functions, and every row of its tables: equal before and after means untouched."""
    found: dict[str, Any] = {}
    with conn, conn.cursor() as cur:
        for name, query in CATALOG_QUERIES.items():
            cur.execute(query, {"schema": schema})
            found[name] = cur.fetchall()
        found["rows"] = {}
        for table, kind in found["relations"]:
            if kind == "r":
                cur.execute(f'SELECT * FROM "{schema}"."{table}" ORDER BY 1')
                found["rows"][table] = cur.fetchall()
    return found


@pytest.fixture()
def other(database_url: str) -> Iterator[db.Connection]:
    """A second install in the same database: schema ws_two, migrated."""
    connection = db.connect(database_url, "webhook-sync tests", schema=OTHER)
    migrations.migrate(connection)
    yield connection
    connection.close()


def deliver(conn: db.Connection, webhook_id: str, status: str) -> inbox.DeliveryResult:
    """One verified delivery of TID's `status` through the inbox (commits)."""
    payload = training_payload(TID, status)
    return inbox.receive_delivery(conn, webhook_id=webhook_id, payload=payload, signed_at=None)


def track(conn: db.Connection, training_id: str = TID) -> None:
    """Track a training in its own transaction."""
    with conn:
        service.track_training(conn, training_id, "user-1")


def test_migrate_beside_a_rails_app_leaves_its_tables_untouched(empty_database_url: str) -> None:
    """A Rails-style public.schema_migrations(version) and a host public.trainings with
    other columns: migrate succeeds, they keep their rows and definitions, and nothing of
    ours is created in public."""
    conn = db.connect(empty_database_url)
    with conn, conn.cursor() as cur:
        cur.execute(HOST_TABLES_SQL)
    before = catalog_of(conn, "public")

    applied = migrations.migrate(conn)
    track(conn)
    deliver(conn, "msg_1", "succeeded")
    after = catalog_of(conn, "public")
    ours = catalog_of(conn, "webhook_sync")
    conn.close()

    assert applied == [m.name for m in migrations.list_migrations()]
    assert after == before
    assert {name for name, _ in ours["relations"]} >= {
        "trainings",
        "webhook_events",
        "training_transitions",
        "schema_migrations",
        "training_transitions_id_seq",
        "trainings_due_idx",
    }
    assert [row[0] for row in ours["rows"]["trainings"]] == [TID]


def test_fresh_database_gets_our_schema_and_nothing_in_public(empty_database_url: str) -> None:
    """Every object migrate creates is in webhook_sync; public stays empty."""
    conn = db.connect(empty_database_url)

    migrations.migrate(conn)
    public = catalog_of(conn, "public")
    conn.close()

    assert public == {"relations": [], "columns": [], "indexes": [], "functions": [], "rows": {}}


def test_two_installs_in_one_database_do_not_see_each_other(
    conn: db.Connection, other: db.Connection
) -> None:
    """The same training tracked in two schemas: a delivery and a track in one change
    nothing in the other, whatever search_path the connection has."""
    track(conn)
    deliver(conn, "msg_default", "succeeded")
    with other, other.cursor() as cur:
        # A search_path pointing at the other install must not redirect our statements.
        cur.execute("SET search_path TO webhook_sync")
    track(other)
    deliver(other, "msg_other", "processing")
    track(other, "only_in_other")

    mine = db.select_training(conn, TID)
    theirs = db.select_training(other, TID)

    assert (mine["replicate_status"], mine["training_status"]) == ("succeeded", "completed")
    assert (theirs["replicate_status"], theirs["training_status"]) == ("processing", "training")
    assert db.select_training(conn, "only_in_other") is None
    assert [e["webhook_id"] for e in db.select_events(conn)] == ["msg_default"]
    assert [e["webhook_id"] for e in db.select_events(other)] == ["msg_other"]
    assert [t["source"] for t in select_transitions(other, TID)] == ["webhook"]


def test_each_install_notifies_on_its_own_channel(
    database_url: str, conn: db.Connection, other: db.Connection
) -> None:
    """The default schema keeps the `training_status` channel; another install notifies
    on `<schema>_training_status`, and neither hears the other."""
    listener = db.connect(database_url)
    listener.autocommit = True
    listener.cursor().execute(f"LISTEN training_status; LISTEN {OTHER}_training_status")
    track(conn)
    track(other)

    deliver(other, "msg_other", "processing")
    deliver(conn, "msg_default", "succeeded")

    def heard() -> list[Any]:
        if select.select([listener], [], [], 0.05)[0]:
            listener.poll()
        return listener.notifies if len(listener.notifies) >= 2 else []

    notes = wait_until(heard, message="two NOTIFYs")
    listener.close()
    assert [(note.channel, note.payload.count("processing")) for note in notes] == [
        (f"{OTHER}_training_status", 1),
        ("training_status", 0),
    ]
    assert db.notify_channel("webhook_sync") == "training_status"


def test_web_process_serves_the_configured_schema(
    database_url: str, conn: db.Connection, other: db.Connection
) -> None:
    """With DATABASE_SCHEMA=ws_two the web process's pooled connections write there only."""
    track(other)
    config = Config(database_url=database_url, webhook_secrets=(SECRET,), database_schema=OTHER)
    app = web.create_app(config)
    try:
        body, headers = signed_delivery(training_payload(TID, "processing"))
        answer = app.test_client().post(WEBHOOK_PATH, data=body, headers=headers)
    finally:
        app.extensions["webhook_sync"].close()

    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["result"] == "applied"
    assert db.select_training(other, TID)["replicate_status"] == "processing"
    assert db.select_training(conn, TID) is None


def test_reading_pending_migrations_leaves_the_callers_transaction_alone(
    conn: db.Connection,
) -> None:
    """pending_migrations reads in the caller's transaction and never rolls it back."""
    service.track_training(conn, "uncommitted", "user-1")

    pending = migrations.pending_migrations(conn)
    conn.commit()

    assert pending == []
    assert db.select_training(conn, "uncommitted") is not None


@pytest.mark.parametrize(
    "column", ["user_id", "training_status", "id = 'x', user_id", "lease_owner"]
)
def test_receive_delivery_writes_only_the_refreshed_columns(
    conn: db.Connection, column: str
) -> None:
    """A column outside the fixed list is refused before any SQL is sent."""
    track(conn)
    row = db.select_training(conn, TID)

    with pytest.raises(ValueError, match="cannot write"):
        db.receive_delivery(
            conn,
            training_id=TID,
            reported_status="processing",
            source=Source.POLL,
            fields={column: "x"},
        )
    conn.rollback()

    assert db.select_training(conn, TID) == row


def test_optional_filters_are_fixed_statements(database_url: str) -> None:
    """Every combination of optional filters runs one of a fixed set of statements
    (rendered once per schema), and each filter still filters."""
    # A schema no other test used, so that this process has rendered nothing for it yet.
    conn = db.connect(database_url, schema=f"ws_{uuid.uuid4().hex[:12]}")
    migrations.migrate(conn)
    track(conn, "t1")
    track(conn, "t2")
    with conn, conn.cursor() as cur:
        psycopg2.extras.execute_values(
            cur,
            f"INSERT INTO {conn.schema}.webhook_events"
            " (webhook_id, training_id, payload, outcome, received_at) VALUES %s",
            [
                ("m1", "t1", psycopg2.extras.Json({}), "applied", datetime(2026, 1, 1, tzinfo=UTC)),
                ("m2", "t2", psycopg2.extras.Json({}), "pending", datetime(2026, 1, 3, tzinfo=UTC)),
            ],
        )
    rendered_before = set(conn.statements)
    answers = {}
    with conn:
        for training_id, outcome, since, newest in itertools.product(
            (None, "t1"), (None, "pending"), (None, datetime(2026, 1, 2, tzinfo=UTC)), (True, False)
        ):
            events = db.select_events(
                conn,
                training_id=training_id,
                outcome=outcome,
                received_since=since,
                newest_first=newest,
            )
            answers[training_id, outcome, since, newest] = [e["webhook_id"] for e in events]
        for ids in (None, ["t2"], []):
            answers[tuple(ids or ()) if ids is not None else None] = [
                row["id"] for row in db.select_trainings(conn, ids)
            ]
    rendered = set(conn.statements) - rendered_before
    conn.close()

    assert len(rendered) == 3  # select_events newest and oldest first, select_trainings
    assert answers[None, None, None, True] == ["m2", "m1"]
    assert answers[None, None, None, False] == ["m1", "m2"]
    assert answers["t1", None, None, True] == ["m1"]
    assert answers[None, "pending", None, True] == ["m2"]
    assert answers[None, None, datetime(2026, 1, 2, tzinfo=UTC), False] == ["m2"]
    assert answers["t1", "pending", None, True] == []
    assert answers[None] == ["t1", "t2"]
    assert answers[("t2",)] == ["t2"]
    assert answers[()] == []


# The migrations the release before schemas shipped; it applied them into `public`.
PREVIOUS_RELEASE = ("0001_trainings.sql", "0002_replicate_created_at.sql")
PREVIOUS_LOCK_KEY = 0x7765_6268_7379_6E63 & 0x7FFF_FFFF_FFFF_FFFF
# Rows as that release left them: finished, in flight and leased, waiting, and an inbox
# with a pending event; transition 4 was deleted, so the sequence is ahead of max(id).
PREVIOUS_ROWS_SQL = """
INSERT INTO trainings (id, user_id, training_status, replicate_status, destination,
    version_id, weights_url, started_at, completed_at, updated_by, replicate_created_at)
VALUES ('done', 'u1', 'completed', 'succeeded', 'acme/lora', 'abc',
    'https://replicate.delivery/w.tar', '2026-01-01T00:00:00Z', '2026-01-01T00:10:00Z',
    'webhook', '2025-12-31T23:59:00Z');
INSERT INTO trainings (id, user_id, replicate_status, lease_owner, lease_expires_at)
VALUES ('running', 'u2', 'processing', 'host:1:abc', now() + interval '1 minute');
INSERT INTO trainings (id, user_id) VALUES ('waiting', 'u3');
INSERT INTO trainings (id, user_id, training_status) VALUES ('host_finished', 'u4', 'failed');
INSERT INTO training_transitions (training_id, source, outcome, from_replicate_status,
    to_replicate_status, from_training_status, to_training_status, reason)
VALUES ('done', 'webhook', 'applied', NULL, 'processing', 'training', 'training', 'a'),
       ('done', 'webhook', 'applied', 'processing', 'succeeded', 'training', 'completed', 'b'),
       ('done', 'poll', 'conflict', 'succeeded', 'failed', 'completed', 'completed', 'c'),
       ('running', 'poll', 'applied', NULL, 'processing', 'training', 'training', 'd');
DELETE FROM training_transitions WHERE id = 4;
INSERT INTO webhook_events (webhook_id, training_id, source, payload, outcome)
VALUES ('msg_done', 'done', 'webhook', '{"id": "done", "status": "succeeded"}', 'applied'),
       ('msg_early', 'waiting', 'webhook', '{"id": "waiting", "status": "succeeded"}',
        'pending');
"""
UPGRADED_TABLES = ("trainings", "webhook_events", "training_transitions", "schema_migrations")


def migrate_as_the_previous_release(conn: db.Connection) -> None:
    """What that release's `migrate` did: each file in its own transaction under its
    advisory lock, run with the default search_path (so into public), and recorded in
    public.schema_migrations(name, applied_at)."""
    for migration in migrations.list_migrations():
        if migration.name not in PREVIOUS_RELEASE:
            continue
        with conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (PREVIOUS_LOCK_KEY,))
            cur.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            cur.execute(migration.path.read_text(encoding="utf-8"))
            cur.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (migration.name,))


def table_rows(conn: db.Connection, schema: str) -> dict[str, Any]:
    """Every row of the upgraded tables, and the transitions sequence's state."""
    with conn, conn.cursor() as cur:
        rows = {}
        for table in UPGRADED_TABLES:
            cur.execute(f"SELECT * FROM {schema}.{table} ORDER BY 1")
            rows[table] = cur.fetchall()
        # Migrations newer than the previous release are applied after the move, not moved.
        rows["schema_migrations"] = [
            row for row in rows["schema_migrations"] if row[0] in PREVIOUS_RELEASE
        ]
        cur.execute(f"SELECT last_value, is_called FROM {schema}.training_transitions_id_seq")
        rows["sequence"] = cur.fetchone()
    return rows


def test_upgrade_moves_the_previous_release_out_of_public(empty_database_url: str) -> None:
    """A database migrated and filled by the release that lived in public is moved into
    webhook_sync by migrate: every row, the sequence and the pending event intact, and
    nothing of ours left in public."""
    conn = db.connect(empty_database_url)
    migrate_as_the_previous_release(conn)
    with conn, conn.cursor() as cur:
        cur.execute(PREVIOUS_ROWS_SQL)
    before = table_rows(conn, "public")

    applied = migrations.migrate(conn)
    after = table_rows(conn, "webhook_sync")
    # 0007 adds the change feed's transaction id, 0 for rows older than it (first in the feed).
    moved_xact_ids = {row[-1] for row in after["training_transitions"]}
    after["training_transitions"] = [row[:-1] for row in after["training_transitions"]]
    # The migrations of later releases are recorded after the moved ones.
    after["schema_migrations"] = after["schema_migrations"][: len(PREVIOUS_RELEASE)]
    public = catalog_of(conn, "public")
    track(conn, "waiting")
    transitions = select_transitions(conn, "waiting")
    row = db.select_training(conn, "waiting")
    conn.close()

    assert applied == [m.name for m in migrations.list_migrations()][len(PREVIOUS_RELEASE) :]
    assert before["sequence"] == (4, True)
    assert moved_xact_ids == {"0"}
    # Later migrations are recorded beside the moved records, which stay as they were.
    assert {
        **after,
        "schema_migrations": after["schema_migrations"][: len(before["schema_migrations"])],
    } == before
    assert public["relations"] == [] and public["functions"] == []
    assert row["training_status"] == "completed"
    assert [(t["id"], t["source"], t["to_replicate_status"]) for t in transitions] == [
        (5, "webhook", "succeeded")
    ]
