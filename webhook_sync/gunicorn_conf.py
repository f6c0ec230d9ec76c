"""gunicorn settings for the web process; the Procfile's `web:` line names this module.

Read in the gunicorn master before any worker starts: it refuses to start without the
settings the web process needs, and it sets PROMETHEUS_MULTIPROC_DIR before anything
imports prometheus_client, so that every worker's metrics land in one place.

Workers are gevent's: each connection is a greenlet, so a client that sends its request
slowly, or never finishes it, holds a greenlet (a few KiB) rather than one of a handful of
threads, and the service stays responsive without a buffering proxy in front. psycopg2
waits through gevent's hub (`wait_cooperatively`), so a query yields to other requests.
The master imports neither the web app nor `requests`: gevent patches the standard
library when a worker starts, and urllib3 imported before that would keep the unpatched
`ssl.SSLContext` (HTTPS to Replicate then fails with RecursionError).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import gevent
import gevent.socket
import psycopg2
from gevent import monkey
from psycopg2 import extensions

from webhook_sync import capacity, errors, host
from webhook_sync.config import Config

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_created_metrics_dir: str | None = None
if not os.environ.get(_MULTIPROC_ENV):
    _created_metrics_dir = tempfile.mkdtemp(prefix="webhook-sync-metrics-")
    os.environ[_MULTIPROC_ENV] = _created_metrics_dir

# Imported only now: prometheus_client chooses its multi-process storage at import time.
from webhook_sync import metrics, signing_secret  # noqa: E402

try:
    _config = Config.from_env(os.environ)
    _config.require_database_url()
    signing_secret.check_settings(_config)
    capacity.check_fits(_config, capacity.WEB)
    # Once, here, before any worker forks: a binding the database does not take stops the
    # whole web process, not each worker in turn (gunicorn would restart those forever).
    host.check_at_start(_config, "web")
except errors.ConfigError as exc:
    if _created_metrics_dir:
        shutil.rmtree(_created_metrics_dir, ignore_errors=True)
    print(f"webhook-sync web: {exc}", file=sys.stderr)
    # 2 for a wrong HOST_* binding, as the CLI exits; 1 for any other setting.
    sys.exit(2 if isinstance(exc, errors.HostBindingError) else 1)

bind = [f"0.0.0.0:{_config.port}"]
workers = _config.web_concurrency
worker_class = "gevent"
# Greenlets per worker: open connections (slow or idle ones included) past this many wait
# in the listen backlog. Requests share the worker's DB_POOL_MAX connections, waiting at
# most a second for one (then 503).
worker_connections = 1000
# Used only when the worker class is overridden to gthread (the benchmark compares both):
# one connection per thread.
threads = _config.db_pool_max
# Heroku ends a request at 30 s and a stopping dyno at 30 s: answer and leave before that.
timeout = 25
graceful_timeout = 20
keepalive = 5
# No access log: the app writes one structured line per delivery (`webhook_delivery`), and
# gunicorn's Apache-format line would be a second, unstructured one for the same request.
accesslog = None
errorlog = "-"
# The default control socket (~/.gunicorn/gunicorn.ctl) is shared by every gunicorn of the
# same user, so two web processes on one machine would fight over it; nothing here uses it.
control_socket_disable = True


# What the master sends a worker to stop it (TERM graceful, QUIT and INT quick).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT)


def post_fork(server: Any, worker: Any) -> None:
    """Let a stop signal end a worker that is still booting (gunicorn hook: runs in the new
    worker right after the fork).

    Until the worker installs its own handlers (after gevent has patched the standard
    library, ~0.1-0.3 s) it carries the master's, which only queue the signal for a master
    loop the worker never runs: a SIGTERM in that window was lost, and gunicorn waited
    graceful_timeout before killing the worker, so a stop right after a start took 20 s.
    The worker serves nothing before its own handlers replace these."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _exit_booting_worker)


def _exit_booting_worker(signum: int, frame: Any) -> None:
    sys.exit(0)


def post_worker_init(worker: Any) -> None:
    """Let psycopg2 wait through gevent's hub, in a worker that gevent patched (gunicorn
    hook: runs in each worker after the patch and the app's load, before any request)."""
    if monkey.is_module_patched("socket"):
        extensions.set_wait_callback(wait_cooperatively)


def wait_cooperatively(conn: Any) -> None:
    """psycopg2's wait callback in a gevent worker: wait for the connection's socket through
    the hub, so other greenlets run meanwhile.

    libpq ignores `connect_timeout` in this non-blocking mode, so it is enforced here: a
    database that accepts the connection but never answers would otherwise hold a greenlet
    and a pool slot for good. Queries are bounded by statement_timeout and keepalives.
    """
    deadline = None
    if conn.status == extensions.STATUS_SETUP:
        # Left out of the connection string (db.connection_params leaves it to libpq's
        # environment variable when that is set), it is PGCONNECT_TIMEOUT's.
        seconds = extensions.parse_dsn(conn.dsn).get("connect_timeout") or os.environ.get(
            "PGCONNECT_TIMEOUT", ""
        )
        if seconds.strip().isdigit() and int(seconds) > 0:
            deadline = time.monotonic() + int(seconds)
    expired = psycopg2.OperationalError("timeout expired")
    while True:
        state = conn.poll()
        if state == extensions.POLL_OK:
            return
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise expired
        if state == extensions.POLL_READ:
            gevent.socket.wait_read(conn.fileno(), timeout=remaining, timeout_exc=expired)
        elif state == extensions.POLL_WRITE:
            gevent.socket.wait_write(conn.fileno(), timeout=remaining, timeout_exc=expired)
        else:
            raise psycopg2.OperationalError(f"unexpected result from poll: {state!r}")


def post_request(worker: Any, req: Any, environ: dict[str, Any], resp: Any) -> None:
    """Let the worker's other connections have a turn after each request (gunicorn hook,
    runs in the worker): greenlets are never preempted, and a keep-alive client whose next
    request has already arrived would be served again and again before any other runs."""
    if monkey.is_module_patched("socket"):
        gevent.sleep(0)


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live metric files (gunicorn hook, runs in the master)."""
    metrics.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """Remove the metrics folder this config created (gunicorn hook, runs in the master)."""
    if _created_metrics_dir and os.environ.get(_MULTIPROC_ENV) == _created_metrics_dir:
        shutil.rmtree(_created_metrics_dir, ignore_errors=True)
