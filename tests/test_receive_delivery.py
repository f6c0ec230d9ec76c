"""The SQL function `receive_delivery` (sql/0008, replaced by 0009) against its
specification, status.py and service.decide: the same outcome, the same row and the same
transition records for every pair and sequence of reports, on a real PostgreSQL."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import select_transitions, wait_until
from tests.test_host_mirror import bind, execute
from webhook_sync import db, inbox, migrations, service, status
from webhook_sync.training import Training
from webhook_sync.vocabulary import AppStatus, Outcome, ReplicateStatus, Source

# Every known status, and two that Replicate might add (ranked between processing and terminal).
STATUSES = [*ReplicateStatus, "queued", "paused"]
SOURCES = [Source.WEBHOOK, Source.POLL, Source.REPLAY]
T1 = datetime(2024, 1, 1, 0, 10, tzinfo=UTC)
T2 = datetime(2024, 1, 1, 0, 20, 0, 123456, tzinfo=UTC)
# Few values per field, so that sequences fill in, repeat and contradict them.
FIELD_VALUES = {
    "destination": [None, "acme/avatar", "acme/other"],
    "version_id": [None, "abc", "def"],
    "weights_url": [None, "https://r.example/w.tar", "https://r.example/x.tar"],
    "error": [None, "out of memory", "killed"],
    "started_at": [None, T1, T2],
    "completed_at": [None, T1, T2],
}
# What a transition record says, besides its id and creation time.
TRANSITION_FIELDS = (
    "training_id",
    "source",
    "outcome",
    "from_replicate_status",
    "to_replicate_status",
    "from_training_status",
    "to_training_status",
    "reason",
    "replicate_completed_at",
)
# The row the spec predicts: every column a report may write (not the database's clock).
ROW_FIELDS = ("replicate_status", "training_status", "updated_by", *db.REFRESHED_COLUMNS)

reports = st.builds(
    lambda status_, source, fields: (Training(id="", status=status_, **fields), source),
    st.sampled_from(STATUSES),
    st.sampled_from(SOURCES),
    st.fixed_dictionaries({column: st.sampled_from(v) for column, v in FIELD_VALUES.items()}),
)
# A fresh row (track), or one the host platform wrote as finished without a Replicate status.
start_rows = st.one_of(
    st.just((AppStatus.TRAINING, {})),
    st.tuples(
        st.sampled_from([AppStatus.COMPLETED, AppStatus.FAILED, AppStatus.CANCELED]),
        st.fixed_dictionaries({column: st.sampled_from(v) for column, v in FIELD_VALUES.items()}),
    ),
)


class Spec:
    """What the funnel did before the SQL function, in Python: service.decide, then the row
    and transition writes `service.apply_update` made of the decision."""

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = {column: row[column] for column in ROW_FIELDS} | {"id": row["id"]}
        self.transitions: list[dict[str, Any]] = []

    def apply(self, training: Training, source: Source) -> tuple[Outcome, str]:
        row = self.row
        decision, changes = service.decide(row, training)
        transition = {
            "training_id": row["id"],
            "source": source,
            "outcome": decision.outcome,
            "from_replicate_status": row["replicate_status"],
            "from_training_status": row["training_status"],
            "reason": decision.reason,
            "replicate_completed_at": None,
        }
        if decision.refused:
            self.transitions.append(
                transition
                | {
                    "to_replicate_status": training.status,
                    "to_training_status": row["training_status"],
                }
            )
            return decision.outcome, decision.reason
        moved = decision.outcome == Outcome.APPLIED
        if not moved and not changes:
            return decision.outcome, decision.reason
        row.update(changes, updated_by=source)
        if moved:
            row["replicate_status"] = training.status
            row["training_status"] = status.app_status_for(training.status)
            self.transitions.append(
                transition
                | {
                    "to_replicate_status": row["replicate_status"],
                    "to_training_status": row["training_status"],
                    "replicate_completed_at": training.completed_at,
                }
            )
        return decision.outcome, decision.reason


def insert_row(conn: db.Connection, training_status: str, fields: dict[str, Any]) -> dict:
    """A tracked training as the host platform may have written it (no Replicate status)."""
    training_id = f"hyp_{uuid.uuid4().hex}"
    values = {"id": training_id, "user_id": "user-1", "training_status": training_status}
    values |= {column: value for column, value in fields.items() if value is not None}
    with conn, conn.cursor() as cur:
        cur.execute(
            f"INSERT INTO webhook_sync.trainings ({', '.join(values)})"
            f" VALUES ({', '.join(['%s'] * len(values))})",
            list(values.values()),
        )
    row = db.select_training(conn, training_id)
    assert row is not None
    return row


def event_outcome(conn: db.Connection, webhook_id: str) -> str | None:
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT outcome FROM webhook_sync.webhook_events WHERE webhook_id = %s", (webhook_id,)
        )
        found = cur.fetchone()
        return found[0] if found else None


def check_same(conn: db.Connection, spec: Spec) -> None:
    """The database holds the row and the transitions the spec predicts."""
    with conn:
        row = db.select_training(conn, spec.row["id"])
        transitions = select_transitions(conn, spec.row["id"])
    assert row is not None
    assert {column: row[column] for column in spec.row} == spec.row
    assert [{f: t[f] for f in TRANSITION_FIELDS} for t in transitions] == spec.transitions


def deliver(
    conn: db.Connection, training: Training, source: Source, webhook_id: str
) -> service.ApplyResult | None:
    """One delivery as the web process makes it: stored and applied in one autocommit call."""
    payload = {"id": training.id, "status": training.status}
    with db.autocommit(conn):
        return service.apply_delivery(
            conn, training, source, webhook_id=webhook_id, payload=payload, signed_at=None
        )


def test_every_pair_of_statuses_decides_as_the_spec(conn: db.Connection) -> None:
    """From a row in each status (none yet, each known, unknown, host-written finished),
    each reported status gives the spec's outcome, reason, row and transitions."""
    starts = [(None, AppStatus.TRAINING)] + [(s, status.app_status_for(s)) for s in STATUSES]
    starts += [(None, s) for s in (AppStatus.COMPLETED, AppStatus.FAILED, AppStatus.CANCELED)]
    checked = 0
    for (first, training_status), reported in itertools.product(starts, STATUSES):
        row = insert_row(conn, training_status, {})
        if first is not None:
            with conn, conn.cursor() as cur:
                cur.execute(
                    "UPDATE webhook_sync.trainings SET replicate_status = %s WHERE id = %s",
                    (first, row["id"]),
                )
            row["replicate_status"] = first
        spec = Spec(row)
        training = Training(id=row["id"], status=reported)
        expected = spec.apply(training, Source.POLL)

        with conn:
            result = service.apply_update(conn, training, Source.POLL)

        assert (result.outcome, result.reason) == expected, (first, training_status, reported)
        check_same(conn, spec)
        checked += 1

    assert checked == len(starts) * len(STATUSES)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(start=start_rows, sequence=st.lists(st.tuples(reports, st.booleans()), max_size=8))
