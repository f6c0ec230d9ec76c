"""`webhook-sync replay` adopts an untracked training as a live delivery does, through the
real command on a real PostgreSQL: stored events (--event, --failed) whose payload was
verified before it was stored, and saved deliveries whose signature --verify checked;
never a payload nobody verified."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.operator_support import fixture, store_event
from tests.support import select_transitions
from tests.test_replay import SUCCEEDED, VECTOR, inbox_events, replay, saved_delivery
from webhook_sync import db, registration
from webhook_sync import replay as replay_module
from webhook_sync.training import parse_training

PUBLIC_WEBHOOK_URL = "https://sync.example.com/webhooks/replicate"
OURS = f"{PUBLIC_WEBHOOK_URL}?user_id=42"
OWNERS = {"PUBLIC_WEBHOOK_URL": PUBLIC_WEBHOOK_URL, "ADOPT_DESTINATION_PATTERN": ""}


def ours(name: str = SUCCEEDED, **fields: Any) -> dict[str, Any]:
    """A published example whose signed `webhook` URL names user 42 of this service."""
    return {**fixture(name), "webhook": OURS, **fields}


def training_row(conn: db.Connection, training_id: str) -> dict[str, Any] | None:
    """The training's row, read in its own transaction."""
    with conn:
        return db.select_training(conn, training_id)


def store_pending_replay(
    conn: db.Connection, webhook_id: str, payload: dict[str, Any], signed_at: datetime | None
) -> None:
    """A replay's event waiting `pending`, as `replay FILE` leaves it (with `signed_at`
    only when --verify checked it)."""
    with conn:
        db.insert_event(
            conn,
            webhook_id=webhook_id,
            training_id=payload["id"],
            payload=payload,
            signed_at=signed_at,
            source="replay",
        )
        db.update_event_outcome(conn, webhook_id, "pending")


def test_event_of_an_untracked_training_is_adopted_by_its_webhook_url(
    database_url: str, conn: db.Connection
) -> None:
    """A stored delivery waiting `pending` is adopted for the user its signed URL names
    and applied as a replay, as a live delivery would have been."""
    payload = ours()
    store_event(conn, "msg_waiting", payload, "pending")

    result = replay(database_url, "--event", "msg_waiting", **OWNERS)
    row = training_row(conn, payload["id"])
    [event] = inbox_events(conn)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "msg_waiting  qy2dts8twsrj20cjjnc87atzd0  applied" in result.stdout
    assert row is not None
    assert row["user_id"] == "42"
    assert row["training_status"] == "completed"
    assert row["updated_by"] == "replay"
    assert event["outcome"] == "applied"
    assert "training_adopted" in result.stderr
    assert [(t["source"], t["outcome"]) for t in select_transitions(conn, payload["id"])] == [
        ("replay", "applied")
    ]


def test_adopting_replay_applies_older_waiting_events_first_and_its_own_last(
    database_url: str, conn: db.Connection
) -> None:
    """The training's earlier waiting deliveries are applied as webhooks, oldest first,
    and the replayed event last, as the replay: it is not swallowed by the adoption."""
    payload = ours()
    processing = {"id": payload["id"], "status": "processing", "webhook": OURS}
    store_event(conn, "msg_older", processing, "pending", age="2 minutes")
    store_event(conn, "msg_newer", payload, "pending", age="1 minute")

    result = replay(database_url, "--event", "msg_newer", **OWNERS)
    outcomes = {event["webhook_id"]: event["outcome"] for event in inbox_events(conn)}
    transitions = select_transitions(conn, payload["id"])

    assert result.returncode == 0, result.stdout + result.stderr
    assert "msg_newer  " in result.stdout
    assert "summary: 1 event(s): 1 applied" in result.stdout
    assert outcomes == {"msg_older": "applied", "msg_newer": "applied"}
    assert [(t["source"], t["to_replicate_status"]) for t in transitions] == [
        ("webhook", "processing"),
        ("replay", "succeeded"),
    ]


def test_failed_events_of_untracked_trainings_are_adopted(
    database_url: str, conn: db.Connection
) -> None:
    """--failed adopts as --event does."""
    payload = ours()
    store_event(conn, "msg_failed", payload, "failed")

    result = replay(database_url, "--failed", **OWNERS)
    row = training_row(conn, payload["id"])

    assert result.returncode == 0, result.stdout + result.stderr
    assert row is not None
    assert row["user_id"] == "42"
    assert row["training_status"] == "completed"


def test_event_is_adopted_by_the_destination_pattern(
    database_url: str, conn: db.Connection
) -> None:
    """ADOPT_DESTINATION_PATTERN is the second rule, as for a delivery."""
    succeeded = fixture(SUCCEEDED)
    payload = {**succeeded, "output": {**succeeded["output"], "version": "user-7/avatar:abc"}}
    store_event(conn, "msg_dest", payload, "pending")

    result = replay(
        database_url,
        "--event",
        "msg_dest",
        ADOPT_DESTINATION_PATTERN=r"^user-(?P<user>\d+)/",
    )
    row = training_row(conn, payload["id"])

    assert result.returncode == 0, result.stdout + result.stderr
    assert row is not None
    assert row["user_id"] == "7"


