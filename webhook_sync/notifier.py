"""Delivering the outbox: signed Standard Webhooks to the platform's endpoints (NOTIFY_URLS).

One loop per process (a thread of the worker): it claims due notifications with a lease,
hands each to a pool of HTTP threads, and records every answer in a short transaction of
its own, so no transaction is ever open during an HTTP call. It wakes on the funnel's
NOTIFY (sent in the transaction that queued the rows, so it arrives after their commit),
on each finished delivery (the next event of that training may now go), when the next
retry falls due, and every SCAN_SECONDS anyway (a missed NOTIFY, another worker's expired
lease).

2xx is delivered. Anything else, a timeout or a connection error is retried with
exponential backoff and jitter (about 1 s doubling, capped at an hour) until the
notification is older than NOTIFY_MAX_AGE, then it is `dead`. Redirects are not
followed. 410 Gone disables the endpoint. A killed process loses nothing: its leases
expire and the row is sent again, with the same `webhook-id`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg2
import requests

from webhook_sync import db, errors, metrics, outbox, redaction, signing
from webhook_sync.config import Config
from webhook_sync.logs import log_event

CONNECT_TIMEOUT_SECONDS = 3.0
READ_TIMEOUT_SECONDS = 10.0
FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 3600.0
SCAN_SECONDS = 5.0
# The shortest sleep before a retry falls due: no loop spins on a clock's rounding.
MIN_WAIT_SECONDS = 0.01
# After the database fails, the loop reconnects after this long, doubling to the cap.
RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 30.0
USER_AGENT = "webhook-sync-notifier"
_DATABASE_ERRORS = (psycopg2.Error, errors.DatabaseUnavailableError)


@dataclass(frozen=True)
class NotifierSettings:
    """What the delivery loop needs from the settings."""

    urls: tuple[str, ...]
    events: tuple[str, ...]
    signing_key: bytes
    max_age_seconds: float
    concurrency: int = 8
    lease_seconds: float = 60.0
    max_retry_seconds: float = MAX_RETRY_SECONDS

    @classmethod
    def from_config(cls, config: Config) -> NotifierSettings:
        """Sign with the newest secret: the first of NOTIFY_SECRET."""
        if not config.notify_secrets:
            raise errors.ConfigError("NOTIFY_SECRET is not set")
        return cls(
            urls=config.notify_urls,
            events=config.notify_events,
            signing_key=signing.decode_secret(config.notify_secrets[0]),
            max_age_seconds=config.notify_max_age_seconds,
            concurrency=config.notify_concurrency,
            lease_seconds=config.notify_lease_seconds,
            max_retry_seconds=config.notify_max_retry_seconds,
        )


@dataclass(frozen=True)
class Attempt:
    """How one HTTP attempt ended: the status code (None: no answer) and what went wrong."""

    status_code: int | None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        """True on 2xx."""
        return self.status_code is not None and 200 <= self.status_code < 300


def retry_delay(attempts: int, cap: float = MAX_RETRY_SECONDS) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: doubling from about 1 s, with
    jitter so that a fleet's retries spread out, capped at `cap` (an hour)."""
    base = FIRST_RETRY_SECONDS * 2 ** min(max(attempts - 1, 0), 20)
    return min(cap, base * random.uniform(0.8, 1.2))


def body_bytes(payload: Any) -> bytes:
    """The exact body of a notification: its stored JSON, compact (the same on every try)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def signed_headers(
    key: bytes, event_id: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt, signed now."""
    timestamp = int(time.time() if now is None else now)
    return {
        signing.ID_HEADER: event_id,
        signing.TIMESTAMP_HEADER: str(timestamp),
        signing.SIGNATURE_HEADER: signing.sign(key, event_id, timestamp, body),
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }


