"""The operator's side of the outbox through the real command: `notifications`,
`notifications retry`, prune's retention, and doctor's endpoint checks."""

from __future__ import annotations

import json

from tests.operator_support import cli
from tests.test_outbox import SECRET, apply, configure, rows, track
from tests.webhook_receiver import WebhookReceiver
from webhook_sync import db

NOTIFY = {"NOTIFY_SECRET": SECRET}


def kill(conn: db.Connection, *ids: int) -> None:
    """Make these notifications dead, last attempted an hour ago."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE webhook_sync.notifications SET status = 'dead', last_error = 'HTTP 500',"
            " last_attempt_at = now() - interval '1 hour' WHERE id = ANY(%(ids)s)",
            {"ids": list(ids)},
        )


def test_list_filters_by_status_and_training(conn: db.Connection, database_url: str) -> None:
    """The list shows each notification once, filtered by status and training, as JSON."""
    configure(conn, "https://a.example/hook")
    for training_id in ("t1", "t2"):
        track(conn, training_id)
        apply(conn, "processing", training_id)
    first = rows(conn)[0]
    kill(conn, first["id"])

    everything = cli(database_url, "notifications")
    dead = cli(database_url, "notifications", "--status", "dead", "--json")
    t2 = cli(database_url, "notifications", "--training", "t2", "--json")

    assert everything.returncode == 0 and "training.processing" in everything.stdout
    assert [json.loads(line)["id"] for line in dead.stdout.splitlines()] == [first["id"]]
    assert [json.loads(line)["training_id"] for line in t2.stdout.splitlines()] == ["t2"]


def test_retry_one_or_every_dead_one_since(conn: db.Connection, database_url: str) -> None:
    """`retry ID` makes one due again; `retry --dead --since` only those dead since then."""
    configure(conn, "https://a.example/hook")
    for training_id in ("t1", "t2", "t3"):
        track(conn, training_id)
        apply(conn, "processing", training_id)
    ids = [r["id"] for r in rows(conn)]
    kill(conn, *ids)

    one = cli(database_url, "notifications", "retry", str(ids[0]))
    none_recent = cli(database_url, "notifications", "retry", "--dead", "--since", "10m")
    older = cli(database_url, "notifications", "retry", "--dead", "--since", "2h", "--json")
    unknown = cli(database_url, "notifications", "retry", "999999")
    usage = cli(database_url, "notifications", "retry")

    assert one.returncode == 0 and "1 notification(s)" in one.stdout
    assert "0 notification(s)" in none_recent.stdout
    assert json.loads(older.stdout) == {"retried": 2, "enabled_endpoints": []}
    assert [r["status"] for r in rows(conn)] == ["pending"] * 3
    assert unknown.returncode == 1 and "no notification 999999" in unknown.stderr
    assert usage.returncode == 2


def test_prune_deletes_finished_old_notifications_only(
    conn: db.Connection, database_url: str
) -> None:
    """Prune removes delivered and dead notifications past retention; pending ones stay."""
    configure(conn, "https://a.example/hook")
    for training_id in ("t1", "t2", "t3"):
        track(conn, training_id)
        apply(conn, "processing", training_id)
    ids = [r["id"] for r in rows(conn)]
    with conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE webhook_sync.notifications SET created_at = now() - interval '40 days',"
            " status = CASE id WHEN %(a)s THEN 'delivered' WHEN %(b)s THEN 'dead'"
            " ELSE 'pending' END",
            {"a": ids[0], "b": ids[1]},
        )

    result = cli(database_url, "prune", "--older-than", "30d")

    assert result.returncode == 0
    assert [r["id"] for r in rows(conn)] == [ids[2]]


def test_doctor_checks_each_endpoint(conn: db.Connection, database_url: str) -> None:
    """doctor says an endpoint that answers is ok, one that does not and one disabled fail."""
    with WebhookReceiver(default=405) as receiver:
        configure(conn, receiver.url, "http://127.0.0.1:9/closed", "http://127.0.0.1:9/gone")
        with conn, conn.cursor() as cur:
            cur.execute(
                "UPDATE webhook_sync.notification_endpoints SET disabled_at = now(),"
                " disabled_reason = 'endpoint answered 410 Gone' WHERE url LIKE '%%/gone'"
            )
        result = cli(
            database_url,
            "doctor",
            "--json",
            NOTIFY_URLS=f"{receiver.url} http://127.0.0.1:9/closed http://127.0.0.1:9/gone",
            **NOTIFY,
        )
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}

    assert checks["notify endpoint #1"]["status"] == "ok"
    assert "answers (HTTP 501 to HEAD)" in checks["notify endpoint #1"]["detail"]
    assert checks["notify endpoint #2"]["status"] == "fail"
    assert checks["notify endpoint #3"]["status"] == "fail"
    assert "disabled" in checks["notify endpoint #3"]["detail"]


def test_migrate_syncs_the_endpoints_before_a_release_starts(
    conn: db.Connection, database_url: str
) -> None:
    """`migrate` (the release step) records NOTIFY_URLS and NOTIFY_EVENTS, so the new
    release's web processes queue for them from their first change."""
    result = cli(
        database_url,
        "migrate",
        NOTIFY_URLS="https://a.example/hook",
        NOTIFY_EVENTS="training.completed",
        **NOTIFY,
    )
    track(conn)
    apply(conn, "processing")
    apply(conn, "succeeded")

    assert result.returncode == 0
    assert [(r["endpoint"], r["event_type"]) for r in rows(conn)] == [
        ("https://a.example/hook", "training.completed")
    ]
