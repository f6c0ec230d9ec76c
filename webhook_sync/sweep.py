"""The sweep: re-check trainings still in `training` against Replicate, safely from many
processes at once; its settings and its result.

When more than LIST_WALK_THRESHOLD rows are due, the sweep first walks `GET /trainings`
(100 per call, newest first, the next page fetched while this one is applied): each
page's due rows are claimed (`FOR UPDATE SKIP LOCKED`) and applied in one transaction, so
one call resolves up to 100 rows and no lease outlives a transaction. Then it claims what
is still due in batches (two rounds of the thread pool, the next claimed while a few
rounds are still queued), with a lease measured by the database clock, and fetches those
one by one on a thread pool, with no transaction open during the HTTP calls; concurrent
sweeps never fetch the same training and a killed one blocks nothing beyond its lease.
Every result goes through `service.apply_update(..., source="poll")`, which is committed
with the row's next check time. The main thread does all database work, so one
connection serves the whole sweep.

List-walk bound: the walk stops at a page older than the oldest due row's creation on
Replicate. The first check of a row stores Replicate's `created_at`
(`replicate_created_at`); before that we use `trainings.created_at` (our insert time,
always after Replicate's creation) minus LIST_WALK_MARGIN. A row tracked long after it was
created (a backfill) may not be met on its first walk and is then fetched by id.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError, ThreadPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg2

from webhook_sync import adoption, db, discovery, errors, fetching, inbox, metrics, service
from webhook_sync.config import Config
from webhook_sync.logs import log_event
from webhook_sync.replicate import ReplicateClient
from webhook_sync.training import Training
from webhook_sync.vocabulary import REFUSED_OUTCOMES, Outcome

# Our insert time minus this bounds the walk until Replicate's created_at is stored.
LIST_WALK_MARGIN = timedelta(minutes=15)
# 404s in a row before a person is asked to look.
NOT_FOUND_ATTENTION_AFTER = 3
# Replicate can answer 404 for a moment after it created a training (its own lag): 404s
# within this long of the row's insert are retried with backoff but not counted.
NOT_FOUND_GRACE = timedelta(minutes=1)
# Results applied per transaction: on a busy disk a commit costs more than the apply.
APPLY_BATCH = 100
PENDING_BATCH = 1000
Progress = Callable[[int, int], None]


# Below this many due rows, per-id GETs are as cheap as a list walk and never miss.
LIST_WALK_THRESHOLD = 20
MAX_CLAIM = 2000
# Rows claimed per round of the thread pool: two keep it busy while the slowest GET of a
# claim finishes, and are few enough that several sweeps take turns on one backlog.
CLAIM_ROUNDS = 2


@dataclass(frozen=True)
class SweepSettings:
    """How a sweep paces itself; `from_config` reads POLL_* and STUCK_AFTER_SECONDS."""

    interval_seconds: float = 120
    lease_seconds: float = 90
    concurrency: int = 8
    stuck_after_seconds: float = 6 * 3600
    max_rps: float = 40.0
    list_threshold: int = LIST_WALK_THRESHOLD
    # None: no discovery of untracked trainings (see `discovery`); from_config enables it.
    discovery_settings: discovery.DiscoverySettings | None = None

    @classmethod
    def from_config(cls, config: Config) -> SweepSettings:
        """The settings for this deployment."""
        return cls(
            interval_seconds=config.poll_interval_seconds,
            lease_seconds=config.poll_lease_seconds,
            concurrency=config.poll_concurrency,
            stuck_after_seconds=config.stuck_after_seconds,
            max_rps=config.max_rps,
            discovery_settings=discovery.DiscoverySettings.from_config(config),
        )

    @property
    def claim_limit(self) -> int:
        """Rows per claim: what the thread pool fetches at once (CLAIM_ROUNDS rounds of
        POLL_CONCURRENCY), so that sweeps running together share a backlog instead of the
        first one leasing all of it; never more than half a lease fetches at the rate limit."""
        fetched_at_once = self.concurrency * CLAIM_ROUNDS
        return max(1, min(MAX_CLAIM, fetched_at_once, int(self.lease_seconds * self.max_rps / 2)))

    @property
    def interval(self) -> timedelta:
        """POLL_INTERVAL_SECONDS as a timedelta."""
        return timedelta(seconds=self.interval_seconds)

    @property
    def slack(self) -> timedelta:
        """How much earlier than one interval after a sweep's start its rows fall due again:
        room for the next sweep starting a little early by the database clock."""
        return timedelta(seconds=min(5.0, self.interval_seconds / 10))

    @property
    def retry_base_seconds(self) -> float:
        """The first retry after a failed check; doubles up to one interval."""
        return max(1.0, self.interval_seconds / 8)


@dataclass
class SweepResult:
    """What one sweep did; `log_fields` is its one summary log line."""

    due: int = 0
    checked: int = 0
    repaired: int = 0
    missed_webhooks: int = 0
    unchanged: int = 0
    refused: int = 0
    errors: int = 0
    not_found: int = 0
    pending_applied: int = 0
    adopted: int = 0
    host_adopted: int = 0
    host_reconciled: int = 0
    discovery_calls: int = 0
    discovery_seconds: float = 0.0
    list_pages: int = 0
    api_calls: int = 0
    stuck: int = 0
    stopped: bool = False
    duration: float = 0.0
    first_error: str | None = field(default=None, repr=False)

    def log_fields(self) -> dict[str, Any]:
        """The summary as log fields (the first error text last)."""
        fields = asdict(self)
        fields["duration"] = round(self.duration, 3)
        fields["error"] = fields.pop("first_error")
        return fields


def new_owner() -> str:
    """A lease owner unique to one sweep: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def run_sweep(
    conn: db.Connection,
    client: ReplicateClient,
    settings: SweepSettings,
    *,
    stop: threading.Event | None = None,
    progress: Progress | None = None,
    owner: str | None = None,
) -> SweepResult:
    """Check every due training once, apply what Replicate says and reschedule it (commits
    many short transactions); log one summary line. Raises ReplicateAuthError at once on a
    401/403 after handing back its leases."""
    sweep = _Sweep(conn, client, settings, stop or threading.Event(), progress, owner)
    result = sweep.run()
    log_event("sweep", logging.INFO, **result.log_fields())
    return result


