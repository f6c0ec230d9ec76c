"""Apply pending sql/NNNN_*.sql files in name order, inside our schema, each in its own
transaction, all under the schema's migration lock.

Every file runs with `SET LOCAL search_path` set to our schema alone, so the unqualified
names it creates and alters are ours, whatever the database already holds (a host's
`public.trainings`, a Rails `public.schema_migrations(version)`). The migrations record
is `<schema>.schema_migrations`, and the advisory lock is the schema's own, so two
installs in one database migrate independently. A function a later file creates should
say `SET search_path FROM CURRENT`, so that it too finds our tables when it is called.

Upgrading from the release before schemas, whose tables and record were in `public`:
the first `migrate` moves them into our schema (`ALTER TABLE … SET SCHEMA`, which keeps
rows, indexes, constraints and the sequence owned by `training_transitions.id`), then
applies what is pending, as usual.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg2

from webhook_sync import db, errors
from webhook_sync.logs import log_event

_PACKAGE_SQL = Path(__file__).resolve().parent / "sql"
_CHECKOUT_SQL = Path(__file__).resolve().parent.parent / "sql"


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    name: str
    path: Path


def find_sql_dir() -> Path:
    """The migrations folder: inside the installed package, else the checkout's sql/."""
    for candidate in (_PACKAGE_SQL, _CHECKOUT_SQL):
        if candidate.is_dir() and any(candidate.glob("*.sql")):
            return candidate
    raise errors.MigrationError(f"no migrations found in {_PACKAGE_SQL} or {_CHECKOUT_SQL}")


def list_migrations(sql_dir: Path | None = None) -> list[Migration]:
    """All migration files in name order."""
    folder = sql_dir or find_sql_dir()
    return [Migration(path.name, path) for path in sorted(folder.glob("[0-9]*.sql"))]


def pending_migrations(conn: db.Connection, sql_dir: Path | None = None) -> list[Migration]:
    """Migrations not yet recorded in our schema (reads only, in the caller's transaction)."""
    applied = db.select_applied_migrations(conn)
    return [m for m in list_migrations(sql_dir) if m.name not in applied]


def migrate(conn: db.Connection, sql_dir: Path | None = None) -> list[str]:
    """Create our schema and its record if missing (moving the previous release's tables
    out of `public`), then apply every pending migration; return the names applied (empty
    on a second run). Commits.

    The whole run holds the schema's migration lock (each file still in its own
    transaction), so of two migrators started together one applies everything and the
    other waits for it, then finds nothing pending.
    """
    with _migration_lock(conn):
        _prepare_schema(conn)
        return [_apply(conn, migration) for migration in pending_migrations(conn, sql_dir)]


@contextmanager
def _migration_lock(conn: db.Connection) -> Iterator[None]:
    """Hold the schema's migration lock (at session level) for the body."""
    try:
        with conn:
            db.lock_migrations(conn)
    except psycopg2.Error as exc:
        raise errors.MigrationError(
            f"waiting for the migration lock of {conn.schema} failed: {db.first_line(exc)}"
        ) from exc
    try:
        yield
    finally:
        if not conn.closed:  # a lost session has released its locks already
            with conn:
                db.unlock_migrations(conn)


def _apply(conn: db.Connection, migration: Migration) -> str:
    """Run one migration file and record it, in one transaction; its name."""
    started = time.monotonic()
    try:
        with conn:
            db.execute_migration(conn, migration.path.read_text(encoding="utf-8"))
            db.insert_migration(conn, migration.name)
    except psycopg2.Error as exc:
        raise errors.MigrationError(f"{migration.name} failed: {db.first_line(exc)}") from exc
    log_event(
        "migration_applied",
        name=migration.name,
        schema=conn.schema,
        ms=round((time.monotonic() - started) * 1000, 1),
    )
    return migration.name


def _prepare_schema(conn: db.Connection) -> None:
    """Our schema and its migrations record, in one transaction (under the migration lock)."""
    try:
        with conn:
            db.create_schema(conn)
            moved = not db.migrations_table_exists(conn) and db.move_legacy_tables(conn)
            db.create_migrations_table(conn)
    except psycopg2.Error as exc:
        raise errors.MigrationError(
            f"preparing schema {conn.schema} failed: {db.first_line(exc)}"
        ) from exc
    if moved:
        log_event("migrated_from_public", schema=conn.schema, tables=", ".join(db.LEGACY_TABLES))
