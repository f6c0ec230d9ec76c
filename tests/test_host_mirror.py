"""The platform's bound table kept true by the funnel (issue 13 §2): every status change
mirrored in the same transaction, a missing host row counted, a refusal failing the whole
change, on a real PostgreSQL and over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg2
import pytest
import requests
from prometheus_client import REGISTRY

from tests.fake_replicate import running
from tests.support import select_transitions
from tests.test_sweep import SETTINGS as SWEEP_SETTINGS
from tests.test_sweep import make_client, make_due
from tests.web_support import SECRET, WEBHOOK_PATH, serve, signed_delivery, training_payload
from webhook_sync import db, errors, inbox, receiver, service, sweep, web
from webhook_sync.config import Config
from webhook_sync.host_binding import HostBinding, parse_host_binding
from webhook_sync.training import parse_training
from webhook_sync.vocabulary import Outcome, Source

TID = "k8sy6bgx31rm80cr2cwbn2bqkw"
USER = "45038279"
# The post-mortem's table, bound by its three settings (and its updated_at).
POST_MORTEM_SETTINGS = {
    "HOST_TABLE": "public.user_models",
    "HOST_TRAINING_ID_COLUMN": "replicate_model_id",
    "HOST_STATUS_COLUMN": "training_status",
    "HOST_UPDATED_AT_COLUMN": "updated_at",
}
USER_MODELS = (
    "CREATE TABLE public.user_models (user_id text NOT NULL, training_status {status_type},"
    " replicate_model_id text, updated_at timestamptz NOT NULL DEFAULT now() - interval '1 day'"
    "{extra})"
)


def bind(**settings: str) -> HostBinding:
    """The binding these HOST_* settings (over the post-mortem's) describe."""
    binding, problems = parse_host_binding({**POST_MORTEM_SETTINGS, **settings})
    assert problems == [] and binding is not None
    return binding


def execute(database_url: str, *statements: str) -> None:
    """Run statements as the platform would, on a connection of its own (committed)."""
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


def host_rows(database_url: str, query: str = "SELECT * FROM public.user_models") -> list[dict]:
    """The platform's rows as it reads them."""
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(query)
            return [dict(row) for row in cur.fetchall()]
    finally:
        conn.close()


def create_user_models(
    database_url: str, status_type: str = "text", extra: str = "", training_id: str = TID
) -> None:
    """The post-mortem's table with its one in-flight row for `training_id`."""
    execute(
        database_url,
        USER_MODELS.format(status_type=status_type, extra=extra),
        "INSERT INTO public.user_models (user_id, training_status, replicate_model_id)"
        f" VALUES ('{USER}', 'training', '{training_id}')",
    )


@pytest.fixture()
def bound(database_url: str) -> Iterator[db.Connection]:
    """A connection of ours bound to the post-mortem's table, with TID tracked."""
    create_user_models(database_url)
    connection = db.connect(database_url, "webhook-sync tests", host=bind())
    with connection:
        service.track_training(connection, TID, USER)
    yield connection
    connection.close()


def apply(conn: db.Connection, status: str, source: Source = Source.POLL) -> service.ApplyResult:
    """Apply one report of Replicate's in its own transaction."""
    with conn:
        return service.apply_update(conn, parse_training(training_payload(TID, status)), source)


def track_and_apply(database_url: str, binding: HostBinding, status: str) -> dict:
    """Track TID on a connection bound by `binding` and apply one poll reporting `status`;
    our row afterwards."""
    conn = db.connect(database_url, host=binding)
    try:
        with conn:
            service.track_training(conn, TID, USER)
        apply(conn, status)
        return db.select_training(conn, TID)
    finally:
        conn.close()


def counted(metric: str, source: str) -> float:
    """A host counter's value for one source (0 before its first count)."""
    return REGISTRY.get_sample_value(metric, {"source": source}) or 0.0


# --- the mirror ------------------------------------------------------------------------


def test_a_poll_that_completes_the_training_completes_the_host_row(
    bound: db.Connection, database_url: str
) -> None:
    """The poll path's apply_update writes the mapped status and moves updated_at, in the
    same transaction as our row."""
    before = host_rows(database_url)[0]

    result = apply(bound, "succeeded")
    after = host_rows(database_url)[0]

    assert result.effects["host_mirrored"] == 1
    assert db.select_training(bound, TID)["training_status"] == "completed"
    assert after["training_status"] == "completed"
    assert after["updated_at"] > before["updated_at"]
    assert after["user_id"] == USER


def test_only_status_changes_are_mirrored(bound: db.Connection, database_url: str) -> None:
    """A report that moves nothing writes nothing there: the host's updated_at stays."""
    apply(bound, "processing")
    before = host_rows(database_url)[0]

    result = apply(bound, "processing")

    assert result.outcome == Outcome.UNCHANGED
    assert host_rows(database_url)[0] == before


def test_host_columns_take_our_refreshed_fields(database_url: str) -> None:
    """HOST_COLUMNS copies the version and the weights URL (and a timestamp) over."""
    create_user_models(
        database_url,
        extra=", replicate_version_id varchar(200), lora_url text, finished timestamptz",
    )
    binding = bind(
        HOST_COLUMNS="version_id=replicate_version_id,weights_url=lora_url,completed_at=finished"
    )
    ours = track_and_apply(database_url, binding, "succeeded")

    theirs = host_rows(database_url)[0]
    assert theirs["replicate_version_id"] == ours["version_id"] == "a" * 64
    assert theirs["lora_url"] == ours["weights_url"]
    assert theirs["finished"] == ours["completed_at"] is not None


def test_fields_filled_in_later_refresh_the_host_columns_alone(database_url: str) -> None:
    """A poll that brings the weights after the terminal webhook moves no status, yet the
    HOST_COLUMNS take the new fields (and updated_at moves); the status column is left
    as it is, even where the app has written its own value there since."""
    create_user_models(database_url, extra=", lora_url text, finished timestamptz")
    binding = bind(HOST_COLUMNS="weights_url=lora_url,completed_at=finished")
    conn = db.connect(database_url, host=binding)
    try:
        with conn:
            service.track_training(conn, TID, USER)
        with conn:
            bare = training_payload(TID, "succeeded", output=None, completed_at=None)
            service.apply_update(conn, parse_training(bare), Source.WEBHOOK)
        assert host_rows(database_url)[0]["lora_url"] is None
        execute(database_url, "UPDATE public.user_models SET training_status = 'shown'")
        before = host_rows(database_url)[0]

        result = apply(conn, "succeeded")
        ours = db.select_training(conn, TID)
    finally:
        conn.close()

    theirs = host_rows(database_url)[0]
    assert result.outcome == Outcome.UNCHANGED
    assert result.effects["host_refreshed"] == 1
    assert theirs["lora_url"] == ours["weights_url"] is not None
    assert theirs["finished"] == ours["completed_at"] is not None
    assert theirs["updated_at"] > before["updated_at"]
    assert theirs["training_status"] == "shown"


@pytest.mark.parametrize(
    ("type_sql", "status_type"),
    [
        (None, "varchar(20)"),
        (
            "CREATE TYPE public.model_state AS ENUM ('queued', 'in_progress', 'ready',"
            " 'broken', 'stopped')",
            "public.model_state",
        ),
    ],
    ids=["varchar", "enum"],
)
def test_custom_spellings_in_a_varchar_or_an_enum_column(
    database_url: str, type_sql: str | None, status_type: str
) -> None:
    """HOST_STATUS_VALUES spells our statuses the platform's way, into a varchar column and
    into a PostgreSQL enum (which a plain text assignment would refuse)."""
    if type_sql:
        execute(database_url, type_sql)
    execute(
        database_url,
        USER_MODELS.format(status_type=status_type, extra=""),
        "INSERT INTO public.user_models (user_id, training_status, replicate_model_id)"
        f" VALUES ('{USER}', 'in_progress', '{TID}')",
    )
    binding = bind(
        HOST_STATUS_VALUES="training=in_progress,completed=ready,failed=broken,canceled=stopped"
    )
    track_and_apply(database_url, binding, "failed")

    assert host_rows(database_url)[0]["training_status"] == "broken"


def test_a_table_with_not_null_domains_and_a_domain_status(database_url: str) -> None:
    """Columns of NOT NULL domains beside the status, and a status column that is itself a
    domain with a CHECK: the mirror types the spelling as the column and the domain's
    check applies to what is written (a spelling it refuses is a refusal)."""
    execute(
        database_url,
        "CREATE DOMAIN public.handle AS text NOT NULL",
        "CREATE DOMAIN public.model_status AS varchar(20)"
        " CHECK (VALUE IN ('training', 'completed', 'failed', 'canceled'))",
        USER_MODELS.format(status_type="public.model_status", extra=", handle public.handle"),
        "INSERT INTO public.user_models (user_id, training_status, replicate_model_id, handle)"
        f" VALUES ('{USER}', 'training', '{TID}', 'ada')",
    )

    with pytest.raises(errors.HostTableRefusedError, match="check_violation"):
        track_and_apply(database_url, bind(HOST_STATUS_VALUES="completed=done"), "succeeded")
    refused = host_rows(database_url)[0]["training_status"]
    track_and_apply(database_url, bind(), "succeeded")

    assert refused == "training"
    assert host_rows(database_url)[0]["training_status"] == "completed"


def test_quoted_identifiers_with_capitals_and_spaces(database_url: str) -> None:
    """Names with capitals, spaces and quotes are quoted, never pasted."""
    execute(
        database_url,
        'CREATE SCHEMA "App Data"',
        'CREATE TABLE "App Data"."User Models" ("Replicate Id" text, "Status" text,'
        ' "Changed ""At""" timestamptz)',
        f"INSERT INTO \"App Data\".\"User Models\" VALUES ('{TID}', 'training', NULL)",
    )
    binding = bind(
        HOST_TABLE="App Data.User Models",
        HOST_TRAINING_ID_COLUMN="Replicate Id",
        HOST_STATUS_COLUMN="Status",
        HOST_UPDATED_AT_COLUMN='Changed "At"',
    )
    track_and_apply(database_url, binding, "canceled")

    row = host_rows(database_url, 'SELECT * FROM "App Data"."User Models"')[0]
    assert row["Status"] == "canceled"
    assert row['Changed "At"'] is not None


def test_a_missing_host_row_is_counted_and_logged_not_an_error(
    bound: db.Connection, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The platform deleted its row: ours is still written, the miss logged and counted."""
    execute(database_url, "DELETE FROM public.user_models")
    before = counted("webhook_sync_host_rows_missing_total", "poll")

    result = apply(bound, "succeeded")

    assert result.outcome == Outcome.APPLIED
    assert result.effects["host_mirrored"] == 0
    assert db.select_training(bound, TID)["training_status"] == "completed"
    assert counted("webhook_sync_host_rows_missing_total", "poll") == before + 1
    missing = [r for r in caplog.records if r.getMessage() == "host_row_missing"]
    assert [r.fields["training_id"] for r in missing] == [TID]  # type: ignore[attr-defined]


# --- refusals --------------------------------------------------------------------------

REFUSALS = {
    "check": (
        "ALTER TABLE public.user_models ADD CONSTRAINT no_completed"
        " CHECK (training_status <> 'completed')",
        "ALTER TABLE public.user_models DROP CONSTRAINT no_completed",
    ),
    "trigger": (
        "CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS"
        " $$BEGIN RAISE EXCEPTION 'no changes to %', NEW.user_id; END$$;"
        " CREATE TRIGGER refuse BEFORE UPDATE ON public.user_models"
        " FOR EACH ROW EXECUTE FUNCTION public.refuse()",
        "DROP TRIGGER refuse ON public.user_models",
    ),
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_a_refused_poll_writes_nothing_of_ours(
    bound: db.Connection, database_url: str, kind: str
) -> None:
    """A constraint or a trigger refusing the host write fails the whole change: our row
    and its transitions are as they were, and the error names the table, not the values."""
    execute(database_url, REFUSALS[kind][0])
    row_before = db.select_training(bound, TID)
    transitions_before = select_transitions(bound, TID)

    with pytest.raises(errors.HostTableRefusedError) as refused:
        apply(bound, "succeeded")

    assert db.select_training(bound, TID) == row_before
    assert select_transitions(bound, TID) == transitions_before
    assert host_rows(database_url)[0]["training_status"] == "training"
    assert "public.user_models" in str(refused.value)
    assert USER not in str(refused.value)


def test_an_error_of_our_own_is_not_taken_for_a_refusal(bound: db.Connection) -> None:
    """A failure naming our schema (here our own CHECK) stays the driver's error."""
    with bound, bound.cursor() as cur:
        cur.execute(
            "ALTER TABLE webhook_sync.trainings ADD CONSTRAINT never_completed"
            " CHECK (training_status <> 'completed')"
        )

    with pytest.raises(psycopg2.errors.CheckViolation):
        apply(bound, "succeeded")


API_TOKEN = "tok-" + "a" * 20


def post_to_bound_app(database_url: str, path: str, **request: object) -> requests.Response:
    """POST to a web app bound to the post-mortem's table (with the API on), served over
    real HTTP for this one request."""
    config = Config(
        database_url=database_url,
        webhook_secrets=(SECRET,),
        host_binding=bind(),
        api_tokens=(API_TOKEN,),
    )
    app = web.create_app(config)
    try:
        with serve(app) as base_url:
            return requests.post(base_url + path, timeout=10, **request)  # type: ignore[arg-type]
    finally:
        app.extensions["webhook_sync"].close()


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_a_refused_webhook_is_503_kept_failed_and_replayed_once_allowed(
    bound: db.Connection, database_url: str, kind: str
) -> None:
    """Over real HTTP: the refusal is a 503 with Retry-After and a short reason, nothing
    of ours changes, the inbox event is `failed`; once the platform drops its refusal,
    replaying the event completes both tables."""
    execute(database_url, REFUSALS[kind][0])
    row_before = db.select_training(bound, TID)
    body, headers = signed_delivery(training_payload(TID, "succeeded"))
    response = post_to_bound_app(database_url, WEBHOOK_PATH, data=body, headers=headers)

    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.json() == {"error": "the platform's table refused the change, retry later"}
    assert db.select_training(bound, TID) == row_before
    assert [t["outcome"] for t in select_transitions(bound, TID)] == []
    event = db.select_event(bound, headers["webhook-id"])
    assert event["outcome"] == Outcome.FAILED
    assert "HostTableRefusedError" in event["error"] and "public.user_models" in event["error"]
    assert USER not in event["error"]

    execute(database_url, REFUSALS[kind][1])
    replayed = inbox.reprocess_event(bound, headers["webhook-id"])

    assert replayed.result == Outcome.APPLIED
    assert db.select_training(bound, TID)["training_status"] == "completed"
    assert host_rows(database_url)[0]["training_status"] == "completed"


def test_a_webhook_is_mirrored_over_http(bound: db.Connection, database_url: str) -> None:
    """A signed delivery to a bound web app completes both tables before the 200."""
    body, headers = signed_delivery(training_payload(TID, "succeeded"))
    response = post_to_bound_app(database_url, WEBHOOK_PATH, data=body, headers=headers)

    assert response.status_code == 200, response.text
    assert json.loads(response.text)["result"] == "applied"
    assert host_rows(database_url)[0]["training_status"] == "completed"


def test_a_refused_poll_leaves_the_row_due_for_the_next_sweep(
    bound: db.Connection, database_url: str
) -> None:
    """In a sweep, a refused mirror counts as a failed check: our row keeps its status,
    its lease is handed back and it is due within one interval; once the platform takes
    the change, the next sweep completes both tables."""
    execute(database_url, REFUSALS["check"][0])
    with running() as fake:
        fake.add(TID, "succeeded")
        client = make_client(fake)

        refused = sweep.run_sweep(bound, client, SWEEP_SETTINGS)
        row = db.select_training(bound, TID)
        with bound, bound.cursor() as cur:
            cur.execute(
                "SELECT lease_owner, next_check_at <= now() + interval '120 seconds'"
                " FROM webhook_sync.trainings WHERE id = %s",
                (TID,),
            )
            lease_owner, due_within_an_interval = cur.fetchone()

        execute(database_url, REFUSALS["check"][1])
        make_due(bound)
        repaired = sweep.run_sweep(bound, client, SWEEP_SETTINGS)

    assert (refused.checked, refused.errors) == (0, 1)
    assert "public.user_models" in (refused.first_error or "")
    assert row["training_status"] == "training"
    assert lease_owner is None and due_within_an_interval
    assert repaired.repaired == 1
    assert db.select_training(bound, TID)["training_status"] == "completed"
    assert host_rows(database_url)[0]["training_status"] == "completed"


def test_a_registration_whose_early_webhook_is_refused_is_503(database_url: str) -> None:
    """Registering through the API applies the webhook that came first; when the host
    table refuses it, the API answers 503 with Retry-After and registers nothing."""
    create_user_models(database_url)
    execute(database_url, REFUSALS["check"][0])
    conn = db.connect(database_url, host=bind())
    try:
        early = inbox.receive_delivery(
            conn, webhook_id="msg_early", payload=training_payload(TID, "succeeded"), signed_at=None
        )
        response = post_to_bound_app(
            database_url,
            "/v1/trainings",
            json={"id": TID, "user_id": USER},
            headers={"Authorization": f"Bearer {API_TOKEN}"},
        )
        tracked = db.select_training(conn, TID)
    finally:
        conn.close()

    assert early.result == Outcome.PENDING
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.json() == {"error": receiver.HOST_REFUSED}
    assert tracked is None
    assert host_rows(database_url)[0]["training_status"] == "training"
