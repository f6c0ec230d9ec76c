"""Scaling out on one PostgreSQL: sweeps that share a backlog, and worker processes that
share one Replicate request budget, against the simulator's rate limit over real HTTP."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e_support import ManagedProcess
from tests.support import VENV_BIN, procfile, wait_until
from tests.test_sweep import insert_rows
from webhook_sync import db, replicate, sweep
from webhook_sync.dev.simulator import BulkPlan, Faults, Simulator, SimulatorServer, start_in_thread

# The account's limit in the simulator (reads per second), and ours a little under it.
SIMULATOR_RPS = 100
MAX_RPS = 80
# Due trainings the four worker processes share: over ten seconds of the budget's work.
DUE = 1000


def unchecked(conn: db.Connection) -> int:
    """How many rows no sweep has checked yet."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM webhook_sync.trainings WHERE last_checked_at IS NULL")
        return cur.fetchone()[0]


@pytest.fixture()
def slow_simulator() -> Iterator[SimulatorServer]:
    """The simulator answering every API call 100 ms late, without a rate limit."""
    sim = Simulator(seed=16, faults=Faults(read_rpm=0, latency_ms=100))
    with start_in_thread(sim) as server:
        yield server


def test_a_claim_is_what_the_pool_fetches_at_once() -> None:
    """A sweep claims two rounds of its thread pool, not its whole backlog."""
    settings = sweep.SweepSettings(concurrency=8, lease_seconds=90, max_rps=40)

    assert settings.claim_limit == 16


def test_four_sweeps_together_share_a_backlog(
    database_url: str, slow_simulator: SimulatorServer
) -> None:
    """Four sweeps started together over 400 due trainings, with Replicate answering in
    100 ms, each check a fair share (the first one used to lease all 400)."""
    ids = slow_simulator.simulator.create_many(BulkPlan(count=400, created_ago=(3600, 7200)))
    setup = db.connect(database_url)
    insert_rows(setup, ids)
    # Fetched by id, four at a time per sweep: the claims are what is shared.
    settings = sweep.SweepSettings(concurrency=4, max_rps=1000, list_threshold=10**6)
    barrier = threading.Barrier(4)
    results: list[sweep.SweepResult] = []

    def run() -> None:
        conn = db.connect(database_url)
        client = replicate.ReplicateClient(
            slow_simulator.simulator.tokens[0], slow_simulator.api_base_url, max_rps=1000
        )
        try:
            barrier.wait()
            results.append(sweep.run_sweep(conn, client, settings))
        finally:
            client.close()
            conn.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    left = unchecked(setup)
    setup.close()

    checked = sorted(result.checked for result in results)
    assert left == 0
    assert sum(checked) == 400
    # A fair share is 100 each; every sweep gets at least half of one.
    assert checked[0] >= 50, checked


def worker_env(database_url: str, server: SimulatorServer) -> dict[str, str]:
    """The environment of one `worker` dyno against the simulator."""
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REPLICATE_API_BASE_URL": server.api_base_url,
        "REPLICATE_API_TOKEN": server.simulator.tokens[0],
        "REPLICATE_MAX_RPS": str(MAX_RPS),
        "POLL_INTERVAL_SECONDS": "3600",
        "POLL_CONCURRENCY": "8",
        "LOG_FORMAT": "json",
    }


def sweep_summaries(output: str) -> list[dict[str, object]]:
    """The `sweep` summary lines a worker logged."""
    found = []
    for line in output.splitlines():
        if '"sweep"' in line:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "sweep":
                found.append(record)
    return found


@pytest.mark.slow
def test_four_workers_share_one_budget_and_meet_no_429(database_url: str, tmp_path: Path) -> None:
    """Four `worker` processes (the Procfile's line) sweep 1,000 due trainings spread over
    old list pages, so most are fetched one by one: together they stay under the
    account's limit (one REPLICATE_MAX_RPS for all, not each) and get no 429."""
    # Bursts of one second's worth: four processes at their own full rate would be
    # throttled within a second or two, and the run lasts over ten (1,000 at MAX_RPS).
    sim = Simulator(seed=17, faults=Faults(read_rpm=SIMULATOR_RPS * 60), burst_seconds=1.0)
    with start_in_thread(sim) as server:
        ids = sim.create_many(BulkPlan(count=DUE, created_ago=(3600, 4 * 3600)))
        sim.create_many(BulkPlan(count=DUE, created_ago=(3600, 4 * 3600), finish_in=(0, 0)))
        conn = db.connect(database_url)
        insert_rows(conn, ids)
        sim.reset_request_counts()
        argv = [str(VENV_BIN / procfile()["worker"].split()[0]), *procfile()["worker"].split()[1:]]
        workers = [
            ManagedProcess(f"worker{n}", argv, worker_env(database_url, server), tmp_path)
            for n in range(4)
        ]
        try:
            for worker in workers:
                worker.start()
            wait_until(lambda: unchecked(conn) == 0, timeout=240, interval=0.5)
        finally:
            for worker in workers:
                worker.stop(timeout=30)
            conn.close()
        counts = sim.request_counts()

    summaries = [sweep_summaries(worker.output()) for worker in workers]
    assert counts["by_status"].get("429", 0) == 0, counts["by_status"]
    assert counts["by_route"].get("GET /v1/trainings/{training_id}", 0) >= DUE * 3 // 4
    assert all(len(found) == 1 for found in summaries), [w.output()[-2000:] for w in workers]
    assert sum(int(found[0]["checked"]) for found in summaries) == DUE
    assert all(int(found[0]["checked"]) > 0 for found in summaries)
