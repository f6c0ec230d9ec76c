"""`webhook-sync doctor` through the real command, on a real PostgreSQL, against the
Replicate simulator over HTTP."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.operator_support import cli, fixture, store_event
from tests.support import free_port, run_cli
from webhook_sync import db, heartbeat, service
from webhook_sync.dev.simulator import DEFAULT_TOKEN, Simulator, SimulatorServer, start_in_thread

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_5WbX5kEWLlfzsGNjH64I8lOOqUB6e8FH"


@pytest.fixture()
def simulator() -> Iterator[SimulatorServer]:
    """The Replicate simulator on a free port, signing with SECRET."""
    server = start_in_thread(Simulator(secret=SECRET, seed=1))
    yield server
    server.shutdown()


def doctor(
    database_url: str, server: SimulatorServer, *args: str, **settings: str
) -> subprocess.CompletedProcess[str]:
    """Run `webhook-sync doctor ARGS` with a complete configuration against the simulator."""
    values = {
        "REPLICATE_API_TOKEN": DEFAULT_TOKEN,
        "REPLICATE_API_BASE_URL": server.api_base_url,
        "REPLICATE_WEBHOOK_SECRET": SECRET,
        **settings,
    }
    return cli(database_url, "doctor", *args, **values)


def worker_swept(database_url: str, seconds_ago: float = 0) -> None:
    """A worker's heartbeat: a sweep finished `seconds_ago` (commits)."""
    conn = db.connect(database_url)
    with conn:
        heartbeat.record_sweep_finished(conn, "worker.1", {"checked": 3, "repaired": 1})
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE webhook_sync.worker_heartbeats"
                " SET sweep_finished_at = now() - make_interval(secs => %s)",
                (seconds_ago,),
            )
    conn.close()


def statuses(output: str) -> dict[str, str]:
    """Each check's name mapped to its status, from the people's output."""
    result = {}
    for line in output.splitlines():
        state, rest = line.split(maxsplit=1)
        name = next(n for n in CHECK_NAMES if rest.startswith(n))
        result[name] = state
    return result


CHECK_NAMES = (
    "configuration",
    "database",
    "clock",
    "stuck trainings",
    "inbox",
    "worker",
    "host",
    "replicate token",
    "webhook secret",
)


def test_doctor_passes_with_a_matching_secret(
    database_url: str, simulator: SimulatorServer
) -> None:
    """Everything configured and matching: every check ok, one line each, exit 0."""
    worker_swept(database_url)
    result = doctor(database_url, simulator)

    assert result.returncode == 0, result.stdout + result.stderr
    assert statuses(result.stdout) == {name: "ok" for name in CHECK_NAMES}
    assert "secret #1 of 1 matches" in result.stdout


def test_doctor_names_the_matching_secret_during_rotation(
    database_url: str, simulator: SimulatorServer
) -> None:
    """With two secrets configured, the one Replicate holds is named by position."""
    worker_swept(database_url)
    result = doctor(database_url, simulator, REPLICATE_WEBHOOK_SECRET=f"{OTHER_SECRET},{SECRET}")

    assert result.returncode == 0
    assert "secret #2 of 2 matches" in result.stdout


def test_doctor_fails_on_a_mismatching_secret_without_printing_either(
    database_url: str, simulator: SimulatorServer
) -> None:
    """A configured secret Replicate does not hold fails the check; neither secret is shown."""
    result = doctor(database_url, simulator, REPLICATE_WEBHOOK_SECRET=OTHER_SECRET)
    output = result.stdout + result.stderr

    assert result.returncode == 3
    assert statuses(result.stdout)["webhook secret"] == "fail"
    assert statuses(result.stdout)["replicate token"] == "ok"
    assert "none of the 1 configured secret(s) matches" in result.stdout
    assert SECRET.removeprefix("whsec_") not in output
    assert OTHER_SECRET.removeprefix("whsec_") not in output


def test_doctor_accepts_the_token_alone_as_the_web_process_does(
    database_url: str, simulator: SimulatorServer
) -> None:
    """Without REPLICATE_WEBHOOK_SECRET the web process signs with the account's secret,
    fetched with the token: a supported setup, so nothing fails and exit is 0."""
    worker_swept(database_url)
    result = doctor(database_url, simulator, REPLICATE_WEBHOOK_SECRET="")
    checks = statuses(result.stdout)

    assert result.returncode == 0, result.stdout + result.stderr
    assert checks["configuration"] == "ok"
    assert checks["webhook secret"] == "ok"
    assert "fetched" in result.stdout
    assert SECRET.removeprefix("whsec_") not in result.stdout + result.stderr


