"""The worker's ear for new rows: a thread that LISTENs for `training_inserted` (the insert
trigger of 0004) and serves each new training at once.

A platform that inserts into our `trainings` table directly, while a webhook for that
training already waits in the inbox as `pending`, should not wait for the next sweep (up
to POLL_INTERVAL_SECONDS). For each announced id this thread applies the waiting events
(each training in its own short transaction); a row Replicate was never asked about is
made due now, and up to IMMEDIATE_CHECKS of them are leased as a sweep leases them (every
worker hears the NOTIFY; only one fetches) and checked at Replicate at once, on the
worker's client (its rate limit shared with the sweep); the rest of a large burst goes
to the next sweep, which reads the list 100 at a time. Rows adopted from
a signed delivery, or from an object discovery or import just fetched, cost no GET. A
missed notification (the connection dropped) loses nothing: the sweep applies pending
events of tracked rows every interval.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from contextlib import closing
from datetime import datetime
from typing import Any

import psycopg2
import psycopg2.extensions

from webhook_sync import db, errors, fetching, redaction, registry, service, sweep
from webhook_sync.logs import log_event
from webhook_sync.replicate import ReplicateClient
from webhook_sync.vocabulary import AppStatus, Source

# A burst of inserts is gathered this long into one batch.
GATHER_SECONDS = 0.05
# Checked at Replicate by id at once; more than this is the sweep's (the list walk).
IMMEDIATE_CHECKS = 20
RECONNECT_CAP_SECONDS = 30.0
# How long the worker waits for this thread at shutdown (it checks `stop` twice a second).
STOP_SECONDS = 2.0
_WAIT_SECONDS = 0.5


class InsertListener:
    """One LISTEN connection and the thread that serves what it hears."""

    def __init__(
        self,
        connect: Callable[[], db.Connection],
        client: ReplicateClient | None,
        settings: sweep.SweepSettings,
        stop: threading.Event,
    ) -> None:
        self.connect = connect
        self.client = client
        self.settings = settings
        self.stop = stop
        self.listening = threading.Event()
        self.served = 0
        self.owner = sweep.new_owner()
        self._thread = threading.Thread(target=self.run, name="insert-listener", daemon=True)

    def start(self) -> InsertListener:
        """Start the thread; it runs until `stop` is set."""
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the thread to end (after `stop`)."""
        self._thread.join(timeout)

    def run(self) -> None:
        """Listen and serve until stopped, reconnecting with backoff; never raises."""
        delay = 1.0
        while not self.stop.is_set():
            try:
                self._listen()
                delay = 1.0
            except Exception as exc:  # the thread's edge: log, wait, listen again
                self.listening.clear()
                log_event(
                    "insert_listener_failed",
                    logging.WARNING,
                    error=redaction.describe_error(exc),
                    retry_in=delay,
                )
                self.stop.wait(delay)
                delay = min(RECONNECT_CAP_SECONDS, delay * 2)

    def _listen(self) -> None:
        listener = self.connect()
        worker = self.connect()
        try:
            listener.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
            registry.listen_for_inserts(listener)
            self.listening.set()
            log_event("insert_listener_listening", channel=registry.insert_channel(listener.schema))
            # Rows inserted while nobody listened are served by the sweep.
            while not self.stop.is_set():
                ids = _gather(listener)
                if ids:
                    self.serve(worker, ids)
        finally:
            listener.close()
            worker.close()

    def serve(self, conn: db.Connection, training_ids: list[str]) -> None:
        """Apply the events waiting for these new rows; make those that Replicate has not
        been asked about due now and check the first IMMEDIATE_CHECKS of them at once
        (commits per training)."""
        started = time.monotonic()
        applied: set[str] = set()
        for training_id in training_ids:
            with conn:
                if service.apply_pending_events(conn, [training_id]):
                    applied.add(training_id)
        with conn:
            rows = db.select_trainings(conn, training_ids, limit=len(training_ids))
            unchecked = [row["id"] for row in rows if needs_check(row, row["id"] in applied)]
            registry.update_due_now(conn, unchecked)
        checked = 0
        if self.client is not None and unchecked and not self.stop.is_set():
            try:
                checked = self.check(conn, self.client, unchecked)
            except errors.ReplicateError as exc:
                log_event("insert_check_failed", logging.WARNING, error=str(exc))
        self.served += len(training_ids)
        log_event(
            "trainings_inserted",
            count=len(training_ids),
            pending_applied=len(applied),
            checked=checked,
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    def check(self, conn: db.Connection, client: ReplicateClient, training_ids: list[str]) -> int:
        """Lease up to IMMEDIATE_CHECKS of these rows as a sweep does (so no other worker,
        woken by the same NOTIFY, fetches them too), GET them and apply what Replicate says;
        return how many were applied. A failed GET hands its lease back: the row stays due
        for the next sweep, which retries with backoff."""
        with conn:
            now = db.select_now(conn)
            claimed = db.claim_due_trainings(
                conn,
                owner=self.owner,
                lease_seconds=self.settings.lease_seconds,
                due_before=now,
                limit=IMMEDIATE_CHECKS,
                ids=training_ids,
            )
        next_check_at = now + self.settings.interval
        ids = [row["id"] for row in claimed]
        applied = 0
        fetched = fetching.fetch_all(client, ids, self.settings.concurrency, self.stop)
        try:
            with closing(fetched):
                for training_id, obj, failure in fetched:
                    if failure is None:
                        applied += self._apply(conn, training_id, obj, next_check_at)
        finally:
            with conn:
                db.release_leases(conn, self.owner, ids)
        return applied

    def _apply(
        self, conn: db.Connection, training_id: str, obj: Any, next_check_at: datetime
    ) -> int:
        try:
            training = fetching.parse_for(training_id, obj)
        except errors.InvalidTrainingError:
            return 0  # the sweep's check records it
        with conn:
            service.apply_check(conn, training, next_check_at=next_check_at, lease_owner=self.owner)
        return 1


def needs_check(row: db.Row, had_pending: bool) -> bool:
    """Whether a new row is worth a GET now: still in `training`, never checked, and known
    only from its INSERT or from webhooks that waited. Rows adopted from a fresh signed
    delivery, or from an object discovery or import just fetched, are not (each adoption
    inserts a row too, and would otherwise cost a second GET)."""
    if row["training_status"] != AppStatus.TRAINING or row["last_checked_at"] is not None:
        return False
    return had_pending or row["updated_by"] == Source.TRACK


def _gather(listener: db.Connection) -> list[str]:
    """The ids announced within one wait (and a short gathering after the first)."""
    if not select.select([listener], [], [], _WAIT_SECONDS)[0]:
        return []
    deadline = time.monotonic() + GATHER_SECONDS
    ids: dict[str, None] = {}
    while True:
        listener.poll()
        while listener.notifies:
            ids[listener.notifies.pop(0).payload] = None
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([listener], [], [], remaining)[0]:
            return list(ids)
