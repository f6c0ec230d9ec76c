"""The HOST_* binding checked against a real database: every problem one line naming its
setting, `doctor`'s host check, and the processes that refuse to start on a wrong binding."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.e2e_support import admin_execute
from tests.operator_support import cli
from tests.support import free_port, run_cli
from tests.test_host_mirror import (
    POST_MORTEM_SETTINGS,
    TID,
    USER,
    bind,
    create_user_models,
    execute,
)
from tests.test_web_process import run_web_to_exit, web_env
from tests.web_support import training_payload
from webhook_sync import db, doctor, errors, host, service
from webhook_sync.training import parse_training

SECRET = "whsec_bG9jYWwtc2ltdWxhdG9yLWRldi1zZWNyZXQ="


def problems(database_url: str, **settings: str) -> list[str]:
    """What check_binding finds for these settings over the post-mortem's."""
    conn = db.connect(database_url)
    try:
        return host.check_binding(conn, bind(**settings))
    finally:
        conn.close()


def test_the_post_mortem_table_passes(database_url: str) -> None:
    """The post-mortem's table, bound by its settings, has no problem."""
    create_user_models(database_url)

    assert problems(database_url) == []


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"HOST_TABLE": "public.user_model"},
            "HOST_TABLE: public.user_model does not exist (or is not a table)",
        ),
        (
            {"HOST_STATUS_COLUMN": "status"},
            'HOST_STATUS_COLUMN: public.user_models has no column "status"',
        ),
        (
            {"HOST_TRAINING_ID_COLUMN": "replicate_id"},
            'HOST_TRAINING_ID_COLUMN: public.user_models has no column "replicate_id"',
        ),
        (
            {"HOST_USER_ID_COLUMN": "owner"},
            'HOST_USER_ID_COLUMN: public.user_models has no column "owner"',
        ),
        (
            {"HOST_UPDATED_AT_COLUMN": "modified"},
            'HOST_UPDATED_AT_COLUMN: public.user_models has no column "modified"',
        ),
        (
            {"HOST_COLUMNS": "weights_url=lora_url"},
            'HOST_COLUMNS: public.user_models has no column "lora_url"',
        ),
        (
            {"HOST_UPDATED_AT_COLUMN": "user_id", "HOST_USER_ID_COLUMN": "steps"},
            None,  # a text column takes now() as ISO text: no problem with the first
        ),
        (
            {"HOST_TRAINING_ID_COLUMN": "steps", "HOST_USER_ID_COLUMN": "user_id"},
            'HOST_TRAINING_ID_COLUMN: "steps" of public.user_models is integer,'
            " which does not take a training id (text)",
        ),
        (
            {"HOST_UPDATED_AT_COLUMN": "steps"},
            'HOST_UPDATED_AT_COLUMN: "steps" of public.user_models is integer,'
            " which does not take now()",
        ),
        (
            {"HOST_COLUMNS": "completed_at=steps"},
            'HOST_COLUMNS: "steps" of public.user_models is integer,'
            " which does not take completed_at (timestamptz)",
        ),
        (
            {"HOST_STATUS_VALUES": "completed=finished_successfully"},
            'HOST_STATUS_VALUES: "training_status" of public.user_models (character varying(12))'
            " does not take 'finished_successfully' (our completed)",
        ),
    ],
)
def test_each_problem_is_one_line_naming_its_setting(
    database_url: str, settings: dict[str, str], expected: str | None
) -> None:
    """A missing table or column, a type that does not take what we write: named."""
    create_user_models(database_url, status_type="varchar(12)", extra=", steps integer")

    found = problems(database_url, **settings)

    if expected is None:
        assert not any(p.startswith("HOST_UPDATED_AT_COLUMN") for p in found), found
    else:
        assert expected in found, found
        assert all("\n" not in problem for problem in found)


def test_an_enum_without_a_spelling_is_named(database_url: str) -> None:
    """An enum status column that lacks one of our spellings is named with its type."""
    execute(database_url, "CREATE TYPE public.model_state AS ENUM ('training', 'completed')")
    create_user_models(database_url, status_type="public.model_state")

    found = problems(database_url)

    assert found == [
        'HOST_STATUS_VALUES: "training_status" of public.user_models (model_state)'
        f" does not take {spelling!r} (our {spelling})"
        for spelling in ("failed", "canceled")
    ]


@pytest.fixture()
def reader_url(pg_admin_url: str, database_url: str) -> Iterator[str]:
    """This test's database as a real role that may read user_models but not update it."""
    role = f"wst_reader_{uuid.uuid4().hex[:8]}"
    admin_execute(pg_admin_url, f"CREATE ROLE {role} LOGIN")
    parts = urlsplit(database_url)
    yield urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
    admin_execute(
        pg_admin_url,
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'",
    )
    admin_execute(database_url, f"DROP OWNED BY {role}")
    admin_execute(pg_admin_url, f"DROP ROLE IF EXISTS {role}")