def test_doctor_fails_on_a_refused_token(database_url: str, simulator: SimulatorServer) -> None:
    """A token Replicate refuses fails its check and skips the secret comparison."""
    result = doctor(database_url, simulator, REPLICATE_API_TOKEN="r8_wrong_token")
    checks = statuses(result.stdout)

    assert result.returncode == 3
    assert checks["replicate token"] == "fail"
    assert checks["webhook secret"] == "skip"
    assert "401" in result.stdout
    assert "r8_wrong_token" not in result.stdout + result.stderr


def test_doctor_json_and_warnings(
    database_url: str, conn: db.Connection, simulator: SimulatorServer
) -> None:
    """Stuck trainings and failed events warn without failing; --json holds every check."""
    payload = fixture("training-get-processing.json")
    with conn:
        service.track_training(conn, "old-one", "user-1")
        with conn.cursor() as cur:
            cur.execute("UPDATE webhook_sync.trainings SET created_at = now() - interval '7 hours'")
    store_event(conn, "msg_failed", payload, "failed")
    worker_swept(database_url)

    result = doctor(database_url, simulator, "--json")
    out = json.loads(result.stdout)
    checks = {check["name"]: check for check in out["checks"]}

    assert result.returncode == 0
    assert out["ok"] is True
    assert [check["name"] for check in out["checks"]] == list(CHECK_NAMES)
    assert checks["stuck trainings"]["status"] == "warn"
    assert checks["stuck trainings"]["detail"].startswith("1 training(s)")
    assert checks["inbox"]["status"] == "warn"
    assert "1 failed" in checks["inbox"]["detail"]


def test_doctor_fails_when_no_sweep_finished_within_two_intervals(
    database_url: str, simulator: SimulatorServer
) -> None:
    """No sweep ever, or the last one longer ago than two intervals: the worker check fails."""
    never = doctor(database_url, simulator)
    worker_swept(database_url, seconds_ago=300)
    late = doctor(database_url, simulator, POLL_INTERVAL_SECONDS="120")
    on_time = doctor(database_url, simulator, POLL_INTERVAL_SECONDS="200")

    assert (never.returncode, statuses(never.stdout)["worker"]) == (3, "fail")
    assert "no worker has finished a sweep" in never.stdout
    assert (late.returncode, statuses(late.stdout)["worker"]) == (3, "fail")
    assert "more than two intervals" in late.stdout
    assert (on_time.returncode, statuses(on_time.stdout)["worker"]) == (0, "ok")


def test_doctor_reports_missing_configuration(database_url: str) -> None:
    """Nothing but DATABASE_URL set: configuration fails, Replicate checks are skipped."""
    result = cli(database_url, "doctor")
    checks = statuses(result.stdout)

    assert result.returncode == 3
    assert checks["configuration"] == "fail"
    assert "REPLICATE_API_TOKEN, REPLICATE_WEBHOOK_SECRET" in result.stdout
    assert checks["database"] == "ok"
    assert checks["replicate token"] == "skip"


def test_doctor_reports_invalid_configuration(database_url: str) -> None:
    """A setting that does not parse fails the configuration check, not the command."""
    result = cli(database_url, "doctor", REPLICATE_WEBHOOK_SECRET="not-a-secret")

    assert result.returncode == 3
    assert "Traceback" not in result.stderr
    assert "secret #1 must look like whsec_<base64>" in result.stdout
    assert statuses(result.stdout)["database"] == "skip"


def test_doctor_reports_pending_migrations(
    empty_database_url: str, simulator: SimulatorServer
) -> None:
    """An unmigrated database fails the database check and names the fix."""
    result = doctor(empty_database_url, simulator)
    checks = statuses(result.stdout)

    assert result.returncode == 3
    assert checks["database"] == "fail"
    assert "webhook-sync migrate" in result.stdout
    assert checks["stuck trainings"] == "skip"
    assert checks["webhook secret"] == "ok"


def test_doctor_reports_an_unreachable_database(simulator: SimulatorServer) -> None:
    """A database nobody listens on fails its check; the rest of the database checks skip."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    result = doctor(url, simulator)
    checks = statuses(result.stdout)

    assert result.returncode == 3
    assert checks["database"] == "fail"
    assert checks["clock"] == "skip"
    assert checks["webhook secret"] == "ok"


def test_doctor_help_documents_the_exit_codes() -> None:
    """`doctor --help` lists its exit codes."""
    result = run_cli("doctor", "--help")

    assert result.returncode == 0
    assert "3 at least one check failed" in " ".join(result.stdout.split())
