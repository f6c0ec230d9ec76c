"""Discovery by the poller, against the simulator over HTTP and a real PostgreSQL: the
account's untracked trainings that are ours are tracked and brought to their status."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.registration_support import client_for, create_training, silent_simulator
from tests.support import VENV_BIN, wait_until
from tests.web_support import training_payload
from webhook_sync import db, discovery, inbox, registration, registry, sweep
from webhook_sync.dev.simulator import BulkPlan, SimulatorServer
from webhook_sync.vocabulary import Source

HERE = "http://127.0.0.1:9/webhooks/replicate"
ELSEWHERE = "https://elsewhere.example.com/hooks?user_id=1"
# The coarsest created_at Replicate shows (`…32.23Z`).
CREATED_AT_RESOLUTION = timedelta(milliseconds=10)
FIND = discovery.DiscoverySettings(concurrency=4)
SETTINGS = sweep.SweepSettings(
    interval_seconds=120, lease_seconds=30, concurrency=4, max_rps=1000, discovery_settings=FIND
)


@pytest.fixture()
def sim() -> Iterator[SimulatorServer]:
    """The simulator, every webhook dropped; trainings take about a second."""
    with silent_simulator(seed=14, train_seconds=1.0) as server:
        yield server


create = create_training


def gets_of(server: SimulatorServer, training_id: str) -> int:
    """How many times the training was fetched by id."""
    return server.simulator.request_counts()["training_gets"].get(training_id, 0)


def rows(conn: db.Connection) -> dict[str, tuple[str, str | None]]:
    """(user_id, replicate_status) of every tracked training."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id, user_id, replicate_status FROM webhook_sync.trainings")
        return {training_id: (user, status) for training_id, user, status in cur.fetchall()}


def test_a_self_registered_training_nobody_tracked_reaches_its_true_status(
    conn: db.Connection, sim: SimulatorServer
) -> None:
    """Every webhook dropped, no row inserted: sweeps find it, track it, finish it."""
    ours = create(sim, HERE + "?user_id=u42")
    client = client_for(sim)

    first = sweep.run_sweep(conn, client, SETTINGS)
    wait_until(lambda: sim.simulator.true_statuses()[ours] == "succeeded", timeout=15)
    with conn, conn.cursor() as cur:
        cur.execute("UPDATE webhook_sync.trainings SET next_check_at = now()")
    sweep.run_sweep(conn, client, SETTINGS)

    assert first.adopted == 1
    assert rows(conn) == {ours: ("u42", "succeeded")}
    assert gets_of(sim, ours) == 2  # discovery's fetch, then the next sweep's check


def test_a_foreign_training_costs_one_fetch_ever(conn: db.Connection, sim: SimulatorServer) -> None:
    """Trainings whose webhook is elsewhere, or missing, are fetched once and remembered."""
    elsewhere = create(sim, ELSEWHERE)
    silent = create(sim, None)
    no_user = create(sim, HERE)
    client = client_for(sim)

    first = sweep.run_sweep(conn, client, SETTINGS)
    second = sweep.run_sweep(conn, client, SETTINGS)

    assert rows(conn) == {}
    assert [gets_of(sim, t) for t in (elsewhere, silent, no_user)] == [1, 1, 1]
    assert (first.discovery_calls, first.api_calls) == (4, 4)
    assert (second.discovery_calls, second.api_calls) == (1, 1)


def test_finished_long_ago_is_not_fetched(conn: db.Connection, sim: SimulatorServer) -> None:
    """A training finished before the window is left alone, without a GET."""
    [old] = sim.simulator.create_many(
        BulkPlan(count=1, created_ago=(60, 60), finish_in=(0, 0), webhook=HERE + "?user_id=u1")
    )
    settings = replace(SETTINGS, discovery_settings=replace(FIND, window_seconds=0.001))

    result = sweep.run_sweep(conn, client_for(sim), settings)

    assert (result.adopted, result.api_calls, gets_of(sim, old)) == (0, 1, 0)
    assert rows(conn) == {}


