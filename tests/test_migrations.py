"""Migrations on a real PostgreSQL: fresh, twice, two at once, and a failing file."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import psycopg2
import pytest

from tests.support import REPO, in_threads, run_cli, wait_until
from webhook_sync import db, errors, migrations


def test_fresh_database_gets_every_table(empty_database_url: str) -> None:
    """A fresh database ends with the tables and every migration recorded, in our schema."""
    conn = db.connect(empty_database_url)
    applied = migrations.migrate(conn)
    with conn.cursor() as cur:
        cur.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'webhook_sync'"
        )
        tables = {name for (name,) in cur.fetchall()}
    conn.close()

    assert applied == [m.name for m in migrations.list_migrations()]
    assert {"trainings", "webhook_events", "training_transitions", "schema_migrations"} <= tables


def test_second_run_is_a_no_op(empty_database_url: str) -> None:
    """Running migrate again applies nothing."""
    conn = db.connect(empty_database_url)
    migrations.migrate(conn)
    second = migrations.migrate(conn)
    pending = migrations.pending_migrations(conn)
    conn.close()

    assert second == []
    assert pending == []


def test_two_migrators_at_once_apply_each_file_once(empty_database_url: str) -> None:
    """Two migrators started together both succeed and each file is applied exactly once."""
    barrier = threading.Barrier(2)

    def run(_index: int) -> list[str]:
        conn = db.connect(empty_database_url)
        try:
            barrier.wait()
            return migrations.migrate(conn)
        finally:
            conn.close()

    results = in_threads(2, run)

    # Between two files either may take the lock, so they may share the work: once each.
    assert sorted(results[0] + results[1]) == [m.name for m in migrations.list_migrations()]


def test_a_second_migrator_waits_for_the_whole_run(empty_database_url: str, tmp_path: Path) -> None:
    """While one migrator is between its files, a second one (with a statement timeout far
    shorter than the wait) waits for the whole run, then finds nothing pending."""
    gate = 7_340_001
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE first_table (id int);")
    (tmp_path / "0002_gated.sql").write_text(
        f"SELECT pg_advisory_lock({gate}); SELECT pg_advisory_unlock({gate});"
        " CREATE TABLE second_table (id int);"
    )
    (tmp_path / "0003_third.sql").write_text("CREATE TABLE third_table (id int);")
    holder = psycopg2.connect(empty_database_url)
    holder.autocommit = True
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_lock(%s)", (gate,))
    results: dict[str, list[str]] = {}
    failures: list[BaseException] = []

    def run(name: str, statement_timeout_ms: int) -> None:
        conn = db.connect(empty_database_url, name, statement_timeout_ms=statement_timeout_ms)
        try:
            results[name] = migrations.migrate(conn, tmp_path)
        except BaseException as exc:  # collected for the assert below
            failures.append(exc)
        finally:
            conn.close()

    first = threading.Thread(target=run, args=("first", 10_000))
    first.start()
    wait_until(lambda: waiting_on_lock(holder, "first", gate), message="the first at 0002")
    second = threading.Thread(target=run, args=("second", 100))
    second.start()
    wait_until(lambda: waiting_on_lock(holder, "second"), message="the second to wait")
    wait_until(
        lambda: waiting_on_lock(holder, "second", longer_than="1 second"),
        message="the second to wait past its statement timeout",
    )
    with holder.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock(%s)", (gate,))
    holder.close()
    first.join(timeout=60)
    second.join(timeout=60)

    assert failures == []
    assert results == {
        "first": ["0001_first.sql", "0002_gated.sql", "0003_third.sql"],
        "second": [],
    }


def waiting_on_lock(
    conn: psycopg2.extensions.connection,
    application_name: str,
    objid: int | None = None,
    longer_than: str = "0",
) -> bool:
    """True while the session named `application_name` waits for an advisory lock (the one
    whose low 32 bits are `objid`, if given) and has waited longer than `longer_than`."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE a.application_name = %s AND l.locktype = 'advisory' AND NOT l.granted"
            " AND (%s::bigint IS NULL OR l.objid = %s::bigint)"
            " AND a.query_start < now() - %s::interval)",
            (application_name, objid, objid, longer_than),
        )
        return cur.fetchone()[0]


def test_failing_migration_names_file_and_error(empty_database_url: str, tmp_path: Path) -> None:
    """A broken file stops the run with its name and PostgreSQL's error; earlier ones stay."""
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE ok_table (id int);")
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE broken (id nosuchtype);")
    conn = db.connect(empty_database_url)

    with pytest.raises(errors.MigrationError) as caught:
        migrations.migrate(conn, tmp_path)
    applied = db.select_applied_migrations(conn)
    conn.close()

    assert "0002_broken.sql" in str(caught.value)
    assert "nosuchtype" in str(caught.value)
    assert applied == {"0001_ok.sql"}


def test_cli_migrate_reports_and_exits_zero(empty_database_url: str) -> None:
    """`webhook-sync migrate` applies the files, and a second run says nothing was applied."""
    first = run_cli("migrate", env={"DATABASE_URL": empty_database_url})
    second = run_cli("migrate", env={"DATABASE_URL": empty_database_url})

    assert first.returncode == 0, first.stderr
    assert "0001_trainings.sql" in first.stdout
    assert second.returncode == 0
    assert "applied 0 migration(s)" in second.stdout


def test_cli_migrate_without_database_url_says_what_to_set() -> None:
    """Without DATABASE_URL the command exits 1 naming the variable, with no traceback."""
    result = run_cli("migrate", env={"DATABASE_URL": ""})

    assert result.returncode == 1
    assert "DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_sql_dir_is_found_from_the_package() -> None:
    """The migrations folder is found without being told where the checkout is."""
    folder = migrations.find_sql_dir()

    assert (folder / "0001_trainings.sql").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_built_wheel_carries_every_migration(tmp_path: Path) -> None:
    """An installed package (a built wheel) holds sql/ and the OpenAPI file inside it."""
    # Built from a copy: setuptools builds in-tree, and a stale build/ would leak into wheels.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("webhook_sync", "sql"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=ignore)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("webhook_sync-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = {f"webhook_sync/sql/{m.name}" for m in migrations.list_migrations()}
    assert expected and expected <= names
    assert "webhook_sync/openapi.yaml" in names
