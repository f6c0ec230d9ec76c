"""Replicate statuses, app statuses and the transition table (pure).

Statuses only move forward: starting < processing < (an unknown status) < terminal.
An unknown status is ranked just below terminal because every status Replicate has
added so far (`aborted`) came late in the lifecycle; the row stays `training` and the
poller keeps checking it. A terminal row never changes its terminal status.
"""

from __future__ import annotations

from dataclasses import dataclass

STARTING = "starting"
PROCESSING = "processing"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELED = "canceled"
ABORTED = "aborted"

KNOWN_REPLICATE_STATUSES = (STARTING, PROCESSING, SUCCEEDED, FAILED, CANCELED, ABORTED)
TERMINAL_REPLICATE_STATUSES = frozenset({SUCCEEDED, FAILED, CANCELED, ABORTED})

# App-facing statuses: the `training_status` column the host platform reads.
APP_TRAINING = "training"
APP_COMPLETED = "completed"
APP_FAILED = "failed"
APP_CANCELED = "canceled"

_APP_STATUS = {
    STARTING: APP_TRAINING,
    PROCESSING: APP_TRAINING,
    SUCCEEDED: APP_COMPLETED,
    FAILED: APP_FAILED,
    CANCELED: APP_CANCELED,
    ABORTED: APP_CANCELED,
}

_RANK = {STARTING: 0, PROCESSING: 1, SUCCEEDED: 3, FAILED: 3, CANCELED: 3, ABORTED: 3}
_UNKNOWN_RANK = 2
_NOTHING_YET_RANK = -1

# Outcomes of deciding a reported status against the stored one.
APPLIED = "applied"
UNCHANGED = "unchanged"
IGNORED = "ignored"
CONFLICT = "conflict"


@dataclass(frozen=True)
class Decision:
    """What to do with a reported status: apply it, keep the row, or refuse it and why."""

    outcome: str
    reason: str

    @property
    def refused(self) -> bool:
        """True when the report must not touch the row (a regression or a contradiction)."""
        return self.outcome in (IGNORED, CONFLICT)


def is_terminal(replicate_status: str | None) -> bool:
    """True when Replicate will not change this status again."""
    return replicate_status in TERMINAL_REPLICATE_STATUSES


def app_status_for(replicate_status: str) -> str:
    """Map Replicate's status to the app-facing one; unknown statuses stay `training`."""
    return _APP_STATUS.get(replicate_status, APP_TRAINING)


def rank(replicate_status: str | None) -> int:
    """Order statuses along the lifecycle; None (nothing seen yet) ranks lowest."""
    if replicate_status is None:
        return _NOTHING_YET_RANK
    return _RANK.get(replicate_status, _UNKNOWN_RANK)


def decide(current: str | None, reported: str) -> Decision:
    """Decide what a reported Replicate status does to a row whose last seen status is `current`."""
    if current == reported:
        return Decision(UNCHANGED, "same status")
    if is_terminal(current):
        if is_terminal(reported):
            return Decision(CONFLICT, f"{reported} contradicts terminal {current}")
        return Decision(IGNORED, f"{reported} after terminal {current}")
    if rank(reported) < rank(current):
        return Decision(IGNORED, f"{reported} would move {current} backwards")
    if rank(reported) == rank(current):
        return Decision(UNCHANGED, f"{reported} is not past {current}")
    return Decision(APPLIED, f"{current or 'none'} -> {reported}")


_IMPLIED_BY_APP_STATUS = {APP_COMPLETED: SUCCEEDED, APP_FAILED: FAILED, APP_CANCELED: CANCELED}


def effective_replicate_status(replicate_status: str | None, training_status: str) -> str | None:
    """The status to decide against: a row the host wrote as finished, with no Replicate
    status of ours yet, is treated as terminal so that nothing can reopen it."""
    if replicate_status is None:
        return _IMPLIED_BY_APP_STATUS.get(training_status)
    return replicate_status