def post_notification(
    session: requests.Session, url: str, headers: dict[str, str], body: bytes
) -> Attempt:
    """One HTTP attempt, following no redirect and reading no answer body."""
    try:
        response = session.post(
            url,
            data=body,
            headers=headers,
            timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS),
            allow_redirects=False,
            stream=True,
        )
    except requests.Timeout as exc:
        return Attempt(None, f"timeout: {type(exc).__name__}")
    except requests.RequestException as exc:
        return Attempt(None, f"connection error: {type(exc).__name__}")
    response.close()
    if 200 <= response.status_code < 300:
        return Attempt(response.status_code)
    return Attempt(response.status_code, f"HTTP {response.status_code}")


def new_owner() -> str:
    """A lease owner unique to one notifier: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:notify:{uuid.uuid4().hex[:8]}"


class Notifier:
    """The delivery loop of one process; `run` blocks until `stop` is set."""

    def __init__(
        self,
        settings: NotifierSettings,
        connect: Callable[[], db.Connection],
        stop: threading.Event,
    ) -> None:
        self.settings = settings
        self._connect = connect
        self.stop = stop
        self.owner = new_owner()
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="notify")
        self._local = threading.local()
        self._in_flight: dict[Future[Attempt], db.Row] = {}
        # Written to by a finished delivery, so that the loop's select wakes at once.
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._pipe_lock = threading.Lock()
        self._pipe_open = True

    def run(self) -> None:
        """Deliver until `stop`; a database failure is logged and the loop reconnects."""
        log_event(
            "notifier_started",
            endpoints=len(self.settings.urls),
            concurrency=self.settings.concurrency,
            lease_seconds=self.settings.lease_seconds,
        )
        threading.Thread(target=self._wake_on_stop, name="notify-stop", daemon=True).start()
        delay = RECONNECT_FIRST_SECONDS
        try:
            while not self.stop.is_set():
                try:
                    self._serve()
                except Exception as exc:  # the thread's edge: log, reconnect, go on
                    log_event(
                        "notifier_failed",
                        logging.WARNING if isinstance(exc, _DATABASE_ERRORS) else logging.ERROR,
                        error=redaction.describe_error(exc),
                        retry_in=round(delay, 1),
                    )
                    self.stop.wait(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, RECONNECT_MAX_SECONDS)
                else:
                    delay = RECONNECT_FIRST_SECONDS
        finally:
            self._pool.shutdown(wait=True)
            with self._pipe_lock:
                # Under the lock: a late wake-up must never write to a reused descriptor.
                self._pipe_open = False
                os.close(self._wake_read)
                os.close(self._wake_write)
            log_event("notifier_stopped")

    def _serve(self) -> None:
        """One session of the loop on fresh connections: sync the endpoints, listen, deliver."""
        conn = self._connect()
        listener = self._connect()
        try:
            listener.autocommit = True
            outbox.listen(listener)
            with conn:
                outbox.sync_endpoints(conn, self.settings.urls, self.settings.events)
            log_event("notify_endpoints_synced", endpoints=len(self.settings.urls))
            while True:
                self._record_finished(conn)
                if self.stop.is_set():
                    if not self._in_flight:
                        return
                    self._wait(listener, 0.2)
                    continue
                more_due = self._claim(conn)
                if more_due:
                    continue
                self._wait(listener, self._idle_seconds(conn))
        finally:
            conn.close()
            listener.close()

    def _claim(self, conn: db.Connection) -> bool:
        """Claim into the free slots and start their deliveries; True when every free slot
        was filled (more may be due). A claim that came back short found everything due:
        claiming again at once would only repeat the query, and whatever is queued or
        unblocked meanwhile wakes the loop (a NOTIFY, a finished delivery)."""
        free = self.settings.concurrency - len(self._in_flight)
        if free <= 0:
            return False
        with conn:
            rows = outbox.claim_notifications(conn, self.owner, free, self.settings.lease_seconds)
        for row in rows:
            future = self._pool.submit(self._attempt, row)
            self._in_flight[future] = row
            future.add_done_callback(self._wake)
        return len(rows) == free

    def _idle_seconds(self, conn: db.Connection) -> float:
        if len(self._in_flight) >= self.settings.concurrency:
            return SCAN_SECONDS
        with conn:
            due_in = outbox.select_seconds_to_next_attempt(conn)
        if due_in is None:
            return SCAN_SECONDS
        return max(MIN_WAIT_SECONDS, min(SCAN_SECONDS, due_in))

    def _wait(self, listener: db.Connection, timeout: float) -> None:
        """Sleep until a NOTIFY, a finished delivery or `timeout`, and consume the wake-ups."""
        readable, _, _ = select.select([listener, self._wake_read], [], [], timeout)
        if listener in readable:
            listener.poll()
            listener.notifies.clear()
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_read, 4096):
                pass

    def _wake_on_stop(self) -> None:
        """A stop request wakes the loop at once rather than at its next scan."""
        self.stop.wait()
        self._wake(None)

    def _wake(self, _future: Future[Attempt] | None) -> None:
        with self._pipe_lock:
            if self._pipe_open:
                # A full pipe already holds a wake-up.
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_write, b"x")

    def _attempt(self, row: db.Row) -> Attempt:
        """Runs on a pool thread: sign and send one notification; no database here."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        body = body_bytes(row["payload"])
        headers = signed_headers(self.settings.signing_key, row["event_id"], body)
        return post_notification(session, row["url"], headers, body)

    def _record_finished(self, conn: db.Connection) -> None:
        for future in [future for future in self._in_flight if future.done()]:
            row = self._in_flight[future]
            self.record(conn, row, future.result())
            del self._in_flight[future]

    def record(self, conn: db.Connection, row: db.Row, attempt: Attempt) -> None:
        """Store how an attempt ended (its own transaction), count it and log it."""
        fields = {
            "notification_id": row["id"],
            "event_id": row["event_id"],
            "training_id": row["training_id"],
            "event_type": row["event_type"],
            "attempt": row["attempts"],
        }
        if attempt.delivered:
            with conn:
                lag = outbox.mark_delivered(conn, row["id"], attempt.status_code or 0)
            metrics.observe_notification("delivered", row["event_type"], lag)
            log_event("notification_delivered", status=attempt.status_code, lag=lag, **fields)
            return
        error = attempt.error or "failed"
        if attempt.status_code == 410:
            reason = "endpoint answered 410 Gone"
            with conn:
                given_up = outbox.disable_endpoint(conn, row["endpoint_id"], reason)
            metrics.observe_notification("disabled", row["event_type"], None)
            log_event(
                "notify_endpoint_disabled",
                logging.ERROR,
                endpoint_id=row["endpoint_id"],
                given_up=given_up,
                **fields,
            )
            return
        delay = retry_delay(row["attempts"], self.settings.max_retry_seconds)
        with conn:
            status = outbox.mark_failed(
                conn,
                row["id"],
                self.owner,
                status_code=attempt.status_code,
                error=error,
                retry_in_seconds=delay,
                max_age_seconds=self.settings.max_age_seconds,
            )
        result = "dead" if status == "dead" else "retry"
        metrics.observe_notification(result, row["event_type"], None)
        log_event(
            "notification_dead" if result == "dead" else "notification_failed",
            logging.ERROR if result == "dead" else logging.WARNING,
            error=error,
            retry_in=None if result == "dead" else round(delay, 1),
            lease_lost=status is None,
            **fields,
        )


def run_notifier(config: Config, stop: threading.Event) -> None:
    """Deliver notifications until `stop` (blocks); the worker runs this on a thread."""
    settings = NotifierSettings.from_config(config)
    url = config.require_database_url()

    def connect() -> db.Connection:
        return db.connect(
            url,
            "webhook-sync notifier",
            config.statement_timeout_ms,
            schema=config.database_schema,
        )

    Notifier(settings, connect, stop).run()
