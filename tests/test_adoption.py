"""Adoption from the platform's own table (HOST_TABLE) by each sweep, on a real PostgreSQL
with a Replicate over HTTP: rows in flight there that we do not know are tracked under
their user id, checked in the same sweep, and their waiting webhooks applied at once;
rows without a user id counted; rows left in flight after ours finished corrected."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterator

import psycopg2
import pytest
from prometheus_client import REGISTRY

from tests.fake_replicate import FakeReplicate, running
from tests.support import in_threads
from tests.web_support import training_payload
from webhook_sync import adoption, db, inbox, logs, replicate, service, sweep
from webhook_sync.host_binding import HostBinding, parse_host_binding
from webhook_sync.training import parse_training

SETTINGS = sweep.SweepSettings(
    interval_seconds=120, lease_seconds=30, concurrency=4, stuck_after_seconds=3600, max_rps=1000
)
BINDING = HostBinding(
    table_schema="public",
    table="user_models",
    training_id_column="replicate_model_id",
    user_id_column="user_id",
    status_column="training_status",
    updated_at_column="updated_at",
)


def create_host_table(conn: db.Connection, user_id_type: str = "bigint") -> None:
    """The post-mortem's table, with the user id column of the given type (commits)."""
    with conn, conn.cursor() as cur:
        cur.execute(
            f"CREATE TABLE public.user_models (user_id {user_id_type},"
            " training_status text, replicate_model_id text, updated_at timestamptz)"
        )


def add_host_rows(conn: db.Connection, *rows: tuple[object, str | None, str | None]) -> None:
    """Rows (user_id, training_status, replicate_model_id) as the platform writes them."""
    with conn, conn.cursor() as cur:
        for user_id, status, training_id in rows:
            cur.execute(
                "INSERT INTO public.user_models"
                " (user_id, training_status, replicate_model_id, updated_at)"
                " VALUES (%s, %s, %s, now() - interval '1 hour')",
                (user_id, status, training_id),
            )


