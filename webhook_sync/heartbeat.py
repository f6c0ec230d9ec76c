"""The worker's heartbeat in `worker_heartbeats`: when each worker's last sweep started
and finished, its summary, and the error while sweeps fail, so that the web process's
/metrics and `doctor` can tell from the database alone that the worker works (worker
dynos take no inbound traffic). One row per worker, named by DYNO or host:pid; rows
not touched for HEARTBEAT_RETENTION are deleted as others beat.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import psycopg2
import psycopg2.extras

from webhook_sync import db, errors
from webhook_sync.logs import log_event

T = TypeVar("T")
# A worker gone this long (a restarted dyno's old pid) no longer has a row.
HEARTBEAT_RETENTION = timedelta(days=7)
AUTH_FAILURE = "replicate_auth"
OTHER_FAILURE = "error"

_RECORD_STARTED = (
    "INSERT INTO {schema}.worker_heartbeats AS h (worker, sweep_started_at, updated_at)"
    " VALUES (%(worker)s, now(), now())"
    " ON CONFLICT (worker) DO UPDATE SET sweep_started_at = now(), updated_at = now()"
)
_RECORD_FINISHED = (
    "INSERT INTO {schema}.worker_heartbeats AS h"
    " (worker, sweep_started_at, sweep_finished_at, summary, updated_at)"
    " VALUES (%(worker)s, now(), now(), %(summary)s, now())"
    " ON CONFLICT (worker) DO UPDATE SET sweep_finished_at = now(), summary = %(summary)s,"
    " last_error = NULL, last_error_kind = NULL, updated_at = now()"
)
_RECORD_FAILED = (
    "INSERT INTO {schema}.worker_heartbeats AS h"
    " (worker, last_error, last_error_kind, updated_at)"
    " VALUES (%(worker)s, %(error)s, %(kind)s, now())"
    " ON CONFLICT (worker) DO UPDATE SET last_error = %(error)s, last_error_kind = %(kind)s,"
    " updated_at = now()"
)
_DELETE_GONE = (
    "DELETE FROM {schema}.worker_heartbeats"
    " WHERE updated_at < now() - make_interval(secs => %(retention)s)"
)
_SELECT_LATEST = (
    "SELECT worker, sweep_started_at, sweep_finished_at, summary,"
    " EXTRACT(EPOCH FROM clock_timestamp() - sweep_finished_at)::double precision AS age_seconds"
    " FROM {schema}.worker_heartbeats WHERE sweep_finished_at IS NOT NULL"
    " ORDER BY sweep_finished_at DESC LIMIT 1"
)
_COUNT_FAILING = (
    "SELECT last_error_kind, count(*) FROM {schema}.worker_heartbeats"
    " WHERE last_error_kind IS NOT NULL"
    " AND updated_at > now() - make_interval(secs => %(within)s)"
    " GROUP BY last_error_kind"
)


def worker_name() -> str:
    """This worker's name: the platform's DYNO (`worker.1`), else host:pid."""
    return os.environ.get("DYNO") or f"{socket.gethostname()}:{os.getpid()}"


def record_sweep_started(conn: db.Connection, worker: str) -> None:
    """Stamp the start of a sweep (the caller commits)."""
    with conn.cursor() as cur:
        cur.execute(db.render(conn, _RECORD_STARTED), {"worker": worker})


def record_sweep_finished(conn: db.Connection, worker: str, summary: Mapping[str, Any]) -> None:
    """Stamp the end of a sweep with its summary, clear the failure, forget workers gone
    for HEARTBEAT_RETENTION (the caller commits)."""
    with conn.cursor() as cur:
        cur.execute(
            db.render(conn, _RECORD_FINISHED),
            {"worker": worker, "summary": psycopg2.extras.Json(dict(summary), dumps=_dumps)},
        )
        cur.execute(
            db.render(conn, _DELETE_GONE), {"retention": HEARTBEAT_RETENTION.total_seconds()}
        )


def record_sweep_failed(conn: db.Connection, worker: str, error: str, kind: str) -> None:
    """Record why this worker's sweep failed (`replicate_auth` or `error`; the caller
    commits); the last finished sweep stays as it was."""
    with conn.cursor() as cur:
        cur.execute(
            db.render(conn, _RECORD_FAILED),
            {"worker": worker, "error": error[:500], "kind": kind},
        )


def select_latest_sweep(conn: db.Connection) -> db.Row | None:
    """The most recently finished sweep of any worker, with its age by the database clock."""
    found = db.rows(conn, _SELECT_LATEST)
    return found[0] if found else None


def count_failing_workers(conn: db.Connection, within_seconds: float) -> dict[str, int]:
    """Workers whose last sweep failed and that beat within `within_seconds`, by kind."""
    with conn.cursor() as cur:
        cur.execute(db.render(conn, _COUNT_FAILING), {"within": within_seconds})
        return dict(cur.fetchall())


def beating(
    conn: db.Connection, worker: str, run: Callable[[], T], summary: Callable[[T], Any]
) -> T:
    """Run one sweep between its heartbeats: started before, finished (with `summary` of
    the result) after, or the failure's kind when it raised (then re-raised). A heartbeat
    that cannot be written is logged and never stops the sweep."""
    _beat(conn, record_sweep_started, worker)
    try:
        result = run()
    except errors.ReplicateAuthError as exc:
        _beat(conn, record_sweep_failed, worker, str(exc), AUTH_FAILURE)
        raise
    except Exception as exc:  # recorded, then re-raised to the process edge
        _beat(conn, record_sweep_failed, worker, db.first_line(exc), OTHER_FAILURE)
        raise
    _beat(conn, record_sweep_finished, worker, summary(result))
    return result


def _beat(conn: db.Connection, write: Callable[..., None], *args: Any) -> None:
    """One heartbeat in its own transaction (after whatever the sweep left open)."""
    try:
        if conn.closed:
            return
        conn.rollback()
        with conn:
            write(conn, *args)
    except psycopg2.Error as exc:
        log_event("heartbeat_failed", logging.WARNING, error=db.first_line(exc))


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)