def test_every_sequence_of_reports_gives_the_specs_rows_and_transitions(
    conn: db.Connection,
    start: tuple[str, dict[str, Any]],
    sequence: list[tuple[tuple[Training, Source], bool]],
) -> None:
    """A sequence of reports (polls and deliveries, some delivered twice) leaves the row,
    the transition records and each event's outcome as the spec says; a second delivery of
    a finished event is a duplicate that writes nothing."""
    row = insert_row(conn, *start)
    spec = Spec(row)

    for index, ((report, source), delivered_twice) in enumerate(sequence):
        training = dataclasses.replace(report, id=row["id"])
        outcome, reason = spec.apply(training, source)
        if source == Source.POLL:
            with conn:
                result = service.apply_update(conn, training, source)
        else:
            webhook_id = f"msg_{row['id']}_{index}"
            result = deliver(conn, training, source, webhook_id)
            assert result is not None
            assert event_outcome(conn, webhook_id) == outcome
            if delivered_twice:
                assert deliver(conn, training, source, webhook_id) is None

        assert (result.outcome, result.reason) == (outcome, reason)
        assert result.event_recorded
        assert {column: result.row[column] for column in spec.row} == spec.row
        check_same(conn, spec)


def test_an_untracked_training_waits_pending_and_its_duplicate_writes_nothing(
    conn: db.Connection,
) -> None:
    """A delivery for an untracked training is stored `pending`; a second delivery of a
    finished event is answered `duplicate` without touching the stored event."""
    training = Training(id="untracked_1", status="succeeded")

    first = deliver(conn, training, Source.WEBHOOK, "msg_untracked")
    with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute("SELECT * FROM webhook_sync.webhook_events")
        stored = cur.fetchall()
    track = insert_row(conn, AppStatus.TRAINING, {})
    again = deliver(conn, Training(id=track["id"], status="processing"), Source.WEBHOOK, "m2")
    repeat = deliver(conn, Training(id=track["id"], status="processing"), Source.WEBHOOK, "m2")
    with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute("SELECT * FROM webhook_sync.webhook_events WHERE webhook_id = 'm2'")
        (m2,) = cur.fetchall()

    assert first is not None and first.outcome == Outcome.PENDING and first.event_recorded
    assert [(e["webhook_id"], e["outcome"]) for e in stored] == [("msg_untracked", "pending")]
    assert again is not None and again.outcome == Outcome.APPLIED
    assert repeat is None
    assert (m2["outcome"], m2["attempts"]) == ("applied", 1)