def test_finished_within_the_window_is_adopted(conn: db.Connection, sim: SimulatorServer) -> None:
    """A training that finished a moment ago, every webhook lost, gets its final status."""
    [done] = sim.simulator.create_many(
        BulkPlan(count=1, created_ago=(60, 60), finish_in=(0, 0), webhook=HERE + "?user_id=u1")
    )

    result = sweep.run_sweep(conn, client_for(sim), SETTINGS)

    assert result.adopted == 1
    assert rows(conn) == {done: ("u1", "succeeded")}


def test_the_destination_pattern_adopts_from_the_listing_alone(
    conn: db.Connection, sim: SimulatorServer
) -> None:
    """A succeeded training whose destination names the user is adopted without a GET."""
    [done] = sim.simulator.create_many(
        BulkPlan(
            count=1,
            created_ago=(60, 60),
            finish_in=(0, 0),
            destination="sandrasocial/45038279-selfie-lora",
        )
    )
    owners = registration.Owners(destination_pattern=re.compile(r"^[^/]+/(?P<user>\d+)-"))
    settings = replace(SETTINGS, discovery_settings=replace(FIND, owners=owners))

    result = sweep.run_sweep(conn, client_for(sim), settings)

    assert rows(conn) == {done: ("45038279", "succeeded")}
    assert (result.adopted, result.api_calls, gets_of(sim, done)) == (1, 1, 0)


def test_pending_events_of_an_untracked_training_are_adopted_without_a_call(
    conn: db.Connection, sim: SimulatorServer
) -> None:
    """Stored pending deliveries whose signed body names the user are adopted by the
    sweep; a replayed payload (perhaps from an unsigned file) is not."""
    payload = training_payload("waiting1", "processing", webhook=HERE + "?user_id=u7")
    inbox.receive_delivery(conn, webhook_id="msg_w1", payload=payload, signed_at=None)
    stray = training_payload("stray1", "processing", webhook=ELSEWHERE)
    inbox.receive_delivery(conn, webhook_id="msg_s1", payload=stray, signed_at=None)
    unsigned = training_payload("replayed1", "processing", webhook=HERE + "?user_id=u8")
    inbox.receive_delivery(
        conn, webhook_id="replay_1", payload=unsigned, signed_at=None, source=Source.REPLAY
    )

    result = sweep.run_sweep(conn, client_for(sim), SETTINGS)
    again = discovery.adopt_pending(conn, FIND)

    assert rows(conn) == {"waiting1": ("u7", "processing")}
    assert result.adopted == 1
    assert again == 0
    with conn:
        assert db.select_event(conn, "msg_w1")["outcome"] == "applied"
        assert db.select_event(conn, "msg_s1")["outcome"] == "pending"
        assert db.select_event(conn, "replay_1")["outcome"] == "pending"


def test_pages_since_the_mark_are_read_and_fetches_stay_bounded(
    conn: db.Connection, sim: SimulatorServer
) -> None:
    """250 new foreign trainings: every page since the mark is read and at most
    max_fetches GETs are made per sweep; the mark moves once all were judged, and then
    one page is enough."""
    client = client_for(sim)
    settings = replace(SETTINGS, discovery_settings=replace(FIND, mark_margin_seconds=0))
    sweep.run_sweep(conn, client, settings)  # an empty account: the mark is our clock
    with conn:
        mark = registry.select_discovery_mark(conn)
    assert mark is not None
    # Replicate (and the simulator) may show created_at to 10 ms: a training created less
    # than that after the mark can list as older than it, which only the margin (0 here)
    # covers; those pages would then look already judged.
    wait_until(lambda: datetime.now(UTC) > mark + CREATED_AT_RESOLUTION, timeout=5)
    sim.simulator.create_many(
        BulkPlan(count=250, created_ago=(0, 0), finish_in=(60, 120), webhook=ELSEWHERE)
    )

    calls = [sweep.run_sweep(conn, client, settings).discovery_calls for _ in range(4)]

    assert calls == [3 + 100, 3 + 100, 3 + 50, 1]
    fetched = sim.simulator.request_counts()["training_gets"]
    assert len(fetched) == 250 and set(fetched.values()) == {1}


