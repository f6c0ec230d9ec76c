"""`track` and `status` through the real command, on a real PostgreSQL."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys

import pytest

from tests.support import run_cli
from webhook_sync import db
from webhook_sync.cli import base


def test_track_prints_the_row_and_is_idempotent(database_url: str) -> None:
    """`track` registers the training in `training` and a second call says it already was."""
    env = {"DATABASE_URL": database_url}

    first = run_cli("track", "t1", "--user", "u1", "--destination", "acme/avatar", env=env)
    second = run_cli("track", "t1", "--user", "u1", env=env)

    assert first.returncode == 0, first.stderr
    assert "tracked t1" in first.stdout and "training" in first.stdout
    assert second.returncode == 0
    assert "already tracked t1" in second.stdout


def test_status_json_uses_column_names(database_url: str) -> None:
    """`status --json` prints one object per line with the columns' names."""
    env = {"DATABASE_URL": database_url}
    run_cli("track", "t1", "--user", "u1", env=env)
    run_cli("track", "t2", "--user", "u2", env=env)

    result = run_cli("status", "--json", env=env)
    rows = [json.loads(line) for line in result.stdout.splitlines()]

    assert result.returncode == 0
    assert [row["id"] for row in rows] == ["t1", "t2"]
    assert set(rows[0]) == set(db.TRAINING_COLUMNS)
    assert rows[1]["training_status"] == "training" and rows[1]["user_id"] == "u2"


def test_status_table_and_unknown_id(database_url: str) -> None:
    """The table shows tracked ids; an unknown id is named on stderr and exits 1."""
    env = {"DATABASE_URL": database_url}
    run_cli("track", "t1", "--user", "u1", env=env)

    shown = run_cli("status", "t1", env=env)
    missing = run_cli("status", "nope", env=env)

    assert shown.returncode == 0
    assert shown.stdout.splitlines()[0].split()[:3] == ["id", "user_id", "training_status"]
    assert "t1" in shown.stdout
    assert missing.returncode == 1
    assert "not tracked: nope" in missing.stderr


def test_status_stuck_lists_only_old_trainings(database_url: str, conn: db.Connection) -> None:
    """`status --stuck` shows trainings in `training` longer than STUCK_AFTER_SECONDS."""
    env = {"DATABASE_URL": database_url, "STUCK_AFTER_SECONDS": "3600"}
    run_cli("track", "old", "--user", "u1", env=env)
    run_cli("track", "new", "--user", "u1", env=env)
    with conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE webhook_sync.trainings SET created_at = now() - interval '2 hours'"
            " WHERE id = 'old'"
        )

    result = run_cli("status", "--stuck", "--json", env=env)

    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == ["old"]


def test_bad_database_url_is_a_short_error() -> None:
    """An unreachable database gives one line and exit 1, never a traceback."""
    result = run_cli("status", env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})

    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot connect to the database")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("migrate",),
        ("track", "t1", "--user", "u1"),
        ("sweep",),
        ("sync", "t1"),
        ("import",),
        ("events",),
        ("prune",),
        ("changes",),
        ("notifications",),
        ("notifications", "retry", "1"),
    ],
    ids=" ".join,
)
def test_every_command_reports_an_error_through_the_one_boundary(args: tuple[str, ...]) -> None:
    """The group's error boundary, the only one, reaches every command, a subgroup's
    included: one line and exit 1, never a traceback."""
    env = {"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "REPLICATE_API_TOKEN": "x"}

    result = run_cli(*args, env=env)

    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: cannot connect to the database")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_python_dash_m_is_the_same_command() -> None:
    """`python -m webhook_sync --help` lists the commands."""
    result = subprocess.run(
        [sys.executable, "-m", "webhook_sync", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )

    assert result.returncode == 0
    assert "track" in result.stdout and "migrate" in result.stdout


def test_the_command_imports_the_development_wing_only_to_run_it() -> None:
    """Building `webhook-sync` (every run: migrate, doctor, --help) imports neither flask
    nor the simulator, demo or trigger, nor the worker's scheduler, yet lists their
    commands."""
    code = (
        "import json, sys\n"
        "from webhook_sync import cli\n"
        "heavy = ('flask', 'webhook_sync.dev.simulator', 'webhook_sync.dev.demo',"
        " 'webhook_sync.dev.trigger', 'apscheduler', 'webhook_sync.worker')\n"
        "print(json.dumps([name for name in heavy if name in sys.modules]))\n"
        "print(json.dumps(sorted(cli.main.commands)))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    loaded, commands = (json.loads(line) for line in result.stdout.splitlines())

    assert result.returncode == 0, result.stderr
    assert loaded == []
    assert {"simulator", "trigger", "demo", "worker"} <= set(commands)


def test_status_on_an_unmigrated_database_says_to_migrate(empty_database_url: str) -> None:
    """An empty database: one line saying to run `webhook-sync migrate`, exit 1; the
    traceback only with -v."""
    env = {"DATABASE_URL": empty_database_url}

    short = run_cli("status", env=env)
    verbose = run_cli("-v", "status", env=env)

    assert short.returncode == 1
    assert short.stderr.count("\n") == 1
    assert "webhook-sync migrate" in short.stderr and "Traceback" not in short.stderr
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_a_database_error_is_one_line_without_a_traceback(database_url: str) -> None:
    """A driver error a command does not expect (no rights on our schema) is one line."""
    env = {"DATABASE_URL": database_url, "DB_STATEMENT_TIMEOUT_MS": "1"}
    admin = db.connect(database_url)
    try:
        with admin, admin.cursor() as cur:
            cur.execute("LOCK TABLE webhook_sync.trainings IN ACCESS EXCLUSIVE MODE")
            result = run_cli("status", "--json", env=env)
    finally:
        admin.close()

    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_replicate_run_hands_back_what_it_took(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The set-up behind `sweep` and `import`: inside it Ctrl-C sets `stop` instead of
    interrupting; on the way out, an error's too, the connection is closed and Ctrl-C
    is given back."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_test")
    before = signal.getsignal(signal.SIGINT)
    runs = []

    with (
        pytest.raises(RuntimeError, match="the command failed"),
        base.replicate_run(
            base.Context(verbose=False), "test", as_json=True, progress_file=io.StringIO()
        ) as run,
    ):
        runs.append(run)
        signal.raise_signal(signal.SIGINT)
        raise RuntimeError("the command failed")

    assert runs[0].stop.is_set()
    assert runs[0].conn.closed
    assert not runs[0].interactive
    assert signal.getsignal(signal.SIGINT) is before
