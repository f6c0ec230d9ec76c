"""The sweep and sync against a local Replicate over real HTTP and a real PostgreSQL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta

import psycopg2.extras
import pytest
from prometheus_client import REGISTRY

from tests.fake_replicate import TOKEN, FakeReplicate, Scripted, running
from tests.registration_support import client_for
from tests.support import VENV_BIN, run_cli, select_transitions, wait_until
from webhook_sync import db, errors, logs, replicate, service, sweep, sync
from webhook_sync.dev.simulator import BulkPlan, Faults, Simulator, SimulatorServer, start_in_thread
from webhook_sync.training import parse_training

SETTINGS = sweep.SweepSettings(
    interval_seconds=120, lease_seconds=30, concurrency=4, stuck_after_seconds=3600, max_rps=1000
)


@pytest.fixture()
def fake() -> Iterator[FakeReplicate]:
    """A FakeReplicate served on a free port."""
    with running() as server:
        yield server


def make_client(fake: FakeReplicate, token: str = TOKEN) -> replicate.ReplicateClient:
    """A fast client for the fake: no real waits between retries."""
    return replicate.ReplicateClient(
        token, fake.url, max_rps=1000, backoff_base=0.001, backoff_cap=0.01, max_attempts=2
    )


def insert_rows(conn: db.Connection, ids: list[str]) -> None:
    """Insert trainings straight into the table, as the host platform may (commits)."""
    with conn, conn.cursor() as cur:
        psycopg2.extras.execute_values(
            cur,
            "INSERT INTO webhook_sync.trainings (id, user_id) VALUES %s",
            [(training_id, "user-1") for training_id in ids],
            page_size=1000,
        )


def statuses(conn: db.Connection) -> dict[str, str]:
    """Every row's app-facing status by id."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id, training_status FROM webhook_sync.trainings")
        return dict(cur.fetchall())


def make_due(conn: db.Connection) -> None:
    """Let time pass for the poller: every row is due again (commits)."""
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE webhook_sync.trainings SET next_check_at = now()")


def missed_webhooks(status: str) -> float:
    """The current value of webhook_sync_missed_webhooks_total for a status."""
    return REGISTRY.get_sample_value("webhook_sync_missed_webhooks_total", {"status": status}) or 0


def add_trainings(fake: FakeReplicate, ids: list[str], status: str) -> list[str]:
    """Put these trainings in the fake Replicate with one status; return their ids."""
    for training_id in ids:
        fake.add(training_id, status)
    return ids


def test_due_trainings_reach_their_final_status(conn: db.Connection, fake: FakeReplicate) -> None:
    """A sweep applies each training's true status and reschedules the one still running."""
    fake.add("done1", "succeeded", completed_at="2026-01-01T00:00:10.5Z")
    fake.add("bad1", "failed", error="CUDA out of memory")
    fake.add("run1", "processing")
    insert_rows(conn, ["done1", "bad1", "run1"])
    missed_before = missed_webhooks("succeeded")

    result = sweep.run_sweep(conn, make_client(fake), SETTINGS)

    assert statuses(conn) == {"done1": "completed", "bad1": "failed", "run1": "training"}
    assert (result.due, result.checked, result.repaired, result.errors) == (3, 3, 3, 0)
    assert result.missed_webhooks == 2
    assert result.api_calls == 3
    assert missed_webhooks("succeeded") == missed_before + 1
    run1 = db.select_training(conn, "run1")
    assert run1 is not None
    assert run1["replicate_status"] == "processing"
    assert run1["next_check_at"] > run1["last_checked_at"]
    assert [t["source"] for t in select_transitions(conn, "done1")] == ["poll"]
    assert select_transitions(conn, "done1")[0]["replicate_completed_at"] is not None


