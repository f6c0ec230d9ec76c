"""Knowing that the worker works: its heartbeat in the database, the system's gauges the
web process's /metrics reads at scrape time (over real HTTP), METRICS_TOKEN."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_replicate import TOKEN, FakeReplicate, running
from tests.web_support import serve
from webhook_sync import db, heartbeat, service, web, worker
from webhook_sync.config import Config
from webhook_sync.training import parse_training

SECRET = "whsec_bG9jYWwtc2ltdWxhdG9yLWRldi1zZWNyZXQ="


@pytest.fixture()
def fake() -> Iterator[FakeReplicate]:
    """A FakeReplicate served on a free port."""
    with running() as server:
        yield server


def heartbeats(conn: db.Connection) -> list[db.Row]:
    """Every worker's heartbeat row."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT worker, sweep_started_at, sweep_finished_at, summary, last_error_kind"
            " FROM webhook_sync.worker_heartbeats"
        )
        names = [column.name for column in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def scrape(app_url: str, token: str | None = None) -> dict[tuple[str, tuple], float]:
    """GET /metrics over HTTP; every sample by name and labels."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.get(f"{app_url}/metrics", headers=headers, timeout=10)
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def sweep_once(database_url: str, fake: FakeReplicate, status: str, token: str) -> worker.Worker:
    """One training `t1` tracked and in `status` on the fake; one sweep of a Worker."""
    fake.add("t1", status)
    conn = db.connect(database_url)
    with conn:
        service.track_training(conn, "t1", "user-1")
    conn.close()
    config = Config(database_url=database_url, api_token=token, api_base_url=fake.url)
    process = worker.Worker(config)
    process.sweep_once()
    process.client.close()
    return process


def test_a_sweep_leaves_a_heartbeat_with_its_summary(
    database_url: str, conn: db.Connection, fake: FakeReplicate
) -> None:
    """The worker stamps its sweep's start and end in the database, with the summary."""
    process = sweep_once(database_url, fake, "succeeded", TOKEN)

    [row] = heartbeats(conn)
    assert row["worker"] == process.name
    assert row["sweep_started_at"] <= row["sweep_finished_at"]
    assert (row["summary"]["checked"], row["summary"]["repaired"]) == (1, 1)
    assert row["last_error_kind"] is None


def test_a_refused_token_is_recorded_as_failing(
    database_url: str, conn: db.Connection, fake: FakeReplicate
) -> None:
    """A sweep stopped by a 401 records `replicate_auth`; the last finished sweep stays."""
    sweep_once(database_url, fake, "processing", "r8_revoked")

    [row] = heartbeats(conn)
    assert row["last_error_kind"] == heartbeat.AUTH_FAILURE
    assert row["sweep_finished_at"] is None


def test_metrics_reads_the_whole_system_from_the_database(
    database_url: str, conn: db.Connection
) -> None:
    """One scrape of the web process shows the worker's last sweep and the trainings,
    events and conflicts that only the database knows about."""
    with conn:
        for training_id in ("a", "b", "c"):
            service.track_training(conn, training_id, "user-1")
        service.apply_update(conn, parse_training({"id": "a", "status": "succeeded"}), "poll")
        service.apply_update(conn, parse_training({"id": "b", "status": "failed"}), "webhook")
        service.apply_update(conn, parse_training({"id": "b", "status": "succeeded"}), "poll")
        heartbeat.record_sweep_finished(conn, "worker.1", {"duration": 1.5})
        heartbeat.record_sweep_failed(conn, "worker.2", "boom", heartbeat.OTHER_FAILURE)
        db.insert_event(
            conn,
            webhook_id="msg_failed",
            training_id="c",
            payload={"id": "c", "status": "processing"},
            signed_at=None,
        )
    with conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE webhook_sync.trainings SET created_at = now() - interval '1 day',"
            " needs_attention = 'three 404s' WHERE id = 'c'"
        )
        cur.execute("UPDATE webhook_sync.webhook_events SET outcome = 'failed'")
    config = Config(database_url=database_url, webhook_secrets=(SECRET,))

    with serve(web.create_app(config)) as url:
        samples = scrape(url)

    assert samples[("webhook_sync_database_up", ())] == 1
    assert 0 <= samples[("webhook_sync_worker_last_sweep_age_seconds", ())] < 60
    assert samples[("webhook_sync_worker_last_sweep_duration_seconds", ())] == 1.5
    assert samples[("webhook_sync_trainings_due", ())] == 1
    assert samples[("webhook_sync_trainings_stuck", ())] == 1
    assert samples[("webhook_sync_trainings_needing_attention", ())] == 1
    assert samples[("webhook_sync_transition_conflicts_recent", ())] == 1
    assert samples[("webhook_sync_inbox_events_failed", ())] == 1
    terminal = "webhook_sync_terminal_transitions_recent"
    assert samples[(terminal, (("source", "poll"),))] == 1
    assert samples[(terminal, (("source", "webhook"),))] == 1
    assert samples[(terminal, (("source", "replay"),))] == 0
    assert samples[("webhook_sync_workers_failing", (("kind", "replicate_auth"),))] == 0
    assert samples[("webhook_sync_workers_failing", (("kind", "error"),))] == 1


