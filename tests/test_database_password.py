"""A database password with every character a URL reserves never leaves the process: not in
an HTTP response, a log line, or the output of a CLI command, with or without -v.

The role is real (CREATE ROLE … PASSWORD) and its password holds `%`, `@`, `/`, `:`, `#`
and a space, percent-encoded in DATABASE_URL as it must be. Two ways for libpq to fail and
name what it was given: a database that does not exist (on the suite's server), and a
wrong password (on a server of the test's own that checks passwords). The CLI, gunicorn
(the Procfile's `web`) and the worker run as real processes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
import requests

from tests.e2e_support import admin_execute
from tests.local_postgres import LocalPostgres
from tests.support import REPO, VENV_BIN, free_port, run_cli, wait_until
from tests.test_web_process import procfile_command, web_env
from tests.web_support import SECRET, WEBHOOK_PATH, signed_delivery, training_payload

PASSWORD = "Kq7v%Zt9w@Wm3r/Rx8k:Vb2n#Np5j Jd4h"
WRONG_PASSWORD = "Jd4h Np5j#Vb2n:Rx8k/Wm3r@Zt9w%Kq7v"
# libpq names the host it could not use: a name no other output of these processes holds.
HOST = "localhost"


@dataclass(frozen=True)
class Role:
    """A login role with PASSWORD, and URLs that use it."""

    name: str
    port: int
    database: str

    def url(self, database: str | None = None, *, password: str = PASSWORD) -> str:
        """A URL for this role, its password percent-encoded."""
        secret = quote(password, safe="")
        return f"postgresql://{self.name}:{secret}@{HOST}:{self.port}/{database or self.database}"

    def leaks(self, text: str) -> list[str]:
        """What of the credentials `text` shows: any four characters in a row of either
        password (as written or percent-encoded), the user, the host, the URL."""
        pieces: dict[str, list[str]] = {"user": [self.name], "host": [HOST]}
        pieces["url"] = ["postgresql://" + self.name, "postgres://"]
        for password in (PASSWORD, WRONG_PASSWORD):
            for kind, spelling in (("password", password), ("encoded", quote(password, safe=""))):
                windows = [spelling[i : i + 4] for i in range(len(spelling) - 3)]
                pieces.setdefault(kind, []).extend(windows)
        return [kind for kind, values in pieces.items() if any(v in text for v in values)]


@pytest.fixture()
def role(pg_admin_url: str, database_url: str) -> Iterator[Role]:
    """A role whose password holds each reserved character, allowed into this test's
    database; dropped afterwards."""
    name = f"wst_leak_{uuid.uuid4().hex[:10]}"
    database = urlsplit(database_url).path.lstrip("/")
    admin_execute(pg_admin_url, f"CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}'")
    try:
        admin_execute(
            database_url,
            f"GRANT USAGE ON SCHEMA webhook_sync TO {name}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA webhook_sync TO {name}",
        )
        yield Role(name, urlsplit(pg_admin_url).port or 5432, database)
    finally:
        admin_execute(
            pg_admin_url,
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'",
        )
        admin_execute(database_url, f"DROP OWNED BY {name}")
        admin_execute(pg_admin_url, f"DROP ROLE IF EXISTS {name}")


def missing_database() -> str:
    """A database name that does not exist: libpq's connection fails."""
    return f"wst_missing_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def password_server() -> Iterator[LocalPostgres]:
    """A PostgreSQL server of this module's own where roles log in with their password."""
    server = LocalPostgres(passwords=True)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture()
def checked_role(password_server: LocalPostgres) -> Role:
    """A role with PASSWORD on the password-checking server, and a database it may use."""
    name = f"wst_leak_{uuid.uuid4().hex[:10]}"
    database = f"wst_{uuid.uuid4().hex[:10]}"
    admin_execute(
        password_server.admin_url,
        f"CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}'",
        f'CREATE DATABASE "{database}" OWNER {name}',
    )
    return Role(name, password_server.port, database)


@dataclass(frozen=True)
class Failing:
    """A role, a URL of it with which libpq fails, and the words of libpq's cause."""

    role: Role
    url: str
    cause: str


@pytest.fixture(params=["missing database", "wrong password"])
def failing(request: pytest.FixtureRequest) -> Failing:
    """A database that does not exist, or a wrong password on a server that checks it."""
    if request.param == "missing database":
        role: Role = request.getfixturevalue("role")
        return Failing(role, role.url(missing_database()), "does not exist")
    role = request.getfixturevalue("checked_role")
    return Failing(role, role.url(password=WRONG_PASSWORD), "password authentication failed")


def test_the_right_password_connects_and_a_wrong_one_is_refused(checked_role: Role) -> None:
    """The password-checking server is what it claims, and the encoded URL is read right."""
    right = run_cli("migrate", env={"DATABASE_URL": checked_role.url()})
    wrong = run_cli("migrate", env={"DATABASE_URL": checked_role.url(password=WRONG_PASSWORD)})

    assert right.returncode == 0, right.stderr
    assert wrong.returncode == 1
    assert "password authentication failed" in wrong.stderr
    assert checked_role.leaks(right.stdout + right.stderr + wrong.stdout + wrong.stderr) == []


