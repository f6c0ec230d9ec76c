"""Whether a process's database connections fit the server: read at start, so that a
configuration that can never fit (more connections than PostgreSQL, the role or the
database allows) is refused at once instead of failing under load.

What each process holds at most (docs/deploy.md, "Scaling out"):
- a `web` process: WEB_CONCURRENCY gunicorn workers × (DB_POOL_MAX pooled connections
  + 1 for the shared Replicate budget while it fetches the signing secret);
- a `worker`: one for its sweeps and jobs, 1 for the shared Replicate budget, 2 for the
  insert listener, and 2 for the notifier with NOTIFY_URLS (else 1, briefly, at start).
The whole deployment needs N × web + M × worker + 2 (the release phase, or a CLI command)
within the usable connections; each process checks its own share against the limits, and
warns when the connections free right now are fewer than it may open.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg2

from webhook_sync import db, errors
from webhook_sync.config import Config
from webhook_sync.logs import log_event

WEB = "web"
WORKER = "worker"
# What a worker holds at once, by the code that opens it (tests/test_worker.py counts them
# in a running worker): its sweep (worker.py; the daily prune takes the same lock, never
# beside it), the shared Replicate budget (budget.py; one for the sweep and the listener),
# the insert listener (wakeup.py: its LISTEN and the connection it serves new rows on).
_WORKER_PARTS = (("its sweep", 1), ("the Replicate budget", 1), ("the insert listener", 2))
# With NOTIFY_URLS, the notifier (notifier.py: its claims and its LISTEN); without, the
# one-off job at start that marks the endpoints unconfigured, beside the first sweep.
NOTIFIER_CONNECTIONS = 2
ENDPOINT_SYNC_CONNECTIONS = 1

_SELECT_LIMITS = (
    "SELECT current_setting('max_connections')::int,"
    " current_setting('superuser_reserved_connections')::int"
    "  + COALESCE(current_setting('reserved_connections', true)::int, 0),"
    " (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user),"
    " (SELECT datconnlimit FROM pg_database WHERE datname = current_database()),"
    " (SELECT count(*) FROM pg_stat_activity"
    "  WHERE backend_type = 'client backend' AND pid <> pg_backend_pid())"
)


@dataclass(frozen=True)
class Limits:
    """The server's connection limits as this role sees them, and what is in use now."""

    max_connections: int
    reserved: int
    role_limit: int | None
    database_limit: int | None
    in_use: int

    @property
    def usable(self) -> int:
        """Connections an ordinary role may ever hold: the smallest limit that applies."""
        limits = [self.max_connections - self.reserved]
        limits += [limit for limit in (self.role_limit, self.database_limit) if limit is not None]
        return max(0, min(limits))

    @property
    def free(self) -> int:
        """Connections free right now (others' use counted against the server's limit)."""
        return max(0, self.usable - self.in_use)


def process_connections(config: Config, role: str) -> int:
    """The most connections one `web` or `worker` process opens with these settings."""
    if role == WEB:
        return config.web_concurrency * (config.db_pool_max + 1)
    return sum(count for _, count in _worker_parts(config))


def _worker_parts(config: Config) -> tuple[tuple[str, int], ...]:
    if config.notify_urls:
        return (*_WORKER_PARTS, ("the notifier", NOTIFIER_CONNECTIONS))
    return (*_WORKER_PARTS, ("the endpoint sync at start", ENDPOINT_SYNC_CONNECTIONS))


def read_limits(conn: db.Connection) -> Limits:
    """Read max_connections, the reserved slots, the role's and the database's limits
    (-1, unlimited, becomes None) and the client connections open now besides this one."""
    with conn.cursor() as cur:
        cur.execute(_SELECT_LIMITS)
        max_connections, reserved, role_limit, database_limit, in_use = cur.fetchone()
    return Limits(
        max_connections=max_connections,
        reserved=reserved,
        role_limit=None if role_limit is None or role_limit < 0 else role_limit,
        database_limit=None if database_limit is None or database_limit < 0 else database_limit,
        in_use=in_use,
    )


def check_fits(config: Config, role: str) -> Limits | None:
    """Raise ConfigError when this process alone needs more connections than the server
    allows; log a warning when fewer are free now. A database that cannot be reached is
    not judged here (the process reports it as it runs): None."""
    needed = process_connections(config, role)
    try:
        conn = db.connect(config.require_database_url(), f"webhook-sync {role} check")
    except errors.DatabaseUnavailableError as exc:
        log_event("connections_not_checked", logging.WARNING, role=role, error=str(exc))
        return None
    try:
        with conn:
            limits = read_limits(conn)
    except psycopg2.Error as exc:
        log_event("connections_not_checked", logging.WARNING, role=role, error=db.first_line(exc))
        return None
    finally:
        conn.close()
    if needed > limits.usable:
        raise errors.ConfigError(
            f"a {role} process may open {needed} database connections"
            f" ({_formula(config, role)}), but this role may hold at most {limits.usable}"
            f" (max_connections {limits.max_connections} less {limits.reserved} reserved"
            f"{_named_limits(limits)}); {_advice(role)} (docs/deploy.md, Scaling out)"
        )
    if needed > limits.free:
        log_event(
            "connections_short",
            logging.WARNING,
            role=role,
            needed=needed,
            free=limits.free,
            usable=limits.usable,
        )
    return limits


def _formula(config: Config, role: str) -> str:
    if role == WEB:
        return (
            f"WEB_CONCURRENCY {config.web_concurrency} × (DB_POOL_MAX {config.db_pool_max}"
            " + 1 for the Replicate budget)"
        )
    return " + ".join(f"{part} {count}" for part, count in _worker_parts(config))


def _advice(role: str) -> str:
    if role == WEB:
        return "lower WEB_CONCURRENCY or DB_POOL_MAX, or raise the limit"
    return "raise the limit"


def _named_limits(limits: Limits) -> str:
    parts = []
    if limits.role_limit is not None:
        parts.append(f"the role's limit {limits.role_limit}")
    if limits.database_limit is not None:
        parts.append(f"the database's limit {limits.database_limit}")
    return "; " + ", ".join(parts) if parts else ""
