"""The worker as a real process (`webhook-sync worker`) against a local Replicate over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.fake_replicate import TOKEN, FakeReplicate, running
from tests.support import VENV_BIN, free_port, wait_until
from tests.test_sweep import insert_rows, statuses
from webhook_sync import capacity, db, worker
from webhook_sync.config import Config

# SIGTERM must end the process within the worker's budget; a little slack for start-up.
EXIT_BUDGET = worker.SHUTDOWN_BUDGET_SECONDS + 5
SECRET = "whsec_bG9jYWwtc2ltdWxhdG9yLWRldi1zZWNyZXQ="


@pytest.fixture()
def fake() -> Iterator[FakeReplicate]:
    """A FakeReplicate served on a free port."""
    with running() as server:
        yield server


class WorkerProcess:
    """A `webhook-sync worker` subprocess writing its log to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.log_file = log_path.open("w")
        self.process = subprocess.Popen(
            [str(VENV_BIN / "webhook-sync"), "worker"],
            env={**os.environ, **env},
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        """Everything the worker printed so far."""
        return self.log_path.read_text()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send `sig` and return the exit code, failing the test past the budget."""
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=EXIT_BUDGET)
        finally:
            self.log_file.close()

    def kill(self) -> None:
        """Stop it (SIGKILL) if it still runs; the fixture's safety net."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


@pytest.fixture()
def start_worker(database_url: str, fake: FakeReplicate, tmp_path: Path) -> Iterator[object]:
    """Start workers with short intervals against this test's database and fake Replicate."""
    started: list[WorkerProcess] = []

    def start(**overrides: str) -> WorkerProcess:
        env = {
            "DATABASE_URL": database_url,
            "REPLICATE_API_TOKEN": TOKEN,
            "REPLICATE_API_BASE_URL": fake.url,
            "REPLICATE_MAX_RPS": "1000",
            "POLL_INTERVAL_SECONDS": "1",
            "POLL_LEASE_SECONDS": "30",
            "POLL_CONCURRENCY": "4",
            "LOG_LEVEL": "INFO",
            **overrides,
        }
        process = WorkerProcess(env, tmp_path / f"worker{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def seed(database_url: str, fake: FakeReplicate, ids: list[str], status: str) -> None:
    """The same trainings on the fake Replicate (in `status`) and as rows in the database."""
    for training_id in ids:
        fake.add(training_id, status)
    conn = db.connect(database_url)
    try:
        insert_rows(conn, ids)
    finally:
        conn.close()


def all_final(database_url: str, count: int) -> bool:
    """True when `count` rows exist and none is still `training`."""
    conn = db.connect(database_url)
    try:
        final = statuses(conn)
    finally:
        conn.close()
    return len(final) == count and "training" not in final.values()


def checked_once(database_url: str) -> bool:
    """True when every row has been checked at least once."""
    conn = db.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT bool_and(last_checked_at IS NOT NULL) FROM webhook_sync.trainings")
            return bool(cur.fetchone()[0])
    finally:
        conn.close()


def leases(database_url: str) -> list[str | None]:
    """Every row's lease owner."""
    conn = db.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT lease_owner FROM webhook_sync.trainings")
            return [owner for (owner,) in cur.fetchall()]
    finally:
        conn.close()


def test_worker_repairs_dropped_webhooks_and_exits_0_on_sigterm(
    database_url: str, fake: FakeReplicate, start_worker: object
) -> None:
    """With every webhook dropped, the worker brings each row to its final status."""
    ids = [f"w{number:02d}" for number in range(30)]
    seed(database_url, fake, ids, "processing")
    metrics_port = free_port()
    process = start_worker(WORKER_METRICS_PORT=str(metrics_port))  # type: ignore[operator]
    wait_until(lambda: checked_once(database_url), message="a first sweep")
    for training_id in ids:
        fake.finish(training_id, "failed" if training_id.endswith("7") else "succeeded")

    wait_until(lambda: all_final(database_url, len(ids)), timeout=20, message="all final")
    scraped = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    code = process.stop(signal.SIGTERM)

    assert code == 0
    assert 'webhook_sync_missed_webhooks_total{status="succeeded"} 27.0' in scraped
    assert 'webhook_sync_missed_webhooks_total{status="failed"} 3.0' in scraped
    assert "webhook_sync_stuck_trainings 0.0" in scraped
    assert "worker_stopped" in process.log()
    assert " sweep due=" in process.log()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_mid_sweep_hands_the_leases_back(
    database_url: str, fake: FakeReplicate, start_worker: object, stop_signal: signal.Signals
) -> None:
    """A worker stopped by SIGTERM or SIGINT while its GETs hang exits 0 and leaves no row
    leased."""
    ids = [f"h{number:02d}" for number in range(10)]
    seed(database_url, fake, ids, "succeeded")
    fake.permits = threading.Semaphore(0)  # every answer waits until we let it go
    process = start_worker(POLL_CONCURRENCY="2")  # type: ignore[operator]
    wait_until(lambda: fake.total() >= 2, message="GETs in flight")

    process.process.send_signal(stop_signal)
    wait_until(lambda: "worker_stopping" in process.log(), message="the signal handled")
    fake.permits.release(100)
    code = process.process.wait(timeout=EXIT_BUDGET)
    process.log_file.close()

    assert code == 0
    assert leases(database_url) == [None] * len(ids)
    assert fake.total() == 2


def backends(database_url: str, condition: str) -> int:
    """Connections to this test's database (other than the asking one) meeting `condition`."""
    conn = db.connect(database_url, "test counter")
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                f" AND pid <> pg_backend_pid() AND {condition}"
            )
            return cur.fetchone()[0]
    finally:
        conn.close()


def blocked_on_a_lock(database_url: str) -> bool:
    """True when the worker's connection waits for a row lock."""
    condition = "application_name = 'webhook-sync worker' AND wait_event_type = 'Lock'"
    return backends(database_url, condition) > 0


@pytest.mark.slow
@pytest.mark.timeout(120)  # waits out the worker's whole 20 s stop budget on purpose
def test_sigterm_exits_within_the_budget_even_if_the_sweep_cannot_finish(
    database_url: str, fake: FakeReplicate, start_worker: object
) -> None:
    """A sweep blocked in the database past the stop budget does not keep the worker
    alive: it exits 0 and its leases expire on their own."""
    ids = [f"b{number:02d}" for number in range(3)]
    seed(database_url, fake, ids, "succeeded")
    fake.permits = threading.Semaphore(0)
    process = start_worker(DB_STATEMENT_TIMEOUT_MS="120000")  # type: ignore[operator]
    wait_until(lambda: fake.total() >= len(ids), message="every GET in flight")
    locker = db.connect(database_url)
    try:
        with locker.cursor() as cur:
            cur.execute("SELECT id FROM webhook_sync.trainings FOR UPDATE")
        fake.permits.release(100)
        wait_until(lambda: blocked_on_a_lock(database_url), message="the sweep blocked")

        process.process.send_signal(signal.SIGTERM)
        code = process.process.wait(timeout=EXIT_BUDGET)
    finally:
        locker.rollback()
        locker.close()
    process.log_file.close()

    assert code == 0
    assert "worker_stopped clean=False" in process.log()


def test_a_killed_worker_is_taken_over_after_its_lease(
    database_url: str, fake: FakeReplicate, start_worker: object
) -> None:
    """A worker SIGKILLed mid-sweep blocks nothing beyond its lease: another one finishes."""
    ids = [f"k{number:02d}" for number in range(10)]
    seed(database_url, fake, ids, "succeeded")
    fake.permits = threading.Semaphore(0)
    # A claim is two rounds of the pool: five threads claim all ten rows at once.
    first = start_worker(POLL_LEASE_SECONDS="2", POLL_CONCURRENCY="5")  # type: ignore[operator]
    wait_until(lambda: fake.total() >= 1, message="the first worker mid-sweep")
    held_by_first = leases(database_url)
    first.process.kill()
    first.process.wait()
    fake.permits.release(1000)
    fake.permits = None

    second = start_worker(POLL_LEASE_SECONDS="2")  # type: ignore[operator]
    wait_until(lambda: all_final(database_url, len(ids)), timeout=20, message="takeover")
    code = second.stop(signal.SIGTERM)

    assert all(owner and f":{first.process.pid}:" in owner for owner in held_by_first)
    assert code == 0
    assert leases(database_url) == [None] * len(ids)


def test_a_refused_token_is_logged_once(
    database_url: str, fake: FakeReplicate, start_worker: object
) -> None:
    """A 401 stops each sweep, and the worker keeps trying without repeating the error."""
    seed(database_url, fake, ["t1"], "processing")
    process = start_worker(REPLICATE_API_TOKEN="r8_revoked_value")  # type: ignore[operator]

    wait_until(lambda: fake.count("/v1/trainings/t1") >= 3, message="three refused sweeps")
    code = process.stop(signal.SIGTERM)

    log = process.log()
    assert code == 0
    assert log.count("REPLICATE_API_TOKEN") == 1
    assert "r8_revoked_value" not in log


def test_prune_job_deletes_events_past_retention(database_url: str, fake: FakeReplicate) -> None:
    """The worker's daily job deletes inbox events older than EVENT_RETENTION_DAYS."""
    conn = db.connect(database_url)
    with conn:
        for webhook_id in ("msg_old", "msg_new"):
            db.insert_event(
                conn,
                webhook_id=webhook_id,
                training_id="t1",
                payload={"id": "t1", "status": "processing"},
                signed_at=None,
            )
    with conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE webhook_sync.webhook_events SET received_at = now() - interval '31 days'"
            " WHERE webhook_id = 'msg_old'"
        )
    config = Config(database_url=database_url, api_token=TOKEN, api_base_url=fake.url)

    worker.Worker(config).prune_once()

    kept = [event["webhook_id"] for event in db.select_events(conn)]
    conn.close()
    assert kept == ["msg_new"]


def test_a_worker_holds_the_connections_capacity_counts(
    database_url: str, fake: FakeReplicate, start_worker: object
) -> None:
    """Mid-sweep, listening for inserts and delivering notifications, a worker holds
    exactly the connections `capacity` refuses a start by (its sweep, the budget, the
    insert listener's two, the notifier's two)."""
    seed(database_url, fake, ["c1", "c2"], "succeeded")
    fake.permits = threading.Semaphore(0)  # the sweep's GETs hang, its connection stays open
    env = {"NOTIFY_URLS": f"http://127.0.0.1:{free_port()}/hook", "NOTIFY_SECRET": SECRET}
    process = start_worker(**env)  # type: ignore[operator]
    wait_until(lambda: fake.total() >= 1, message="a GET in flight")
    wait_until(
        lambda: (
            "insert_listener_listening" in process.log()
            and "notify_endpoints_synced" in process.log()
        ),
        message="the listener and the notifier up",
    )
    held = backends(database_url, "application_name LIKE 'webhook-sync %'")
    fake.permits.release(100)
    process.stop(signal.SIGTERM)
    config = Config.from_env({**env, "DATABASE_URL": database_url})

    assert held == capacity.process_connections(config, capacity.WORKER)