def test_a_second_sweep_finds_nothing_due(conn: db.Connection, fake: FakeReplicate) -> None:
    """Checked rows wait one interval: an immediate second sweep makes no API call."""
    fake.add("run1", "processing")
    insert_rows(conn, ["run1"])
    client = make_client(fake)
    sweep.run_sweep(conn, client, SETTINGS)

    second = sweep.run_sweep(conn, client, SETTINGS)

    assert (second.due, second.api_calls) == (0, 0)


def test_thousand_due_on_the_newest_pages_take_at_most_15_calls(
    conn: db.Connection, fake: FakeReplicate
) -> None:
    """1,000 due trainings, all on the newest pages, are resolved by the list walk."""
    ids = add_trainings(fake, [f"t{number:04d}" for number in range(1000)], "processing")
    for training_id in ids[::3]:
        fake.finish(training_id, "succeeded")
    insert_rows(conn, ids)

    result = sweep.run_sweep(conn, make_client(fake), SETTINGS)

    final = statuses(conn)
    assert result.api_calls <= 15
    assert result.checked == 1000
    assert sum(status == "completed" for status in final.values()) == len(ids[::3])
    assert fake.count("/v1/trainings/") == 0


def test_rows_missing_from_the_listing_are_fetched_by_id(
    conn: db.Connection, fake: FakeReplicate
) -> None:
    """Due rows the walk does not meet (older than the pages read) are fetched one by one."""
    ids = add_trainings(fake, [f"n{number:03d}" for number in range(150)], "succeeded")
    insert_rows(conn, ids)
    fake.trainings.pop("n000")  # gone from the listing: only a GET by id can answer
    fake.script("/v1/trainings/n000", Scripted(200, {"id": "n000", "status": "canceled"}))

    result = sweep.run_sweep(conn, make_client(fake), SETTINGS)

    assert statuses(conn)["n000"] == "canceled"
    assert result.checked == 150
    assert fake.count("/v1/trainings/") == 1


def test_three_sweeps_at_once_never_fetch_a_training_twice(
    database_url: str, fake: FakeReplicate
) -> None:
    """Three concurrent sweeps share the due rows: each training is fetched exactly once."""
    ids = add_trainings(fake, [f"c{number:03d}" for number in range(240)], "succeeded")
    fake.latency = 0.002
    setup = db.connect(database_url)
    insert_rows(setup, ids)
    # Small claims (lease 5 s x 10 rps / 2 = 25 rows) so the sweeps interleave; per-id only.
    settings = sweep.SweepSettings(
        interval_seconds=120, lease_seconds=5, concurrency=4, max_rps=10, list_threshold=10_000
    )
    barrier = threading.Barrier(3)
    results: list[sweep.SweepResult] = []
    failures: list[BaseException] = []

    def run() -> None:
        conn = db.connect(database_url)
        try:
            barrier.wait()
            results.append(sweep.run_sweep(conn, make_client(fake), settings))
        except BaseException as exc:  # collected for the assert below
            failures.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = statuses(setup)
    setup.close()

    assert failures == []
    assert {fake.counts[f"/v1/trainings/{training_id}"] for training_id in ids} == {1}
    assert sum(result.checked for result in results) == len(ids)
    assert set(final.values()) == {"completed"}


def test_a_failing_fetch_backs_off_without_holding_up_the_others(
    conn: db.Connection, fake: FakeReplicate
) -> None:
    """One training answering 500 is rescheduled with backoff; the others are applied."""
    for training_id in ("ok1", "ok2", "sick"):
        fake.add(training_id, "succeeded")
    fake.script("/v1/trainings/sick", *[Scripted(500, {"detail": "boom"})] * 2)
    insert_rows(conn, ["ok1", "ok2", "sick"])

    result = sweep.run_sweep(conn, make_client(fake), SETTINGS)

    sick = db.select_training(conn, "sick")
    assert sick is not None
    assert (result.checked, result.errors) == (2, 1)
    assert "boom" in (result.first_error or "")
    assert statuses(conn) == {"ok1": "completed", "ok2": "completed", "sick": "training"}
    assert sick["check_failures"] == 1
    assert sick["next_check_at"] > sick["last_checked_at"]
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM webhook_sync.trainings WHERE lease_owner IS NOT NULL")
        assert cur.fetchone()[0] == 0