def tuples_written(conn: db.Connection, training: Training, webhook_id: str) -> dict[str, tuple]:
    """Deliver in a transaction of its own and count the rows it inserted and updated per
    table of ours (the server's counts for this session, read before and after within the
    transaction: they may hold earlier transactions' counts not yet reported)."""
    payload = {"id": training.id, "status": training.status}
    with conn:
        before = _tuple_counts(conn)
        service.apply_delivery(
            conn, training, Source.WEBHOOK, webhook_id=webhook_id, payload=payload, signed_at=None
        )
        after = _tuple_counts(conn)
    written = {
        name: (inserted - before.get(name, (0, 0))[0], updated - before.get(name, (0, 0))[1])
        for name, (inserted, updated) in after.items()
    }
    return {name: counts for name, counts in written.items() if counts != (0, 0)}


def _tuple_counts(conn: db.Connection) -> dict[str, tuple[int, int]]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT relname, n_tup_ins, n_tup_upd FROM pg_stat_xact_user_tables"
            " WHERE schemaname = 'webhook_sync'"
        )
        return {name: (inserted, updated) for name, inserted, updated in cur.fetchall()}


def test_a_delivery_writes_its_event_once_and_its_duplicate_writes_nothing(
    conn: db.Connection,
) -> None:
    """A fresh delivery inserts its inbox event with its outcome (no second write of it);
    a duplicate of a finished event writes nothing at all; a redelivery of a pending event
    updates that event once."""
    row = insert_row(conn, AppStatus.TRAINING, {})
    training = Training(id=row["id"], status="processing")
    untracked = Training(id="untracked_w", status="starting")

    fresh = tuples_written(conn, training, "m_fresh")
    duplicate = tuples_written(conn, training, "m_fresh")
    pending = tuples_written(conn, untracked, "m_pending")
    insert_row_with_id(conn, untracked.id)
    redelivered = tuples_written(conn, untracked, "m_pending")

    assert fresh == {"webhook_events": (1, 0), "trainings": (0, 1), "training_transitions": (1, 0)}
    assert duplicate == {}
    assert pending == {"webhook_events": (1, 0)}
    assert redelivered == {
        "webhook_events": (0, 1),
        "trainings": (0, 1),
        "training_transitions": (1, 0),
    }
    assert event_outcome(conn, "m_pending") == "applied"


