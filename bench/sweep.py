"""The sweep: 10,000 trainings in flight in the simulator (100 ms latency, 3,000 reads per
minute), all due and tracked, checked by the first sweep of the Procfile's `worker`.

Reported beside the naive floor, one GET per training at Replicate's 50 reads/s (200 s;
computed, not run). Two shapes of the same load: recent trainings, which the newest-first
list walk covers in few pages, and the same number spread over six hours among as many
finished trainings of the account, where the walk helps less. The worker's memory is
read once its sweep summary is logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2

from bench.common import (
    REPO,
    VENV_BIN,
    Figure,
    Process,
    log,
    not_measured,
    profile,
    query_one,
    rss_mib,
    throttled_figure,
    throwaway_database,
)
from webhook_sync.dev.simulator import BulkPlan, Simulator, start_in_thread
from webhook_sync.discovery import DiscoverySettings

SECTION = "sweep"
TRAININGS = 10_000
LATENCY_MS = 100
READ_RPM = 3_000
NAIVE_FLOOR_SECONDS = TRAININGS / (READ_RPM / 60)
WALL_TARGET_SECONDS = 30.0
CALLS_TARGET = 0.05
RSS_TARGET_MIB = 120.0
# Discovery's bound per sweep: max_pages list calls and max_fetches GETs by id.
DISCOVERY_CALLS_CAP = DiscoverySettings().max_pages + DiscoverySettings().max_fetches
# A sweep still running then is stopped and reported unfinished; `make bench` must stay short.
SWEEP_TIMEOUT_SECONDS = 120
# Trainings are tracked a moment after Replicate created them, as `track` would be.
TRACK_LAG_SECONDS = 1


@dataclass(frozen=True)
class Scenario:
    """One shape of 10,000 in-flight trainings on the simulator's list pages."""

    name: str
    created_ago: tuple[float, float]
    finished_others: int  # untracked, finished trainings interleaved on the pages


SCENARIOS = (
    Scenario("recent (last 10 min)", (5.0, 600.0), 0),
    Scenario("spread over 6 h, 1:1 finished", (5.0, 6 * 3600.0), TRAININGS),
)


def _created_at(sim: Simulator, training_id: str) -> datetime:
    text = sim.describe_training(training_id)["training"]["created_at"]
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _track_in_creation_order(url: str, sim: Simulator, ids: list[str]) -> None:
    """Track the trainings as if each had been tracked right after it was created: rows in
    creation order, `created_at` just after Replicate's, every check due now."""
    created = sorted((_created_at(sim, training_id), training_id) for training_id in ids)
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO webhook_sync.trainings"
                " (id, user_id, training_status, replicate_status, updated_by, created_at,"
                " updated_at, next_check_at)"
                " SELECT id, 'bench', 'training', 'starting', 'track', at, at, at"
                " FROM unnest(%(ids)s::text[], %(ats)s::timestamptz[]) AS t(id, created),"
                " LATERAL (SELECT created + make_interval(secs => %(lag)s) AS at) AS lagged",
                {
                    "ids": [training_id for _, training_id in created],
                    "ats": [at for at, _ in created],
                    "lag": TRACK_LAG_SECONDS,
                },
            )
    finally:
        conn.close()


def _sweep_summary(log_path: Path) -> dict[str, Any] | None:
    """The worker's one-line sweep summary (LOG_FORMAT=json), once it has been logged."""
    with contextlib.suppress(OSError):
        for line in log_path.read_text(errors="replace").splitlines():
            if '"sweep"' not in line:
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == "sweep":
                    return record
    return None


def _run_worker(url: str, api_base_url: str, token: str, workdir: Path) -> dict[str, Any]:
    """Start the Procfile's `worker` (it sweeps at once), wait for its sweep summary, read
    its memory, stop it. Past SWEEP_TIMEOUT_SECONDS it is stopped (SIGTERM hands the rest
    back) and the summary it then logs has `stopped` set."""
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "REPLICATE_API_BASE_URL": api_base_url,
        "REPLICATE_API_TOKEN": token,
        "LOG_FORMAT": "json",
        # Only the first sweep is measured; the next one would start long after.
        "POLL_INTERVAL_SECONDS": "3600",
    }
    log_path = workdir / f"worker-{int(time.time())}.log"
    process = Process([str(VENV_BIN / "webhook-sync"), "worker"], env, log_path, cwd=REPO)
    profiler = profile(process.pid, "worker", workdir)
    started = time.monotonic()
    memory: dict[str, float | None] = {"rss_mib": None, "peak_rss_mib": None}
    try:
        summary = None
        while summary is None and process.popen.poll() is None:
            if time.monotonic() - started > SWEEP_TIMEOUT_SECONDS:
                break
            time.sleep(0.1)
            summary = _sweep_summary(log_path)
        memory = {"rss_mib": rss_mib(process.pid), "peak_rss_mib": rss_mib(process.pid, "VmHWM")}
    finally:
        process.stop(timeout=30)
        if profiler is not None:
            profiler.stop(timeout=30)
    summary = _sweep_summary(log_path)
    if summary is None:
        raise RuntimeError(f"the worker logged no sweep summary:\n{process.tail()}")
    return {**summary, **memory}