def test_progress_counts_checked_and_failed_rows(conn: db.Connection, fake: FakeReplicate) -> None:
    """The progress callback counts every row once, checked or failed, up to the due total."""
    for training_id in ("ok1", "ok2", "sick"):
        fake.add(training_id, "succeeded")
    fake.script("/v1/trainings/sick", *[Scripted(500, {"detail": "boom"})] * 2)
    insert_rows(conn, ["ok1", "ok2", "sick"])
    reported: list[tuple[int, int]] = []

    sweep.run_sweep(conn, make_client(fake), SETTINGS, progress=lambda *done: reported.append(done))

    assert reported[0] == (0, 3)
    assert reported[-1] == (3, 3)
    done = [count for count, _ in reported]
    assert done == sorted(done)
    assert set(done) == {0, 1, 2, 3}


def backdate(conn: db.Connection, minutes: float) -> None:
    """Pretend every row was inserted `minutes` ago (commits)."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE webhook_sync.trainings SET created_at = now() - make_interval(mins => %s)",
            (minutes,),
        )


def test_repeated_404s_mark_the_training_as_needing_attention(
    conn: db.Connection, fake: FakeReplicate
) -> None:
    """After three 404s in a row the row stays `training` and is flagged for a person."""
    insert_rows(conn, ["ghost"])
    backdate(conn, 2)
    client = make_client(fake)

    for _ in range(3):
        make_due(conn)
        result = sweep.run_sweep(conn, client, SETTINGS)

    ghost = db.select_training(conn, "ghost")
    assert ghost is not None
    assert result.not_found == 1
    assert ghost["training_status"] == "training"
    assert ghost["check_failures"] == 3
    assert "404" in (ghost["needs_attention"] or "")


def test_404s_just_after_tracking_are_retried_but_not_counted(
    conn: db.Connection, simulator: SimulatorServer
) -> None:
    """Replicate's lag after a create: a new training that answers 404 (the simulator's
    new_training_404 fault) sweep after sweep is retried with backoff, never flagged, and
    applied once Replicate shows it."""
    simulator.simulator.set_faults(new_training_404_rate=1.0, new_training_404_seconds=4)
    plan = BulkPlan(count=1, created_ago=(0, 0), finish_in=(3600, 3600))
    (training_id,) = simulator.simulator.create_many(plan)
    insert_rows(conn, [training_id])
    client = client_for(simulator)

    for _ in range(4):
        make_due(conn)
        result = sweep.run_sweep(conn, client, SETTINGS)
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT check_failures, not_found_count, needs_attention"
            " FROM webhook_sync.trainings WHERE id = %s",
            (training_id,),
        )
        lagging = cur.fetchone()

    def visible() -> bool:
        try:
            client.get_training(training_id)
        except errors.ReplicateNotFoundError:
            return False
        return True

    wait_until(visible, timeout=30, message="the lag to end")
    make_due(conn)
    sweep.run_sweep(conn, client, SETTINGS)

    assert result.not_found == 1
    assert lagging == (4, 0, None)
    found = db.select_training(conn, training_id)
    assert found is not None
    assert (found["training_status"], found["replicate_status"]) == ("training", "processing")


def test_found_again_clears_needs_attention(conn: db.Connection, fake: FakeReplicate) -> None:
    """A flagged training that Replicate answers for again is unflagged."""
    insert_rows(conn, ["late"])
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE webhook_sync.trainings SET needs_attention = 'x', not_found_count = 3")
    fake.add("late", "processing")

    sweep.run_sweep(conn, make_client(fake), SETTINGS)

    late = db.select_training(conn, "late")
    assert late is not None
    assert late["needs_attention"] is None


def test_401_stops_the_sweep_and_hands_back_every_lease(
    conn: db.Connection, fake: FakeReplicate
) -> None:
    """A refused token stops the sweep at once with an error naming REPLICATE_API_TOKEN."""
    ids = add_trainings(fake, [f"a{number:02d}" for number in range(40)], "succeeded")
    insert_rows(conn, ids)
    settings = sweep.SweepSettings(concurrency=1, list_threshold=10_000)

    with pytest.raises(errors.ReplicateAuthError) as caught:
        sweep.run_sweep(conn, make_client(fake, token="r8_revoked"), settings)

    assert "REPLICATE_API_TOKEN" in str(caught.value)
    assert "r8_revoked" not in str(caught.value)
    assert fake.total() <= 2
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM webhook_sync.trainings"
            " WHERE lease_owner IS NULL AND next_check_at <= now() AND check_failures = 0"
        )
        assert cur.fetchone()[0] == len(ids)


def test_a_401_still_applies_what_was_fetched_before_it(
    conn: db.Connection, fake: FakeReplicate
) -> None:
    """The answers that came before a refused token are true: they are applied before the
    ReplicateAuthError stops the sweep; the refused row stays as it was."""
    ids = add_trainings(fake, ["b1", "b2", "b3", "refused"], "succeeded")
    fake.script("/v1/trainings/refused", Scripted(401, {"detail": "revoked"}, delay=0.5))
    insert_rows(conn, ids)

    with pytest.raises(errors.ReplicateAuthError):
        sweep.run_sweep(conn, make_client(fake), SETTINGS)

    assert statuses(conn) == {
        "b1": "completed",
        "b2": "completed",
        "b3": "completed",
        "refused": "training",
    }


def test_stop_hands_back_the_leases_of_unchecked_rows(
    conn: db.Connection, fake: FakeReplicate
) -> None:
    """A stop requested mid-sweep cancels queued fetches and frees their leases at once."""
    ids = add_trainings(fake, [f"s{number:02d}" for number in range(30)], "succeeded")
    insert_rows(conn, ids)
    stop = threading.Event()
    permits = fake.permits = threading.Semaphore(3)  # the 4th GET hangs until the stop

    def stop_at_the_fourth_get() -> None:
        wait_until(lambda: fake.total() >= 4, message="the 4th GET")
        stop.set()
        permits.release(len(ids))

    stopper = threading.Thread(target=stop_at_the_fourth_get)
    stopper.start()
    settings = sweep.SweepSettings(concurrency=1, list_threshold=10_000)
    result = sweep.run_sweep(conn, make_client(fake), settings, stop=stop)
    stopper.join()

    final = statuses(conn)
    assert result.stopped
    assert (result.checked, result.errors) == (4, 0)
    assert fake.total() == 4
    assert sum(status == "completed" for status in final.values()) == result.checked
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM webhook_sync.trainings WHERE lease_owner IS NOT NULL")
        assert cur.fetchone()[0] == 0


def store_pending_event(conn: db.Connection, webhook_id: str, training_id: str) -> None:
    """Keep a succeeded webhook for an untracked training in the inbox, as `pending`."""
    with conn:
        db.insert_event(
            conn,
            webhook_id=webhook_id,
            training_id=training_id,
            payload={"id": training_id, "status": "succeeded"},
            signed_at=None,
        )
        db.update_event_outcome(conn, webhook_id, "pending")


def test_pending_inbox_events_are_applied_for_rows_inserted_later(
    conn: db.Connection, fake: FakeReplicate
) -> None:
    """A webhook that arrived before its row existed is applied by the next sweep."""
    store_pending_event(conn, "msg_early", "early")
    insert_rows(conn, ["early"])
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE webhook_sync.trainings SET next_check_at = now() + interval '1 hour'")

    result = sweep.run_sweep(conn, make_client(fake), SETTINGS)

    early = db.select_training(conn, "early")
    event = db.select_event(conn, "msg_early")
    assert result.pending_applied == 1
    assert early is not None and event is not None
    assert (early["training_status"], early["updated_by"]) == ("completed", "webhook")
    assert event["outcome"] == "applied"
    assert fake.total() == 0


def test_a_pending_event_the_database_refuses_does_not_stop_the_sweep(
    conn: db.Connection, fake: FakeReplicate
) -> None:
    """An inbox event whose apply PostgreSQL refuses fails alone: the sweep still checks
    every other due row, and the event stays pending for the next sweep."""
    fake.add("fine", "succeeded")
    store_pending_event(conn, "msg_poison", "poison")
    insert_rows(conn, ["poison", "fine"])
    with conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE webhook_sync.trainings SET next_check_at = now() + interval '1 hour'"
            " WHERE id = 'poison'"
        )
        cur.execute(
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE EXCEPTION 'refused by the test'; END $$;"
            " CREATE TRIGGER refuse_poison BEFORE UPDATE OF training_status"
            " ON webhook_sync.trainings"
            " FOR EACH ROW WHEN (OLD.id = 'poison') EXECUTE FUNCTION refuse_poison()"
        )

    result = sweep.run_sweep(conn, make_client(fake), SETTINGS)

    event = db.select_event(conn, "msg_poison")
    assert (result.checked, result.pending_applied) == (1, 0)
    assert statuses(conn) == {"poison": "training", "fine": "completed"}
    assert event is not None and event["outcome"] == "pending"


def test_a_leased_row_is_not_claimed_until_its_lease_expires(conn: db.Connection) -> None:
    """A second claimer gets nothing while the lease holds, and the row once it expires."""
    insert_rows(conn, ["leased"])
    with conn:
        now = db.select_now(conn)
        first = db.claim_due_trainings(conn, owner="a", lease_seconds=0.2, due_before=now, limit=10)
    with conn:
        during = db.claim_due_trainings(conn, owner="b", lease_seconds=30, due_before=now, limit=10)

    def claim_b() -> list[db.Row]:
        with conn:
            return db.claim_due_trainings(
                conn, owner="b", lease_seconds=30, due_before=now, limit=10
            )

    after = wait_until(claim_b, message="the lease to expire")

    assert [row["id"] for row in first] == ["leased"]
    assert during == []
    assert [row["id"] for row in after] == ["leased"]


def test_sync_applies_given_trainings_due_or_not(conn: db.Connection, fake: FakeReplicate) -> None:
    """sync fetches the named trainings now and reports each outcome, errors included; an
    untracked training is `pending`, as everywhere else."""
    fake.add("later", "succeeded")
    fake.add("untracked", "succeeded")
    insert_rows(conn, ["later"])
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE webhook_sync.trainings SET next_check_at = now() + interval '1 hour'")

    results = sync.sync_trainings(
        conn, make_client(fake), ["later", "nowhere", "untracked"], SETTINGS
    )

    assert [(r.training_id, r.outcome) for r in results] == [
        ("later", "applied"),
        ("nowhere", "error"),
        ("untracked", "pending"),
    ]
    assert "404" in (results[1].error or "")
    assert statuses(conn) == {"later": "completed"}


def test_stuck_trainings_are_counted(conn: db.Connection, fake: FakeReplicate) -> None:
    """A training in `training` past the stuck threshold is counted, in the metric, and
    logged in one line per sweep."""
    fake.add("old", "processing")
    fake.add("older", "processing")
    insert_rows(conn, ["old", "older"])
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE webhook_sync.trainings SET created_at = now() - interval '2 hours'")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    package_logger = logging.getLogger(logs.LOGGER_NAME)
    package_logger.addHandler(handler)
    try:
        result = sweep.run_sweep(conn, make_client(fake), SETTINGS)
    finally:
        package_logger.removeHandler(handler)

    stuck_lines = [r for r in records if r.getMessage() == "trainings_stuck"]
    assert result.stuck == 2
    assert REGISTRY.get_sample_value("webhook_sync_stuck_trainings") == 2
    assert len(stuck_lines) == 1
    assert stuck_lines[0].fields["count"] == 2  # type: ignore[attr-defined]


def cli_env(database_url: str, fake: FakeReplicate, token: str = TOKEN) -> dict[str, str]:
    """The environment the CLI needs to reach this test's database and fake Replicate."""
    return {
        "DATABASE_URL": database_url,
        "REPLICATE_API_TOKEN": token,
        "REPLICATE_API_BASE_URL": fake.url,
    }


