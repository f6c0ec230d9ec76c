"""Apply pending sql/NNNN_*.sql files in name order, each in its own locked transaction."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import psycopg2

from webhook_sync import db, errors
from webhook_sync.logs import log_event

# pg_advisory_xact_lock key: any constant unique to this application ("webhsync").
MIGRATION_LOCK_KEY = 0x7765_6268_7379_6E63 & 0x7FFF_FFFF_FFFF_FFFF
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
    """Migrations not yet recorded in schema_migrations (reads only)."""
    applied = db.select_applied_migrations(conn)
    conn.rollback()
    return [m for m in list_migrations(sql_dir) if m.name not in applied]


def migrate(conn: db.Connection, sql_dir: Path | None = None) -> list[str]:
    """Apply every pending migration; return the names applied (empty on a second run).

    Each file runs in its own transaction that first takes a transaction-level advisory
    lock, so two migrators started together apply each file exactly once.
    """
    applied_now: list[str] = []
    for migration in list_migrations(sql_dir):
        started = time.monotonic()
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%(key)s)", {"key": MIGRATION_LOCK_KEY})
                cur.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                cur.execute(
                    "SELECT 1 FROM schema_migrations WHERE name = %(name)s",
                    {"name": migration.name},
                )
                if cur.fetchone():
                    continue
                cur.execute(migration.path.read_text(encoding="utf-8"))
                cur.execute(
                    "INSERT INTO schema_migrations (name) VALUES (%(name)s)",
                    {"name": migration.name},
                )
        except psycopg2.Error as exc:
            raise errors.MigrationError(f"{migration.name} failed: {db.first_line(exc)}") from exc
        applied_now.append(migration.name)
        log_event(
            "migration_applied",
            name=migration.name,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
    return applied_now