def test_two_deliveries_of_one_event_racing_for_its_training_apply_it_once(
    conn: db.Connection, database_url: str
) -> None:
    """Two deliveries of one webhook-id, both past the inbox lookup while the training is
    locked elsewhere: the first to get the lock applies it and stores the event, the other
    then finds it stored and finished and writes nothing (`duplicate`)."""
    row = insert_row(conn, AppStatus.TRAINING, {})
    holder = db.connect(database_url)
    try:
        with holder.cursor() as cur:
            cur.execute(
                "SELECT 1 FROM webhook_sync.trainings WHERE id = %s FOR UPDATE", (row["id"],)
            )

        def deliver_once(_index: int) -> Outcome:
            own = db.connect(database_url)
            try:
                payload = {"id": row["id"], "status": "processing"}
                return inbox.receive_delivery(
                    own, webhook_id="m_race", payload=payload, signed_at=None
                ).result
            finally:
                own.close()

        def both_wait_for_the_lock() -> bool:
            with conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
                return cur.fetchone()[0] == 2

        pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        futures = [pool.submit(deliver_once, index) for index in range(2)]
        wait_until(both_wait_for_the_lock, timeout=30)
        holder.rollback()
        results = sorted(future.result(timeout=30) for future in futures)
        pool.shutdown()
    finally:
        holder.close()

    assert results == [Outcome.APPLIED, Outcome.DUPLICATE]
    assert len(select_transitions(conn, row["id"])) == 1
    assert event_outcome(conn, "m_race") == "applied"