def test_sweep_command_prints_the_summary(
    conn: db.Connection, database_url: str, fake: FakeReplicate
) -> None:
    """`webhook-sync sweep` runs one sweep and ends with the summary line."""
    fake.add("cli1", "succeeded")
    insert_rows(conn, ["cli1"])

    done = run_cli("sweep", env=cli_env(database_url, fake))

    assert done.returncode == 0, done.stderr
    assert "due=1 checked=1 repaired=1" in done.stdout
    assert statuses(conn) == {"cli1": "completed"}


def test_sweep_command_names_the_token_on_401(
    conn: db.Connection, database_url: str, fake: FakeReplicate
) -> None:
    """A refused token makes `sweep` exit 1 with a short cause naming REPLICATE_API_TOKEN."""
    fake.add("cli1", "succeeded")
    insert_rows(conn, ["cli1"])

    done = run_cli("sweep", env=cli_env(database_url, fake, token="r8_nope_secret"))

    assert done.returncode == 1
    assert "REPLICATE_API_TOKEN" in done.stderr
    assert "r8_nope_secret" not in done.stderr + done.stdout


def test_sync_command_reports_each_training(
    conn: db.Connection, database_url: str, fake: FakeReplicate
) -> None:
    """`webhook-sync sync` applies known ids and exits 1 when one cannot be fetched."""
    fake.add("cli2", "canceled")
    insert_rows(conn, ["cli2"])

    done = run_cli("sync", "cli2", "missing", "--json", env=cli_env(database_url, fake))

    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1
    assert [(row["training_id"], row["outcome"]) for row in rows] == [
        ("cli2", "applied"),
        ("missing", "error"),
    ]
    assert statuses(conn) == {"cli2": "canceled"}