def test_a_role_without_update_is_named(database_url: str, reader_url: str) -> None:
    """A real role with SELECT but no UPDATE on the table: the status and updated-at
    columns are named; what it may read is not."""
    create_user_models(database_url)
    role = urlsplit(reader_url).username
    execute(database_url, f"GRANT SELECT ON public.user_models TO {role}")

    found = problems(reader_url, HOST_UPDATED_AT_COLUMN="updated_at")

    assert found == [
        'HOST_STATUS_COLUMN: the database role may not UPDATE "training_status"'
        " of public.user_models",
        'HOST_UPDATED_AT_COLUMN: the database role may not UPDATE "updated_at"'
        " of public.user_models",
    ]
    assert role not in " ".join(found)


def test_a_column_grant_is_enough(database_url: str, reader_url: str) -> None:
    """UPDATE granted on the written columns alone passes (no table-wide grant needed)."""
    create_user_models(database_url)
    role = urlsplit(reader_url).username
    execute(
        database_url,
        f"GRANT SELECT ON public.user_models TO {role}",
        f"GRANT UPDATE (training_status, updated_at) ON public.user_models TO {role}",
    )

    assert problems(reader_url, HOST_UPDATED_AT_COLUMN="updated_at") == []


def test_doctor_checks_the_binding(database_url: str) -> None:
    """`doctor` has a host check: ok without a binding, ok on a right one, fail naming the
    setting on a wrong one."""
    create_user_models(database_url)
    conn = db.connect(database_url)
    try:
        unbound = doctor.check_host(conn, None)
        right = doctor.check_host(conn, bind())
        wrong = doctor.check_host(conn, bind(HOST_STATUS_COLUMN="status"))
    finally:
        conn.close()
    command = cli(database_url, "doctor", **{**POST_MORTEM_SETTINGS, "HOST_STATUS_COLUMN": "x"})

    assert (unbound.status, right.status, wrong.status) == ("ok", "ok", "fail")
    assert wrong.detail == 'HOST_STATUS_COLUMN: public.user_models has no column "status"'
    host_line = next(line for line in command.stdout.splitlines() if " host" in line)
    assert host_line.split()[0] == "fail"
    assert 'HOST_STATUS_COLUMN: public.user_models has no column "x"' in host_line


def test_worker_and_migrate_refuse_a_wrong_binding_with_exit_2(database_url: str) -> None:
    """The worker (at start) and `migrate` (the release phase) exit 2 with one line."""
    create_user_models(database_url)
    env = {
        "DATABASE_URL": database_url,
        "REPLICATE_API_TOKEN": "r8_unused",
        "REPLICATE_API_BASE_URL": "",
        **POST_MORTEM_SETTINGS,
        "HOST_STATUS_COLUMN": "state",
    }
    expected = 'error: HOST_STATUS_COLUMN: public.user_models has no column "state"\n'

    worker = run_cli("worker", env=env)
    migrate = run_cli("migrate", env=env)

    assert (worker.returncode, worker.stderr) == (2, expected)
    assert migrate.returncode == 2 and migrate.stderr == expected


@pytest.mark.slow
def test_gunicorn_refuses_a_wrong_binding_before_forking(database_url: str) -> None:
    """The Procfile's web line stops in gunicorn's master with exit 2 and one line."""
    create_user_models(database_url)
    settings = {**POST_MORTEM_SETTINGS, "HOST_TABLE": "public.user_modelz"}
    env = web_env(
        DATABASE_URL=database_url,
        REPLICATE_WEBHOOK_SECRET=SECRET,
        PORT=str(free_port()),
        WEB_CONCURRENCY="1",
        **settings,
    )

    web, output = run_web_to_exit(env)

    assert web.returncode == 2
    assert (
        "webhook-sync web: HOST_TABLE: public.user_modelz does not exist (or is not a table)"
        in web.stderr
    )
    assert "Traceback" not in output


def test_a_binding_wrong_in_itself_also_exits_2(database_url: str) -> None:
    """HOST_* settings that cannot be a binding (no training id column) stop a command
    with exit 2 and one line, before the database is asked."""
    env = {"DATABASE_URL": database_url, "HOST_TABLE": "public.user_models"}

    result = run_cli("migrate", env=env)

    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid configuration: HOST_TRAINING_ID_COLUMN:")
    assert result.stderr.count("\n") == 1


def test_a_permission_lost_at_run_time_is_a_refusal(database_url: str, reader_url: str) -> None:
    """A role that may write our tables but, since start, not the host's: the change is
    refused as a whole (insufficient_privilege), ours not written."""
    create_user_models(database_url)
    role = urlsplit(reader_url).username
    execute(
        database_url,
        f"GRANT USAGE ON SCHEMA webhook_sync TO {role}",
        f"GRANT ALL ON ALL TABLES IN SCHEMA webhook_sync TO {role}",
        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA webhook_sync TO {role}",
        f"GRANT SELECT ON public.user_models TO {role}",
    )
    conn = db.connect(reader_url, host=bind())
    try:
        with conn:
            service.track_training(conn, TID, USER)
        with pytest.raises(errors.HostTableRefusedError) as refused, conn:
            service.apply_update(conn, parse_training(training_payload(TID, "failed")), "poll")
        row = db.select_training(conn, TID)
    finally:
        conn.close()

    assert str(refused.value) == (
        "host table public.user_models refused the write: insufficient_privilege"
    )
    assert row["training_status"] == "training"