def insert_row_with_id(conn: db.Connection, training_id: str) -> None:
    """Track `training_id` in `training`, as a platform's registration would."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO webhook_sync.trainings (id, user_id) VALUES (%s, 'user-1')",
            (training_id,),
        )


@pytest.mark.parametrize("reconnect", [False, True])
def test_the_statement_is_prepared_once_per_connection(database_url: str, reconnect: bool) -> None:
    """The delivery's statement is PREPAREd on a connection's first call and EXECUTEd after;
    a new connection (a reconnect) prepares it again."""
    conn = db.connect(database_url)
    row = insert_row(conn, AppStatus.TRAINING, {})
    try:
        for reported in ("starting", "processing"):
            if reconnect:
                conn.close()
                conn = db.connect(database_url)
            with conn:
                service.apply_update(conn, Training(id=row["id"], status=reported), Source.POLL)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT name FROM pg_prepared_statements")
            prepared = [name for (name,) in cur.fetchall()]
    finally:
        conn.close()

    name = db.receive_delivery_statement(conn)
    assert name.startswith("receive_delivery_")
    assert prepared == [name]
    assert conn.prepared == {name}


def count_statements(
    conn: db.Connection, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, bool]]:
    """Count the statements `conn` sends from now on through any cursor it opens (a plain
    one, a dict cursor), each as its first word and whether it ran outside a transaction."""
    sent: list[tuple[str, bool]] = []
    cursor = conn.cursor

    def counting_cursor(*args: Any, cursor_factory: Any = None, **kwargs: Any) -> Any:
        base = cursor_factory or conn.cursor_factory or psycopg2.extensions.cursor

        class CountingCursor(base):  # type: ignore[misc, valid-type]
            def execute(self, query: Any, vars: Any = None) -> Any:
                sent.append((str(query).split()[0], self.connection.autocommit))
                return super().execute(query, vars)

        return cursor(*args, cursor_factory=CountingCursor, **kwargs)

    monkeypatch.setattr(conn, "cursor", counting_cursor)
    return sent


def test_a_delivery_and_its_duplicate_are_one_statement_each_in_autocommit(
    conn: db.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once prepared, a delivery is one EXECUTE in autocommit (no BEGIN, no COMMIT round
    trip), and so is its duplicate; the connection is handed back out of autocommit."""
    row = insert_row(conn, AppStatus.TRAINING, {})
    deliver(conn, Training(id=row["id"], status="starting"), Source.WEBHOOK, "m_warm")
    sent = count_statements(conn, monkeypatch)
    payload = {"id": row["id"], "status": "processing"}

    for _ in range(2):
        inbox.receive_delivery(conn, webhook_id="m_once", payload=payload, signed_at=None)

    assert sent == [("EXECUTE", True), ("EXECUTE", True)]
    assert conn.autocommit is False


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan."""
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


def test_the_host_mirror_finds_its_row_by_index_under_the_generic_plan(database_url: str) -> None:
    """Prepared and planned once for every call, the host mirror reading FROM `changed`
    looks its row up by the host table's index instead of scanning the table: the
    function declares that it returns one row (it scanned all 5,000 rows without)."""
    execute(
        database_url,
        "CREATE TABLE public.user_models (user_id text NOT NULL, training_status text,"
        " replicate_model_id text PRIMARY KEY, updated_at timestamptz)",
        "INSERT INTO public.user_models SELECT 'u', 'training', 'h' || n"
        " FROM generate_series(1, 5000) AS n",
        "ANALYZE public.user_models",
    )
    conn = db.connect(database_url, host=bind())
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SET plan_cache_mode = force_generic_plan")
            service.track_training(conn, "h1", "u")
            service.track_training(conn, "h2", "u")
        with conn:
            service.apply_update(conn, Training(id="h1", status="starting"), Source.POLL)
        with conn.cursor() as cur:
            cur.execute(
                f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {db.receive_delivery_statement(conn)}"
                " ('h2', 'starting',"
                " 'poll', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, false)"
            )
            (explained,) = cur.fetchone()
        conn.rollback()
    finally:
        conn.close()
    scans = [
        node["Node Type"]
        for node in plan_nodes(explained[0]["Plan"])
        if node.get("Relation Name") == "user_models"
    ]

    assert scans == ["ModifyTable", "Index Scan"]


def test_a_connection_whose_prepared_statement_vanished_sends_it_unprepared(
    conn: db.Connection,
) -> None:
    """Behind a pooler in transaction mode (PgBouncer) the next transaction may reach a
    session that never saw the PREPARE, as after DEALLOCATE ALL: a delivery still
    succeeds, sent planned per call, and so does every later call on that connection; a
    poll inside a transaction fails once (its transaction is aborted) and then works."""
    first, second, third = (insert_row(conn, AppStatus.TRAINING, {}) for _ in range(3))
    deliver(conn, Training(id=first["id"], status="starting"), Source.WEBHOOK, "m_p1")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DEALLOCATE ALL")
    conn.autocommit = False

    delivered = deliver(conn, Training(id=second["id"], status="starting"), Source.WEBHOOK, "m_p2")
    with conn:
        polled = service.apply_update(
            conn, Training(id=third["id"], status="starting"), Source.POLL
        )
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_prepared_statements")
        (prepared,) = cur.fetchone()

    assert delivered is not None and delivered.outcome == Outcome.APPLIED
    assert polled.outcome == Outcome.APPLIED
    name = db.receive_delivery_statement(conn)
    assert (conn.prepared, conn.unprepared, prepared) == (set(), {name}, 0)


def test_a_host_table_named_with_a_percent_sign_is_mirrored_when_sent_unprepared(
    database_url: str,
) -> None:
    """Sent planned per call (its prepared statement vanished, as behind PgBouncer), the
    statement's text goes through psycopg2's parameter formatting: a `%` in the bound
    table's name stays itself, and the delivery writes the host row."""
    execute(
        database_url,
        'CREATE TABLE public."user%models" (user_id text NOT NULL, training_status text,'
        " replicate_model_id text PRIMARY KEY, updated_at timestamptz)",
        "INSERT INTO public.\"user%models\" VALUES ('u', 'training', 'p1', NULL)",
    )
    conn = db.connect(database_url, host=bind(HOST_TABLE="public.user%models"))
    try:
        with conn:
            service.track_training(conn, "p1", "u")
        deliver(conn, Training(id="p1", status="starting"), Source.WEBHOOK, "m_pct1")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("DEALLOCATE ALL")
        conn.autocommit = False

        delivered = deliver(conn, Training(id="p1", status="succeeded"), Source.WEBHOOK, "m_pct2")
        with conn, conn.cursor() as cur:
            cur.execute('SELECT training_status FROM public."user%models"')
            (host_status,) = cur.fetchone()
    finally:
        conn.close()

    assert delivered is not None and delivered.outcome == Outcome.APPLIED
    assert conn.unprepared == {db.receive_delivery_statement(conn)}
    assert host_status == "completed"


