"""A row inserted directly wakes the worker: the insert trigger NOTIFYs, the listener
applies the webhook waiting for it and checks it at Replicate, without a sweep."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from tests.registration_support import client_for, create_training
from tests.support import VENV_BIN, wait_until
from tests.web_support import training_payload
from webhook_sync import db, inbox, registration, sweep, wakeup
from webhook_sync.dev.simulator import (
    Faults,
    Lifecycle,
    Simulator,
    SimulatorServer,
    start_in_thread,
)

SETTINGS = sweep.SweepSettings(interval_seconds=3600, lease_seconds=30, max_rps=1000)


@pytest.fixture()
def simulator() -> Iterator[SimulatorServer]:
    """The Replicate simulator on a free port; trainings stay in progress for a minute."""
    sim = Simulator(
        seed=14,
        faults=Faults(read_rpm=1_000_000),
        lifecycle=Lifecycle(start_seconds=0.1, train_seconds=60, fail_rate=0),
    )
    with start_in_thread(sim) as server:
        yield server


def insert_directly(database_url: str, training_id: str) -> None:
    """INSERT a row the way a platform with its own SQL does (no Python of ours)."""
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO webhook_sync.trainings (id, user_id) VALUES (%s, %s)",
                (training_id, "user-1"),
            )
    finally:
        conn.close()


def event_outcome(database_url: str, webhook_id: str) -> str:
    """The stored outcome of one inbox event."""
    conn = db.connect(database_url)
    try:
        with conn:
            event = db.select_event(conn, webhook_id)
            assert event is not None
            return event["outcome"]
    finally:
        conn.close()


def store_pending(conn: db.Connection, training_id: str, webhook_id: str) -> None:
    """A webhook that arrived before its training was tracked: stored as pending."""
    payload = training_payload(training_id, "processing", started_at="2026-11-28T10:01:00Z")
    result = inbox.receive_delivery(conn, webhook_id=webhook_id, payload=payload, signed_at=None)
    assert result.result == "pending"


@pytest.fixture()
def listener(database_url: str) -> Iterator[wakeup.InsertListener]:
    """An insert listener without a Replicate client, stopped afterwards."""
    stop = threading.Event()
    running = wakeup.InsertListener(
        lambda: db.connect(database_url, "test listener"), None, SETTINGS, stop
    ).start()
    wait_until(running.listening.is_set, message="LISTEN in place")
    yield running
    stop.set()
    running.join(5)


def test_a_direct_insert_applies_the_waiting_webhook(
    conn: db.Connection, database_url: str, listener: wakeup.InsertListener
) -> None:
    """The pending event is applied as soon as the row is inserted (hang guard 10 s)."""
    store_pending(conn, "direct1", "msg_direct1")

    insert_directly(database_url, "direct1")

    wait_until(lambda: event_outcome(database_url, "msg_direct1") == "applied", timeout=10)
    with conn:
        row = db.select_training(conn, "direct1")
    assert row is not None
    assert (row["replicate_status"], row["updated_by"]) == ("processing", "webhook")


def test_an_insert_is_checked_at_replicate_at_once(
    conn: db.Connection, database_url: str, simulator: SimulatorServer
) -> None:
    """A new row is fetched from Replicate by the listener, not left for the next sweep."""
    created = {"id": create_training(simulator, webhook=None)}
    stop = threading.Event()
    client = client_for(simulator)
    running = wakeup.InsertListener(
        lambda: db.connect(database_url, "test listener"), client, SETTINGS, stop
    ).start()
    try:
        wait_until(running.listening.is_set, message="LISTEN in place")
        insert_directly(database_url, created["id"])

        wait_until(lambda: running.served == 1, timeout=10, message="the insert served")
    finally:
        stop.set()
        running.join(5)

    with conn:
        row = db.select_training(conn, created["id"])
    assert row is not None
    assert row["last_checked_at"] is not None
    assert row["replicate_status"] in {"starting", "processing"}
    assert row["next_check_at"] > row["last_checked_at"]


def test_two_workers_hearing_one_insert_fetch_it_once(
    conn: db.Connection, database_url: str, simulator: SimulatorServer
) -> None:
    """Every worker hears the NOTIFY; the lease lets only one of them fetch the row."""
    created = {"id": create_training(simulator, webhook=None)}
    stop = threading.Event()
    listeners = [
        wakeup.InsertListener(
            lambda: db.connect(database_url, "test listener"),
            client_for(simulator),
            SETTINGS,
            stop,
        ).start()
        for _ in range(3)
    ]
    try:
        for listener in listeners:
            wait_until(listener.listening.is_set, message="LISTEN in place")
        insert_directly(database_url, created["id"])

        wait_until(lambda: all(listener.served == 1 for listener in listeners), timeout=10)
    finally:
        stop.set()
        for listener in listeners:
            listener.join(5)

    with conn:
        row = db.select_training(conn, created["id"])
    assert simulator.simulator.request_counts()["training_gets"] == {created["id"]: 1}
    assert row["last_checked_at"] is not None


def test_a_row_adopted_from_a_signed_delivery_costs_no_get(
    conn: db.Connection, database_url: str, simulator: SimulatorServer
) -> None:
    """Self-registration inserts a row too; the listener serves it without asking Replicate."""
    webhook = "https://sync.example.com/webhooks/replicate?user_id=u1"
    created = {"id": create_training(simulator, webhook=webhook)}
    stop = threading.Event()
    running = wakeup.InsertListener(
        lambda: db.connect(database_url, "test listener"), client_for(simulator), SETTINGS, stop
    ).start()
    try:
        wait_until(running.listening.is_set, message="LISTEN in place")
        payload = training_payload(created["id"], "processing", webhook=webhook)
        result = inbox.receive_delivery(
            conn,
            webhook_id="msg_adopt",
            payload=payload,
            signed_at=None,
            owners=registration.Owners(),
        )
        wait_until(lambda: running.served == 1, timeout=10, message="the insert served")
    finally:
        stop.set()
        running.join(5)

    assert result.result == "applied"
    assert simulator.simulator.request_counts()["training_gets"].get(created["id"], 0) == 0


def test_the_worker_process_serves_an_insert_between_sweeps(
    conn: db.Connection, database_url: str, simulator: SimulatorServer, tmp_path: Path
) -> None:
    """`webhook-sync worker`, its next sweep an hour away, applies the event waiting for a
    row inserted directly (hang guard 15 s)."""
    store_pending(conn, "direct2", "msg_direct2")
    log_path = tmp_path / "worker.log"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REPLICATE_API_TOKEN": simulator.simulator.tokens[0],
        "REPLICATE_API_BASE_URL": simulator.api_base_url,
        "POLL_INTERVAL_SECONDS": "3600",
    }
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "webhook-sync"), "worker"], env=env, stdout=log, stderr=log
        )
    try:
        wait_until(lambda: " sweep " in log_path.read_text(), timeout=30, message="first sweep")
        wait_until(lambda: "insert_listener_listening" in log_path.read_text(), timeout=30)
        insert_directly(database_url, "direct2")

        wait_until(lambda: event_outcome(database_url, "msg_direct2") == "applied", timeout=15)
    finally:
        process.terminate()
        code = process.wait(timeout=30)

    assert code == 0
    assert "trainings_inserted count=1 pending_applied=1" in log_path.read_text()
