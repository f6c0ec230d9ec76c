"""`webhook-sync import`: track the trainings that already exist at Replicate.

Trainings started before webhook-sync was installed, or from Replicate's web UI, are
invisible to the poller until tracked. The import walks `GET /v1/trainings` (newest
first, 100 per call) back to `since`, and for each training not yet tracked, in flight
(or finished too, with `include_finished`), finds its user: a fixed `user`; else the
destination pattern on the listed object (a succeeded one shows its destination); else
it fetches the training once and reads the self-registration query of its signed-by-
Replicate `webhook` URL (then the pattern again). An attributed training is tracked and
its status applied at once through the funnel (source `poll`); the others are skipped,
counted, and remembered as foreign so discovery never fetches them again. Inserts are
`ON CONFLICT DO NOTHING` and every status goes through the funnel's locked row, so it is
safe to run twice and beside running workers; every call goes through the client's rate
limit (REPLICATE_MAX_RPS).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from webhook_sync import db, errors, fetching, registration, registry, status
from webhook_sync.logs import log_event
from webhook_sync.replicate import ReplicateClient
from webhook_sync.training import Training, parse_training

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImportOptions:
    """What to import and how to attribute it."""

    since: timedelta = timedelta(days=7)
    include_finished: bool = False
    user: str | None = None
    owners: registration.Owners = field(default_factory=registration.Owners)
    dry_run: bool = False
    concurrency: int = 8
    # When an imported training still in flight is next checked by the poller.
    check_after: timedelta = timedelta(minutes=2)


@dataclass
class ImportSummary:
    """What one import found and did (`imported` is what it would do, on a dry run)."""

    listed: int = 0
    imported: int = 0
    imported_finished: int = 0
    already_tracked: int = 0
    skipped_finished: int = 0
    unattributed: int = 0
    fetch_failed: int = 0
    invalid: int = 0
    pages: int = 0
    fetched: int = 0
    dry_run: bool = False
    users: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The summary as plain JSON-ready values."""
        return asdict(self)


def import_trainings(
    conn: db.Connection,
    client: ReplicateClient,
    options: ImportOptions,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> ImportSummary:
    """Walk the account's trainings back to `options.since` and track those that are ours
    and not yet tracked (commits per training; nothing on a dry run). Raises
    ReplicateAuthError on a 401/403, ReplicateError when the listing fails."""
    summary = ImportSummary(dry_run=options.dry_run)
    stop = stop or threading.Event()
    with conn:
        now = db.select_now(conn)
    cutoff = now - options.since
    total = max(1, int(options.since.total_seconds()))
    with closing(client.list_training_pages()) as pages:
        for page in pages:
            summary.pages += 1
            listed = _in_window(page, cutoff, summary)
            _import_page(conn, client, options, listed, now, summary, stop)
            oldest = min((t.created_at for t in listed if t.created_at), default=None)
            if progress is not None and oldest is not None:
                progress(min(total, int((now - oldest).total_seconds())), total)
            if stop.is_set() or len(listed) < len(page):
                break
    if progress is not None:
        progress(total, total)
    log_event("import", **{k: v for k, v in summary.as_dict().items() if k != "users"})
    return summary


def _in_window(
    page: list[dict[str, Any]], cutoff: datetime, summary: ImportSummary
) -> list[Training]:
    """The page's trainings created at or after `cutoff` (the listing is newest first)."""
    listed = []
    for obj in page:
        try:
            training = parse_training(obj)
        except errors.InvalidTrainingError:
            summary.invalid += 1
            continue
        if training.created_at is not None and training.created_at < cutoff:
            break
        listed.append(training)
    summary.listed += len(listed)
    return listed


def _import_page(
    conn: db.Connection,
    client: ReplicateClient,
    options: ImportOptions,
    listed: list[Training],
    now: datetime,
    summary: ImportSummary,
    stop: threading.Event,
) -> None:
    with conn:
        tracked, foreign = registry.select_known_ids(conn, [t.id for t in listed])
    to_fetch: list[Training] = []
    for training in listed:
        if training.id in tracked:
            summary.already_tracked += 1
        elif status.is_terminal(training.status) and not options.include_finished:
            summary.skipped_finished += 1
        elif options.user is not None:
            _adopt(
                conn, options, training, registration.Owner(options.user, "import"), now, summary
            )
        elif (user := options.owners.user_from_destination(training.destination)) is not None:
            _adopt(conn, options, training, registration.Owner(user, "destination"), now, summary)
        elif training.id in foreign:
            summary.unattributed += 1
        else:
            to_fetch.append(training)
    fetched = fetching.fetch_all(client, [t.id for t in to_fetch], options.concurrency, stop)
    with closing(fetched):
        for training_id, obj, failure in fetched:
            summary.fetched += 1
            if failure is not None:
                summary.fetch_failed += 1  # a failed GET, or one cancelled by a stop
                continue
            try:
                training = fetching.parse_for(training_id, obj)
            except errors.InvalidTrainingError:
                summary.invalid += 1
                continue
            owner = options.owners.owner_of(obj, training)
            if owner is not None:
                _adopt(conn, options, training, owner, now, summary)
                continue
            summary.unattributed += 1
            if not options.dry_run:
                with conn:
                    registry.insert_foreign_training(
                        conn, training.id, "import: no user", training.created_at
                    )


def _adopt(
    conn: db.Connection,
    options: ImportOptions,
    training: Training,
    owner: registration.Owner,
    now: datetime,
    summary: ImportSummary,
) -> None:
    summary.imported += 1
    summary.imported_finished += int(status.is_terminal(training.status))
    summary.users[owner.user_id] = summary.users.get(owner.user_id, 0) + 1
    if options.dry_run:
        return
    with conn:
        registration.adopt_and_apply(conn, training, owner, now + options.check_after)
