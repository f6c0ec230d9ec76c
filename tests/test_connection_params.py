"""What a connection is opened with: the URL's own settings and libpq's environment win over
our defaults, and TLS is required only off this machine when nothing says otherwise."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from tests.support import database_url_for
from webhook_sync import db, errors


@pytest.mark.parametrize(
    ("url", "environ", "sslmode"),
    [
        ("postgresql://u@db.example.com/x", {}, "require"),
        ("postgresql://u@db.example.com:5432,replica.example.com/x", {}, "require"),
        ("postgresql://u@localhost,db.example.com/x", {}, "require"),
        ("postgresql://u@127.0.0.1/x", {}, None),
        ("postgresql://u@127.0.0.2/x", {}, None),
        ("postgresql://u@[::1]:5432/x", {}, None),
        ("postgresql://u@localhost/x", {}, None),
        ("postgresql://postgres:@/postgres?host=/tmp/pg", {}, None),
        ("postgresql:///x", {}, None),
        # The URL has no host: libpq takes PGHOST, and so does our judgement.
        ("postgresql:///x", {"PGHOST": "db.example.com"}, "require"),
        ("postgresql:///x", {"PGHOST": "/var/run/postgresql"}, None),
        ("postgresql://u@localhost/x", {"PGHOST": "db.example.com"}, None),
        # Whoever says how to use TLS is obeyed, and never downgraded.
        ("postgres://u@db.example.com/x?sslmode=disable", {}, None),
        ("postgres://u@db.example.com/x?sslmode=verify-full", {}, None),
        ("postgresql://u@db.example.com/x", {"PGSSLMODE": "verify-full"}, None),
        ("postgresql:///x", {"PGHOST": "db.example.com", "PGSSLMODE": "verify-ca"}, None),
        ("postgresql://u@db.example.com/x", {"PGSSLMODE": ""}, "require"),
        ("postgresql:///x?service=prod", {}, None),
    ],
)
def test_tls_is_required_off_box_only_when_nothing_says_otherwise(
    url: str, environ: dict[str, str], sslmode: str | None
) -> None:
    """`require` is added only when neither the URL nor PGSSLMODE sets sslmode and the
    effective host (the URL's, else PGHOST, else the socket) is not this machine."""
    params = db.connection_params(url, "test", environ=environ)

    assert params.get("sslmode") == sslmode


def test_the_process_environment_is_what_counts_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without `environ`, libpq's variables of this process decide: PGSSLMODE=verify-full is
    never downgraded, and a remote PGHOST behind `postgresql:///db` gets `require`."""
    monkeypatch.setenv("PGSSLMODE", "verify-full")
    kept = db.connection_params("postgresql://u@db.example.com/x", "test")
    monkeypatch.delenv("PGSSLMODE")
    monkeypatch.setenv("PGHOST", "db.example.com")
    remote = db.connection_params("postgresql:///x", "test")

    assert "sslmode" not in kept
    assert remote["sslmode"] == "require"


def test_our_defaults_fill_in_and_never_override_the_url() -> None:
    """Timeouts, keepalives and the name are ours only where the URL is silent; `options`
    keeps theirs after ours, so a `-c` of theirs wins."""
    url = (
        "postgresql://u@h/x?application_name=theirs&connect_timeout=7&keepalives_idle=60"
        "&options=-c%20search_path%3Dapp"
    )

    params = db.connection_params(url, "ours", 1234, environ={})
    silent = db.connection_params("postgresql://u@h/x", "ours", 1234, environ={})

    assert "application_name" not in params and "connect_timeout" not in params
    assert "keepalives_idle" not in params and params["keepalives_count"] == 3
    assert params["options"] == "-c statement_timeout=1234 -c search_path=app"
    assert silent["application_name"] == "ours" and silent["connect_timeout"] == 5
    assert silent["options"] == "-c statement_timeout=1234"


def test_libpq_environment_counts_as_theirs() -> None:
    """PGAPPNAME, PGCONNECT_TIMEOUT and PGOPTIONS are kept like the URL's own settings."""
    environ = {"PGAPPNAME": "env-name", "PGCONNECT_TIMEOUT": "9", "PGOPTIONS": "-c work_mem=8MB"}

    params = db.connection_params("postgresql://u@h/x", "ours", 1000, environ=environ)

    assert "application_name" not in params and "connect_timeout" not in params
    assert params["options"] == "-c statement_timeout=1000 -c work_mem=8MB"


def test_a_real_connection_keeps_the_urls_options(database_url: str) -> None:
    """Over a real connection: the URL's application_name, search_path, statement_timeout
    and connect_timeout are what the session has."""
    options = quote("-c search_path=elsewhere,public -c statement_timeout=4321", safe="")
    url = f"{database_url}?application_name=theirs&connect_timeout=7&options={options}"

    conn = db.connect(url, "ours", statement_timeout_ms=1000)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT current_setting('application_name'),"
                " current_setting('search_path'), current_setting('statement_timeout')"
            )
            settings = cur.fetchone()
        connect_timeout = conn.info.dsn_parameters.get("connect_timeout")
    finally:
        conn.close()

    assert settings == ("theirs", "elsewhere,public", "4321ms")
    assert connect_timeout == "7"


def test_a_url_libpq_cannot_read_is_a_config_error_without_the_url(pg_admin_url: str) -> None:
    """A URL that slipped past the settings (an unknown parameter) is refused, unechoed."""
    url = database_url_for(pg_admin_url, "x") + "?bogus_parameter=Kq7vZt9w"

    with pytest.raises(errors.ConfigError) as caught:
        db.connect(url)

    assert "DATABASE_URL" in str(caught.value)
    assert "Kq7vZt9w" not in str(caught.value) and "127.0.0.1" not in str(caught.value)