class _Sweep:
    """One sweep's state: its lease owner, the rows it still holds, its counts."""

    def __init__(
        self,
        conn: db.Connection,
        client: ReplicateClient,
        settings: SweepSettings,
        stop: threading.Event,
        progress: Progress | None,
        owner: str | None,
    ) -> None:
        self.conn = conn
        self.client = client
        self.settings = settings
        self.stop = stop
        self.progress = progress
        self.owner = owner or new_owner()
        self.result = SweepResult()
        # The rows leased and not yet checked, with when each was inserted (our
        # created_at, for NOT_FOUND_GRACE).
        self.held: dict[str, datetime] = {}
        self.batch: list[Training] = []
        self.next_check_at: datetime | None = None
        self.due_before: datetime | None = None
        self.expected = 0

    def run(self) -> SweepResult:
        started = time.monotonic()
        calls_before = self.client.request_count
        try:
            # First, so that the rows it tracks (due at their insert) are due in this sweep.
            host = adoption.adopt_in_flight(self.conn)
            self.result.host_adopted = host.adopted
            # Host rows left in flight after ours finished: the mirror never writes them.
            self.result.host_reconciled = adoption.reconcile_finished(self.conn)
            with self.conn:
                # Rows rescheduled during this sweep are due after this instant, so a
                # failing row is not claimed again and again within one sweep.
                due_before = db.select_now(self.conn)
            # Measured from this sweep's start, not from each check, so that a row checked
            # late in this sweep is still due when the next sweep starts one interval on.
            self.next_check_at = due_before + self.settings.interval - self.settings.slack
            self.due_before = due_before
            self.result.pending_applied = host.pending_applied + self._apply_pending_events()
            with self.conn:
                self.expected, bound = db.select_due_summary(
                    self.conn,
                    due_before=due_before,
                    margin_seconds=LIST_WALK_MARGIN.total_seconds(),
                )
            self._report_progress()
            if self.expected > self.settings.list_threshold and bound is not None:
                self._walk_list(bound)
            self._check()
            # After the due rows: repairing what we track comes before finding more.
            if self.settings.discovery_settings is not None and not self.stop.is_set():
                self._discover(self.settings.discovery_settings, self.next_check_at)
            self.result.stuck = self._count_stuck()
        finally:
            self._hand_back()
            self.result.stopped = self.stop.is_set()
            self.result.api_calls = self.client.request_count - calls_before
            self.result.duration = time.monotonic() - started
        return self.result

    def _discover(self, settings: discovery.DiscoverySettings, next_check_at: datetime) -> None:
        """Adopt the untracked trainings that are ours (`discovery`), counting its calls."""
        started = time.monotonic()
        found = discovery.discover(
            self.conn, self.client, settings, next_check_at=next_check_at, stop=self.stop
        )
        self.result.adopted = found.adopted + found.pending_adopted
        self.result.discovery_calls = found.api_calls
        self.result.discovery_seconds = round(time.monotonic() - started, 3)

    def _apply_pending_events(self) -> int:
        """Apply inbox events for rows tracked since they arrived (the track/webhook race,
        or rows the host platform inserted directly), each training in its own
        transaction: one the database refuses stays pending and must not stop every sweep."""
        with self.conn:
            ids = db.select_tracked_pending_training_ids(self.conn, PENDING_BATCH)
        return inbox.apply_pending_each(self.conn, ids)

    def _claim(self) -> list[str]:
        """Lease the next batch of due rows (`claim_limit`); their ids, none once stopping."""
        if self.stop.is_set() or self.due_before is None:
            return []
        with self.conn:
            claimed = db.claim_due_trainings(
                self.conn,
                owner=self.owner,
                lease_seconds=self.settings.lease_seconds,
                due_before=self.due_before,
                limit=self.settings.claim_limit,
            )
        self.held.update((row["id"], row["created_at"]) for row in claimed)
        self.result.due += len(claimed)
        self._report_progress()
        return [row["id"] for row in claimed]

    def _check(self) -> None:
        """Fetch due rows one by one on the thread pool, claiming the next batch while a few
        rounds are still queued (`fetching.QUEUED_ROUNDS`), and apply them in batches."""
        fetched = fetching.fetch_claimed(
            self.client,
            self._claim,
            self.settings.concurrency,
            self.stop,
            tick_seconds=self.settings.lease_seconds / 3,
        )
        renewed = time.monotonic()
        try:
            with closing(fetched):
                for training_id, obj, failure in fetched:
                    if time.monotonic() - renewed >= self.settings.lease_seconds / 3:
                        # A slow API (429s, timeouts) must not let our leases lapse while
                        # we still fetch: another sweep would then fetch the same trainings.
                        self._renew_leases()
                        renewed = time.monotonic()
                    if training_id is None:
                        continue  # a tick: nothing finished within tick_seconds
                    if failure is None:
                        failure = self._collect(training_id, obj)
                    if failure is not None and not self._stopped_by(failure):
                        self._fail(training_id, failure)
        except errors.ReplicateAuthError:
            # What was fetched before the token was refused is still true: apply it.
            self._flush()
            raise
        self._flush()

    def _renew_leases(self) -> None:
        with self.conn:
            db.update_lease_expiry(
                self.conn, self.owner, sorted(self.held), self.settings.lease_seconds
            )

    def _stopped_by(self, failure: BaseException) -> bool:
        """True for a fetch that never happened because we are stopping: not a failure,
        its lease is handed back."""
        if isinstance(failure, CancelledError):
            return True
        return self.stop.is_set() and isinstance(failure, errors.ReplicateUnavailableError)

    def _walk_list(self, bound: datetime) -> None:
        """Resolve due rows from the newest-first listing, 100 per call: each page's due
        rows are claimed and applied in one transaction (no lease outlives it), while the
        next page is already being fetched. Stop when every due row was met, a page is
        older than `bound` (the oldest due row's creation), or more pages were read than
        due rows remain (fetching those by id is then cheaper)."""
        pages = self.client.list_training_pages()
        remaining = self.expected
        prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sweep-list")
        try:
            upcoming = prefetch.submit(next, pages, None)
            while True:
                page = upcoming.result()
                if page is None:
                    return
                self.result.list_pages += 1
                upcoming = prefetch.submit(next, pages, None)
                oldest = None
                for obj in page:
                    created = fetching.parse_training_created(obj)
                    if created is not None and (oldest is None or created < oldest):
                        oldest = created
                    # An unusable listed object is left to the GET by id.
                    self._collect(obj.get("id"), obj, flush=False)
                remaining -= self._flush(claim=True)
                if (
                    remaining <= 0
                    or self.stop.is_set()
                    or (oldest is not None and oldest < bound)
                    or self.result.list_pages >= remaining
                ):
                    return
        except errors.ReplicateAuthError:
            raise
        except errors.ReplicateError as exc:
            # The rows left are claimed and fetched by id, each with retries and backoff.
            if not self.stop.is_set():
                log_event("sweep_list_failed", logging.WARNING, error=str(exc))
        finally:
            # A page fetched ahead and not needed costs one call; wait for it, then stop.
            prefetch.shutdown(wait=True, cancel_futures=True)
            pages.close()

    def _collect(
        self, training_id: Any, obj: Any, flush: bool = True
    ) -> errors.InvalidTrainingError | None:
        """Queue a fetched object to be applied with the next batch; the parse error, if any."""
        try:
            self.batch.append(fetching.parse_for(training_id, obj))
        except errors.InvalidTrainingError as exc:
            return exc
        if flush and len(self.batch) >= APPLY_BATCH:
            self._flush()
        return None

    def _flush(self, claim: bool = False) -> int:
        """Apply the queued results in one transaction (a commit costs more than an
        apply), first claiming those that are due when `claim` (listed objects); return
        how many were applied. If one result breaks the batch, the others are applied one
        by one to isolate it (claimed ones are left due, for the fetch by id)."""
        batch, self.batch = self.batch, []
        if not batch:
            return 0
        try:
            with self.conn:
                if claim:
                    claimed = db.claim_due_trainings(
                        self.conn,
                        owner=self.owner,
                        lease_seconds=self.settings.lease_seconds,
                        due_before=self.due_before,
                        limit=len(batch),
                        ids=[training.id for training in batch],
                    )
                    due = {row["id"] for row in claimed}
                    batch = [training for training in batch if training.id in due]
                updates = [self._apply(training) for training in batch]
        except db.CONNECTION_LOST_ERRORS:
            raise
        except inbox.ROW_ERRORS:
            if not claim:
                for training in batch:
                    self._apply_alone(training)
            return 0
        if claim:
            self.result.due += len(batch)
        for training, update in zip(batch, updates, strict=True):
            self._count(training, update)
        return len(batch)

    def _apply_alone(self, training: Training) -> None:
        try:
            with self.conn:
                update = self._apply(training)
        except db.CONNECTION_LOST_ERRORS:
            raise
        except inbox.ROW_ERRORS as exc:
            self._fail(training.id, exc)
            return
        self._count(training, update)

    def _apply(self, training: Training) -> service.ApplyResult:
        """Apply one result through the funnel and schedule the row's next check."""
        return service.apply_check(
            self.conn, training, next_check_at=self.next_check_at, lease_owner=self.owner
        )

    def _count(self, training: Training, update: service.ApplyResult) -> None:
        self.held.pop(training.id, None)
        self.result.checked += 1
        if update.outcome == Outcome.APPLIED:
            self.result.repaired += 1
        elif update.outcome == Outcome.UNCHANGED:
            self.result.unchanged += 1
        elif update.outcome in REFUSED_OUTCOMES:
            self.result.refused += 1
        if service.reached_terminal(update):
            self.result.missed_webhooks += 1
        self._report_progress()

    def _fail(self, training_id: str, exc: BaseException) -> None:
        """Count a failed check and back the row off, without holding up the others."""
        not_found = isinstance(exc, errors.ReplicateNotFoundError)
        self.result.errors += 1
        self.result.not_found += int(not_found)
        self.result.first_error = self.result.first_error or str(exc)
        inserted = self.held.get(training_id)
        just_created = (
            inserted is not None
            and self.due_before is not None
            and self.due_before - inserted < NOT_FOUND_GRACE
        )
        with self.conn:
            row = db.update_check_failed(
                self.conn,
                training_id,
                owner=self.owner,
                retry_base_seconds=self.settings.retry_base_seconds,
                retry_cap_seconds=self.settings.interval_seconds,
                not_found=not_found and not just_created,
                attention_after=NOT_FOUND_ATTENTION_AFTER,
                attention=f"Replicate answered 404 {NOT_FOUND_ATTENTION_AFTER} times in a row",
            )
        self.held.pop(training_id, None)
        log_event("poll_check_failed", logging.DEBUG, training_id=training_id, error=str(exc))
        if row is not None and not_found and row["not_found_count"] == NOT_FOUND_ATTENTION_AFTER:
            log_event(
                "training_needs_attention",
                logging.WARNING,
                training_id=training_id,
                reason=row["needs_attention"],
            )
        self._report_progress()

    def _hand_back(self) -> None:
        """Free the leases of rows not checked (stopped, or failed), so the next sweep of
        any worker takes them at once instead of after the lease."""
        if not self.held:
            return
        try:
            with self.conn:
                released = db.release_leases(self.conn, self.owner, sorted(self.held))
        except psycopg2.Error as exc:
            # The leases expire on their own; nothing is lost.
            log_event("sweep_release_failed", logging.WARNING, error=db.first_line(exc))
            return
        log_event("sweep_leases_released", logging.INFO, count=released)
        self.held.clear()

    def _count_stuck(self) -> int:
        with self.conn:
            cutoff = db.select_now(self.conn) - timedelta(seconds=self.settings.stuck_after_seconds)
            stuck = db.count_stuck_trainings(self.conn, cutoff)
        metrics.set_stuck_trainings(stuck)
        if stuck:
            log_event(
                "trainings_stuck",
                logging.WARNING,
                count=stuck,
                stuck_after_seconds=self.settings.stuck_after_seconds,
            )
        return stuck

    def _report_progress(self) -> None:
        if self.progress is not None:
            done = self.result.checked + self.result.errors
            self.progress(done, max(self.expected, self.result.due))
