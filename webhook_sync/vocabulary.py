"""The words our tables store, defined once: Replicate's statuses, the app statuses, the
paths a report comes by and what deciding a report does (pure).

The CHECK constraints and partial indexes of sql/ spell the same words; a test reads them
back from the database (pg_constraint, pg_indexes) and compares them with these.
"""

from __future__ import annotations

from enum import StrEnum


class ReplicateStatus(StrEnum):
    """Replicate's own training statuses that we know (`trainings.replicate_status` also
    keeps any status Replicate adds later, as it is)."""

    STARTING = "starting"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    ABORTED = "aborted"


class AppStatus(StrEnum):
    """`trainings.training_status`: what the host platform reads."""

    TRAINING = "training"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


class Source(StrEnum):
    """The path a report came by: `trainings.updated_by`, `training_transitions.source`."""

    TRACK = "track"
    WEBHOOK = "webhook"
    POLL = "poll"
    REPLAY = "replay"


class Outcome(StrEnum):
    """What a report did, or would do, to its training and its inbox event."""

    RECEIVED = "received"  # stored in the inbox, not processed yet
    APPLIED = "applied"  # the status moved forward
    UNCHANGED = "unchanged"  # nothing new, or only fields filled in
    DUPLICATE = "duplicate"  # this webhook-id was processed already (an answer, not stored)
    IGNORED = "ignored"  # refused: it would move the status backwards
    CONFLICT = "conflict"  # refused: it contradicts a terminal row
    PENDING = "pending"  # the training is not tracked yet; `track` applies it
    FAILED = "failed"  # processing failed; the stored event can be replayed
    ERROR = "error"  # `sync`: Replicate could not be asked (not stored)


class NotificationStatus(StrEnum):
    """`notifications.status`: where an outbox row is in its delivery."""

    PENDING = "pending"  # waiting for its first or next attempt (or for an earlier one)
    DELIVERED = "delivered"  # the endpoint answered 2xx
    DEAD = "dead"  # given up: older than NOTIFY_MAX_AGE, or its endpoint answered 410


class EventType(StrEnum):
    """`notifications.event_type`: the status change a notification tells of."""

    PROCESSING = "training.processing"
    COMPLETED = "training.completed"
    FAILED = "training.failed"
    CANCELED = "training.canceled"


# `webhook_events.source`: the inbox holds deliveries and replays.
EVENT_SOURCES = (Source.WEBHOOK, Source.REPLAY)
# `training_transitions.outcome`: every decision about a status report.
TRANSITION_OUTCOMES = (Outcome.APPLIED, Outcome.IGNORED, Outcome.CONFLICT)
# `webhook_events.outcome`.
EVENT_OUTCOMES = (
    Outcome.RECEIVED,
    Outcome.APPLIED,
    Outcome.UNCHANGED,
    Outcome.IGNORED,
    Outcome.CONFLICT,
    Outcome.PENDING,
    Outcome.FAILED,
)
# Inbox events not (successfully) applied yet: processed again when seen
# (`webhook_events_unfinished_idx` is built on exactly these).
UNFINISHED_EVENT_OUTCOMES = (Outcome.RECEIVED, Outcome.PENDING, Outcome.FAILED)
# Refusals: the row is left as it was, and the decision is recorded.
REFUSED_OUTCOMES = (Outcome.IGNORED, Outcome.CONFLICT)
# The fields of a training a status report refreshes (`trainings` columns of the same
# names), in the order the funnel and HOST_COLUMNS name them.
REFRESHED_COLUMNS = (
    "destination",
    "version_id",
    "weights_url",
    "error",
    "started_at",
    "completed_at",
)
