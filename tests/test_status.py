"""The transition table: property-based, any order, duplicates, never backwards."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.support import LIFECYCLE, TERMINAL_STATUSES, lifecycle_position
from webhook_sync import status
from webhook_sync.vocabulary import ReplicateStatus

KNOWN = [str(known) for known in ReplicateStatus]
reports = st.lists(st.sampled_from([*KNOWN, "queued_by_future_api"]), min_size=1, max_size=12)


def run_reports(sequence: list[str]) -> tuple[str | None, list[str | None]]:
    """Feed reports through `decide` the way apply_update does; return the final and history."""
    current: str | None = None
    history = [current]
    for reported in sequence:
        decision = status.decide(current, reported)
        if decision.outcome == "applied":
            current = reported
        history.append(current)
    return current, history


@given(reports)
def test_ends_in_first_terminal_or_furthest(sequence: list[str]) -> None:
    """Any sequence ends in the first terminal status received, else the furthest reached."""
    final, _ = run_reports(sequence)

    terminals = [s for s in sequence if s in TERMINAL_STATUSES]
    if terminals:
        assert final == terminals[0]
    else:
        assert lifecycle_position(final) == max(lifecycle_position(s) for s in sequence)


@given(reports)
def test_never_moves_backwards(sequence: list[str]) -> None:
    """The status never moves back along the lifecycle and a terminal status never changes."""
    _, history = run_reports(sequence)

    positions = [lifecycle_position(s) for s in history]
    assert positions == sorted(positions)
    first_terminal = next((i for i, s in enumerate(history) if s in TERMINAL_STATUSES), None)
    if first_terminal is not None:
        assert len(set(history[first_terminal:])) == 1


@given(reports)
def test_duplicates_change_nothing(sequence: list[str]) -> None:
    """Delivering every report twice in a row ends exactly where delivering it once does."""
    doubled = [s for report in sequence for s in (report, report)]

    assert run_reports(doubled)[0] == run_reports(sequence)[0]


def test_the_lifecycle_written_down_names_every_status() -> None:
    """The tests' own lifecycle covers exactly the vocabulary's statuses, and status.py
    calls terminal exactly the ones it ends with."""
    assert set(LIFECYCLE) - {None} == set(KNOWN)
    assert {s for s in KNOWN if status.is_terminal(s)} == TERMINAL_STATUSES


def test_app_status_mapping() -> None:
    """Replicate statuses map to the four app statuses; unknown ones stay in training."""
    mapped = {s: status.app_status_for(s) for s in [*KNOWN, "brand_new"]}

    assert mapped == {
        "starting": "training",
        "processing": "training",
        "succeeded": "completed",
        "failed": "failed",
        "canceled": "canceled",
        "aborted": "canceled",
        "brand_new": "training",
    }


def test_contradicting_terminal_is_a_conflict() -> None:
    """`failed` after `succeeded` is refused as a conflict, a late processing as ignored."""
    conflict = status.decide("succeeded", "failed")
    late = status.decide("succeeded", "processing")

    assert conflict.outcome == "conflict" and conflict.refused
    assert late.outcome == "ignored" and late.refused


def test_host_finished_row_is_treated_as_terminal() -> None:
    """A row the host wrote as completed, with no Replicate status, cannot be reopened."""
    current = status.effective_replicate_status(None, "completed")

    assert status.decide(current, "processing").outcome == "ignored"
    assert status.effective_replicate_status(None, "training") is None