def test_without_any_sweep_the_age_is_infinite(database_url: str) -> None:
    """Before any worker finished a sweep, the age gauge is +Inf, so the alert fires."""
    config = Config(database_url=database_url, webhook_secrets=(SECRET,))

    with serve(web.create_app(config)) as url:
        samples = scrape(url)

    assert math.isinf(samples[("webhook_sync_worker_last_sweep_age_seconds", ())])


def test_undelivered_notifications_are_counted(database_url: str) -> None:
    """The notification gauges count the outbox's pending and dead rows."""
    conn = db.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO webhook_sync.notification_endpoints (url, events)"
            " VALUES ('https://app.example/hooks', ARRAY['training.completed']) RETURNING id"
        )
        endpoint_id = cur.fetchone()[0]
        cur.execute(
            "INSERT INTO webhook_sync.notifications"
            " (event_id, endpoint_id, training_id, event_type, payload, status)"
            " SELECT 'evt_' || n, %s, 't' || n, 'training.completed', '{}', status"
            " FROM unnest(ARRAY['pending', 'pending', 'dead', 'delivered'])"
            " WITH ORDINALITY AS s(status, n)",
            (endpoint_id,),
        )
    conn.close()
    config = Config(database_url=database_url, webhook_secrets=(SECRET,))

    with serve(web.create_app(config)) as url:
        samples = scrape(url)

    undelivered = "webhook_sync_notifications_undelivered"
    assert samples[(undelivered, (("status", "pending"),))] == 2
    assert samples[(undelivered, (("status", "dead"),))] == 1
    oldest = "webhook_sync_notifications_oldest_undelivered_seconds"
    assert 0 <= samples[(oldest, (("status", "pending"),))] < 60


def test_metrics_says_when_the_database_cannot_be_read(empty_database_url: str) -> None:
    """Before `migrate`, /metrics still answers, with database_up 0."""
    config = Config(database_url=empty_database_url, webhook_secrets=(SECRET,))

    with serve(web.create_app(config)) as url:
        samples = scrape(url)

    assert [value for (name, _), value in samples.items() if name.endswith("database_up")] == [0]


def test_metrics_token_is_required_when_set(database_url: str) -> None:
    """With METRICS_TOKEN, /metrics answers 401 without the bearer token, 200 with it."""
    config = Config(database_url=database_url, webhook_secrets=(SECRET,), metrics_token="scrape-me")

    with serve(web.create_app(config)) as url:
        anonymous = requests.get(f"{url}/metrics", timeout=10)
        wrong = requests.get(f"{url}/metrics", headers={"Authorization": "Bearer nope"}, timeout=10)
        samples = scrape(url, token="scrape-me")

    assert (anonymous.status_code, wrong.status_code) == (401, 401)
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    assert "scrape-me" not in anonymous.text
    assert samples[("webhook_sync_database_up", ())] == 1


def test_metrics_token_is_read_from_the_environment() -> None:
    """METRICS_TOKEN is a setting, kept out of the config's repr."""
    config = Config.from_env({"METRICS_TOKEN": "scrape-me"})

    assert config.metrics_token == "scrape-me"
    assert "scrape-me" not in repr(config)


def test_a_finished_sweep_clears_the_failure_and_forgets_workers_long_gone(
    conn: db.Connection,
) -> None:
    """A success clears this worker's error; a worker silent past HEARTBEAT_RETENTION
    loses its row when another beats."""
    with conn:
        heartbeat.record_sweep_failed(conn, "worker.1", "boom", heartbeat.OTHER_FAILURE)
        heartbeat.record_sweep_finished(conn, "worker.old", {})
    with conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE webhook_sync.worker_heartbeats"
            " SET updated_at = now() - %s - interval '1 minute' WHERE worker = 'worker.old'",
            (heartbeat.HEARTBEAT_RETENTION,),
        )

    with conn:
        heartbeat.record_sweep_finished(conn, "worker.1", {"checked": 0})

    [row] = heartbeats(conn)
    assert row["worker"] == "worker.1"
    assert row["last_error_kind"] is None


def test_a_heartbeat_that_cannot_be_written_does_not_stop_the_sweep(
    empty_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the table (an unmigrated database) the sweep still runs and returns; the
    failed heartbeats are logged."""
    conn = db.connect(empty_database_url)
    try:
        result = heartbeat.beating(conn, "worker.1", lambda: 42, lambda value: {"v": value})
    finally:
        conn.close()

    assert result == 42
    assert [r.getMessage() for r in caplog.records].count("heartbeat_failed") == 2
