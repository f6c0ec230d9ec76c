"""The one funnel on a real PostgreSQL: apply_update, track, the inbox use cases."""

from __future__ import annotations

import datetime
import json
import re
import select
import threading

import psycopg2
import psycopg2.extras
import pytest

from tests.support import in_threads, select_transitions, wait_until
from webhook_sync import db, inbox, service
from webhook_sync.training import parse_training

TID = "zz4ibbonubfz7carwiefibzgga"
SUCCEEDED = {
    "id": TID,
    "status": "succeeded",
    "output": {"version": "acme/avatar:abc123", "weights": "https://replicate.delivery/w.tar"},
    "completed_at": "2024-01-01T00:10:00.123Z",
}


def apply(conn: db.Connection, payload: dict, source: str = "webhook") -> service.ApplyResult:
    """Apply one report in its own transaction."""
    with conn:
        return service.apply_update(conn, parse_training(payload), source)


def track(conn: db.Connection, training_id: str = TID) -> dict:
    """Track a training in its own transaction."""
    with conn:
        return service.track_training(conn, training_id, "user-1")[0]


def test_forward_report_is_applied_and_logged(conn: db.Connection) -> None:
    """A succeeded report completes the row, fills output fields and logs the transition."""
    track(conn)

    result = apply(conn, SUCCEEDED)
    row = db.select_training(conn, TID)
    transitions = select_transitions(conn, TID)

    assert result.outcome == "applied"
    assert row["training_status"] == "completed"
    assert row["replicate_status"] == "succeeded"
    assert (row["destination"], row["version_id"]) == ("acme/avatar", "abc123")
    assert row["weights_url"] == "https://replicate.delivery/w.tar"
    assert row["updated_by"] == "webhook"
    assert [(t["outcome"], t["to_replicate_status"], t["source"]) for t in transitions] == [
        ("applied", "succeeded", "webhook")
    ]


def test_late_processing_never_overwrites_succeeded(conn: db.Connection) -> None:
    """A late `processing` is ignored, recorded as refused, and leaves the row as it was."""
    track(conn)
    apply(conn, SUCCEEDED)

    result = apply(conn, {"id": TID, "status": "processing"}, "poll")
    row = db.select_training(conn, TID)
    refused = select_transitions(conn, TID)[-1]

    assert result.outcome == "ignored"
    assert row["training_status"] == "completed" and row["updated_by"] == "webhook"
    assert (refused["outcome"], refused["to_replicate_status"]) == ("ignored", "processing")


def test_contradicting_terminal_is_a_recorded_conflict(conn: db.Connection) -> None:
    """`failed` after `succeeded` is refused as a conflict and recorded."""
    track(conn)
    apply(conn, SUCCEEDED)

    result = apply(conn, {"id": TID, "status": "failed", "error": "boom"})
    row = db.select_training(conn, TID)

    assert result.outcome == "conflict"
    assert row["replicate_status"] == "succeeded" and row["error"] is None
    assert select_transitions(conn, TID)[-1]["outcome"] == "conflict"


def test_equal_status_refreshes_missing_fields(conn: db.Connection) -> None:
    """A second `succeeded` carrying output fills version_id without a status change."""
    track(conn)
    apply(conn, {"id": TID, "status": "succeeded"})

    result = apply(conn, SUCCEEDED, "poll")
    row = db.select_training(conn, TID)

    assert result.outcome == "unchanged"
    assert row["version_id"] == "abc123" and row["updated_by"] == "poll"
    assert len(select_transitions(conn, TID)) == 1


def test_terminal_row_fields_are_filled_in_never_changed(conn: db.Connection) -> None:
    """Once terminal, a report may fill NULL fields; one that would change a field the row
    holds is refused whole (nothing filled either) and recorded as a conflict naming them."""
    track(conn)
    apply(conn, {"id": TID, "status": "succeeded", "completed_at": SUCCEEDED["completed_at"]})
    filled = apply(conn, SUCCEEDED, "poll")
    complete = db.select_training(conn, TID)
    rewrite = {
        **SUCCEEDED,
        "output": {"version": "evil/other:def456", "weights": "https://evil.example/w.tar"},
        "completed_at": "2030-01-01T00:00:00Z",
        "error": "a field the row does not hold yet",
    }

    changed = apply(conn, rewrite, "replay")
    row = db.select_training(conn, TID)
    refused = select_transitions(conn, TID)[-1]

    assert filled.outcome == "unchanged"
    assert complete["weights_url"] == "https://replicate.delivery/w.tar"
    assert changed.outcome == "conflict"
    assert row == complete
    assert (refused["outcome"], refused["source"]) == ("conflict", "replay")
    assert refused["reason"] == (
        "would change destination, version_id, weights_url, completed_at of terminal succeeded"
    )


