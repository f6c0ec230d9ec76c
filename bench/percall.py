"""Per-request CPU: the real `web` app against the reference apps, one WSGI call at a time.

The load tests (`bench/ingest.py`) measure throughput on a shared 2-core machine, where
the neighbours' load moves every figure by ±0.1. This part measures what a request costs
this process alone: each app is called in a loop through WSGI with requests built
beforehand (no sockets, no gunicorn, no load generator), and the CPU time of this process
(`time.process_time`, which the database's own work does not count against) is divided
by the number of requests. The database is real: a fresh delivery moves a tracked training
and a duplicate is sent again after it was stored, exactly as the load tests send them.

Three kinds, each beside its reference: a bad signature (a 401) against hello-world, a
duplicate and a fresh delivery against the minimal reference app. The ratio is ours /
the reference's CPU, so issue 17's rate targets read as its inverse (0.8 of the rate: at
most 1.25x the CPU). gunicorn's and gevent's work per request is not in either side; on
the wire both pay it, which is why a CPU ratio is harsher than the load tests' ratio.

`python -m bench.percall [--count N] [--profile DIR]` runs it alone; with `--profile`
each kind's first round also runs under cProfile (CPU time) into DIR. `--instructions` counts
instructions per request under callgrind instead: two runs with the same setup
(`--loop KIND --app APP --count N`), the difference divided by the difference of N.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH_SECRET,
    WEBHOOK_PATH,
    Figure,
    admin_url,
    environment,
    log,
    throwaway_database,
)

SECTION = "per-request CPU"
COUNT = 2000
ROUNDS = 3
KINDS = ("bad", "duplicate", "fresh")
# Issue 17's targets, read as CPU: a reference request's CPU over ours.
TARGETS = {"bad": 0.8, "duplicate": 1.0, "fresh": 0.8}
REFERENCE = {"bad": "hello", "duplicate": "minimal", "fresh": "minimal"}
# Requests a callgrind loop answers before the counted ones: the first open connections and
# prepare statements.
WARM = 20

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Any]


@dataclass(frozen=True)
class Cost:
    """CPU per request of one app on one kind of request (best of ROUNDS)."""

    app: str
    kind: str
    cpu_us: float
    statuses: frozenset[int]


def _environs(pairs: list[tuple[str, str]], *, bad: bool) -> list[dict[str, Any]]:
    """WSGI environs as gunicorn builds them for these signed deliveries."""
    from werkzeug.test import EnvironBuilder

    from bench import loadgen

    with tempfile.TemporaryDirectory() as folder:
        path = loadgen.write_signed(Path(folder) / "d.tsv", pairs, BENCH_SECRET, bad_signature=bad)
        lines = path.read_text().splitlines()
    environs = []
    for line in lines:
        webhook_id, timestamp, signature, body = line.split("\t", 3)
        builder = EnvironBuilder(
            path=WEBHOOK_PATH,
            method="POST",
            data=body.encode(),
            headers={
                "Content-Type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": timestamp,
                "webhook-signature": signature,
            },
        )
        environs.append(builder.get_environ())
    return environs


def _run(app: WsgiApp, environs: list[dict[str, Any]]) -> tuple[float, frozenset[int]]:
    """CPU seconds of this process to answer every environ, and the statuses seen."""
    seen = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        seen.append(status)

    gc.collect()
    started = time.process_time()
    for environ in environs:
        environ["wsgi.input"].seek(0)
        response = app(environ, start_response)
        for _ in response:
            pass
        if hasattr(response, "close"):
            response.close()
    spent = time.process_time() - started
    return spent, frozenset(int(status.split()[0]) for status in seen)


def _requests(
    app: WsgiApp, database_url: str, kind: str, prefix: str, count: int
) -> list[dict[str, Any]]:
    """`count` requests of `kind` for `app`, about trainings tracked now (for `duplicate`,
    deliveries `app` has already answered once)."""
    from bench import ingest

    pairs = ingest.deliveries(prefix, count)
    ingest.track_for(database_url, pairs)
    environs = _environs(pairs, bad=kind == "bad")
    if kind == "duplicate":
        _run(app, _environs(pairs, bad=False))
    return environs


@contextlib.contextmanager
def _apps(database_url: str) -> Iterator[dict[str, WsgiApp]]:
    """web, hello and minimal, built in this process as gunicorn's workers build them."""
    values = {"DATABASE_URL": database_url, "REPLICATE_WEBHOOK_SECRET": BENCH_SECRET}
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # As under gunicorn: the metrics are written to per-process files.
        values["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="webhook-sync-percall-")
    # Given back after: the parts that run next in this process (and the processes they
    # start) must not inherit this part's database, secret or metrics folder.
    with environment(**values):
        from bench import reference_apps
        from webhook_sync import logs, web

        web_app = web.create_app_from_env()
        # The log line is written, as in production, but to nowhere.
        devnull = open(os.devnull, "w")  # noqa: SIM115 (closed below)
        handlers = logging.getLogger(logs.LOGGER_NAME).handlers
        # Given back after: the parts that run next in this process log to the real stream.
        streams = [handler.setStream(devnull) for handler in handlers]  # type: ignore[attr-defined]
        try:
            yield {
                "web": web_app,
                "hello": reference_apps.hello_app(),
                "minimal": reference_apps.minimal_app(),
            }
        finally:
            web_app.extensions["webhook_sync"].close()
            for handler, stream in zip(handlers, streams, strict=True):
                handler.setStream(stream)  # type: ignore[attr-defined]
            devnull.close()


def _measure_kind(
    apps: dict[str, WsgiApp],
    database_url: str,
    kind: str,
    count: int,
    names: tuple[str, ...],
    profile_dir: Path | None,
) -> list[Cost]:
    costs = []
    for name in names:
        best = None
        statuses: frozenset[int] = frozenset()
        for round_no in range(ROUNDS):
            prefix = f"{kind[:1]}{name[:1]}{round_no}{time.monotonic_ns() % 10**6:06d}_"
            environs = _requests(apps[name], database_url, kind, prefix, count)
            # CPU time, as the figures: a wall-clock profile charges the database's work to
            # the call that waited for it.
            profiler = None
            if profile_dir and round_no == 0:
                profiler = cProfile.Profile(time.process_time)
                profiler.enable()
            spent, statuses = _run(apps[name], environs)
            if profiler:
                profiler.disable()
                profiler.dump_stats(str(profile_dir / f"{name}-{kind}.pstats"))
                continue
            best = spent if best is None else min(best, spent)
        costs.append(Cost(name, kind, (best or 0.0) / count * 1e6, statuses))
    return costs


def measure(database_url: str, count: int = COUNT, profile_dir: Path | None = None) -> list[Figure]:
    """Every kind's CPU per request, ours against its reference, as figures."""
    figures = []
    with _apps(database_url) as apps:
        for kind in KINDS:
            ours, reference = _measure_kind(
                apps, database_url, kind, count, ("web", REFERENCE[kind]), profile_dir
            )
            log(
                f"percall {kind}: web {ours.cpu_us:.0f} µs {sorted(ours.statuses)},"
                f" {reference.app} {reference.cpu_us:.0f} µs {sorted(reference.statuses)}"
            )
            figures.append(
                Figure(
                    SECTION,
                    f"web CPU per request ({kind})",
                    ours.cpu_us,
                    "µs",
                    reference.cpu_us,
                    f"{reference.app} CPU per request",
                    target=f"<= {1 / TARGETS[kind]:.2f} x (issue 17's {TARGETS[kind]} of its rate)",
                    better="lower",
                    met=ours.cpu_us * TARGETS[kind] <= reference.cpu_us,
                    note=f"{count} WSGI calls in this process, best of {ROUNDS} rounds (CPU of"
                    f" this process only); statuses web {sorted(ours.statuses)},"
                    f" {reference.app} {sorted(reference.statuses)}",
                )
            )
    return figures


def _one_loop(database_url: str, kind: str, app: str, count: int, prepared: int) -> None:
    """Prepare `prepared` requests of `kind` and answer the first `count` (callgrind's
    subject: the same setup with two counts, so the difference is the requests alone)."""
    with _apps(database_url) as apps:
        prefix = f"cg{kind[:1]}{app[:1]}{time.monotonic_ns() % 10**8:08d}_"
        environs = _requests(apps[app], database_url, kind, prefix, prepared)
        _run(apps[app], environs[:WARM])
        _run(apps[app], environs[WARM : WARM + count])


def instructions(kind: str, app: str, low: int = 50, high: int = 550) -> float | None:
    """Instructions per request of `app` answering `kind`, counted by callgrind as the
    difference of two runs (`high` and `low` requests after the same setup)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return None
    counts = []
    for count in (low, high):
        argv = [
            valgrind,
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "bench.percall",
            "--loop",
            kind,
            "--app",
            app,
            "--count",
            str(count),
            "--prepared",
            str(high + WARM),
        ]
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=os.environ)
        match = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or match is None:
            raise RuntimeError(f"callgrind failed: {done.stderr[-2000:]}")
        counts.append(int(match.group(1)))
    return (counts[1] - counts[0]) / (high - low)


def main(argv: list[str] | None = None) -> int:
    """Run this part alone and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=COUNT)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--loop", choices=KINDS, help="(under callgrind) one app, one kind")
    parser.add_argument("--app", default="web", choices=("web", "hello", "minimal"))
    parser.add_argument("--prepared", type=int, default=0)
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions per request (callgrind)"
    )
    args = parser.parse_args(argv)
    if args.loop:
        with admin_url() as admin, throwaway_database(admin) as url:
            _one_loop(url, args.loop, args.app, args.count, max(args.prepared, args.count + WARM))
        return 0
    if args.instructions:
        for kind in KINDS:
            for app in ("web", REFERENCE[kind]):
                counted = instructions(kind, app)
                if counted is None:
                    print("not measured: valgrind is not installed (apt-get install valgrind)")
                    return 1
                print(f"{kind} {app}: {counted:,.0f} instructions per request")
        return 0
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    with admin_url() as admin, throwaway_database(admin) as url:
        for figure in measure(url, args.count, args.profile):
            print(figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