def test_a_poll_in_a_transaction_fails_once_when_its_prepared_statement_vanished(
    conn: db.Connection,
) -> None:
    """Inside the caller's transaction the failed EXECUTE aborted it, so the error is the
    caller's (the sweep retries the row); the connection's next call is sent unprepared."""
    row = insert_row(conn, AppStatus.TRAINING, {})
    with conn:
        service.apply_update(conn, Training(id=row["id"], status="starting"), Source.POLL)
    with conn, conn.cursor() as cur:
        cur.execute("DEALLOCATE ALL")

    with pytest.raises(psycopg2.errors.InvalidSqlStatementName), conn:
        service.apply_update(conn, Training(id=row["id"], status="processing"), Source.POLL)
    with conn:
        again = service.apply_update(conn, Training(id=row["id"], status="processing"), Source.POLL)

    assert again.outcome == Outcome.APPLIED


def test_a_column_added_while_connections_hold_the_statement_changes_nothing(
    conn: db.Connection,
) -> None:
    """A migration adding a column to `trainings` while the web process runs: the prepared
    statement and the function's row variable adapt, the next delivery applies."""
    row = insert_row(conn, AppStatus.TRAINING, {})
    deliver(conn, Training(id=row["id"], status="starting"), Source.WEBHOOK, "m_c1")
    with conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE webhook_sync.trainings ADD COLUMN later_column text")

    again = deliver(conn, Training(id=row["id"], status="processing"), Source.WEBHOOK, "m_c2")

    assert again is not None and again.outcome == Outcome.APPLIED
    assert conn.prepared == {db.receive_delivery_statement(conn)}


def test_a_statement_of_the_same_name_left_by_another_client_is_never_executed(
    conn: db.Connection,
) -> None:
    """Behind a pooler in transaction mode a server session may already hold another
    client's `receive_delivery` (perhaps another install's): the connection does not fail
    on its PREPARE, nor EXECUTE that statement; it sends its own, planned per call."""
    row = insert_row(conn, AppStatus.TRAINING, {})
    with conn, conn.cursor() as cur:
        cur.execute(f"PREPARE {db.receive_delivery_statement(conn)} AS SELECT 1 / 0")

    delivered = deliver(conn, Training(id=row["id"], status="starting"), Source.WEBHOOK, "m_d1")
    again = deliver(conn, Training(id=row["id"], status="processing"), Source.WEBHOOK, "m_d2")

    assert delivered is not None and delivered.outcome == Outcome.APPLIED
    assert again is not None and again.outcome == Outcome.APPLIED
    assert (conn.prepared, conn.unprepared) == (set(), {db.receive_delivery_statement(conn)})


# Later migrations that replace `receive_delivery`: one adds a result column (always null),
# the other changes the type of one the statement reads (`check_failures` as bigint).
ONE_MORE_COLUMN = {
    "fields_refreshed boolean\n)": "fields_refreshed boolean,\n later_column text\n)",
    "NULL::text, false;": "NULL::text, false, NULL::text;",
    "v_refreshed;": "v_refreshed, NULL::text;",
}
WIDER_COLUMN = {
    "check_failures integer,": "check_failures bigint,",
    "NULL::integer, NULL::text,": "NULL::bigint, NULL::text,",
    "v_row.check_failures,": "v_row.check_failures::bigint,",
}


