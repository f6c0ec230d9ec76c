"""Secrets never leak: with logging at DEBUG, no webhook secret, API token or database
password appears in any log line, any process output or any response body.

The database URL carries a real password (a role created for the test), so a log line
that prints the URL would fail these tests.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
from flask.testing import FlaskClient

from tests import e2e
from tests.e2e_support import admin_execute
from tests.support import free_port, run_cli
from tests.web_support import sign_headers
from webhook_sync import db, logs, service
from webhook_sync.config import Config
from webhook_sync.web import WEBHOOK_PATH, create_app


@dataclass(frozen=True)
class Secrets:
    """Every secret of one test: a database URL with a password, a webhook secret, a token."""

    database_url: str
    password: str
    webhook_secret: str
    api_token: str

    def values(self) -> list[str]:
        """The strings that must never appear (the secret also without its prefix)."""
        return [
            self.password,
            self.webhook_secret,
            self.webhook_secret.removeprefix("whsec_"),
            self.api_token,
        ]

    def leaks(self, text: str) -> list[str]:
        """Which secrets `text` contains (by kind, never the value itself)."""
        names = ["database password", "webhook secret", "webhook secret key", "API token"]
        return [name for name, value in zip(names, self.values(), strict=True) if value in text]


def _with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{user}:{password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture()
def secret_values(pg_admin_url: str, database_url: str) -> Iterator[Secrets]:
    """A login role with a password on this test's database; dropped afterwards."""
    role = f"wst_secret_{uuid.uuid4().hex[:10]}"
    password = "pw-" + secrets.token_hex(16)  # hex: safe as a SQL literal
    dbname = urlsplit(database_url).path.lstrip("/")
    admin_execute(
        pg_admin_url,
        f"CREATE ROLE {role} LOGIN PASSWORD '{password}'",
        f'GRANT ALL ON DATABASE "{dbname}" TO {role}',
    )
    try:
        # Short connections only: the run below cuts every connection to this database.
        admin_execute(
            database_url,
            f"GRANT ALL ON SCHEMA webhook_sync TO {role}",
            f"GRANT ALL ON ALL TABLES IN SCHEMA webhook_sync TO {role}",
            f"GRANT ALL ON ALL SEQUENCES IN SCHEMA webhook_sync TO {role}",
        )
        yield Secrets(
            database_url=_with_credentials(database_url, role, password),
            password=password,
            webhook_secret="whsec_" + base64.b64encode(secrets.token_bytes(24)).decode(),
            api_token="r8_" + secrets.token_hex(18),
        )
    finally:
        admin_execute(
            pg_admin_url,
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'",
        )
        admin_execute(database_url, f"DROP OWNED BY {role}")
        admin_execute(pg_admin_url, f"DROP ROLE IF EXISTS {role}")


