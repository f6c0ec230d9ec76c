"""The outbox's judgement in the end-to-end runs, on receipts written by hand: it must
catch what breaks a promise and nothing else."""

from __future__ import annotations

from tests.e2e_outbox import Receipt, judge_outbox

TRANSITIONS = [
    {
        "outcome": "applied",
        "training_id": "t1",
        "to_training_status": "training",
        "to_replicate_status": "processing",
    },
    {
        "outcome": "applied",
        "training_id": "t1",
        "to_training_status": "completed",
        "to_replicate_status": "succeeded",
    },
]


def receipt(event: str, at: float, answered_at: float, status: int = 200, **extra) -> Receipt:
    """One delivery of t1's `event` (its id is `evt_<event>`)."""
    values = {
        "at": at,
        "answered_at": answered_at,
        "webhook_id": f"evt_{event}",
        "event_id": f"evt_{event}",
        "training_id": "t1",
        "event_type": f"training.{event}",
        "status": status,
        "verified": True,
        "committed": True,
        "fault": "ok",
    }
    values.update(extra)
    return Receipt(**values)


def test_a_retry_answered_before_the_timed_out_attempt_keeps_the_order() -> None:
    """The earliest 2xx of an event counts, even when the attempt the notifier gave up on is
    answered after its retry (a judgement that took the first attempt's answer failed)."""
    receipts = [
        receipt("processing", at=0.0, answered_at=11.3, fault="timeout"),
        receipt("processing", at=11.0, answered_at=11.1),
        receipt("completed", at=11.2, answered_at=11.25),
    ]

    report = judge_outbox(TRANSITIONS, receipts, [])

    assert report.problems() == []
    assert report.duplicates == 1


def test_broken_promises_are_each_named() -> None:
    """A later event sent before the earlier one's 2xx, an event never answered 2xx, one
    received before its commit and one whose id changed are all reported."""
    receipts = [
        receipt("completed", at=0.0, answered_at=0.1, committed=False),
        receipt("processing", at=1.0, answered_at=1.1, status=500),
        receipt("processing", at=2.0, answered_at=2.1, webhook_id="evt_other", status=500),
    ]

    problems = judge_outbox(TRANSITIONS, receipts, []).problems()

    assert [problem.split(":")[0] for problem in problems] == [
        "notifications missing",
        "notifications out of order",
        "notifications before commit",
        "notifications id mismatch",
    ]
