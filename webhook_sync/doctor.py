"""`webhook-sync doctor`: check the configuration, the database, Replicate, the inbox, the
platform's bound table (HOST_*) and the notification endpoints.

Each check gives `ok`, `warn` (worth a look, not broken), `fail` (broken) or `skip` (a
check it depends on failed). Nothing is written anywhere, and no secret or token is ever
part of a detail: secrets are named by their position in REPLICATE_WEBHOOK_SECRET.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import requests

from webhook_sync import config as config_module
from webhook_sync import db, errors, heartbeat, host, migrations, outbox, replicate
from webhook_sync.host_binding import HostBinding
from webhook_sync.vocabulary import Outcome

OK = "ok"
WARN = "warn"
FAIL = "fail"
SKIP = "skip"
DEFAULT_CLOCK_TOLERANCE = timedelta(seconds=5)
DEFAULT_HTTP_TIMEOUT = 10.0


@dataclass(frozen=True)
class Check:
    """The result of one check: its name, ok/warn/fail/skip and a short detail for people."""

    name: str
    status: str
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return asdict(self)


def run_checks(
    environ: Mapping[str, str],
    *,
    clock_tolerance: timedelta = DEFAULT_CLOCK_TOLERANCE,
    http_timeout: float = DEFAULT_HTTP_TIMEOUT,
) -> list[Check]:
    """Run every check in order; reads the database and calls Replicate, writes nothing."""
    checks: list[Check] = []
    try:
        config = config_module.Config.from_env(environ)
    except errors.ConfigError as exc:
        checks.append(Check("configuration", FAIL, str(exc)))
        config = None
    else:
        checks.append(check_configuration(config))
    checks.extend(_database_checks(config, clock_tolerance))
    checks.extend(_replicate_checks(config, http_timeout))
    checks.extend(_notify_checks(config, http_timeout))
    return checks


def failed(checks: list[Check]) -> bool:
    """True when any check failed."""
    return any(check.status == FAIL for check in checks)


def check_configuration(config: config_module.Config) -> Check:
    """Every setting the processes need is present (the token alone also signs webhooks:
    the web process then fetches the account's secret with it)."""
    missing = [
        name
        for name, value in (
            ("DATABASE_URL", config.database_url),
            ("REPLICATE_API_TOKEN", config.api_token),
            ("REPLICATE_WEBHOOK_SECRET", config.webhook_secrets or config.api_token),
        )
        if not value
    ]
    if missing:
        return Check("configuration", FAIL, "not set: " + ", ".join(missing))
    secrets = (
        f"{len(config.webhook_secrets)} webhook secret(s)"
        if config.webhook_secrets
        else "webhook secret fetched from Replicate"
    )
    return Check("configuration", OK, f"complete ({secrets}, API {config.api_base_url})")


def _database_checks(
    config: config_module.Config | None, clock_tolerance: timedelta
) -> list[Check]:
    names = ("database", "clock", "stuck trainings", "inbox", "worker", "host")
    if config is None or not config.database_url:
        return [Check(name, SKIP, "DATABASE_URL is not set") for name in names]
    try:
        conn = _connect(config.database_url, config)
    except (errors.DatabaseUnavailableError, errors.ConfigError) as exc:
        unreachable = (Check(name, SKIP, "the database is unreachable") for name in names[1:])
        return [Check("database", FAIL, str(exc)), *unreachable]
    try:
        with conn:
            pending = migrations.pending_migrations(conn)
        applied = len(migrations.list_migrations()) - len(pending)
        schema = f"schema {config.database_schema}"
        if pending:
            database = Check(
                "database",
                FAIL,
                f"reachable, but {len(pending)} migration(s) pending in {schema}: "
                + ", ".join(m.name for m in pending)
                + " (run: webhook-sync migrate)",
            )
        else:
            database = Check(
                "database", OK, f"reachable, {schema}, {applied} migration(s), all applied"
            )
        checks = [database, check_clock(conn, clock_tolerance)]
        if pending:
            return [*checks, *(Check(name, SKIP, "migrations pending") for name in names[2:])]
        stuck_after = timedelta(seconds=config.stuck_after_seconds)
        return [
            *checks,
            check_stuck_trainings(conn, stuck_after),
            check_inbox(conn),
            check_worker(conn, config.poll_interval_seconds),
            check_host(conn, config.host_binding),
        ]
    finally:
        conn.close()


def _connect(url: str, config: config_module.Config) -> db.Connection:
    return db.connect(
        url, "webhook-sync doctor", config.statement_timeout_ms, schema=config.database_schema
    )


def check_clock(
    conn: db.Connection, tolerance: timedelta, clock: Callable[[], float] = time.time
) -> Check:
    """This machine's clock agrees with the database's within `tolerance`."""
    with conn:
        before = clock()
        db_now = db.select_clock(conn)
        after = clock()
    local_now = datetime.fromtimestamp((before + after) / 2, UTC)
    skew = (db_now - local_now).total_seconds()
    # The round trip bounds how precisely the two clocks can be compared.
    allowed = tolerance.total_seconds() + (after - before) / 2
    detail = f"{abs(skew):.3f}s {'behind' if skew < 0 else 'ahead of'} this machine"
    if abs(skew) > allowed:
        return Check(
            "clock",
            FAIL,
            f"the database clock is {detail} (tolerance {tolerance.total_seconds():g}s)",
        )
    return Check("clock", OK, f"the database clock is {detail}")


def check_stuck_trainings(conn: db.Connection, stuck_after: timedelta) -> Check:
    """Count trainings still `training` past STUCK_AFTER_SECONDS (a warning, not a failure)."""
    with conn:
        count = db.count_stuck_trainings(conn, db.select_now(conn) - stuck_after)
    hours = stuck_after.total_seconds() / 3600
    if count:
        return Check(
            "stuck trainings",
            WARN,
            f"{count} training(s) still `training` after {hours:g}h (webhook-sync status --stuck)",
        )
    return Check("stuck trainings", OK, f"none still `training` after {hours:g}h")


def check_inbox(conn: db.Connection) -> Check:
    """Count failed and pending inbox events (a warning when any failed)."""
    with conn:
        counts = db.count_events_by_outcome(conn)
    failures = counts.get(Outcome.FAILED, 0)
    pending = counts.get(Outcome.PENDING, 0)
    detail = (
        f"{sum(counts.values())} event(s), {failures} failed, {pending} pending"
        " (waiting for their training to be tracked)"
    )
    if failures:
        return Check(
            "inbox", WARN, detail + "; see webhook-sync events --outcome failed, replay --failed"
        )
    return Check("inbox", OK, detail)


def check_worker(conn: db.Connection, interval_seconds: float) -> Check:
    """Some worker finished a sweep within two POLL_INTERVAL_SECONDS (its heartbeat); a
    warning while a worker's sweeps fail."""
    limit = 2 * interval_seconds
    with conn:
        latest = heartbeat.select_latest_sweep(conn)
        failing = heartbeat.count_failing_workers(conn, limit)
    if latest is None:
        return Check(
            "worker",
            FAIL,
            "no worker has finished a sweep yet: is `webhook-sync worker` running?",
        )
    age = latest["age_seconds"]
    summary = latest["summary"] or {}
    detail = (
        f"last sweep finished {age:.0f}s ago by {latest['worker']}"
        f" (checked {summary.get('checked', '?')}, repaired {summary.get('repaired', '?')})"
    )
    if age > limit:
        return Check(
            "worker",
            FAIL,
            f"{detail}: more than two intervals (2 × POLL_INTERVAL_SECONDS = {limit:g}s);"
            " is `webhook-sync worker` running?",
        )
    if failing:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(failing.items()))
        return Check("worker", WARN, f"{detail}; sweeps failing now: {kinds}")
    return Check("worker", OK, detail)