def test_racing_fills_of_a_terminal_row_keep_the_first(
    database_url: str, conn: db.Connection
) -> None:
    """Six reports filling the same empty field of a terminal row at once, each with its
    own value: one fills it, the others are conflicts, and the row keeps that one."""
    track(conn)
    apply(conn, {"id": TID, "status": "succeeded"})
    barrier = threading.Barrier(6)

    def fill(index: int) -> tuple[str, str]:
        own = db.connect(database_url)
        weights = f"https://replicate.delivery/{index}.tar"
        barrier.wait()
        report = {"id": TID, "status": "succeeded", "output": {"weights": weights}}
        outcome = apply(own, report, "poll").outcome
        own.close()
        return weights, outcome

    outcomes = dict(in_threads(6, fill))
    kept = db.select_training(conn, TID)["weights_url"]

    assert sorted(outcomes.values()) == ["conflict"] * 5 + ["unchanged"]
    assert outcomes[kept] == "unchanged"


def test_identical_report_writes_nothing(conn: db.Connection) -> None:
    """Repeating the same report changes no column, not even updated_at."""
    track(conn)
    apply(conn, SUCCEEDED)
    before = db.select_training(conn, TID)

    result = apply(conn, SUCCEEDED, "poll")

    assert result.outcome == "unchanged"
    assert db.select_training(conn, TID) == before


def test_unknown_training_is_reported_not_created(conn: db.Connection) -> None:
    """A report for an untracked training changes nothing and says so."""
    result = apply(conn, SUCCEEDED)

    assert result.outcome == "pending"
    assert db.select_training(conn, TID) is None


def test_unknown_replicate_status_is_stored_and_stays_training(conn: db.Connection) -> None:
    """A status Replicate adds later is stored as-is and keeps the row in training."""
    track(conn)
    apply(conn, {"id": TID, "status": "processing"})

    result = apply(conn, {"id": TID, "status": "queued_for_gpu"})
    row = db.select_training(conn, TID)

    assert result.outcome == "applied"
    assert (row["replicate_status"], row["training_status"]) == ("queued_for_gpu", "training")


def test_status_change_sends_notify(conn: db.Connection, database_url: str) -> None:
    """A status change NOTIFYs `training_status` with the id, the user id, the new status
    and the change's position in the feed."""
    listener = db.connect(database_url)
    listener.autocommit = True
    listener.cursor().execute("LISTEN training_status")
    track(conn)

    apply(conn, SUCCEEDED)

    def notified() -> list:
        if select.select([listener], [], [], 0.05)[0]:
            listener.poll()
        return listener.notifies

    notes = wait_until(notified, message="a NOTIFY")
    listener.close()
    payload = json.loads(notes[0].payload)
    position = payload.pop("position")
    assert payload == {
        "id": TID,
        "user_id": "user-1",
        "training_status": "completed",
        "replicate_status": "succeeded",
    }
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", position)


def test_racing_writers_change_state_once(database_url: str, conn: db.Connection) -> None:
    """Eight threads applying succeeded and processing at once: one change, never backwards."""
    track(conn)
    barrier = threading.Barrier(8)

    def worker(index: int) -> str:
        own = db.connect(database_url)
        payload = SUCCEEDED if index % 2 else {"id": TID, "status": "processing"}
        barrier.wait()
        outcome = apply(own, payload).outcome
        own.close()
        return outcome

    outcomes = in_threads(8, worker)
    applied = [t for t in select_transitions(conn, TID) if t["outcome"] == "applied"]

    assert sorted(outcomes[1::2]) == ["applied"] + ["unchanged"] * 3
    assert db.select_training(conn, TID)["replicate_status"] == "succeeded"
    assert [t["to_replicate_status"] for t in applied].count("succeeded") == 1
    assert [t["to_replicate_status"] for t in applied] in (
        ["succeeded"],
        ["processing", "succeeded"],
    )


def test_track_is_idempotent(conn: db.Connection) -> None:
    """Tracking twice keeps one row with the first user."""
    with conn:
        _, first = service.track_training(conn, TID, "user-1", "acme/avatar")
    with conn:
        row, second = service.track_training(conn, TID, "user-2")

    assert (first, second) == (True, False)
    assert (row["user_id"], row["destination"], row["training_status"]) == (
        "user-1",
        "acme/avatar",
        "training",
    )


def test_early_webhook_is_kept_and_applied_on_track(conn: db.Connection) -> None:
    """A delivery for an untracked training is stored pending and applied when it is tracked."""
    early = inbox.receive_delivery(conn, webhook_id="msg_early", payload=SUCCEEDED, signed_at=None)

    row = track(conn)
    event = db.select_event(conn, "msg_early")

    assert early.result == "pending"
    assert row["training_status"] == "completed" and row["updated_by"] == "webhook"
    assert event["outcome"] == "applied"


def test_duplicate_delivery_changes_nothing(conn: db.Connection) -> None:
    """The same webhook-id again is answered as a duplicate."""
    track(conn)
    first = inbox.receive_delivery(conn, webhook_id="msg_1", payload=SUCCEEDED, signed_at=None)

    again = inbox.receive_delivery(conn, webhook_id="msg_1", payload=SUCCEEDED, signed_at=None)

    assert (first.result, again.result) == ("applied", "duplicate")
    assert db.select_event(conn, "msg_1")["attempts"] == 1