def tracked(conn: db.Connection) -> dict[str, tuple[str, str, str | None]]:
    """(user_id, training_status, replicate_status) of every row we track, by id."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT id, user_id, training_status, replicate_status FROM webhook_sync.trainings"
        )
        return {row[0]: row[1:] for row in cur.fetchall()}


@pytest.fixture()
def fake() -> Iterator[FakeReplicate]:
    """A FakeReplicate served on a free port."""
    with running() as server:
        yield server


@pytest.fixture()
def bound(database_url: str) -> Iterator[db.Connection]:
    """A connection that carries the binding to public.user_models (the table is the
    test's to create)."""
    connection = db.connect(database_url, "webhook-sync tests", host=BINDING)
    yield connection
    connection.close()


def client_for(fake: FakeReplicate) -> replicate.ReplicateClient:
    """A fast client for the fake: no real waits between retries."""
    return replicate.ReplicateClient(
        fake.token, fake.url, max_rps=1000, backoff_base=0.001, backoff_cap=0.01, max_attempts=2
    )


def adopted_total() -> float:
    """webhook_sync_trainings_adopted_total{how="host_table"} now."""
    sample = REGISTRY.get_sample_value(
        "webhook_sync_trainings_adopted_total", {"how": adoption.HOW}
    )
    return sample or 0.0


def test_rows_in_flight_are_tracked_with_their_user_and_checked_in_the_same_sweep(
    bound: db.Connection, fake: FakeReplicate
) -> None:
    """Only rows in `training` with a training id and a user id (no longer than any other
    entry point takes) that we do not track yet are adopted; the sweep that adopted them
    asks Replicate about them at once."""
    create_host_table(bound)
    add_host_rows(
        bound,
        (45038279, "training", "k8sy6bgx31rm80cr2cwbn2bqkw"),
        (7, "training", "second0000000000000000000a"),
        (8, "completed", "finished000000000000000000"),
        (9, "training", None),
        (None, "training", "nouser00000000000000000000"),
        (10, "training", "known00000000000000000000a"),
        (11, "training", "x" * 201),
    )
    with bound:
        db.insert_training(bound, "known00000000000000000000a", "someone-else", None)
    fake.add("k8sy6bgx31rm80cr2cwbn2bqkw", "processing")
    fake.add("second0000000000000000000a", "succeeded")
    fake.add("known00000000000000000000a", "processing")
    before = adopted_total()

    result = sweep.run_sweep(bound, client_for(fake), SETTINGS)

    assert result.host_adopted == 2
    assert adopted_total() - before == 2
    assert tracked(bound) == {
        "k8sy6bgx31rm80cr2cwbn2bqkw": ("45038279", "training", "processing"),
        "second0000000000000000000a": ("7", "completed", "succeeded"),
        "known00000000000000000000a": ("someone-else", "training", "processing"),
    }
    assert fake.count("/v1/trainings/k8sy6bgx31rm80cr2cwbn2bqkw") == 1


def test_a_second_sweep_adopts_nothing_more(
    bound: db.Connection, fake: FakeReplicate, caplog: pytest.LogCaptureFixture
) -> None:
    """A row adopted once is known: the next sweep's anti-join leaves it alone, and the
    summary line says how many each sweep adopted."""
    create_host_table(bound)
    add_host_rows(bound, (1, "training", "once00000000000000000000aa"))
    fake.add("once00000000000000000000aa", "processing")
    caplog.set_level(logging.INFO, logger=logs.LOGGER_NAME)

    first = sweep.run_sweep(bound, client_for(fake), SETTINGS)
    second = sweep.run_sweep(bound, client_for(fake), SETTINGS)

    assert (first.host_adopted, second.host_adopted) == (1, 0)
    assert [
        (record.fields["count"], record.fields["table"])
        for record in caplog.records
        if record.getMessage() == "training_adopted_from_host"
    ] == [(1, "public.user_models")]


def test_a_webhook_waiting_in_the_inbox_is_applied_at_once(
    bound: db.Connection, fake: FakeReplicate
) -> None:
    """A delivery stored as `pending` before the row was known is applied when the host row
    is adopted, by the adoption itself."""
    create_host_table(bound)
    add_host_rows(bound, (45038279, "training", "waiting0000000000000000000"))
    payload = training_payload("waiting0000000000000000000", "succeeded")
    inbox.receive_delivery(bound, webhook_id="msg_waiting", payload=payload, signed_at=None)

    result = adoption.adopt_in_flight(bound)

    assert (result.adopted, result.pending_applied) == (1, 1)
    assert tracked(bound) == {"waiting0000000000000000000": ("45038279", "completed", "succeeded")}
    with bound:
        assert db.select_event(bound, "msg_waiting")["outcome"] == "applied"


@pytest.mark.parametrize(
    ("user_id_type", "user_id"),
    [("bigint", 45038279), ("uuid", "6f1c2a52-6d3e-4c8e-9a41-1f0d2e3b4c5d"), ("text", "u-42")],
)
def test_a_user_id_of_any_type_is_read_as_text(
    bound: db.Connection, user_id_type: str, user_id: object
) -> None:
    """An int, a uuid or a text user id column: our row holds its text."""
    create_host_table(bound, user_id_type)
    add_host_rows(bound, (user_id, "training", "typed00000000000000000000a"))

    adoption.adopt_in_flight(bound)

    assert tracked(bound) == {"typed00000000000000000000a": (str(user_id), "training", None)}


def test_the_adoption_is_bounded_per_sweep(bound: db.Connection) -> None:
    """More new rows in flight than the limit: the rest wait for the next adoption."""
    create_host_table(bound)
    add_host_rows(bound, *[(n, "training", f"bounded{n:019d}") for n in range(5)])

    first = adoption.adopt_in_flight(bound, limit=3)
    second = adoption.adopt_in_flight(bound, limit=3)

    assert (first.adopted, second.adopted) == (3, 2)
    assert len(tracked(bound)) == 5


def test_spellings_and_names_come_from_the_binding(database_url: str) -> None:
    """A table in another schema with mixed-case names holding spaces (quoted, never
    pasted) and its own word for `training`: only rows holding that word are in flight."""
    binding, problems = parse_host_binding(
        {
            "HOST_TABLE": "Platform App.User Models",
            "HOST_TRAINING_ID_COLUMN": "Model Id",
            "HOST_USER_ID_COLUMN": "Owner",
            "HOST_STATUS_COLUMN": "State",
            "HOST_STATUS_VALUES": "training=in_progress,completed=ready,failed=error",
        }
    )
    assert problems == []
    conn = db.connect(database_url, "webhook-sync tests", host=binding)
    try:
        with conn, conn.cursor() as cur:
            cur.execute('CREATE SCHEMA "Platform App"')
            cur.execute(
                'CREATE TABLE "Platform App"."User Models"'
                ' ("Owner" text, "State" text, "Model Id" text)'
            )
            cur.execute(
                'INSERT INTO "Platform App"."User Models" VALUES'
                " ('alice', 'in_progress', 'spelled000000000000000000a'),"
                " ('bob', 'training', 'spelled000000000000000000b')"
            )

        result = adoption.adopt_in_flight(conn)

        assert result.adopted == 1
        assert tracked(conn) == {"spelled000000000000000000a": ("alice", "training", None)}
    finally:
        conn.close()


def test_two_sweeps_racing_adopt_each_row_once(
    database_url: str, fake: FakeReplicate, caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers' sweeps starting together: every row is adopted by exactly one of them,
    and meeting the other's insert is not a failure."""
    caplog.set_level(logging.WARNING, logger=logs.LOGGER_NAME)
    setup = db.connect(database_url, "webhook-sync tests", host=BINDING)
    try:
        create_host_table(setup)
        ids = [f"race{n:022d}" for n in range(200)]
        add_host_rows(setup, *[(n, "training", training_id) for n, training_id in enumerate(ids)])
        for training_id in ids:
            fake.add(training_id, "processing")
    finally:
        setup.close()
    connections = [db.connect(database_url, f"sweep {n}", host=BINDING) for n in range(2)]
    try:
        results = in_threads(
            2, lambda n: sweep.run_sweep(connections[n], client_for(fake), SETTINGS)
        )
        rows = tracked(connections[0])
    finally:
        for connection in connections:
            connection.close()

    assert sum(result.host_adopted for result in results) == len(ids)
    assert [r for r in caplog.records if r.getMessage() == "host_adoption_failed"] == []
    assert sorted(rows) == sorted(ids)
    assert {user for user, _, _ in rows.values()} == {str(n) for n in range(len(ids))}


def test_a_table_the_role_cannot_read_is_logged_and_the_sweep_goes_on(
    bound: db.Connection, fake: FakeReplicate, caplog: pytest.LogCaptureFixture
) -> None:
    """A role that may no longer read the user id column (revoked after the start check)
    but may still write the mirror: adoption fails alone, with one warning
    naming the table; the row we already track is still checked and mirrored."""
    create_host_table(bound)
    add_host_rows(
        bound,
        (1, "training", "unreadable0000000000000000"),
        (2, "training", "tracked000000000000000000a"),
    )
    role = f"wst_noread_{uuid.uuid4().hex[:8]}"
    with bound, bound.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} NOLOGIN")
        cur.execute(f"GRANT USAGE ON SCHEMA webhook_sync TO {role}")
        cur.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA webhook_sync TO {role}")
        cur.execute(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA webhook_sync TO {role}")
        cur.execute(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA webhook_sync TO {role}")
        # What the mirror needs (find the row by training id, read and write its status,
        # write updated_at); not the user id, which adoption reads.
        cur.execute(
            f"GRANT SELECT (replicate_model_id, training_status) ON public.user_models TO {role}"
        )
        cur.execute(f"GRANT UPDATE (training_status, updated_at) ON public.user_models TO {role}")
    with bound:
        db.insert_training(bound, "tracked000000000000000000a", "2", None)
    fake.add("tracked000000000000000000a", "succeeded")
    caplog.set_level(logging.WARNING, logger=logs.LOGGER_NAME)
    try:
        with bound, bound.cursor() as cur:
            cur.execute(f"SET ROLE {role}")
        result = sweep.run_sweep(bound, client_for(fake), SETTINGS)
    finally:
        with bound, bound.cursor() as cur:
            cur.execute("RESET ROLE")
            cur.execute(f"DROP OWNED BY {role}")
            cur.execute(f"DROP ROLE {role}")

    assert (result.host_adopted, result.checked, result.errors) == (0, 1, 0)
    assert tracked(bound) == {"tracked000000000000000000a": ("2", "completed", "succeeded")}
    with bound, bound.cursor() as cur:
        cur.execute("SELECT replicate_model_id, training_status FROM public.user_models")
        assert dict(cur.fetchall()) == {
            "unreadable0000000000000000": "training",
            "tracked000000000000000000a": "completed",
        }
    failures = [r for r in caplog.records if r.getMessage() == "host_adoption_failed"]
    assert len(failures) == 1
    assert failures[0].fields["table"] == "public.user_models"
    assert "permission denied" in failures[0].fields["error"]


# --- host rows in flight without a user id -------------------------------------------


def test_rows_in_flight_without_a_user_id_are_counted_once_per_sweep(
    bound: db.Connection, fake: FakeReplicate, caplog: pytest.LogCaptureFixture
) -> None:
    """Rows adoption leaves alone for want of a user id (NULL or empty) are counted and
    logged once per sweep, the count only; rows without a training id, rows in another
    status and rows we track already are not counted."""
    create_host_table(bound, "text")
    add_host_rows(
        bound,
        (None, "training", "nulluser000000000000000000"),
        ("", "training", "emptyuser00000000000000000"),
        (None, "training", None),
        (None, "completed", "finisheduser00000000000000"),
        (None, "training", "knownuser00000000000000000"),
        ("u-1", "training", "withuser000000000000000000"),
    )
    with bound:
        db.insert_training(bound, "knownuser00000000000000000", "u-9", None)
    fake.add("knownuser00000000000000000", "processing")
    fake.add("withuser000000000000000000", "processing")
    caplog.set_level(logging.INFO, logger=logs.LOGGER_NAME)

    adopted = adoption.adopt_in_flight(bound)
    sweep.run_sweep(bound, client_for(fake), SETTINGS)

    assert (adopted.adopted, adopted.without_user_id) == (1, 2)
    counted = [r for r in caplog.records if r.getMessage() == "host_rows_without_user_id"]
    assert [r.fields for r in counted] == [{"table": "public.user_models", "count": 2}] * 2
    assert "nulluser000000000000000000" not in tracked(bound)


def test_no_line_when_every_row_in_flight_has_a_user_id(
    bound: db.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing to count, nothing logged."""
    create_host_table(bound)
    add_host_rows(bound, (1, "training", "fine000000000000000000000a"))
    caplog.set_level(logging.INFO, logger=logs.LOGGER_NAME)

    result = adoption.adopt_in_flight(bound)

    assert (result.adopted, result.without_user_id) == (1, 0)
    assert [r for r in caplog.records if r.getMessage() == "host_rows_without_user_id"] == []


# --- reconciliation: host rows left in flight after ours finished --------------------

# The binding above, copying three of our refreshed fields as well.
BINDING_WITH_COLUMNS = dataclasses.replace(
    BINDING,
    extra_columns=(
        ("version_id", "replicate_version_id"),
        ("weights_url", "lora_url"),
        ("completed_at", "finished_at"),
    ),
)


def finish_elsewhere(conn: db.Connection, training_id: str, status: str) -> None:
    """Track a training and apply Replicate's `status` on a connection without the binding
    (a process configured before HOST_TABLE was set): our row moves, theirs does not."""
    assert conn.host is None
    with conn:
        service.track_training(conn, training_id, "45038279")
    with conn:
        service.apply_update(conn, parse_training(training_payload(training_id, status)), "poll")


def host_table(conn: db.Connection, table: str = "public.user_models") -> dict[str, dict]:
    """The platform's rows by training id, as it reads them."""
    with conn, db.dict_cursor(conn) as cur:
        cur.execute(f"SELECT * FROM {table}")
        return {row["replicate_model_id"]: dict(row) for row in cur.fetchall()}


def reconciled_total(status: str) -> float:
    """webhook_sync_host_rows_reconciled_total{status} now."""
    labels = {"status": status}
    return REGISTRY.get_sample_value("webhook_sync_host_rows_reconciled_total", labels) or 0.0


@pytest.fixture()
def bound_with_columns(database_url: str) -> Iterator[db.Connection]:
    """A connection bound to public.user_models with HOST_COLUMNS, the table created with
    those columns."""
    connection = db.connect(database_url, "webhook-sync tests", host=BINDING_WITH_COLUMNS)
    create_host_table(connection)
    with connection, connection.cursor() as cur:
        cur.execute(
            "ALTER TABLE public.user_models ADD COLUMN replicate_version_id text,"
            " ADD COLUMN lora_url text, ADD COLUMN finished_at timestamptz"
        )
    yield connection
    connection.close()


def test_a_host_row_left_in_flight_is_written_as_the_mirror_writes(
    bound_with_columns: db.Connection,
    conn: db.Connection,
    fake: FakeReplicate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A training that finished here while the host row still says `training` (no binding
    then) is corrected by the next sweep: the status spelled, updated_at moved and the
    HOST_COLUMNS copied, exactly as the mirror writes a training finished under the
    binding; a training in flight on both sides is left alone."""
    bound = bound_with_columns
    add_host_rows(
        bound,
        (1, "training", "late0000000000000000000000"),
        (2, "training", "mirrored000000000000000000"),
        (3, "training", "running0000000000000000000"),
    )
    finish_elsewhere(conn, "late0000000000000000000000", "succeeded")
    with bound:
        service.track_training(bound, "mirrored000000000000000000", "2")
    with bound:
        payload = training_payload("mirrored000000000000000000", "succeeded")
        service.apply_update(bound, parse_training(payload), "poll")
    with bound:
        service.track_training(bound, "running0000000000000000000", "3")
    with bound:
        payload = training_payload("running0000000000000000000", "processing")
        service.apply_update(bound, parse_training(payload), "poll")
    fake.add("running0000000000000000000", "processing")
    before = host_table(bound)
    counted_before = reconciled_total("completed")
    caplog.set_level(logging.INFO, logger=logs.LOGGER_NAME)

    result = sweep.run_sweep(bound, client_for(fake), SETTINGS)
    after = host_table(bound)

    assert result.host_reconciled == 1
    assert reconciled_total("completed") - counted_before == 1
    late, mirrored = after["late0000000000000000000000"], after["mirrored000000000000000000"]
    ours = db.select_training(bound, "late0000000000000000000000")
    assert late["training_status"] == "completed"
    assert late["updated_at"] > before["late0000000000000000000000"]["updated_at"]
    assert (late["replicate_version_id"], late["lora_url"], late["finished_at"]) == (
        ours["version_id"],
        ours["weights_url"],
        ours["completed_at"],
    )
    assert ours["completed_at"] is not None
    # The same report mirrored under the binding wrote the same values.
    assert (late["training_status"], late["replicate_version_id"], late["finished_at"]) == (
        mirrored["training_status"],
        mirrored["replicate_version_id"],
        mirrored["finished_at"],
    )
    assert after["running0000000000000000000"] == before["running0000000000000000000"]
    assert after["mirrored000000000000000000"] == before["mirrored000000000000000000"]
    lines = [r.fields for r in caplog.records if r.getMessage() == "host_rows_reconciled"]
    assert lines == [{"table": "public.user_models", "count": 1, "limited": False}]


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [("deleted", "succeeded"), ("completed", "succeeded"), ("canceled", "succeeded")],
    ids=["an-app-state", "matching", "another-finished-status"],
)
def test_a_host_row_not_in_flight_is_never_written(
    bound: db.Connection, conn: db.Connection, theirs: str, ours: str
) -> None:
    """Only the in-flight spelling is replaced: a state of the app's own, the status that
    matches ours, or another finished status stays as it is, updated_at included."""
    create_host_table(bound)
    add_host_rows(bound, (1, theirs, "settled000000000000000000a"))
    finish_elsewhere(conn, "settled000000000000000000a", ours)
    before = host_table(bound)

    written = adoption.reconcile_finished(bound)

    assert written == 0
    assert host_table(bound) == before


def test_of_two_host_rows_of_one_training_only_the_one_in_flight_is_written(
    bound: db.Connection, conn: db.Connection
) -> None:
    """The app keeps an old row of the training as 'deleted' and a new one in flight: the
    new one is corrected, the old one stays the app's."""
    create_host_table(bound)
    add_host_rows(
        bound,
        (1, "deleted", "twice0000000000000000000aa"),
        (1, "training", "twice0000000000000000000aa"),
    )
    finish_elsewhere(conn, "twice0000000000000000000aa", "succeeded")

    written = adoption.reconcile_finished(bound)

    with bound, bound.cursor() as cur:
        cur.execute("SELECT training_status FROM public.user_models ORDER BY 1")
        assert [status for (status,) in cur.fetchall()] == ["completed", "deleted"]
    assert written == 1


def test_custom_spellings_into_an_enum_column(database_url: str, conn: db.Connection) -> None:
    """HOST_STATUS_VALUES: the platform's in-flight word is what is replaced, by its word
    for our status, in a PostgreSQL enum column; our spelling of `training` there is just
    another value of theirs and is left alone."""
    binding, problems = parse_host_binding(
        {
            "HOST_TABLE": "public.user_models",
            "HOST_TRAINING_ID_COLUMN": "replicate_model_id",
            "HOST_STATUS_VALUES": "training=in_progress,completed=ready,failed=broken",
        }
    )
    assert problems == [] and binding is not None
    with conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TYPE public.model_state AS ENUM"
            " ('in_progress', 'ready', 'broken', 'canceled', 'training')"
        )
        cur.execute(
            "CREATE TABLE public.user_models (user_id text,"
            " training_status public.model_state, replicate_model_id text)"
        )
        cur.execute(
            "INSERT INTO public.user_models VALUES"
            " ('1', 'in_progress', 'spelledfailed0000000000000'),"
            " ('2', 'training', 'spelledours000000000000000')"
        )
    finish_elsewhere(conn, "spelledfailed0000000000000", "failed")
    finish_elsewhere(conn, "spelledours000000000000000", "succeeded")
    spelled = db.connect(database_url, "webhook-sync tests", host=binding)
    try:
        written = adoption.reconcile_finished(spelled)
        rows = host_table(spelled)
    finally:
        spelled.close()

    assert written == 1
    assert {tid: row["training_status"] for tid, row in rows.items()} == {
        "spelledfailed0000000000000": "broken",
        "spelledours000000000000000": "training",
    }


def test_the_reconciliation_is_bounded_per_sweep(bound: db.Connection, conn: db.Connection) -> None:
    """More of our finished trainings left in flight there than the limit: the rest are
    corrected by the next sweep, and the line says when the bound was reached."""
    create_host_table(bound)
    ids = [f"bound{n:021d}" for n in range(5)]
    add_host_rows(bound, *[(n, "training", training_id) for n, training_id in enumerate(ids)])
    for training_id in ids:
        finish_elsewhere(conn, training_id, "canceled")

    first = adoption.reconcile_finished(bound, limit=3)
    second = adoption.reconcile_finished(bound, limit=3)
    third = adoption.reconcile_finished(bound, limit=3)

    assert (first, second, third) == (3, 2, 0)
    assert {row["training_status"] for row in host_table(bound).values()} == {"canceled"}


def test_a_refused_reconciliation_is_logged_and_the_sweep_goes_on(
    bound: db.Connection,
    conn: db.Connection,
    fake: FakeReplicate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The host's table refuses the correction (a CHECK): nothing there changes, the
    refusal is logged and counted like the mirror's, and the rest of the sweep runs; once
    the platform drops its refusal, the next sweep corrects the row."""
    create_host_table(bound)
    add_host_rows(bound, (1, "training", "refused0000000000000000000"))
    finish_elsewhere(conn, "refused0000000000000000000", "succeeded")
    with bound, bound.cursor() as cur:
        cur.execute(
            "ALTER TABLE public.user_models ADD CONSTRAINT no_completed"
            " CHECK (training_status <> 'completed')"
        )
    with bound:
        db.insert_training(bound, "checked0000000000000000000", "2", None)
    fake.add("checked0000000000000000000", "processing")
    refusals_before = REGISTRY.get_sample_value(
        "webhook_sync_host_writes_refused_total", {"source": adoption.RECONCILE}
    )
    caplog.set_level(logging.WARNING, logger=logs.LOGGER_NAME)

    refused = sweep.run_sweep(bound, client_for(fake), SETTINGS)
    held = host_table(bound)["refused0000000000000000000"]["training_status"]
    with bound, bound.cursor() as cur:
        cur.execute("ALTER TABLE public.user_models DROP CONSTRAINT no_completed")
    repaired = sweep.run_sweep(bound, client_for(fake), SETTINGS)

    assert (refused.host_reconciled, refused.checked, refused.errors) == (0, 1, 0)
    assert held == "training"
    lines = [r.fields for r in caplog.records if r.getMessage() == "host_table_refused"]
    assert len(lines) == 1
    assert lines[0]["source"] == "reconcile"
    assert "public.user_models" in lines[0]["reason"]
    assert "no_completed" in lines[0]["reason"]
    refusals = REGISTRY.get_sample_value(
        "webhook_sync_host_writes_refused_total", {"source": adoption.RECONCILE}
    )
    assert refusals - (refusals_before or 0.0) == 1
    assert repaired.host_reconciled == 1
    assert host_table(bound)["refused0000000000000000000"]["training_status"] == "completed"


@pytest.mark.parametrize(
    ("setting", "error"),
    [("statement_timeout", "statement timeout"), ("lock_timeout", "lock timeout")],
)
def test_a_row_the_app_holds_locked_past_the_timeout_waits_for_the_next_sweep(
    bound: db.Connection,
    conn: db.Connection,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
    setting: str,
    error: str,
) -> None:
    """A lock the app holds on the row past our statement timeout (or a lock_timeout the
    role or DATABASE_URL sets) fails the correction alone (logged, the connection still
    usable); the next try, the lock gone, writes it."""
    create_host_table(bound)
    add_host_rows(bound, (1, "training", "locked00000000000000000000"))
    finish_elsewhere(conn, "locked00000000000000000000", "succeeded")
    app = psycopg2.connect(database_url)
    caplog.set_level(logging.WARNING, logger=logs.LOGGER_NAME)
    try:
        with bound, bound.cursor() as cur:
            cur.execute(f"SET {setting} = '200ms'")
        with app.cursor() as cur:
            cur.execute("SELECT 1 FROM public.user_models FOR UPDATE")
        timed_out = adoption.reconcile_finished(bound)
    finally:
        app.close()
    written = adoption.reconcile_finished(bound)

    assert (timed_out, written) == (0, 1)
    failures = [r.fields for r in caplog.records if r.getMessage() == "host_reconcile_failed"]
    assert len(failures) == 1
    assert error in failures[0]["error"]
    assert host_table(bound)["locked00000000000000000000"]["training_status"] == "completed"


def test_a_host_row_reset_after_our_change_is_not_written_back(
    bound: db.Connection, conn: db.Connection, fake: FakeReplicate
) -> None:
    """An app that retrains by resetting its row to `training` (bumping updated_at) before
    it stores the new training id keeps its reset: the old training's result is not
    written back over it, so the new id lands on a row still in flight and is adopted."""
    create_host_table(bound)
    add_host_rows(bound, (1, "training", "retrained00000000000000000"))
    finish_elsewhere(conn, "retrained00000000000000000", "succeeded")
    with bound, bound.cursor() as cur:
        cur.execute("UPDATE public.user_models SET updated_at = now()")

    result = sweep.run_sweep(bound, client_for(fake), SETTINGS)

    assert result.host_reconciled == 0
    assert host_table(bound)["retrained00000000000000000"]["training_status"] == "training"
    # Before the reset (the host row older than our change), the same row is corrected.
    with bound, bound.cursor() as cur:
        cur.execute("UPDATE public.user_models SET updated_at = now() - interval '1 day'")
    assert sweep.run_sweep(bound, client_for(fake), SETTINGS).host_reconciled == 1
