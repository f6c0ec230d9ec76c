"""The post-mortem end to end, with the real processes (simulator, web, worker from the
Procfile): the platform's own `user_models` row says `training`, the `completed` webhook
is dropped, nobody calls `track` — and the row still ends `completed`, by settings alone."""

from __future__ import annotations

from pathlib import Path

import psycopg2
import pytest

from tests import e2e
from tests.support import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

USER_ID = 45038279
TRAINING_ID = "k8sy6bgx31rm80cr2cwbn2bqkw"
# The three settings the README shows, plus the updated-at column the post-mortem's
# table has.
HOST_SETTINGS = {
    "HOST_TABLE": "public.user_models",
    "HOST_TRAINING_ID_COLUMN": "replicate_model_id",
    "HOST_STATUS_COLUMN": "training_status",
    "HOST_UPDATED_AT_COLUMN": "updated_at",
}
# Every webhook dropped; Replicate's own read limit would only slow the run down.
FAULTS = {"drop_rate": 1.0, "read_rpm": 0, "create_rpm": 0}


def query(database_url: str, statement: str) -> list[tuple[object, ...]]:
    """Run one statement on its own connection (autocommit) and return its rows."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def our_row(database_url: str) -> tuple[object, ...] | None:
    """(user_id, training_status, replicate_status, updated_by) of our row, if any."""
    rows = query(
        database_url,
        "SELECT user_id, training_status, replicate_status, updated_by FROM webhook_sync.trainings",
    )
    return rows[0] if rows else None


def test_the_post_mortem_row_ends_completed_with_its_webhook_dropped(
    database_url: str, tmp_path: Path
) -> None:
    """User 45038279's `user_models` row in `training`, its training finished at Replicate,
    its `completed` webhook dropped, no row of ours inserted by anyone: the worker's sweep
    adopts it from the host table, finds it succeeded, and the host row says `completed`
    with its `updated_at` moved."""
    query(
        database_url,
        "CREATE TABLE public.user_models (user_id bigint, training_status text,"
        " replicate_model_id text, updated_at timestamptz)",
    )
    query(
        database_url,
        "INSERT INTO public.user_models VALUES"
        f" ({USER_ID}, 'training', '{TRAINING_ID}', now() - interval '1 hour')",
    )
    [(written_at,)] = query(database_url, "SELECT updated_at FROM public.user_models")
    scenario = e2e.Scenario(
        poll_interval=1,
        lease_seconds=10,
        web_concurrency=1,
        faults=FAULTS,
        notify=False,
        converge_timeout=60,
    )
    with e2e.Cluster(database_url, scenario, tmp_path, extra_env=HOST_SETTINGS) as cluster:
        cluster.start_simulator()
        cluster.sim_post(
            "/_admin/trainings",
            {
                "ids": [TRAINING_ID],
                "created_ago": [30, 30],
                "finish_in": [1.0, 1.0],
                "webhook": cluster.web_url + e2e.WEBHOOK_PATH,
                "webhook_events_filter": ["start", "completed"],
            },
        )
        assert our_row(database_url) is None
        cluster.start_web()
        worker = cluster.start_worker("worker-1")
        wait_until(
            lambda: (our_row(database_url) or (None, None))[1] == "completed",
            timeout=60,
            interval=0.2,
            message="our row to be adopted and completed",
        )
        deliveries = cluster.sim_get("/_admin/deliveries")["deliveries"]
        worker_log = worker.output()
    outputs = {path.name: path.read_text(errors="replace") for path in tmp_path.glob("*.log")}

    assert our_row(database_url) == (str(USER_ID), "completed", "succeeded", "poll")
    [(user_id, status, training_id, updated_at)] = query(
        database_url,
        "SELECT user_id, training_status, replicate_model_id, updated_at FROM public.user_models",
    )
    assert (user_id, status, training_id) == (USER_ID, "completed", TRAINING_ID)
    assert updated_at > written_at
    completed = [d for d in deliveries if d["event"] == "completed"]
    assert completed and all(d["dropped"] for d in completed)
    assert " training_adopted_from_host " in worker_log
    assert [name for name, text in outputs.items() if "Traceback" in text] == []
