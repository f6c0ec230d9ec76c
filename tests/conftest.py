"""Fixtures: a real PostgreSQL (TEST_DATABASE_URL, or an embedded one), a migrated template
database per run, and a fresh copy of it per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg2
import pytest

from tests.local_postgres import LocalPostgres
from tests.support import database_url_for
from webhook_sync import db, migrations


def _admin_execute(admin_url: str, *statements: str) -> None:
    conn = psycopg2.connect(admin_url)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A URL to a database on a real PostgreSQL server where we may create databases:
    TEST_DATABASE_URL, or a server of our own started for this run."""
    configured = os.environ.get("TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    # No server configured: start our own from pgserver's bundled PostgreSQL, on TCP like
    # a real one (pgserver's own get_server listens on a Unix socket only).
    server = LocalPostgres()
    try:
        yield server.start().admin_url
    finally:
        server.stop()  # also when it failed to start: its folder holds a copy of the binaries


@pytest.fixture(scope="session")
def template_database(pg_admin_url: str) -> Iterator[str]:
    """The name of a database migrated once per run, copied for every test."""
    name = f"wst_tmpl_{uuid.uuid4().hex[:12]}"
    _admin_execute(pg_admin_url, f'CREATE DATABASE "{name}"')
    conn = db.connect(database_url_for(pg_admin_url, name))
    try:
        migrations.migrate(conn)
    finally:
        conn.close()
    yield name
    _admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def database_url(pg_admin_url: str, template_database: str) -> Iterator[str]:
    """A URL to a fresh, migrated database for this test only, dropped afterwards."""
    name = f"wst_{uuid.uuid4().hex[:16]}"
    _admin_execute(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_database}"')
    yield database_url_for(pg_admin_url, name)
    _admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def empty_database_url(pg_admin_url: str) -> Iterator[str]:
    """A URL to a fresh database with no schema, for migration tests."""
    name = f"wst_{uuid.uuid4().hex[:16]}"
    _admin_execute(pg_admin_url, f'CREATE DATABASE "{name}"')
    yield database_url_for(pg_admin_url, name)
    _admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def conn(database_url: str) -> Iterator[db.Connection]:
    """An open connection to this test's database."""
    connection = db.connect(database_url, "webhook-sync tests")
    yield connection
    connection.close()