def test_terminal_lag_is_measured_by_source(conn: db.Connection) -> None:
    """The funnel observes the lag from Replicate's completed_at for every source."""
    insert_rows(conn, ["lag1"])
    before = REGISTRY.get_sample_value(
        "webhook_sync_terminal_lag_seconds_count", {"source": "webhook"}
    )
    report = parse_training(
        {"id": "lag1", "status": "succeeded", "completed_at": "2026-01-01T00:00:00Z"}
    )

    with conn:
        service.apply_update(conn, report, "webhook")

    after = REGISTRY.get_sample_value(
        "webhook_sync_terminal_lag_seconds_count", {"source": "webhook"}
    )
    assert after == (before or 0) + 1


def test_one_row_the_database_refuses_fails_alone(conn: db.Connection, fake: FakeReplicate) -> None:
    """A row whose update PostgreSQL refuses breaks only itself: the others in its batch
    are applied and it backs off."""
    ids = [f"u{number:02d}" for number in range(30)]
    for training_id in [*ids, "u99"]:
        fake.add(training_id, "succeeded")
    insert_rows(conn, [*ids, "u99"])
    with conn, conn.cursor() as cur:
        cur.execute(
            "CREATE FUNCTION refuse_u99() RETURNS trigger LANGUAGE plpgsql AS $$"
            " BEGIN RAISE EXCEPTION 'refused by the test'; END $$;"
            " CREATE TRIGGER refuse_u99 BEFORE UPDATE OF training_status ON webhook_sync.trainings"
            " FOR EACH ROW WHEN (OLD.id = 'u99') EXECUTE FUNCTION refuse_u99()"
        )

    result = sweep.run_sweep(conn, make_client(fake), SETTINGS)

    final = statuses(conn)
    u99 = db.select_training(conn, "u99")
    assert (result.checked, result.errors) == (len(ids), 1)
    assert "refused by the test" in (result.first_error or "")
    assert all(final[training_id] == "completed" for training_id in ids)
    assert u99 is not None
    assert (u99["training_status"], u99["check_failures"]) == ("training", 1)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM webhook_sync.trainings WHERE lease_owner IS NOT NULL")
        assert cur.fetchone()[0] == 0


