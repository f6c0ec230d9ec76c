"""`webhook-sync import` as a real process against the simulator over HTTP: a mixed
history adopted correctly, safe to run twice, a dry run writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.registration_support import create_training, silent_simulator
from tests.support import VENV_BIN, run_cli
from webhook_sync import db
from webhook_sync.dev.simulator import BulkPlan, SimulatorServer

HERE = "https://sync.example.com/webhooks/replicate"
PATTERN = r"^[^/]+/(?P<user>\d+)-"
DAY = 86400.0


@pytest.fixture()
def sim() -> Iterator[SimulatorServer]:
    """The simulator; trainings created through the API stay in flight for minutes."""
    with silent_simulator(seed=15, train_seconds=600) as server:
        yield server


@pytest.fixture()
def history(sim: SimulatorServer, conn: db.Connection) -> dict[str, str]:
    """A mixed account: self-registered in flight, foreign, finished, tracked, too old."""

    def create(webhook: str | None) -> str:
        return create_training(sim, webhook)

    plan = sim.simulator.create_many
    names = {
        "flight1": create(f"{HERE}?user_id=a1"),
        "flight2": create(f"{HERE}?user_id=a2"),
        "foreign": create("https://elsewhere.example.com/hook?user_id=zz"),
        "tracked": create(f"{HERE}?user_id=t1"),
        "finished": plan(
            BulkPlan(count=1, created_ago=(60, 60), finish_in=(0, 0), webhook=f"{HERE}?user_id=f1")
        )[0],
        "by_destination": plan(
            BulkPlan(
                count=1,
                created_ago=(60, 60),
                finish_in=(0, 0),
                destination="sandrasocial/45038279-selfie-lora",
            )
        )[0],
        "too_old": plan(
            BulkPlan(
                count=1,
                created_ago=(10 * DAY, 10 * DAY),
                finish_in=(3600, 3600),
                webhook=f"{HERE}?user_id=old",
            )
        )[0],
    }
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO webhook_sync.trainings (id, user_id) VALUES (%s, 'platform')",
            (names["tracked"],),
        )
    return names


def run_import(database_url: str, sim: SimulatorServer, *args: str) -> dict:
    """Run `webhook-sync import --json …` and return its summary."""
    result = run_cli(
        "import",
        "--json",
        *args,
        env={
            "DATABASE_URL": database_url,
            "REPLICATE_API_TOKEN": sim.simulator.tokens[0],
            "REPLICATE_API_BASE_URL": sim.api_base_url,
        },
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def tracked(conn: db.Connection) -> dict[str, tuple[str, str | None]]:
    """(user_id, replicate_status) by id."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id, user_id, replicate_status FROM webhook_sync.trainings")
        return {row[0]: (row[1], row[2]) for row in cur.fetchall()}


def test_a_mixed_history_is_imported_correctly_and_safely_twice(
    database_url: str, sim: SimulatorServer, conn: db.Connection, history: dict[str, str]
) -> None:
    """In flight first; then finished ones by query and by pattern; a rerun adds nothing."""
    first = run_import(database_url, sim)
    second = run_import(database_url, sim, "--include-finished", "--user-from-destination", PATTERN)
    third = run_import(database_url, sim, "--include-finished", "--user-from-destination", PATTERN)

    rows = tracked(conn)
    assert (first["listed"], first["imported"], first["already_tracked"]) == (6, 2, 1)
    assert (first["skipped_finished"], first["unattributed"]) == (2, 1)
    assert first["users"] == {"a1": 1, "a2": 1}
    assert (second["imported"], second["imported_finished"], second["unattributed"]) == (2, 2, 1)
    assert (third["imported"], third["already_tracked"], third["fetched"]) == (0, 5, 0)
    assert rows[history["flight1"]][0] == "a1"
    assert rows[history["finished"]] == ("f1", "succeeded")
    assert rows[history["by_destination"]] == ("45038279", "succeeded")
    assert rows[history["tracked"]][0] == "platform"
    assert history["foreign"] not in rows and history["too_old"] not in rows
    assert sim.simulator.request_counts()["training_gets"][history["foreign"]] == 1


def test_a_dry_run_counts_and_writes_nothing(
    database_url: str, sim: SimulatorServer, conn: db.Connection, history: dict[str, str]
) -> None:
    """--dry-run reports what it would import; only the platform's row exists after."""
    summary = run_import(database_url, sim, "--dry-run", "--include-finished")

    assert (summary["dry_run"], summary["imported"], summary["unattributed"]) == (True, 3, 2)
    assert set(tracked(conn)) == {history["tracked"]}


def test_a_fixed_user_takes_everything_in_the_window(
    database_url: str, sim: SimulatorServer, conn: db.Connection, history: dict[str, str]
) -> None:
    """--user attributes every untracked training without fetching any; --since bounds it."""
    summary = run_import(database_url, sim, "--user", "u9", "--include-finished", "--since", "30d")

    rows = tracked(conn)
    assert (summary["imported"], summary["fetched"]) == (6, 0)
    assert {
        user for training_id, (user, _) in rows.items() if training_id != history["tracked"]
    } == {"u9"}


def test_user_and_pattern_exclude_each_other(database_url: str, sim: SimulatorServer) -> None:
    """Two ways of naming the user at once is a usage error."""
    result = run_cli(
        "import",
        "--user",
        "u1",
        "--user-from-destination",
        PATTERN,
        env={"DATABASE_URL": database_url, "REPLICATE_API_TOKEN": "x"},
    )

    assert result.returncode == 2
    assert "exclude each other" in result.stderr


def test_since_reads_a_sum_like_every_duration(
    database_url: str, sim: SimulatorServer, conn: db.Connection, history: dict[str, str]
) -> None:
    """--since follows the one duration rule: 1d12h reaches the trainings of the last hour
    and stops before the one created ten days ago."""
    summary = run_import(
        database_url, sim, "--dry-run", "--user", "u9", "--include-finished", "--since", "1d12h"
    )

    assert (summary["imported"], summary["already_tracked"]) == (5, 1)


@pytest.mark.slow
def test_two_imports_beside_a_running_worker_agree(
    database_url: str, sim: SimulatorServer, conn: db.Connection, tmp_path: Path
) -> None:
    """Two imports at once, with a worker sweeping every second: every training is tracked
    once, under the given user, and both imports exit 0."""
    ids = sim.simulator.create_many(
        BulkPlan(count=150, created_ago=(60, 3600), finish_in=(1, 30), webhook=HERE)
    )
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REPLICATE_API_TOKEN": sim.simulator.tokens[0],
        "REPLICATE_API_BASE_URL": sim.api_base_url,
        "POLL_INTERVAL_SECONDS": "1",
    }
    argv = [str(VENV_BIN / "webhook-sync"), "import", "--user", "u1", "--include-finished"]
    with (tmp_path / "worker.log").open("w") as log:
        worker = subprocess.Popen(
            [str(VENV_BIN / "webhook-sync"), "worker"], env=env, stdout=log, stderr=log
        )
    try:
        imports = [
            subprocess.Popen([*argv, "--json"], env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outputs = [process.communicate(timeout=120)[0] for process in imports]
    finally:
        worker.terminate()
        worker.wait(timeout=30)

    summaries = [json.loads(output) for output in outputs]
    rows = tracked(conn)
    assert [process.returncode for process in imports] == [0, 0]
    assert set(rows) == set(ids)
    assert {user for user, _ in rows.values()} == {"u1"}
    assert sum(summary["imported"] for summary in summaries) >= len(ids)