def test_event_naming_no_user_of_ours_still_waits(database_url: str, conn: db.Connection) -> None:
    """A stored delivery whose URL points elsewhere is not adopted: exit 4, still pending."""
    payload = fixture(SUCCEEDED)  # its webhook is webhook.site's
    store_event(conn, "msg_foreign", payload, "pending")

    result = replay(database_url, "--event", "msg_foreign", **OWNERS)
    [event] = inbox_events(conn)

    assert result.returncode == 4
    assert training_row(conn, payload["id"]) is None
    assert event["outcome"] == "pending"


def test_unverified_replay_event_is_never_adopted(database_url: str, conn: db.Connection) -> None:
    """An event stored by a replay of a file nobody verified could name any user: its
    replay leaves the training untracked."""
    payload = ours()
    store_pending_replay(conn, "replay_unverified", payload, signed_at=None)

    result = replay(database_url, "--event", "replay_unverified", **OWNERS)

    assert result.returncode == 4
    assert training_row(conn, payload["id"]) is None


def test_unverified_file_is_never_adopted(database_url: str, conn: db.Connection) -> None:
    """A bare training object naming user 42 is stored pending, not adopted."""
    payload = ours()

    result = replay(database_url, "-", input=json.dumps(payload), **OWNERS)
    [event] = inbox_events(conn)

    assert result.returncode == 4
    assert training_row(conn, payload["id"]) is None
    assert event["outcome"] == "pending"


def test_verified_delivery_adopts_its_training(
    database_url: str, conn: db.Connection, tmp_path: Path
) -> None:
    """A saved delivery whose signature --verify checked adopts its training by the signed
    `webhook` URL, and its event keeps the signature time."""
    payload = ours()
    path = saved_delivery(tmp_path, json.dumps(payload))

    result = replay(
        database_url, "--verify", str(path), REPLICATE_WEBHOOK_SECRET=VECTOR["secret"], **OWNERS
    )
    row = training_row(conn, payload["id"])
    [event] = inbox_events(conn)

    assert result.returncode == 0, result.stdout + result.stderr
    assert row is not None
    assert row["user_id"] == "42"
    assert row["training_status"] == "completed"
    assert event["outcome"] == "applied"
    assert event["signed_at"] == datetime.fromtimestamp(int(VECTOR["webhook_timestamp"]), UTC)


def test_verified_replay_event_is_adopted_when_replayed_again(
    database_url: str, conn: db.Connection
) -> None:
    """An event a --verify replay stored (it carries the signature time) counts as signed."""
    payload = ours()
    store_pending_replay(conn, "replay_verified", payload, datetime(2021, 2, 25, tzinfo=UTC))

    result = replay(database_url, "--event", "replay_verified", **OWNERS)
    row = training_row(conn, payload["id"])

    assert result.returncode == 0, result.stdout + result.stderr
    assert row is not None
    assert row["user_id"] == "42"


def test_dry_run_names_the_user_it_would_adopt_for_and_writes_nothing(
    database_url: str, conn: db.Connection, tmp_path: Path
) -> None:
    """--dry-run of a verified delivery previews the adoption and the change, and says whom
    the training would be adopted for."""
    payload = ours()
    path = saved_delivery(tmp_path, json.dumps(payload))

    result = replay(
        database_url,
        "--dry-run",
        "--verify",
        str(path),
        REPLICATE_WEBHOOK_SECRET=VECTOR["secret"],
        **OWNERS,
    )
    lines = result.stdout.splitlines()

    assert result.returncode == 0, result.stdout + result.stderr
    assert "would change: adopted for user 42 by its webhook_url; " in result.stdout
    assert any(line.split() == ["training_status", "training", "completed"] for line in lines)
    assert training_row(conn, payload["id"]) is None
    assert inbox_events(conn) == []


@pytest.mark.parametrize(
    ("signed_at", "adopted"),
    [(datetime(2021, 2, 25, tzinfo=UTC), True), (None, False)],
    ids=["verified", "unverified"],
)
def test_dry_run_of_a_stored_event_previews_adoption_only_when_it_was_signed(
    database_url: str, conn: db.Connection, signed_at: datetime | None, adopted: bool
) -> None:
    """--dry-run --event decides adoption as the real replay does (`inbox.is_signed`): a
    verified replay's event previews it, an unverified one's does not; neither writes."""
    payload = ours()
    store_pending_replay(conn, "replay_stored", payload, signed_at)

    result = replay(database_url, "--dry-run", "--event", "replay_stored", **OWNERS)

    assert ("adopted for user 42 by its webhook_url" in result.stdout) is adopted, result.stdout
    assert result.returncode == (0 if adopted else 4), result.stdout + result.stderr
    assert training_row(conn, payload["id"]) is None
    assert [event["outcome"] for event in inbox_events(conn)] == ["pending"]


def test_the_dry_run_previews_against_the_row_adoption_inserts(conn: db.Connection) -> None:
    """The row a dry run assumes for a training it would adopt (`replay._adopted_row`) is
    the row `db.insert_training` inserts, in every column but its timestamps: a default
    changed in one and not the other would preview a change the replay does not make."""
    training = parse_training(ours())
    owner = registration.Owner("42", "webhook_url")
    timestamps = {"created_at", "updated_at", "next_check_at"}

    previewed = replay_module.preview(conn, training, owner).before
    with conn:
        inserted = db.insert_training(conn, training.id, owner.user_id, training.destination)

    assert previewed is not None and inserted is not None
    assert {k: v for k, v in previewed.items() if k not in timestamps} == {
        k: v for k, v in inserted.items() if k not in timestamps
    }
