"""Discovery: each sweep finds the account's trainings nobody tracked that are ours.

A platform that crashed between creating a training at Replicate and registering it, and
whose every webhook for it was lost, still gets its true status: each sweep reads the
newest page of `GET /v1/trainings` (one call, even when nothing is due), and further
pages while they still hold trainings created since the last discovery (the mark kept in
`discovery_marks`), at most `max_pages`. Of the listed trainings we neither track nor
have judged foreign, one that is not finished, or finished within DISCOVERY_WINDOW_SECONDS,
is fetched once (`webhook` is not in the listing), at most `max_fetches` per sweep: if its
signed `webhook` URL points here with a `user_id` (or ADOPT_DESTINATION_PATTERN matches
its destination) it is tracked and its status applied at once; otherwise it is
remembered in `foreign_trainings`, so each foreign training costs one GET, ever. The
pattern is also tried on listed objects themselves (a succeeded one shows its
destination), which costs nothing. Before the list, inbox events waiting for untracked
trainings are judged the same way, from their signed payloads, without any call.

Every call goes through the sweep's client, under its rate limit (REPLICATE_MAX_RPS);
`max_pages + max_fetches` bounds what discovery adds to one sweep (`make bench` measures
it: bench/sweep.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg2

from webhook_sync import db, errors, fetching, inbox, registration, registry, status
from webhook_sync.config import Config
from webhook_sync.logs import log_event
from webhook_sync.replicate import ReplicateClient
from webhook_sync.training import Training, parse_training
from webhook_sync.vocabulary import Source

# Foreign trainings are forgotten after this long; one seen again costs one more GET.
FOREIGN_RETENTION = timedelta(days=30)
PRUNE_BATCH = 1000
NOT_OURS = "webhook names no user of ours and the destination pattern does not match"


@dataclass(frozen=True)
class DiscoverySettings:
    """What discovery may spend per sweep, and how it attributes trainings."""

    owners: registration.Owners = field(default_factory=registration.Owners)
    window_seconds: float = 3600
    max_pages: int = 5
    max_fetches: int = 100
    pending_batch: int = 1000
    concurrency: int = 4
    # Replicate lists a new training a moment after creating it, and an empty account's
    # first mark is our clock: pages are read this far past the mark.
    mark_margin_seconds: float = 120

    @classmethod
    def from_config(cls, config: Config) -> DiscoverySettings:
        """PUBLIC_WEBHOOK_URL, ADOPT_DESTINATION_PATTERN and DISCOVERY_WINDOW_SECONDS."""
        return cls(
            owners=registration.Owners.from_config(config),
            window_seconds=config.discovery_window_seconds,
            concurrency=config.poll_concurrency,
        )


@dataclass
class DiscoveryResult:
    """What one discovery did: calls made, trainings adopted and judged foreign."""

    pages: int = 0
    fetched: int = 0
    adopted: int = 0
    foreign: int = 0
    pending_adopted: int = 0

    @property
    def api_calls(self) -> int:
        """List pages and GETs by id (retries not included)."""
        return self.pages + self.fetched

    def log_fields(self) -> dict[str, Any]:
        """The result as log fields."""
        return asdict(self)


def discover(
    conn: db.Connection,
    client: ReplicateClient,
    settings: DiscoverySettings,
    *,
    next_check_at: datetime,
    stop: threading.Event | None = None,
) -> DiscoveryResult:
    """Adopt the untracked trainings that are ours, from the inbox then from the newest
    pages of the list, scheduling each adopted one's next check at `next_check_at`
    (commits per training). One discovery of an install runs at a time (a session
    advisory lock); a sweep that finds it taken skips discovery. Raises ReplicateAuthError
    on a 401/403; any other failure of Replicate ends discovery early and is logged: the
    next sweep tries again."""
    result = DiscoveryResult()
    with conn:
        locked = registry.try_lock_discovery(conn)
    if not locked:
        # Another worker's sweep is discovering: the same GETs twice would be waste.
        return result
    try:
        result.pending_adopted = adopt_pending(conn, settings)
        _walk(conn, client, settings, result, next_check_at, stop or threading.Event())
    except errors.ReplicateAuthError:
        raise
    except errors.ReplicateError as exc:
        log_event("discovery_failed", logging.WARNING, error=str(exc))
    finally:
        # A broken connection must not hide the error that broke it; closing it frees
        # the lock anyway.
        with contextlib.suppress(psycopg2.Error), conn:
            registry.unlock_discovery(conn)
    with conn:
        cutoff = db.select_now(conn) - FOREIGN_RETENTION
        registry.delete_foreign_seen_before(conn, cutoff, PRUNE_BATCH)
    if result.adopted or result.pending_adopted or result.foreign:
        log_event("discovery", **result.log_fields())
    return result


def adopt_pending(conn: db.Connection, settings: DiscoverySettings) -> int:
    """Judge untracked trainings with inbox events waiting by their newest signed payload:
    adopt (and apply every waiting event of) those that name their owner, remember the
    others as foreign. Return how many were adopted (commits per training)."""
    with conn:
        waiting = registry.select_untracked_pending(conn, settings.pending_batch)
    adopted = 0
    for event in waiting:
        with conn:
            try:
                training = parse_training(event["payload"])
            except errors.InvalidTrainingError as exc:
                registry.insert_foreign_training(conn, event["training_id"], str(exc), None)
                continue
            owner = settings.owners.owner_of(event["payload"], training)
            if owner is None:
                registry.insert_foreign_training(conn, training.id, NOT_OURS, training.created_at)
                continue
        adopt = functools.partial(
            registration.adopt_training, conn, training, owner, Source.WEBHOOK
        )
        adopted += _isolated(conn, training.id, adopt)
    return adopted


def _walk(
    conn: db.Connection,
    client: ReplicateClient,
    settings: DiscoverySettings,
    result: DiscoveryResult,
    next_check_at: datetime,
    stop: threading.Event,
) -> None:
    """Read the newest pages down to the mark, judge what they hold, and move the mark to
    the newest listed training once everything newer than the old mark was judged (a GET
    cut by `max_fetches` or failed keeps the mark: the next sweep reads those pages again).
    """
    with conn:
        mark = registry.select_discovery_mark(conn)
        now = db.select_now(conn)
    finished_after = now - timedelta(seconds=settings.window_seconds)
    margin = timedelta(seconds=settings.mark_margin_seconds)
    newest: datetime | None = None
    to_fetch: list[Training] = []
    reached_mark = False
    with closing(client.list_training_pages()) as pages:
        for page in pages:
            result.pages += 1
            listed = _parse_listed(page)
            created = [t.created_at for t in listed if t.created_at is not None]
            if created and (newest is None or max(created) > newest):
                newest = max(created)
            to_fetch += _judge_listed(conn, settings, listed, finished_after, next_check_at, result)
            reached_mark = mark is None or not created or min(created) < mark - margin
            if reached_mark or stop.is_set() or result.pages >= settings.max_pages:
                break
        else:
            reached_mark = True  # the end of the list
    judged = _fetch_and_judge(conn, client, settings, to_fetch, next_check_at, result, stop)
    if not judged or stop.is_set():
        return
    if not reached_mark:
        # More new trainings than `max_pages` hold since the last discovery: the older
        # ones are left to `webhook-sync import`.
        log_event("discovery_gap", logging.WARNING, pages=result.pages, mark=mark)
    with conn:
        registry.update_discovery_mark(conn, newest or now)


def _parse_listed(page: list[dict[str, Any]]) -> list[Training]:
    listed = []
    for obj in page:
        try:
            listed.append(parse_training(obj))
        except errors.InvalidTrainingError:
            continue  # not a training we could ever apply
    return listed


def _judge_listed(
    conn: db.Connection,
    settings: DiscoverySettings,
    listed: list[Training],
    finished_after: datetime,
    next_check_at: datetime,
    result: DiscoveryResult,
) -> list[Training]:
    """Adopt listed trainings the destination pattern attributes; return those worth one
    GET (never seen, and not finished before `finished_after`)."""
    with conn:
        tracked, foreign = registry.select_known_ids(conn, [t.id for t in listed])
    worth_fetching = []
    for training in listed:
        if training.id in tracked:
            continue
        user_id = settings.owners.user_from_destination(training.destination)
        if user_id is not None:
            owner = registration.Owner(user_id, "destination")
            result.adopted += _adopt_fetched(conn, training, owner, next_check_at)
        elif training.id not in foreign and not _finished_before(training, finished_after):
            worth_fetching.append(training)
    return worth_fetching


def _finished_before(training: Training, cutoff: datetime) -> bool:
    if not status.is_terminal(training.status):
        return False
    ended = training.completed_at or training.created_at
    return ended is not None and ended < cutoff


def _fetch_and_judge(
    conn: db.Connection,
    client: ReplicateClient,
    settings: DiscoverySettings,
    candidates: list[Training],
    next_check_at: datetime,
    result: DiscoveryResult,
    stop: threading.Event,
) -> bool:
    """GET each candidate once (newest first, at most `max_fetches`) and adopt it or
    remember it as foreign; a failed GET leaves it for the next discovery. True when
    every candidate was judged."""
    ids = [training.id for training in candidates[: settings.max_fetches]]
    judged = len(ids) == len(candidates)
    fetched = fetching.fetch_all(client, ids, settings.concurrency, stop)
    with closing(fetched):
        for training_id, obj, failure in fetched:
            result.fetched += 1
            if failure is not None:
                judged = False
                log_event(
                    "discovery_fetch_failed",
                    logging.DEBUG,
                    training_id=training_id,
                    error=str(failure),
                )
                continue
            try:
                training = fetching.parse_for(training_id, obj)
            except errors.InvalidTrainingError as exc:
                with conn:
                    registry.insert_foreign_training(conn, training_id, str(exc), None)
                continue
            owner = settings.owners.owner_of(obj, training)
            if owner is not None:
                result.adopted += _adopt_fetched(conn, training, owner, next_check_at)
                continue
            with conn:
                registry.insert_foreign_training(conn, training.id, NOT_OURS, training.created_at)
            result.foreign += 1
    return judged


def _adopt_fetched(
    conn: db.Connection, training: Training, owner: registration.Owner, next_check_at: datetime
) -> int:
    """Adopt and apply one object from Replicate in its own transaction; 1 when done."""
    adopt = functools.partial(registration.adopt_and_apply, conn, training, owner, next_check_at)
    return _isolated(conn, training.id, adopt)


def _isolated(conn: db.Connection, training_id: str, adopt: Callable[[], object]) -> int:
    """Run one training's adoption in its own transaction; 1 when done. A value the
    database refuses fails that one alone (logged, 0), not the sweep. A lost connection
    is raised."""
    return int(inbox.isolated(conn, training_id, adopt, "discovery_adopt_failed"))