def check_host(conn: db.Connection, binding: HostBinding | None) -> Check:
    """The HOST_* binding against the database: the table and columns exist, their types
    take what the mirror writes, the role may SELECT and UPDATE them (reads only)."""
    if binding is None:
        return Check("host", OK, "no platform table bound (HOST_TABLE is not set)")
    problems = host.check_binding(conn, binding)
    if problems:
        return Check("host", FAIL, "; ".join(problems))
    return Check(
        "host", OK, f"{binding.qualified_table} takes every status change (SELECT and UPDATE)"
    )


def _replicate_checks(config: config_module.Config | None, http_timeout: float) -> list[Check]:
    if config is None or not config.api_token:
        reason = "REPLICATE_API_TOKEN is not set"
        return [Check("replicate token", SKIP, reason), Check("webhook secret", SKIP, reason)]
    client = replicate.ReplicateClient.from_config(
        config, max_attempts=1, connect_timeout=http_timeout, read_timeout=http_timeout
    )
    try:
        # The secret endpoint needs the token too, so one call answers both checks.
        remote = client.get_webhook_secret()
    except errors.ReplicateAuthError as exc:
        return [
            Check("replicate token", FAIL, str(exc)),
            Check("webhook secret", SKIP, "the token was refused"),
        ]
    except errors.ReplicateError as exc:
        return [
            Check("replicate token", FAIL, f"cannot check it: {exc}"),
            Check("webhook secret", SKIP, "Replicate did not answer"),
        ]
    finally:
        client.close()
    return [
        Check("replicate token", OK, f"accepted by {config.api_base_url}"),
        check_webhook_secret(config.webhook_secrets, remote),
    ]


