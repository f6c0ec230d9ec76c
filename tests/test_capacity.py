"""Connections against the server's limits: read at start, and a configuration that can
never fit refused by the real `worker` and `web` commands."""

from __future__ import annotations

import os
import shlex
import subprocess
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.e2e_support import admin_execute
from tests.support import VENV_BIN, free_port, procfile, run_cli
from webhook_sync import capacity, db, errors
from webhook_sync.config import Config

SECRET = "whsec_bG9jYWwtc2ltdWxhdG9yLWRldi1zZWNyZXQ="


@pytest.fixture()
def limited_url(pg_admin_url: str, database_url: str) -> Iterator[Callable[[int], str]]:
    """This test's database as a new role that may hold at most `limit` connections."""
    roles: list[str] = []

    def make(limit: int) -> str:
        role = f"wst_limited_{uuid.uuid4().hex[:8]}"
        admin_execute(pg_admin_url, f"CREATE ROLE {role} LOGIN CONNECTION LIMIT {limit}")
        roles.append(role)
        parts = urlsplit(database_url)
        return urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))

    yield make
    for role in roles:
        admin_execute(
            pg_admin_url,
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'",
            f"DROP ROLE IF EXISTS {role}",
        )


def test_the_limits_are_read_from_the_server(conn: db.Connection) -> None:
    """max_connections and the reserved slots come from the server; usable is below them."""
    with conn, conn.cursor() as cur:
        cur.execute("SHOW max_connections")
        expected = int(cur.fetchone()[0])
        limits = capacity.read_limits(conn)

    assert limits.max_connections == expected
    assert 0 < limits.usable <= expected - limits.reserved
    assert limits.role_limit is None


def test_a_web_process_that_cannot_fit_is_refused(
    limited_url: Callable[[int], str],
) -> None:
    """Two gunicorn workers of four pooled connections (+1 each for the budget) need ten;
    a role limited to five is told so, with the settings to lower; a worker (five) fits."""
    config = Config(database_url=limited_url(5), web_concurrency=2, db_pool_max=4)

    with pytest.raises(errors.ConfigError) as refused:
        capacity.check_fits(config, capacity.WEB)
    limits = capacity.check_fits(config, capacity.WORKER)

    assert "may open 10 database connections" in str(refused.value)
    assert "at most 5" in str(refused.value)
    assert "WEB_CONCURRENCY" in str(refused.value)
    assert limits is not None and limits.role_limit == 5


def test_fewer_free_connections_than_needed_warn_and_start(
    limited_url: Callable[[int], str], caplog: pytest.LogCaptureFixture
) -> None:
    """A role limited to six fits a worker's five; while three of its connections are
    open elsewhere, the check still passes but logs `connections_short`."""
    url = limited_url(6)
    config = Config(database_url=url)
    quiet = capacity.check_fits(config, capacity.WORKER)
    warned_before = [r.getMessage() for r in caplog.records].count("connections_short")
    held = [db.connect(url) for _ in range(3)]
    try:
        short = capacity.check_fits(config, capacity.WORKER)
    finally:
        for connection in held:
            connection.close()

    assert quiet is not None and quiet.free == 6
    assert warned_before == 0
    assert short is not None and short.free == 3
    assert [r.getMessage() for r in caplog.records].count("connections_short") == 1


def test_an_unreachable_database_is_not_judged_at_start() -> None:
    """Without a database to ask, the check passes the question on to the running process."""
    config = Config(database_url=f"postgresql://nobody@127.0.0.1:{free_port()}/none")

    assert capacity.check_fits(config, capacity.WEB) is None


def test_the_commands_refuse_a_configuration_that_cannot_fit(
    limited_url: Callable[[int], str],
) -> None:
    """The Procfile's `web` and `worker` lines exit at start, naming why, when the role's
    limit (one connection) is below what they would open (ten, five)."""
    env = {
        **os.environ,
        "DATABASE_URL": limited_url(1),
        "REPLICATE_WEBHOOK_SECRET": SECRET,
        "REPLICATE_API_TOKEN": "r8_unused",
        "PORT": str(free_port()),
        "WEB_CONCURRENCY": "2",
        "DB_POOL_MAX": "4",
    }
    web_argv = shlex.split(procfile()["web"])
    web = subprocess.run(
        [str(VENV_BIN / web_argv[0]), *web_argv[1:]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    worker = run_cli("worker", env=env, timeout=60)

    assert web.returncode != 0
    assert "may open 10 database connections" in web.stderr + web.stdout
    assert worker.returncode == 1
    assert "a worker process may open 5 database connections" in worker.stderr
    assert "the insert listener 2" in worker.stderr
    assert "at most 1" in worker.stderr