@pytest.fixture()
def simulator() -> Iterator[SimulatorServer]:
    """The project's Replicate simulator on a free port, with room for fast sweeps."""
    sim = Simulator(seed=5, faults=Faults(read_rpm=1_000_000))
    with start_in_thread(sim) as server:
        yield server


def test_simulator_thousand_finished_trainings_in_at_most_15_calls(
    conn: db.Connection, simulator: SimulatorServer
) -> None:
    """Against the simulator: 1,000 trainings created in the last minute, all finished and
    their webhooks never sent, reach their true status in at most 15 API calls."""
    ids = simulator.simulator.create_many(
        BulkPlan(count=1000, created_ago=(1, 60), finish_in=(0, 0), fail_rate=0.2)
    )
    insert_rows(conn, ids)
    simulator.simulator.reset_request_counts()

    result = sweep.run_sweep(conn, client_for(simulator), SETTINGS)

    truth = simulator.simulator.true_statuses()
    final = statuses(conn)
    assert simulator.simulator.request_counts()["total"] <= 15
    assert result.checked == 1000
    assert {training_id: final[training_id] for training_id in ids} == {
        training_id: {"succeeded": "completed"}.get(truth[training_id], truth[training_id])
        for training_id in ids
    }


def test_stored_creation_time_bounds_the_walk_for_late_tracked_rows(
    conn: db.Connection, simulator: SimulatorServer
) -> None:
    """Rows tracked long after Replicate created them cost GETs once; once the first
    check has stored Replicate's created_at, the next sweep resolves them from the list."""
    ids = simulator.simulator.create_many(
        BulkPlan(count=300, created_ago=(1800, 3600), finish_in=(3600, 3600))
    )
    insert_rows(conn, ids)
    client = client_for(simulator)
    first = sweep.run_sweep(conn, client, SETTINGS)
    make_due(conn)
    simulator.simulator.reset_request_counts()

    second = sweep.run_sweep(conn, client, SETTINGS)

    assert first.api_calls > 100
    assert first.checked == second.checked == 300
    assert simulator.simulator.request_counts()["total"] == second.api_calls <= 4