def check_webhook_secret(configured: tuple[str, ...], remote: str) -> Check:
    """One configured secret equals the one Replicate signs with (neither is ever shown)."""
    if not configured:
        # The web process does the same: it verifies with the secret this call just fetched.
        return Check(
            "webhook secret",
            OK,
            "REPLICATE_WEBHOOK_SECRET is not set: the web process uses the account's secret,"
            " fetched from Replicate with the token",
        )
    remote_bytes = remote.strip().encode()
    # Every position is compared, so timing does not say which one matched.
    matches = [hmac.compare_digest(secret.encode(), remote_bytes) for secret in configured]
    if any(matches):
        position = matches.index(True) + 1
        return Check(
            "webhook secret",
            OK,
            f"secret #{position} of {len(configured)} matches the one Replicate signs with",
        )
    return Check(
        "webhook secret",
        FAIL,
        f"none of the {len(configured)} configured secret(s) matches the one Replicate signs"
        " with: webhooks will be refused (update REPLICATE_WEBHOOK_SECRET)",
    )


def _notify_checks(config: config_module.Config | None, http_timeout: float) -> list[Check]:
    """One check per NOTIFY_URLS endpoint: it answers over HTTP, and is not disabled."""
    if config is None or not config.notify_urls:
        return []
    disabled: dict[str, str] = {}
    if config.database_url:
        try:
            conn = _connect(config.database_url, config)
            try:
                with conn:
                    endpoints = outbox.select_endpoints(conn)
            finally:
                conn.close()
            disabled = {e["url"]: e["disabled_reason"] for e in endpoints if e["disabled_at"]}
        except (errors.DatabaseUnavailableError, psycopg2.Error):
            disabled = {}  # the database checks above already say what is wrong
    return [
        check_notify_endpoint(position, url, disabled.get(url), http_timeout)
        for position, url in enumerate(config.notify_urls, start=1)
    ]


def check_notify_endpoint(
    position: int, url: str, disabled_reason: str | None, http_timeout: float
) -> Check:
    """The endpoint answers an unsigned HEAD (any status but 410: nothing is delivered, so
    a 405 is an answer); a disabled endpoint fails. Shows the URL without credentials or
    query."""
    parts = urlsplit(url)
    # Neither a user:password nor the query (where a token may be) is shown.
    host = parts.hostname or ""
    shown = f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"
    name = f"notify endpoint #{position}"
    if disabled_reason:
        return Check(
            name,
            FAIL,
            f"{shown} is disabled ({disabled_reason}); after fixing it:"
            " webhook-sync notifications retry --dead",
        )
    try:
        response = requests.head(
            url, timeout=(min(3.0, http_timeout), http_timeout), allow_redirects=False
        )
    except requests.RequestException as exc:
        return Check(name, FAIL, f"{shown} does not answer: {type(exc).__name__}")
    response.close()
    if response.status_code == 410:
        return Check(name, FAIL, f"{shown} answers 410 Gone: notifications would disable it")
    return Check(name, OK, f"{shown} answers (HTTP {response.status_code} to HEAD)")