@pytest.mark.slow
def test_the_worker_process_brings_unregistered_self_registering_trainings_home(
    database_url: str, sim: SimulatorServer, tmp_path: Path
) -> None:
    """End to end: `webhook-sync worker`, every webhook dropped and no row inserted by
    anyone; each self-registered training ends in its true status, the others untracked."""
    ours = [create(sim, f"{HERE}?user_id=user{n}") for n in range(5)]
    theirs = [create(sim, ELSEWHERE), create(sim, None)]
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REPLICATE_API_TOKEN": sim.simulator.tokens[0],
        "REPLICATE_API_BASE_URL": sim.api_base_url,
        "POLL_INTERVAL_SECONDS": "1",
    }
    log_path = tmp_path / "worker.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "webhook-sync"), "worker"], env=env, stdout=log, stderr=log
        )
    conn = db.connect(database_url)
    try:

        def settled() -> bool:
            truth = sim.simulator.true_statuses()
            tracked = rows(conn)
            return all(truth[t] in {"succeeded", "failed"} for t in ours) and {
                t: status for t, (_user, status) in tracked.items()
            } == {t: truth[t] for t in ours}

        wait_until(settled, timeout=60, message="every self-registered training final")
        tracked = rows(conn)
    finally:
        process.terminate()
        code = process.wait(timeout=30)
        conn.close()

    assert code == 0
    assert {t: user for t, (user, _status) in tracked.items()} == {
        t: f"user{n}" for n, t in enumerate(ours)
    }
    assert not set(theirs) & set(tracked)
    assert sim.simulator.request_counts()["training_gets"][theirs[0]] == 1


def test_the_simulator_carries_the_webhook_url_as_replicate_does(sim: SimulatorServer) -> None:
    """GET and webhook bodies carry the creation's `webhook`; the listing does not, which
    is why discovery fetches a candidate once."""
    url = HERE + "?user_id=u1"
    training_id = create(sim, url)
    client = client_for(sim)

    fetched = client.get_training(training_id)
    delivered = sim.simulator.get_training(training_id, view="webhook")
    listed = next(obj for obj in next(client.list_training_pages()) if obj["id"] == training_id)

    assert fetched["webhook"] == delivered["webhook"] == url
    assert "webhook" not in listed


def test_one_discovery_at_a_time(
    conn: db.Connection, database_url: str, sim: SimulatorServer
) -> None:
    """While another session holds the discovery lock a sweep skips discovery; after, not."""
    create(sim, ELSEWHERE)
    other = db.connect(database_url)
    try:
        with other:
            assert registry.try_lock_discovery(other)
        skipped = sweep.run_sweep(conn, client_for(sim), SETTINGS)
        with other:
            registry.unlock_discovery(other)
    finally:
        other.close()
    ran = sweep.run_sweep(conn, client_for(sim), SETTINGS)

    assert (skipped.discovery_calls, ran.discovery_calls) == (0, 2)


def test_a_training_the_database_refuses_fails_alone(
    conn: db.Connection, sim: SimulatorServer
) -> None:
    """One adoption PostgreSQL refuses is logged; the others are adopted, the sweep goes on."""
    first = create(sim, HERE + "?user_id=u1")
    second = create(sim, HERE + "?user_id=u2")
    with conn, conn.cursor() as cur:
        cur.execute(
            "CREATE FUNCTION webhook_sync.refuse() RETURNS trigger LANGUAGE plpgsql AS"
            " $$ BEGIN RAISE EXCEPTION 'refused'; END $$"
        )
        cur.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON webhook_sync.trainings FOR EACH ROW"
            f" WHEN (NEW.id = '{first}') EXECUTE FUNCTION webhook_sync.refuse()"
        )

    result = sweep.run_sweep(conn, client_for(sim), SETTINGS)

    assert result.adopted == 1
    assert {t: user for t, (user, _) in rows(conn).items()} == {second: "u2"}
