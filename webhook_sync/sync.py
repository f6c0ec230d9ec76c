"""`sync`: fetch given trainings from Replicate now, due or not, and apply what it says."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass

from webhook_sync import db, errors, fetching, service, sweep
from webhook_sync.replicate import ReplicateClient
from webhook_sync.vocabulary import Outcome


@dataclass(frozen=True)
class SyncResult:
    """What `sync` did to one training: the funnel's outcome, or the error."""

    training_id: str
    outcome: Outcome  # applied | unchanged | ignored | conflict | pending | error
    old_status: str | None = None
    new_status: str | None = None
    error: str | None = None


def sync_trainings(
    conn: db.Connection,
    client: ReplicateClient,
    training_ids: Sequence[str],
    settings: sweep.SweepSettings,
) -> list[SyncResult]:
    """Fetch these trainings now, due or not, and apply them (commits per training); a row
    leased by a running sweep is applied but its schedule is left to that sweep. Raises
    ReplicateAuthError on a 401/403."""
    results = []
    fetched = fetching.fetch_all(client, training_ids, settings.concurrency, None)
    with closing(fetched):
        for training_id, obj, failure in fetched:
            try:
                if failure is not None:
                    raise failure
                training = fetching.parse_for(training_id, obj)
            except errors.WebhookSyncError as exc:
                results.append(SyncResult(training_id, Outcome.ERROR, error=str(exc)))
                continue
            with conn:
                next_check_at = db.select_now(conn) + settings.interval
                update = service.apply_check(conn, training, next_check_at=next_check_at)
            results.append(
                SyncResult(training_id, update.outcome, update.old_status, update.new_status)
            )
    order = {training_id: index for index, training_id in enumerate(training_ids)}
    return sorted(results, key=lambda result: order[result.training_id])