def test_rows_checked_late_in_a_sweep_are_due_for_the_next_one(
    conn: db.Connection, fake: FakeReplicate
) -> None:
    """The next check is one interval (less a little slack) after the sweep's start, not
    after each row's check, so a slow sweep cannot push a row past the next sweep."""
    ids = add_trainings(fake, [f"l{number}" for number in range(5)], "processing")
    fake.latency = 0.05
    insert_rows(conn, ids)
    settings = sweep.SweepSettings(interval_seconds=120, concurrency=1)

    sweep.run_sweep(conn, make_client(fake), settings)

    rows = db.select_trainings(conn, ids)
    first_check = min(row["last_checked_at"] for row in rows)
    assert len({row["next_check_at"] for row in rows}) == 1
    assert rows[0]["next_check_at"] <= first_check + settings.interval - settings.slack


def test_three_list_walks_at_once_apply_each_training_once(
    database_url: str, fake: FakeReplicate
) -> None:
    """Three sweeps walking the same pages at once claim each listed training only once."""
    ids = add_trainings(fake, [f"m{number:03d}" for number in range(500)], "succeeded")
    fake.latency = 0.005
    setup = db.connect(database_url)
    insert_rows(setup, ids)
    barrier = threading.Barrier(3)
    results: list[sweep.SweepResult] = []

    def run() -> None:
        conn = db.connect(database_url)
        try:
            barrier.wait()
            results.append(sweep.run_sweep(conn, make_client(fake), SETTINGS))
        finally:
            conn.close()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with setup, setup.cursor() as cur:
        cur.execute(
            "SELECT training_id, count(*) FROM webhook_sync.training_transitions"
            " GROUP BY training_id"
        )
        transitions = dict(cur.fetchall())
    final = statuses(setup)
    setup.close()

    assert len(results) == 3
    assert sum(result.checked for result in results) == len(ids)
    assert transitions == dict.fromkeys(ids, 1)
    assert set(final.values()) == {"completed"}
    assert fake.count("/v1/trainings/") == 0


