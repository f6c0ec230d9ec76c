"""gunicorn settings for the web process; the Procfile's `web:` line names this module.

Read in the gunicorn master before any worker starts: it refuses to start without the
settings the web process needs, and it sets PROMETHEUS_MULTIPROC_DIR before anything
imports prometheus_client, so that every worker's metrics land in one place.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from typing import Any

from webhook_sync import capacity, errors
from webhook_sync.config import Config

_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_created_metrics_dir: str | None = None
if not os.environ.get(_MULTIPROC_ENV):
    _created_metrics_dir = tempfile.mkdtemp(prefix="webhook-sync-metrics-")
    os.environ[_MULTIPROC_ENV] = _created_metrics_dir

# Imported only now: prometheus_client chooses its multi-process storage at import time.
from webhook_sync import metrics, web  # noqa: E402

try:
    _config = Config.from_env(os.environ)
    web.check_config(_config)
    capacity.check_fits(_config, capacity.WEB)
except errors.ConfigError as exc:
    if _created_metrics_dir:
        shutil.rmtree(_created_metrics_dir, ignore_errors=True)
    sys.exit(f"webhook-sync web: {exc}")

bind = [f"0.0.0.0:{_config.port}"]
workers = _config.web_concurrency
# Threads share a worker's connection pool; one connection per thread means a request
# never waits for a connection in normal operation.
worker_class = "gthread"
threads = _config.db_pool_max
# Heroku ends a request at 30 s and a stopping dyno at 30 s: answer and leave before that.
timeout = 25
graceful_timeout = 20
keepalive = 5
accesslog = "-"
errorlog = "-"
# The default control socket (~/.gunicorn/gunicorn.ctl) is shared by every gunicorn of the
# same user, so two web processes on one machine would fight over it; nothing here uses it.
control_socket_disable = True


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live metric files (gunicorn hook, runs in the master)."""
    metrics.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """Remove the metrics folder this config created (gunicorn hook, runs in the master)."""
    if _created_metrics_dir and os.environ.get(_MULTIPROC_ENV) == _created_metrics_dir:
        shutil.rmtree(_created_metrics_dir, ignore_errors=True)