def test_the_percent_encoded_password_is_a_working_url(role: Role) -> None:
    """The URL that spells the password right is accepted and connects."""
    result = run_cli("events", env={"DATABASE_URL": role.url()})

    assert result.returncode == 0, result.stderr
    assert role.leaks(result.stdout + result.stderr) == []


@pytest.mark.parametrize(
    "command",
    [
        ("migrate",),
        ("doctor", "--json"),
        ("status",),
        ("status", "some-training"),
        ("events",),
        ("prune",),
        ("prune", "--older-than", "1d"),
    ],
)
@pytest.mark.parametrize("verbose", [False, True], ids=["short", "verbose"])
def test_cli_output_and_tracebacks_hold_no_credential(
    failing: Failing, command: tuple[str, ...], verbose: bool
) -> None:
    """Each command fails with a cause, never a credential."""
    role = failing.role
    env = {"DATABASE_URL": failing.url, "LOG_LEVEL": "DEBUG"}

    result = run_cli(*(("-v",) if verbose else ()), *command, env=env)

    assert result.returncode in (1, 3), result.stderr
    assert result.stderr or result.stdout
    assert role.leaks(result.stdout + result.stderr) == [], result.stdout + result.stderr
    if verbose and command[0] != "doctor":
        assert "Traceback" in result.stderr
    if not verbose:
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("broken", "cause"),
    [("missing database", "does not exist"), ("unknown URL parameter", "DATABASE_URL")],
)
def test_doctor_json_names_the_cause_without_details(role: Role, broken: str, cause: str) -> None:
    """doctor --json fails the database check with a cause people can act on (also for a
    URL that passes the settings but not libpq) and nothing of the URL."""
    url = role.url(missing_database()) if broken == "missing database" else role.url() + "?x=1"

    result = run_cli("doctor", "--json", env={"DATABASE_URL": url})
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}

    assert result.returncode == 3
    assert checks["database"]["status"] == "fail"
    assert cause in checks["database"]["detail"]
    assert role.leaks(result.stdout + result.stderr) == []


@pytest.mark.parametrize("character", ["%", "@", "/", "#", " ", "?"])
def test_a_url_with_the_password_not_encoded_is_refused_unechoed(
    role: Role, character: str
) -> None:
    """A raw reserved character in the password stops the command at the settings, naming
    DATABASE_URL and showing nothing of the value."""
    password = f"Kq7v{character}Zt9w"
    url = f"postgresql://{role.name}:{password}@{HOST}:{role.port}/{role.database}"

    results = [
        run_cli("status", env={"DATABASE_URL": url}),
        run_cli("-v", "status", env={"DATABASE_URL": url}),
    ]

    for result in results:
        output = result.stdout + result.stderr
        assert result.returncode == 1
        assert "DATABASE_URL" in output
        assert "Kq7v" not in output and "Zt9w" not in output and role.name not in output


# --- the web process over HTTP, and the worker -------------------------------------------


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL past a generous deadline."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_gunicorn_answers_and_logs_no_credential(failing: Failing, tmp_path: Path) -> None:
    """/readyz answers the fixed reason and a delivery 503, over HTTP; neither the answers
    nor gunicorn's log (at DEBUG) hold a credential, and the log keeps the cause."""
    port = free_port()
    env = web_env(
        DATABASE_URL=failing.url,
        PORT=str(port),
        REPLICATE_WEBHOOK_SECRET=SECRET,
        WEB_CONCURRENCY="1",
        LOG_LEVEL="DEBUG",
    )
    log_path = tmp_path / "web.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            procfile_command("web"), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(base_url, process), timeout=30, message="gunicorn to answer")
        ready = requests.get(base_url + "/readyz", timeout=10)
        body, headers = signed_delivery(training_payload("leak-check", "succeeded"))
        delivery = requests.post(base_url + WEBHOOK_PATH, data=body, headers=headers, timeout=10)
    finally:
        stop(process)
    output = log_path.read_text(errors="replace")

    assert (ready.status_code, ready.json()) == (
        503,
        {"status": "unavailable", "reason": "database unavailable"},
    )
    assert delivery.status_code == 503
    assert failing.cause in output
    for text in (ready.text, str(ready.headers), delivery.text, str(delivery.headers), output):
        assert failing.role.leaks(text) == [], text


def _answers(base_url: str, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"gunicorn exited with {process.returncode}")
    try:
        return requests.get(base_url + "/healthz", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.mark.slow
def test_worker_sweep_failed_line_holds_no_credential(failing: Failing, tmp_path: Path) -> None:
    """The worker's `sweep_failed` line names the cause and no credential."""
    env = web_env(
        DATABASE_URL=failing.url,
        REPLICATE_API_TOKEN="r8_leakcheck",
        REPLICATE_API_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
        LOG_LEVEL="DEBUG",
    )
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "webhook-sync"), "worker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: "sweep_failed" in log_path.read_text(errors="replace"),
            timeout=30,
            message="the worker's first sweep to fail",
        )
    finally:
        stop(process)
    output = log_path.read_text(errors="replace")
    line = next(line for line in output.splitlines() if "sweep_failed" in line)

    assert failing.cause in line
    assert failing.role.leaks(output) == [], output
