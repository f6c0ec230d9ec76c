"""A database password with every character a URL reserves never leaves the process: not in
an HTTP response, a log line, or the output of a CLI command, with or without -v.

The role is real (CREATE ROLE … PASSWORD) and its password holds `%`, `@`, `/`, `:`, `#`
and a space, percent-encoded in DATABASE_URL as it must be; the URL names a database that
does not exist, so libpq fails and its error names what it was given. The CLI, gunicorn
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
from tests.support import REPO, VENV_BIN, free_port, run_cli, wait_until
from tests.test_web_process import procfile_command, web_env
from tests.web_support import SECRET, WEBHOOK_PATH, signed_delivery, training_payload

PASSWORD = "Kq7v%Zt9w@Wm3r/Rx8k:Vb2n#Np5j Jd4h"
# libpq names the host it could not use: a name no other output of these processes holds.
HOST = "localhost"


@dataclass(frozen=True)
class Role:
    """A login role with PASSWORD, and URLs that use it."""

    name: str
    port: int
    database: str

    def url(self, database: str | None = None, *, encoded: bool = True) -> str:
        """A URL for this role (its password percent-encoded unless told otherwise)."""
        password = quote(PASSWORD, safe="") if encoded else PASSWORD
        return f"postgresql://{self.name}:{password}@{HOST}:{self.port}/{database or self.database}"

    def leaks(self, text: str) -> list[str]:
        """What of the credentials `text` shows: any four characters in a row of the
        password (as written or percent-encoded), the user, the host, the URL."""
        encoded = quote(PASSWORD, safe="")
        pieces = {
            "password": [PASSWORD[i : i + 4] for i in range(len(PASSWORD) - 3)],
            "encoded password": [encoded[i : i + 4] for i in range(len(encoded) - 3)],
            "user": [self.name],
            "host": [HOST],
            "url": ["postgresql://" + self.name, "postgres://"],
        }
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
    role: Role, command: tuple[str, ...], verbose: bool
) -> None:
    """Each command against a missing database fails with a cause, never a credential."""
    env = {"DATABASE_URL": role.url(missing_database()), "LOG_LEVEL": "DEBUG"}

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
def test_gunicorn_answers_and_logs_no_credential(role: Role, tmp_path: Path) -> None:
    """/readyz answers the fixed reason and a delivery 503, over HTTP; neither the answers
    nor gunicorn's log (at DEBUG) hold a credential, and the log keeps the cause."""
    port = free_port()
    env = web_env(
        DATABASE_URL=role.url(missing_database()),
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
    assert "does not exist" in output
    for text in (ready.text, str(ready.headers), delivery.text, str(delivery.headers), output):
        assert role.leaks(text) == [], text


def _answers(base_url: str, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"gunicorn exited with {process.returncode}")
    try:
        return requests.get(base_url + "/healthz", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


@pytest.mark.slow
def test_worker_sweep_failed_line_holds_no_credential(role: Role, tmp_path: Path) -> None:
    """The worker's `sweep_failed` line names the cause and no credential."""
    env = web_env(
        DATABASE_URL=role.url(missing_database()),
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

    assert "does not exist" in line
    assert role.leaks(output) == [], output