def test_a_failing_listing_falls_back_to_gets_by_id(
    conn: db.Connection, fake: FakeReplicate
) -> None:
    """When GET /trainings keeps failing, the due rows are fetched one by one instead."""
    ids = add_trainings(fake, [f"f{number:02d}" for number in range(30)], "failed")
    fake.script("/v1/trainings", *[Scripted(502, {"detail": "bad gateway"})] * 2)
    insert_rows(conn, ids)

    result = sweep.run_sweep(conn, make_client(fake), SETTINGS)

    assert (result.checked, result.errors, result.list_pages) == (30, 0, 0)
    assert fake.count("/v1/trainings/") == 30
    assert set(statuses(conn).values()) == {"failed"}


def test_a_slow_sweep_keeps_its_leases(database_url: str, fake: FakeReplicate) -> None:
    """While its GETs hang past the lease, a sweep renews its leases, so a second sweep
    started meanwhile claims nothing and no training is fetched twice."""
    ids = add_trainings(fake, ["slow1", "slow2"], "succeeded")
    setup = db.connect(database_url)
    insert_rows(setup, ids)
    permits = fake.permits = threading.Semaphore(0)  # every answer waits until released
    settings = sweep.SweepSettings(lease_seconds=0.6, concurrency=2, list_threshold=10_000)
    results: list[sweep.SweepResult] = []

    def run_first() -> None:
        conn = db.connect(database_url)
        try:
            results.append(sweep.run_sweep(conn, make_client(fake), settings))
        finally:
            conn.close()

    first = threading.Thread(target=run_first)
    first.start()
    wait_until(lambda: fake.total() == 2, message="both GETs hanging")
    with setup:
        claimed_until = db.select_now(setup) + timedelta(seconds=settings.lease_seconds)
    wait_until(lambda: select_now(database_url) > claimed_until, message="the first lease")
    second = sweep.run_sweep(setup, make_client(fake), settings)
    permits.release(10)
    first.join()
    final = statuses(setup)
    setup.close()

    assert second.due == 0
    assert results[0].checked == 2
    assert fake.total() == 2
    assert set(final.values()) == {"completed"}


def select_now(database_url: str) -> datetime:
    """The database clock, read on a connection of its own."""
    conn = db.connect(database_url)
    try:
        with conn:
            return db.select_now(conn)
    finally:
        conn.close()


def test_ctrl_c_stops_the_sweep_command_cleanly(
    conn: db.Connection, database_url: str, fake: FakeReplicate
) -> None:
    """SIGINT stops `webhook-sync sweep` like SIGTERM stops a worker: exit 0, summary shown,
    no lease left behind."""
    ids = add_trainings(fake, [f"i{number}" for number in range(5)], "succeeded")
    insert_rows(conn, ids)
    permits = fake.permits = threading.Semaphore(0)
    process = subprocess.Popen(
        [str(VENV_BIN / "webhook-sync"), "sweep"],
        env={**os.environ, **cli_env(database_url, fake)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: fake.total() >= 1, message="a GET in flight")

    process.send_signal(signal.SIGINT)
    permits.release(100)
    stdout, stderr = process.communicate(timeout=30)

    assert process.returncode == 0, stderr
    assert "stopped=True" in stdout
    assert "Traceback" not in stderr
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM webhook_sync.trainings WHERE lease_owner IS NOT NULL")
        assert cur.fetchone()[0] == 0
