"""The worker process: an APScheduler BlockingScheduler that sweeps at start and every
POLL_INTERVAL_SECONDS, prunes the inbox daily, and stops cleanly on SIGTERM or SIGINT.
With NOTIFY_URLS set, a thread of its own delivers the outbox (`notifier`), never
waiting behind a sweep, and stops with the same event.

A stop request sets one event that the scheduler, the running sweep and the Replicate
client all watch: no new sweep starts, queued GETs are cancelled, retry waits end, the
GETs in flight finish (at most the read timeout) and the leases of unchecked rows are
handed back, well within SHUTDOWN_BUDGET_SECONDS; then the process exits 0. A job still
blocked at the budget (a row lock, a slow database) is abandoned and the process exits 0
anyway, like a SIGKILL, which loses nothing either: its leases expire and the next sweep
of any worker takes over.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from types import FrameType

import prometheus_client
from apscheduler.schedulers.blocking import BlockingScheduler

from webhook_sync import (
    capacity,
    db,
    errors,
    heartbeat,
    host,
    notifier,
    operations,
    outbox,
    redaction,
    sweep,
    wakeup,
)
from webhook_sync.config import Config
from webhook_sync.logs import log_event
from webhook_sync.replicate import ReplicateClient

SHUTDOWN_BUDGET_SECONDS = 20
# A sweep that starts a little late is still worth running; one that missed by more than
# this is skipped for the next (coalesce makes several missed runs one).
MIN_MISFIRE_GRACE_SECONDS = 60
PRUNE_EVERY = timedelta(days=1)
PRUNE_FIRST_AFTER = timedelta(minutes=5)


class Worker:
    """One worker process: its scheduler, its Replicate client and its stop event."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.database_url = config.require_database_url()
        self.settings = sweep.SweepSettings.from_config(config)
        self.stop = threading.Event()
        self.client = ReplicateClient.from_config(config, stop=self.stop)
        self.scheduler = BlockingScheduler(
            timezone=UTC,
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": max(MIN_MISFIRE_GRACE_SECONDS, config.poll_interval_seconds),
            },
        )
        # Held while a job runs, so that shutdown can wait for it.
        self._busy = threading.Lock()
        self._last_auth_error: str | None = None
        # The heartbeat's row: DYNO on a platform, else host:pid.
        self.name = heartbeat.worker_name()

    def run(self) -> int:
        """Install the signal handlers, schedule the jobs and block until stopped; return 0."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        now = datetime.now(UTC)
        self.scheduler.add_job(
            self.sweep_once,
            "interval",
            seconds=self.config.poll_interval_seconds,
            next_run_time=now,
            id="sweep",
        )
        self.scheduler.add_job(
            self.prune_once,
            "interval",
            seconds=PRUNE_EVERY.total_seconds(),
            next_run_time=now + PRUNE_FIRST_AFTER,
            id="prune",
        )
        notifier_thread = self._start_notifier()
        log_event(
            "worker_started",
            interval_seconds=self.config.poll_interval_seconds,
            concurrency=self.settings.concurrency,
            lease_seconds=self.settings.lease_seconds,
            max_rps=self.config.max_rps,
        )
        # New rows (a platform's own INSERT) are served at once, not at the next sweep.
        listener = wakeup.InsertListener(self._connect, self.client, self.settings, self.stop)
        listener.start()
        if not self.stop.is_set():
            self.scheduler.start()
        deadline = time.monotonic() + SHUTDOWN_BUDGET_SECONDS
        listener.join(timeout=wakeup.STOP_SECONDS)
        finished = self._busy.acquire(timeout=max(0.0, deadline - time.monotonic()))
        if finished:
            self._busy.release()
        if notifier_thread is not None:
            notifier_thread.join(max(0.0, deadline - time.monotonic()))
            finished = finished and not notifier_thread.is_alive()
        self.client.close()
        log_event("worker_stopped", clean=finished)
        if not finished:
            # The job is still blocked (a row lock, a slow database): waiting for its
            # thread would keep the process past the budget the platform counts on. Its
            # transaction rolls back with the connection and its leases expire.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0

    def _start_notifier(self) -> threading.Thread | None:
        """With NOTIFY_URLS, deliver the outbox on a thread of its own (never behind a
        sweep); without, mark every endpoint unconfigured so the funnel queues nothing."""
        if not self.config.notify_urls:
            self.scheduler.add_job(
                self.unconfigure_notify_endpoints, next_run_time=datetime.now(UTC), id="notify"
            )
            return None
        thread = threading.Thread(
            target=notifier.run_notifier, args=(self.config, self.stop), name="notifier"
        )
        thread.start()
        return thread

    def unconfigure_notify_endpoints(self) -> None:
        """NOTIFY_URLS is empty: no endpoint is configured any more (errors are logged)."""
        try:
            conn = self._connect()
            try:
                with conn:
                    outbox.sync_endpoints(conn, (), ())
            finally:
                conn.close()
        except Exception as exc:  # the process edge: log; the next start tries again
            log_event("notify_sync_failed", logging.ERROR, error=self._describe(exc))

    def request_stop(self, signum: int, _frame: FrameType | None = None) -> None:
        """Signal handler: start no new job and make the running sweep wind down."""
        if self.stop.is_set():
            return
        self.stop.set()
        log_event("worker_stopping", signal=signal.Signals(signum).name)
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def sweep_once(self) -> sweep.SweepResult | None:
        """One scheduled sweep; errors are logged here, at the process edge, never raised."""
        with self._busy:
            if self.stop.is_set():
                return None
            try:
                conn = self._connect()
                try:
                    result = heartbeat.beating(
                        conn,
                        self.name,
                        lambda: sweep.run_sweep(conn, self.client, self.settings, stop=self.stop),
                        sweep.SweepResult.log_fields,
                    )
                finally:
                    conn.close()
            except errors.ReplicateAuthError as exc:
                self._log_auth_error(str(exc))
                return None
            except Exception as exc:  # the process edge: log, and try again next interval
                log_event("sweep_failed", logging.ERROR, error=self._describe(exc))
                return None
            if self._last_auth_error is not None:
                log_event("replicate_auth_recovered")
                self._last_auth_error = None
            return result

    def prune_once(self) -> None:
        """Delete inbox events past EVENT_RETENTION_DAYS and transitions past
        TRANSITION_RETENTION_DAYS; errors are logged, never raised. Each prune is tried
        on its own: one that keeps failing (a lock, a timeout on a large backlog) must not
        leave the other table growing forever."""
        with self._busy:
            if self.stop.is_set():
                return
            config = self.config
            prunes = (
                ("events", operations.prune_events, config.event_retention_days),
                ("transitions", operations.prune_transitions, config.transition_retention_days),
            )
            try:
                conn = self._connect()
            except Exception as exc:  # the process edge: log, and try again tomorrow
                log_event("prune_failed", logging.ERROR, error=self._describe(exc))
                return
            try:
                for rows, prune, days in prunes:
                    try:
                        prune(conn, timedelta(days=days))
                    except Exception as exc:  # the process edge: log, and try again tomorrow
                        log_event(
                            "prune_failed", logging.ERROR, rows=rows, error=self._describe(exc)
                        )
            finally:
                conn.close()

    def _connect(self) -> db.Connection:
        return db.connect(
            self.database_url,
            "webhook-sync worker",
            self.config.statement_timeout_ms,
            schema=self.config.database_schema,
            host=self.config.host_binding,
        )

    def _describe(self, exc: BaseException) -> str:
        """The error for a log line, through the one redactor (no database credentials)."""
        return redaction.describe_error(exc, self.database_url)

    def _log_auth_error(self, message: str) -> None:
        """Log a refused token once, not every interval, until it changes or recovers."""
        if message == self._last_auth_error:
            log_event("sweep_failed", logging.DEBUG, error=message)
            return
        self._last_auth_error = message
        log_event("sweep_failed", logging.ERROR, error=message, repeats="logged once")


def run_worker(config: Config) -> int:
    """Run the worker until SIGTERM or SIGINT; return the exit code (0). ConfigError when
    its connections cannot fit the database's limits, HostBindingError when the database
    does not take its HOST_* binding."""
    capacity.check_fits(config, capacity.WORKER)
    host.check_at_start(config, "worker")
    if config.worker_metrics_port:
        prometheus_client.start_http_server(config.worker_metrics_port)
        log_event("worker_metrics", port=config.worker_metrics_port)
    return Worker(config).run()
