"""Scaling out: 10,000 due trainings tracked long after Replicate created them (so the
list walk stops at its first page and nearly all are fetched one by one), swept by four
Procfile `worker`s that share one Replicate budget, beside one worker with that whole
budget. The simulator answers each call 100 ms late and allows 200 reads/s; the budget
(REPLICATE_MAX_RPS, for all processes together) is 160/s. One worker's eight threads
fetch at most 80/s, so four workers finish sooner until the shared budget binds; they
must never be slower, and together never throttled.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg2

from bench.common import (
    VENV_BIN,
    Figure,
    Process,
    log,
    not_measured,
    query_one,
    throttled_figure,
    throwaway_database,
    track_many,
)
from webhook_sync.dev.simulator import BulkPlan, Faults, Simulator, start_in_thread

SECTION = "scale"
TRAININGS = 10_000
LATENCY_MS = 100
READ_RPS = 200
MAX_RPS = 160
CONCURRENCY = 8
RUN_TIMEOUT_SECONDS = 300


def _unchecked(url: str) -> int:
    return query_one(
        url, "SELECT count(*) FROM webhook_sync.trainings WHERE last_checked_at IS NULL"
    )


def _run(admin: str, workers: int, workdir: Path) -> dict[str, Any]:
    """Sweep the backlog with `workers` Procfile workers; wall time until every row was
    checked once, and what the simulator saw."""
    sim = Simulator(seed=16, faults=Faults(latency_ms=LATENCY_MS, read_rpm=READ_RPS * 60))
    with start_in_thread(sim) as server, throwaway_database(admin) as url:
        ids = sim.create_many(
            BulkPlan(count=TRAININGS, created_ago=(3600, 6 * 3600), finish_in=(3600, 7200))
        )
        track_many(url, ids)
        sim.reset_request_counts()
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "REPLICATE_API_BASE_URL": server.api_base_url,
            "REPLICATE_API_TOKEN": sim.tokens[0],
            "REPLICATE_MAX_RPS": str(MAX_RPS),
            "POLL_CONCURRENCY": str(CONCURRENCY),
            "POLL_INTERVAL_SECONDS": "3600",
            "LOG_LEVEL": "WARNING",
        }
        started = time.monotonic()
        processes = [
            Process(
                [str(VENV_BIN / "webhook-sync"), "worker"],
                env,
                workdir / f"scale-{workers}-{number}.log",
            )
            for number in range(workers)
        ]
        finished = False
        try:
            while time.monotonic() - started < RUN_TIMEOUT_SECONDS:
                if _unchecked(url) == 0:
                    finished = True
                    break
                if any(process.popen.poll() is not None for process in processes):
                    raise RuntimeError(f"a worker exited:\n{processes[0].tail()}")
                time.sleep(0.25)
            wall = time.monotonic() - started
        finally:
            for process in processes:
                process.stop(timeout=30)
        counts = sim.request_counts()
        return {
            "workers": workers,
            "wall": wall,
            "finished": finished,
            "left": _unchecked(url),
            "calls": counts["total"],
            "by_id": counts["by_route"].get("GET /v1/trainings/{training_id}", 0),
            "throttled": counts["by_status"].get("429", 0),
        }


def measure(admin: str) -> list[Figure]:
    """One worker with the whole budget, then four sharing it; their wall times side by side."""
    reports: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="webhook-sync-bench-scale-") as folder:
        for workers in (1, 4):
            log(f"scale: {TRAININGS} due, fetched by id, {workers} worker(s)")
            try:
                reports[workers] = _run(admin, workers, Path(folder))
            except (RuntimeError, psycopg2.Error) as exc:
                log(f"scale with {workers} worker(s) failed: {exc}")
                return [not_measured(SECTION, f"wall time, {workers} workers", str(exc))]
            report = reports[workers]
            log(
                f"scale {workers}: {report['wall']:.1f} s, {report['calls']} calls"
                f" ({report['by_id']} by id), {report['throttled']} throttled,"
                f" {report['left']} unchecked"
            )
    one, four = reports[1], reports[4]
    setting = (
        f"simulator {LATENCY_MS} ms, {READ_RPS} reads/s; REPLICATE_MAX_RPS {MAX_RPS} shared;"
        f" POLL_CONCURRENCY {CONCURRENCY}"
    )
    return [
        Figure(
            SECTION,
            f"wall time of {TRAININGS:,} due, 1 worker with the whole budget",
            one["wall"],
            "s",
            reference=TRAININGS / MAX_RPS,
            reference_name="the budget's floor",
            better="lower",
            met=one["finished"] or None,
            note=f"{one['calls']} calls ({one['by_id']} by id), {one['left']} unchecked; {setting}",
        ),
        Figure(
            SECTION,
            f"wall time of {TRAININGS:,} due, 4 workers sharing it",
            four["wall"],
            "s",
            reference=one["wall"],
            reference_name="1 worker",
            target="<= 1 worker's",
            better="lower",
            met=four["finished"] and four["wall"] <= one["wall"],
            note=f"{four['calls']} calls ({four['by_id']} by id), {four['left']} unchecked",
        ),
        throttled_figure(
            SECTION,
            "429s, 4 workers sharing one budget",
            four["throttled"],
            note=f"1 worker: {one['throttled']}",
        ),
    ]