def test_concurrent_identical_deliveries_apply_once(database_url: str, conn: db.Connection) -> None:
    """Six identical deliveries at the same moment: one applied, the rest duplicates."""
    track(conn)
    barrier = threading.Barrier(6)

    def deliver(_index: int) -> str:
        own = db.connect(database_url)
        barrier.wait()
        result = inbox.receive_delivery(
            own, webhook_id="msg_x", payload=SUCCEEDED, signed_at=None
        ).result
        own.close()
        return result

    results = in_threads(6, deliver)

    assert sorted(results) == ["applied"] + ["duplicate"] * 5
    assert len(select_transitions(conn, TID)) == 1


def test_failed_processing_is_recorded_and_retried(conn: db.Connection) -> None:
    """A delivery whose processing failed is stored as failed and processed again on retry."""
    track(conn)
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO webhook_sync.webhook_events"
            " (webhook_id, training_id, payload, outcome, error)"
            " VALUES ('msg_f', %s, %s, 'failed', 'earlier crash')",
            (TID, psycopg2.extras.Json(SUCCEEDED)),
        )

    retried = inbox.receive_delivery(conn, webhook_id="msg_f", payload=SUCCEEDED, signed_at=None)

    assert retried.result == "applied"
    assert db.select_event(conn, "msg_f")["outcome"] == "applied"


def test_unknown_source_is_a_programming_error(conn: db.Connection) -> None:
    """Only the four documented sources may write."""
    with pytest.raises(ValueError, match="source"):
        service.apply_update(conn, parse_training(SUCCEEDED), "cron")


def check_columns(conn: db.Connection, training_id: str = TID) -> dict:
    """The bookkeeping of a row's checks, which `select_training` does not show."""
    with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(
            "SELECT last_checked_at, next_check_at, check_failures, not_found_count,"
            " needs_attention, replicate_created_at, lease_owner, lease_expires_at"
            " FROM webhook_sync.trainings WHERE id = %(id)s",
            {"id": training_id},
        )
        return dict(cur.fetchone())


def fail_check(conn: db.Connection, owner: str | None = None) -> None:
    """Record one failed check (a 404) on the row, as a sweep does."""
    with conn:
        db.update_check_failed(
            conn,
            TID,
            owner=owner,
            retry_base_seconds=30,
            retry_cap_seconds=600,
            not_found=True,
            attention_after=1,
            attention="gone",
        )


def lease(conn: db.Connection, owner: str) -> None:
    """Lease the row as a sweep does."""
    with conn:
        claimed = db.claim_due_trainings(
            conn,
            owner=owner,
            lease_seconds=300,
            due_before=db.select_now(conn) + datetime.timedelta(days=1),
            limit=1,
            ids=[TID],
        )
    assert [row["id"] for row in claimed] == [TID]


def test_apply_check_applies_as_poll_and_records_the_check(conn: db.Connection) -> None:
    """A check's answer goes through the funnel as `poll`, then the row's next check is
    scheduled, its failures reset and Replicate's creation time kept."""
    track(conn)
    fail_check(conn)
    next_check_at = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    report = {**SUCCEEDED, "created_at": "2024-01-01T00:00:00Z"}

    with conn:
        result = service.apply_check(conn, parse_training(report), next_check_at=next_check_at)
    row = db.select_training(conn, TID)
    checks = check_columns(conn)

    assert result.outcome == "applied"
    assert row["training_status"] == "completed"
    assert row["updated_by"] == "poll"
    assert [t["source"] for t in select_transitions(conn, TID)] == ["poll"]
    assert checks["next_check_at"] == next_check_at
    assert checks["last_checked_at"] is not None
    assert (checks["check_failures"], checks["not_found_count"]) == (0, 0)
    assert checks["needs_attention"] is None
    assert checks["replicate_created_at"] == datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)


def test_apply_check_frees_the_lease_it_holds(conn: db.Connection) -> None:
    """The sweep's and the wake-up's way: the lease holder records its check and frees it."""
    track(conn)
    lease(conn, "sweep-a")
    next_check_at = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)

    with conn:
        service.apply_check(
            conn, parse_training(SUCCEEDED), next_check_at=next_check_at, lease_owner="sweep-a"
        )
    checks = check_columns(conn)

    assert (checks["lease_owner"], checks["lease_expires_at"]) == (None, None)
    assert checks["next_check_at"] == next_check_at


def test_apply_check_leaves_a_leased_schedule_to_its_holder(conn: db.Connection) -> None:
    """`sync`'s way: a row another sweep leases is applied, but its schedule and lease are
    that sweep's to record."""
    track(conn)
    lease(conn, "sweep-a")
    before = check_columns(conn)

    with conn:
        result = service.apply_check(
            conn,
            parse_training(SUCCEEDED),
            next_check_at=datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
        )

    assert result.outcome == "applied"
    assert db.select_training(conn, TID)["training_status"] == "completed"
    assert check_columns(conn) == before