class Capture(logging.Handler):
    """Keeps every record at DEBUG from every logger, rendered both ways (kv and JSON)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._kv = logs.KeyValueFormatter()
        self._json = logs.JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self._kv.format(record))
        self.lines.append(self._json.format(record))
        self.lines.append(repr(record.__dict__))


@pytest.fixture()
def captured() -> Iterator[Capture]:
    """Every log record of every logger at DEBUG for the duration of the test."""
    handler = Capture()
    logs.configure("DEBUG", "kv")  # the package's own stdout handler, as the processes have
    package = logging.getLogger(logs.LOGGER_NAME)
    root = logging.getLogger()
    saved = (package.level, root.level)
    package.addHandler(handler)
    root.addHandler(handler)
    package.setLevel(logging.DEBUG)
    root.setLevel(logging.DEBUG)
    yield handler
    package.removeHandler(handler)
    root.removeHandler(handler)
    package.setLevel(saved[0])
    root.setLevel(saved[1])


def with_unused_port(url: str) -> str:
    """The same URL (user, password, database) aimed at a port where nothing listens."""
    parts = urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{credentials}@127.0.0.1:{free_port()}"))


def test_web_flows_never_log_or_answer_a_secret(
    secret_values: Secrets, captured: Capture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Accepted, refused, malformed, oversized and database-down deliveries at DEBUG."""
    config = Config(
        database_url=secret_values.database_url,
        webhook_secrets=(secret_values.webhook_secret,),
        api_token=secret_values.api_token,
        max_webhook_bytes=64 * 1024,
        log_level="DEBUG",
    )
    conn = db.connect(secret_values.database_url)
    with conn:
        service.track_training(conn, "leakcheck", "user-1")
    conn.close()
    app = create_app(config)
    client: FlaskClient = app.test_client()
    good = json.dumps({"id": "leakcheck", "status": "succeeded", "logs": "x"}).encode()
    answers = []
    try:
        for secret in (secret_values.webhook_secret, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"):
            answers.append(
                client.post(WEBHOOK_PATH, headers=sign_headers(good, secret=secret), data=good)
            )
        answers.append(client.post(WEBHOOK_PATH, data=good))
        answers.append(
            client.post(
                WEBHOOK_PATH,
                headers=sign_headers(b"{", secret=secret_values.webhook_secret),
                data=b"{",
            )
        )
        answers.append(client.post(WEBHOOK_PATH, data=b"x" * 70_000))
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.yaml", "/nope"):
            answers.append(client.get(path))
    finally:
        app.extensions["webhook_sync"].close()
    down_url = with_unused_port(secret_values.database_url)
    down_app = create_app(
        Config(database_url=down_url, webhook_secrets=(secret_values.webhook_secret,))
    )
    down_client = down_app.test_client()
    answers.append(
        down_client.post(
            WEBHOOK_PATH, headers=sign_headers(good, secret=secret_values.webhook_secret), data=good
        )
    )
    answers.append(down_client.get("/readyz"))
    down_app.extensions["webhook_sync"].close()
    output = capsys.readouterr()
    bodies = [answer.get_data(as_text=True) + str(dict(answer.headers)) for answer in answers]

    assert [answer.status_code for answer in answers[:5]] == [200, 401, 400, 400, 413]
    assert [answer.status_code for answer in answers[-2:]] == [503, 503]
    assert len(captured.lines) > 10
    assert any("leakcheck" in line for line in captured.lines)
    for text in [*captured.lines, *bodies, output.out, output.err]:
        assert secret_values.leaks(text) == [], text[:500]


def test_cli_errors_never_print_the_password(secret_values: Secrets) -> None:
    """A database that is down, with and without -v: the cause is printed, the password not."""
    down_url = with_unused_port(secret_values.database_url)
    env = {
        "DATABASE_URL": down_url,
        "LOG_LEVEL": "DEBUG",
        "REPLICATE_API_TOKEN": secret_values.api_token,
    }

    results = [
        run_cli("status", env=env),
        run_cli("-v", "status", env=env),
        run_cli("migrate", env=env),
        run_cli("-v", "track", "abc", "--user", "u", env=env),
        run_cli("status", env={**env, "DATABASE_URL": secret_values.database_url}),
    ]

    assert [result.returncode for result in results] == [1, 1, 1, 1, 0]
    assert all(result.stderr for result in results[:4])
    for result in results:
        assert secret_values.leaks(result.stdout + result.stderr) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_processes_at_debug_never_log_a_secret(
    secret_values: Secrets, pg_admin_url: str, tmp_path: Path
) -> None:
    """web and worker at DEBUG through a run with faults: no secret in any of their output."""
    scenario = e2e.Scenario(
        trainings=20,
        finish_in=(1.0, 6.0),
        cancels=2,
        log_level="DEBUG",
        kill_worker=False,
        restart_web=False,
        converge_timeout=40,
        # Every fault of the defaults, over shorter spans: the lagging wave's 404s and the
        # platform's outage still come first. The run ends when the lease of the delivery
        # SIGKILLed once the platform is up runs out (NOTIFY_LEASE_SECONDS later).
        lagging_faults={"new_training_404_rate": 1.0, "new_training_404_seconds": 5.0},
        lagging_finish_in=(5.0, 7.0),
        platform_down_seconds=3.0,
    )
    env = {
        "REPLICATE_API_TOKEN": secret_values.api_token,
        "REPLICATE_WEBHOOK_SECRET": secret_values.webhook_secret,
    }
    with e2e.Cluster(
        secret_values.database_url,
        scenario,
        tmp_path,
        extra_env=env,
        sim_token=secret_values.api_token,
        sim_secret=secret_values.webhook_secret,
    ) as cluster:
        cluster.start(workers=1)
        evidence = e2e.run_scenario(cluster, pg_admin_url)
        refused = requests.post(cluster.web_url + WEBHOOK_PATH, data=b"{}", timeout=10)
        # The simulator stands in for Replicate, which holds the token and secret anyway.
        outputs = {
            process.name: process.output()
            for process in cluster.processes
            if process.name != "simulator"
        }

    assert all(evidence.rows[training_id][0] != "training" for training_id in evidence.ids)
    assert refused.status_code == 400
    assert all(outputs.values())
    for name, text in outputs.items():
        assert secret_values.leaks(text) == [], f"{name} printed a secret"
    assert secret_values.leaks(refused.text) == []
