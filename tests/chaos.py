"""`make chaos`: the end-to-end convergence run, bigger, with a PostgreSQL restart, and a
printed report. Exit code 0 when every promise held, 1 otherwise.

It starts its own PostgreSQL server (pgserver's binaries, data in a temporary folder) so
that it can restart it; the machine's shared server is never touched. Without pgserver
it uses TEST_DATABASE_URL and skips the restart, saying so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid

from tests import e2e
from tests.e2e_report import analyze
from tests.e2e_support import admin_execute
from tests.local_postgres import LocalPostgres
from tests.support import database_name, database_url_for
from webhook_sync import db, migrations


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The run's size and pace."""
    parser = argparse.ArgumentParser(prog="make chaos", description=__doc__)
    parser.add_argument("--trainings", type=int, default=3000)
    parser.add_argument("--poll-interval", type=int, default=5)
    parser.add_argument("--lease", type=int, default=10)
    parser.add_argument("--max-rps", type=int, default=100, help="REPLICATE_MAX_RPS")
    parser.add_argument("--finish-within", type=float, default=60.0, help="seconds")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs even when all held"
    )
    return parser.parse_args(argv)


def create_database(admin_url: str) -> str:
    """A fresh migrated database on the server; returns its URL."""
    name = f"chaos_{uuid.uuid4().hex[:12]}"
    admin_execute(admin_url, f'CREATE DATABASE "{name}"')
    url = database_url_for(admin_url, name)
    conn = db.connect(url, "make chaos")
    try:
        migrations.migrate(conn)
    finally:
        conn.close()
    return url


def main(argv: list[str] | None = None) -> int:
    """Run the scenario and print the report; 0 when every promise held."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    postgres: LocalPostgres | None = LocalPostgres()
    try:
        postgres.start()
        admin_url = postgres.admin_url
        print(f"PostgreSQL of our own on 127.0.0.1:{postgres.port} (restarted during the run)")
    except Exception as exc:  # a process edge: say why and carry on without the restart
        postgres.stop()  # removes its folder
        postgres = None
        admin_url = os.environ.get("TEST_DATABASE_URL", "")
        if not admin_url:
            print(
                f"cannot start PostgreSQL ({exc}) and TEST_DATABASE_URL is unset", file=sys.stderr
            )
            return 1
        print(f"note: no PostgreSQL of our own ({exc}); using TEST_DATABASE_URL, no restart")
    lag = 6.0 * args.poll_interval
    scenario = e2e.Scenario(
        trainings=args.trainings,
        finish_in=(5.0, args.finish_within),
        cancels=max(1, args.trainings // 50),
        lagging_trainings=max(30, args.trainings // 20),
        # Long enough for several sweeps of this pace to meet the lag's 404s.
        lagging_faults={"new_training_404_rate": 1.0, "new_training_404_seconds": lag},
        lagging_finish_in=(lag, lag + 5.0),
        poll_interval=args.poll_interval,
        lease_seconds=args.lease,
        poll_concurrency=16,
        max_rps=args.max_rps,
        web_concurrency=2,
        restart_postgres=postgres is not None,
        seed=args.seed,
        converge_timeout=args.finish_within + 10 * args.poll_interval + 60,
        # Thousands of notifications behind the platform's outage and faults.
        notify_timeout=240.0,
        notify_concurrency=32,
    )
    log_dir = e2e.new_log_dir("webhook-sync-chaos-")
    started = time.monotonic()
    database_url = create_database(admin_url)
    try:
        with e2e.Cluster(database_url, scenario, log_dir) as cluster:
            cluster.start(workers=2)
            evidence = e2e.run_scenario(
                cluster, admin_url, postgres, progress=lambda line: print(f"  {line}", flush=True)
            )
    except BaseException:
        print(f"the run failed; the processes' logs are in {log_dir}", file=sys.stderr)
        raise
    finally:
        if postgres is not None:
            postgres.stop()
        else:
            name = database_name(database_url)
            admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    report = analyze(evidence)
    print()
    print(f"make chaos: seed {args.seed}, {time.monotonic() - started:.0f} s")
    print(report.table())
    problems = report.problems()
    for problem in problems:
        print(f"FAIL {problem}")
    print("all promises held" if not problems else f"{len(problems)} promise(s) broken")
    if problems or args.keep_logs:
        print(f"the processes' logs are in {log_dir}")
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