def _scenario(admin: str, scenario: Scenario, workdir: Path) -> dict[str, Any]:
    """Build the scenario in a fresh simulator and database, sweep once, return the report
    (`stopped` set, with the progress made, when the sweep ran out of time)."""
    sim = Simulator(seed=8)
    sim.set_faults(latency_ms=LATENCY_MS, read_rpm=READ_RPM)
    with start_in_thread(sim) as server, throwaway_database(admin) as url:
        ids = sim.create_many(
            BulkPlan(count=TRAININGS, created_ago=scenario.created_ago, finish_in=(3600, 7200))
        )
        if scenario.finished_others:
            # Other trainings of the account that already finished: never tracked here.
            sim.create_many(
                BulkPlan(
                    count=scenario.finished_others,
                    created_ago=scenario.created_ago,
                    finish_in=(0.0, 0.0),
                )
            )
        _track_in_creation_order(url, sim, ids)
        sim.reset_request_counts()
        report = _run_worker(url, server.api_base_url, sim.tokens[0], workdir)
        counts = sim.request_counts()
        report["sim_requests"] = counts["total"]
        report["throttled"] = counts["by_status"].get("429", 0)
        report["sim_list_pages"] = counts["by_route"].get("GET /v1/trainings", 0)
        report["db_checked"] = query_one(
            url, "SELECT count(*) FROM webhook_sync.trainings WHERE last_checked_at IS NOT NULL"
        )
        report["left_due"] = query_one(
            url,
            "SELECT count(*) FROM webhook_sync.trainings WHERE training_status = 'training'"
            " AND next_check_at <= now()",
        )
    return report


def measure(admin: str) -> list[Figure]:
    """Run both sweep scenarios and return their figures (the sweep's memory included)."""
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="webhook-sync-bench-sweep-") as folder:
        for scenario in SCENARIOS:
            log(f"sweep: {TRAININGS} in flight, {scenario.name}")
            try:
                report = _scenario(admin, scenario, Path(folder))
            except (RuntimeError, psycopg2.Error) as exc:
                log(f"sweep {scenario.name} failed: {exc}")
                figures.append(not_measured(SECTION, f"wall time, {scenario.name}", str(exc)))
                continue
            log(
                f"sweep {scenario.name}: {report['duration']} s (stopped: {report['stopped']}),"
                f" {report['sim_requests']} calls ({report['sim_list_pages']} list pages),"
                f" {report['throttled']} throttled, {report['db_checked']} checked"
            )
            figures += _figures(scenario, report, first=scenario is SCENARIOS[0])
    return figures


def _figures(scenario: Scenario, report: dict[str, Any], first: bool) -> list[Figure]:
    """The rows for one scenario; an unfinished sweep reports the progress it made."""
    calls = report["sim_requests"]
    checked = report["db_checked"]
    pages = report["sim_list_pages"]
    progress = (
        f"{checked} checked, {report['left_due']} still due; {calls} calls: {pages} list"
        f" pages, {calls - pages} by id"
    )
    name = scenario.name
    wall_target = f"<= {WALL_TARGET_SECONDS:.0f} s" if first else ""
    calls_target = f"<= {CALLS_TARGET}" if first else ""
    if report["stopped"]:
        why = f"stopped after {SWEEP_TIMEOUT_SECONDS} s, unfinished ({progress})"
        figures = [
            not_measured(SECTION, f"wall time, {name}", why, wall_target),
            Figure(
                SECTION,
                f"API calls per checked training, {name}",
                calls / checked if checked else None,
                "calls",
                reference=1.0,
                reference_name="naive (1 GET each)",
                target=calls_target,
                better="lower",
                note=f"unfinished sweep: {progress}",
            ),
        ]
    else:
        per_training = calls / TRAININGS
        figures = [
            Figure(
                SECTION,
                f"wall time, {name}",
                report["duration"],
                "s",
                reference=NAIVE_FLOOR_SECONDS,
                reference_name="naive floor (1 GET each at 50/s)",
                target=wall_target,
                better="lower",
                met=report["duration"] <= WALL_TARGET_SECONDS if first else None,
                note=f"{report['repaired']} moved to processing, {report['errors']} errors; "
                f"{progress}",
            ),
            Figure(
                SECTION,
                f"API calls per training, {name}",
                per_training,
                "calls",
                reference=1.0,
                reference_name="naive (1 GET each)",
                target=calls_target,
                better="lower",
                met=per_training <= CALLS_TARGET if first else None,
                note=f"{calls} calls: {pages} list pages, {calls - pages} by id",
            ),
        ]
    if report["rss_mib"] is not None:
        figures.append(
            Figure(
                "memory",
                f"worker RSS after the sweep, {name}",
                report["rss_mib"],
                "MiB",
                target=f"<= {RSS_TARGET_MIB:.0f} MiB",
                better="lower",
                met=report["rss_mib"] <= RSS_TARGET_MIB,
                note=f"peak (VmHWM) {report['peak_rss_mib']:.0f} MiB; the Procfile's worker"
                + (", read when it was stopped" if report["stopped"] else ""),
            )
        )
    if "discovery_calls" in report:
        figures.append(
            Figure(
                SECTION,
                f"API calls added by discovery, {name}",
                float(report["discovery_calls"]),
                "calls",
                reference=float(calls),
                reference_name="the whole sweep's calls",
                target=f"<= {DISCOVERY_CALLS_CAP}",
                better="lower",
                met=report["discovery_calls"] <= DISCOVERY_CALLS_CAP,
                note=f"{report['discovery_seconds']} s of the sweep; {report['adopted']} adopted;"
                " the first discovery reads the newest page and GETs each untracked training"
                " on it not finished before the window",
            )
        )
    figures.append(
        throttled_figure(
            SECTION,
            f"429s (rate limit exceeded), {name}",
            report["throttled"],
            note=f"limit {READ_RPM} reads/min, {LATENCY_MS} ms latency",
        )
    )
    return figures
