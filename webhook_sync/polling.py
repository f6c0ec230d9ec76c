"""What the sweep and `sync` share: their settings and results, fetching trainings from
Replicate on a bounded thread pool, checking what came back, and telling a missed webhook."""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from webhook_sync import errors, service, status
from webhook_sync.config import Config
from webhook_sync.logs import log_event
from webhook_sync.replicate import ReplicateClient
from webhook_sync.training import Training, parse_training

# Below this many due rows, per-id GETs are as cheap as a list walk and never miss.
LIST_WALK_THRESHOLD = 20
MAX_CLAIM = 2000


@dataclass(frozen=True)
class SweepSettings:
    """How a sweep paces itself; `from_config` reads POLL_* and STUCK_AFTER_SECONDS."""

    interval_seconds: float = 120
    lease_seconds: float = 90
    concurrency: int = 8
    stuck_after_seconds: float = 6 * 3600
    max_rps: float = 40.0
    list_threshold: int = LIST_WALK_THRESHOLD

    @classmethod
    def from_config(cls, config: Config) -> SweepSettings:
        """The settings for this deployment."""
        return cls(
            interval_seconds=config.poll_interval_seconds,
            lease_seconds=config.poll_lease_seconds,
            concurrency=config.poll_concurrency,
            stuck_after_seconds=config.stuck_after_seconds,
            max_rps=config.max_rps,
        )

    @property
    def claim_limit(self) -> int:
        """Rows per claim: as many as half a lease can fetch one by one at the rate limit."""
        return max(1, min(MAX_CLAIM, int(self.lease_seconds * self.max_rps / 2)))

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


@dataclass(frozen=True)
class SyncResult:
    """What `sync` did to one training: the funnel's outcome, or the error."""

    training_id: str
    outcome: str  # applied | unchanged | ignored | conflict | unknown | error
    old_status: str | None = None
    new_status: str | None = None
    error: str | None = None


def parse_training_created(obj: Any) -> Any:
    """Replicate's `created_at` of a listed object, or None."""
    try:
        return parse_training(obj).created_at
    except errors.InvalidTrainingError:
        return None


def parse_for(training_id: str, obj: Any) -> Training:
    """Parse a fetched object and check that it is the training we asked for."""
    training = parse_training(obj)
    if training.id != training_id:
        raise errors.InvalidTrainingError(
            f"asked Replicate for {training_id}, got an object for {training.id}"
        )
    return training


def fetch_all(
    client: ReplicateClient,
    training_ids: Iterable[str],
    concurrency: int,
    stop: threading.Event | None,
    tick_seconds: float | None = None,
) -> Generator[tuple[str | None, Any, BaseException | None], None, None]:
    """GET each training on a bounded thread pool, yielding (id, object, error) as each
    completes, and (None, None, None) whenever `tick_seconds` pass without one; on a
    401/403 or `stop`, the GETs not yet started are cancelled."""
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="sweep")
    futures: dict[Future[dict[str, Any]], str] = {
        pool.submit(get_unless_stopped, client, training_id, stop): training_id
        for training_id in training_ids
    }
    waiting = set(futures)
    cancelled = False
    try:
        while waiting:
            done, waiting = wait(waiting, timeout=tick_seconds, return_when=FIRST_COMPLETED)
            if not done:
                yield None, None, None
            for future in done:
                training_id = futures[future]
                if not cancelled and stop is not None and stop.is_set():
                    cancelled = cancel_all(futures)
                try:
                    yield training_id, future.result(), None
                except CancelledError as exc:
                    yield training_id, None, exc
                except errors.ReplicateAuthError as exc:
                    cancelled = cancel_all(futures)
                    yield training_id, None, exc
                except errors.ReplicateError as exc:
                    yield training_id, None, exc
    finally:
        # A consumer that stops early (a 401) must not leave queued GETs running.
        pool.shutdown(wait=True, cancel_futures=True)


def get_unless_stopped(
    client: ReplicateClient, training_id: str, stop: threading.Event | None
) -> dict[str, Any]:
    """GET one training, unless a stop came while the GET waited in the queue."""
    if stop is not None and stop.is_set():
        raise CancelledError
    return client.get_training(training_id)


def cancel_all(futures: Iterable[Future[Any]]) -> bool:
    for future in futures:
        future.cancel()
    return True


def observe(update: service.ApplyResult, training: Training) -> bool:
    """Log a poll that moved a row to a terminal status, a missed webhook (the funnel counts
    it in webhook_sync_missed_webhooks_total); True when it was one."""
    if update.outcome != status.APPLIED or not status.is_terminal(update.new_status):
        return False
    log_event(
        "missed_webhook",
        training_id=training.id,
        source="poll",
        new=update.new_status,
        replicate_completed_at=training.completed_at,
    )
    return True
