"""The transition table: how a reported Replicate status moves a row (pure).

Statuses only move forward: starting < processing < (an unknown status) < terminal.
An unknown status is ranked just below terminal because every status Replicate has
added so far (`aborted`) came late in the lifecycle; the row stays `training` and the
poller keeps checking it. A terminal row never changes its terminal status, and its
fields are only filled in: a report that would change one it already holds is a conflict.

This module is the specification: the SQL function `receive_delivery` (sql/0008, replaced
by 0009) decides the same way in the database, and tests/test_receive_delivery.py holds the
two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

from webhook_sync.vocabulary import REFUSED_OUTCOMES, AppStatus, Outcome, ReplicateStatus

TERMINAL_REPLICATE_STATUSES = frozenset(
    {
        ReplicateStatus.SUCCEEDED,
        ReplicateStatus.FAILED,
        ReplicateStatus.CANCELED,
        ReplicateStatus.ABORTED,
    }
)

_APP_STATUS = {
    ReplicateStatus.STARTING: AppStatus.TRAINING,
    ReplicateStatus.PROCESSING: AppStatus.TRAINING,
    ReplicateStatus.SUCCEEDED: AppStatus.COMPLETED,
    ReplicateStatus.FAILED: AppStatus.FAILED,
    ReplicateStatus.CANCELED: AppStatus.CANCELED,
    ReplicateStatus.ABORTED: AppStatus.CANCELED,
}

_RANK = {
    ReplicateStatus.STARTING: 0,
    ReplicateStatus.PROCESSING: 1,
    **dict.fromkeys(TERMINAL_REPLICATE_STATUSES, 3),
}
_UNKNOWN_RANK = 2
_NOTHING_YET_RANK = -1


@dataclass(frozen=True)
class Decision:
    """What to do with a reported status: apply it, keep the row, or refuse it and why."""

    outcome: Outcome
    reason: str

    @property
    def refused(self) -> bool:
        """True when the report must not touch the row (a regression or a contradiction)."""
        return self.outcome in REFUSED_OUTCOMES


def is_terminal(replicate_status: str | None) -> bool:
    """True when Replicate will not change this status again."""
    return replicate_status in TERMINAL_REPLICATE_STATUSES


def app_status_for(replicate_status: str) -> AppStatus:
    """Map Replicate's status to the app-facing one; unknown statuses stay `training`."""
    return _APP_STATUS.get(replicate_status, AppStatus.TRAINING)


def rank(replicate_status: str | None) -> int:
    """Order statuses along the lifecycle; None (nothing seen yet) ranks lowest."""
    if replicate_status is None:
        return _NOTHING_YET_RANK
    return _RANK.get(replicate_status, _UNKNOWN_RANK)


def decide(current: str | None, reported: str) -> Decision:
    """Decide what a reported Replicate status does to a row whose last seen status is `current`."""
    if current == reported:
        return Decision(Outcome.UNCHANGED, "same status")
    if is_terminal(current):
        if is_terminal(reported):
            return Decision(Outcome.CONFLICT, f"{reported} contradicts terminal {current}")
        return Decision(Outcome.IGNORED, f"{reported} after terminal {current}")
    if rank(reported) < rank(current):
        return Decision(Outcome.IGNORED, f"{reported} would move {current} backwards")
    if rank(reported) == rank(current):
        return Decision(Outcome.UNCHANGED, f"{reported} is not past {current}")
    return Decision(Outcome.APPLIED, f"{current or 'none'} -> {reported}")


def decide_fields(current: str | None, overwritten: list[str]) -> Decision | None:
    """A terminal row's fields may only be filled in: a report that would change fields
    the row already holds (`overwritten`) is a conflict naming them; None when allowed."""
    if not is_terminal(current) or not overwritten:
        return None
    return Decision(
        Outcome.CONFLICT, f"would change {', '.join(overwritten)} of terminal {current}"
    )


_IMPLIED_BY_APP_STATUS = {
    AppStatus.COMPLETED: ReplicateStatus.SUCCEEDED,
    AppStatus.FAILED: ReplicateStatus.FAILED,
    AppStatus.CANCELED: ReplicateStatus.CANCELED,
}


def effective_replicate_status(replicate_status: str | None, training_status: str) -> str | None:
    """The status to decide against: a row the host wrote as finished, with no Replicate
    status of ours yet, is treated as terminal so that nothing can reopen it."""
    if replicate_status is None:
        return _IMPLIED_BY_APP_STATUS.get(training_status)
    return replicate_status