def replace_function(database_url: str, replacements: dict[str, str]) -> None:
    """What a later migration may do: drop `receive_delivery` and create it again, its
    text changed by `replacements` (each must occur in it)."""
    text = (migrations.find_sql_dir() / "0009_receive_delivery_written_once.sql").read_text()
    for old, new in replacements.items():
        assert old in text
        text = text.replace(old, new)
    execute(
        database_url,
        "SET search_path TO webhook_sync",
        "DROP FUNCTION receive_delivery",
        text,
    )


def test_a_function_replaced_with_one_more_result_column_keeps_its_statement(
    database_url: str,
) -> None:
    """The statement names the function's columns it reads: a migration that adds a result
    column changes nothing it returns, so the prepared statement runs on unchanged."""
    conn = db.connect(database_url)
    try:
        row = insert_row(conn, AppStatus.TRAINING, {})
        deliver(conn, Training(id=row["id"], status="starting"), Source.WEBHOOK, "m_k1")
        replace_function(database_url, ONE_MORE_COLUMN)
        with conn:
            report = Training(id=row["id"], status="processing")
            result = service.apply_update(conn, report, Source.POLL)
    finally:
        conn.close()

    assert result.outcome == Outcome.APPLIED
    assert (conn.prepared, conn.stale) == ({db.receive_delivery_statement(conn)}, set())


@pytest.mark.parametrize("in_transaction", [False, True])
def test_a_function_replaced_with_another_result_type_is_prepared_again(
    database_url: str, in_transaction: bool
) -> None:
    """A migration changed a result column's type while connections held the statement
    ("cached plan must not change result type"): a delivery prepares it again at once; a
    poll inside a transaction fails once, and its next call prepares again."""
    conn = db.connect(database_url)
    try:
        row = insert_row(conn, AppStatus.TRAINING, {})
        deliver(conn, Training(id=row["id"], status="starting"), Source.WEBHOOK, "m_r1")
        replace_function(database_url, WIDER_COLUMN)
        report = Training(id=row["id"], status="processing")
        if in_transaction:
            with pytest.raises(psycopg2.errors.FeatureNotSupported), conn:
                service.apply_update(conn, report, Source.POLL)
            with conn:
                result = service.apply_update(conn, report, Source.POLL)
        else:
            result = deliver(conn, report, Source.WEBHOOK, "m_r2")
    finally:
        conn.close()

    assert result is not None and result.outcome == Outcome.APPLIED
    assert (conn.prepared, conn.stale) == ({db.receive_delivery_statement(conn)}, set())


def test_a_delivery_that_times_out_is_kept_failed_for_replay(database_url: str) -> None:
    """A delivery waiting on a row lock past the statement timeout writes nothing (one
    statement), is raised as the database being unavailable (a 503 for the sender), and
    is kept `failed` with the timeout as its error; once the lock is gone, a replay of the
    stored event applies it."""
    conn = db.connect(database_url, statement_timeout_ms=300)
    holder = db.connect(database_url)
    try:
        row = insert_row(conn, AppStatus.TRAINING, {})
        payload = {"id": row["id"], "status": "processing"}
        with holder.cursor() as cur:
            cur.execute(
                "SELECT 1 FROM webhook_sync.trainings WHERE id = %s FOR UPDATE", (row["id"],)
            )
            with pytest.raises(psycopg2.errors.QueryCanceled):
                inbox.receive_delivery(
                    conn, webhook_id="m_timeout", payload=payload, signed_at=None
                )
        holder.rollback()

        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT outcome, error FROM webhook_sync.webhook_events WHERE webhook_id = %s",
                ("m_timeout",),
            )
            outcome, error = cur.fetchone()
        assert outcome == Outcome.FAILED
        assert "QueryCanceled" in error
        assert db.select_training(conn, row["id"])["replicate_status"] is None

        replayed = inbox.reprocess_event(conn, "m_timeout")
        assert replayed.result == Outcome.APPLIED
        assert db.select_training(conn, row["id"])["replicate_status"] == "processing"
    finally:
        holder.close()
        conn.close()
