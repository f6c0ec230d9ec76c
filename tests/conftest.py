"""Fixtures: a real PostgreSQL (TEST_DATABASE_URL, or an embedded one), a migrated template
database per run, and a fresh copy of it per test (made ahead and dropped behind the tests,
see tests/throwaway_databases.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.e2e_support import admin_execute
from tests.local_postgres import LocalPostgres
from tests.support import database_url_for
from tests.throwaway_databases import ThrowawayDatabases
from webhook_sync import db, migrations


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
    admin_execute(pg_admin_url, f'CREATE DATABASE "{name}"')
    conn = db.connect(database_url_for(pg_admin_url, name))
    try:
        migrations.migrate(conn)
    finally:
        conn.close()
    yield name
    admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def throwaway_databases(pg_admin_url: str, template_database: str) -> Iterator[ThrowawayDatabases]:
    """The run's supply of fresh databases; every one is dropped before the template is."""
    databases = ThrowawayDatabases(pg_admin_url)
    try:
        yield databases
    finally:
        databases.close()


@pytest.fixture()
def database_url(
    pg_admin_url: str, template_database: str, throwaway_databases: ThrowawayDatabases
) -> Iterator[str]:
    """A URL to a fresh, migrated database for this test only, dropped afterwards."""
    name = throwaway_databases.take(template_database)
    yield database_url_for(pg_admin_url, name)
    throwaway_databases.give_back(name)


@pytest.fixture()
def empty_database_url(pg_admin_url: str, throwaway_databases: ThrowawayDatabases) -> Iterator[str]:
    """A URL to a fresh database with no schema, for migration tests."""
    name = throwaway_databases.take(None)
    yield database_url_for(pg_admin_url, name)
    throwaway_databases.give_back(name)


@pytest.fixture()
def conn(database_url: str) -> Iterator[db.Connection]:
    """An open connection to this test's database."""
    connection = db.connect(database_url, "webhook-sync tests")
    yield connection
    connection.close()
