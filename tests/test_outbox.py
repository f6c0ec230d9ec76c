"""The outbox on a real PostgreSQL and a real HTTP receiver: rows queued by the funnel in the
same statement as the change, delivered as Standard Webhooks (checked with the
`standardwebhooks` library), in order, retried, given up, and 410 disabling an endpoint."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from standardwebhooks.webhooks import Webhook

from tests.support import wait_until
from tests.webhook_receiver import Received, WebhookReceiver
from webhook_sync import db, notifier, operations, outbox, service, worker
from webhook_sync.config import NOTIFY_EVENT_TYPES, Config
from webhook_sync.training import parse_training

SECRET = "whsec_" + "bm90aWZ5LXRlc3Qtc2VjcmV0LWtleQ=="  # base64 of 23 bytes
OLD_SECRET = "whsec_" + "b2xkLW5vdGlmeS1zZWNyZXQta2V5"
TID = "outboxtraining0000000000a"


def settings(urls: tuple[str, ...], **overrides: object) -> notifier.NotifierSettings:
    """Notifier settings signing with SECRET."""
    values: dict = {
        "urls": urls,
        "events": NOTIFY_EVENT_TYPES,
        "signing_key": notifier.signing.decode_secret(SECRET),
        "max_age_seconds": 3 * 86400,
        "concurrency": 4,
        "lease_seconds": 30,
    }
    values.update(overrides)
    return notifier.NotifierSettings(**values)


def configure(
    conn: db.Connection, *urls: str, events: tuple[str, ...] = NOTIFY_EVENT_TYPES
) -> None:
    """Sync the endpoints as the worker does at start."""
    with conn:
        outbox.sync_endpoints(conn, urls, events)


def apply(conn: db.Connection, status: str, training_id: str = TID, **extra: object) -> None:
    """Apply one report in its own transaction."""
    with conn:
        service.apply_update(
            conn, parse_training({"id": training_id, "status": status, **extra}), "webhook"
        )


def track(conn: db.Connection, training_id: str = TID) -> None:
    """Track a training in its own transaction."""
    with conn:
        service.track_training(conn, training_id, "user-1")


def rows(conn: db.Connection, **filters: object) -> list[dict]:
    """Notifications, oldest first."""
    with conn:
        return sorted(outbox.select_notifications(conn, **filters), key=lambda r: r["id"])


def counted(result: str) -> float:
    """This process's webhook_sync_notifications_total for one result."""
    return REGISTRY.get_sample_value("webhook_sync_notifications_total", {"result": result}) or 0


def verified(received: Received) -> dict:
    """The body of a delivery, verified by the reference library (raises when it fails)."""
    return Webhook(SECRET).verify(received.body, received.headers)


@pytest.fixture()
def running(database_url: str) -> Iterator[callable]:
    """Start a notifier thread on the test database; stopped at the end."""
    started: list[tuple[threading.Event, threading.Thread]] = []

    def start(urls: tuple[str, ...], **overrides: object) -> notifier.Notifier:
        stop = threading.Event()
        loop = notifier.Notifier(
            settings(urls, **overrides), lambda: db.connect(database_url, "test notifier"), stop
        )
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        started.append((stop, thread))
        return loop

    yield start
    for stop, thread in started:
        stop.set()
        thread.join(30)


def test_each_status_change_queues_one_row_per_endpoint(conn: db.Connection) -> None:
    """processing and succeeded queue one row per endpoint each, with the training's fields."""
    configure(conn, "https://a.example/hook", "https://b.example/hook")
    track(conn)

    apply(conn, "starting")
    apply(conn, "processing")
    apply(conn, "processing")
    apply(
        conn,
        "succeeded",
        output={"version": "acme/avatar:abc", "weights": "https://r.example/w.tar"},
        completed_at="2024-01-01T00:10:00.123Z",
    )
    queued = rows(conn)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id, payload FROM webhook_sync.notifications")
        payloads = dict(cur.fetchall())

    assert [(r["event_type"], r["endpoint"]) for r in queued] == [
        ("training.processing", "https://a.example/hook"),
        ("training.processing", "https://b.example/hook"),
        ("training.completed", "https://a.example/hook"),
        ("training.completed", "https://b.example/hook"),
    ]
    assert queued[0]["event_id"] == queued[1]["event_id"] != queued[2]["event_id"]
    body = payloads[queued[2]["id"]]
    assert body["type"] == "training.completed" and body["id"] == queued[2]["event_id"]
    assert body["created_at"].endswith("Z")
    assert body["training"] == {
        "id": TID,
        "user_id": "user-1",
        "training_status": "completed",
        "replicate_status": "succeeded",
        "destination": "acme/avatar",
        "version_id": "abc",
        "weights_url": "https://r.example/w.tar",
        "error": None,
        "started_at": None,
        "completed_at": "2024-01-01T00:10:00.123000Z",
    }


def test_rolled_back_change_queues_nothing_and_events_filter(conn: db.Connection) -> None:
    """A change rolled back leaves no row; NOTIFY_EVENTS limits the types queued."""
    configure(conn, "https://a.example/hook", events=("training.failed",))
    track(conn)

    with conn:
        service.apply_update(conn, parse_training({"id": TID, "status": "processing"}), "poll")
        conn.rollback()
    apply(conn, "processing")
    apply(conn, "failed", error="boom")

    assert [r["event_type"] for r in rows(conn)] == ["training.failed"]


def test_unconfigured_endpoint_gets_no_new_rows(conn: db.Connection) -> None:
    """An endpoint left out of NOTIFY_URLS stops receiving new rows."""
    configure(conn, "https://a.example/hook")
    configure(conn, "https://b.example/hook")
    track(conn)

    apply(conn, "processing")

    assert [r["endpoint"] for r in rows(conn)] == ["https://b.example/hook"]


def test_deliveries_verify_with_standardwebhooks_after_retries(
    conn: db.Connection, running: callable
) -> None:
    """A 500 and a 302 are retried with the same webhook-id; every delivery verifies with the
    reference library, and the second event waits for the first; the attempts are counted."""
    before = {result: counted(result) for result in ("delivered", "retry")}
    with WebhookReceiver(statuses=[500, 302]) as receiver:
        configure(conn, receiver.url)
        track(conn)
        apply(conn, "processing")
        apply(conn, "succeeded")
        running((receiver.url,))

        received = receiver.wait_for(4, timeout=60)
        wait_until(lambda: len(rows(conn, status="delivered")) == 2, 30, message="delivered")
    bodies = [verified(r) for r in received]
    ids = [r.headers["webhook-id"] for r in received]

    assert [b["type"] for b in bodies] == [
        "training.processing",
        "training.processing",
        "training.processing",
        "training.completed",
    ]
    assert ids[0] == ids[1] == ids[2] == bodies[0]["id"] != ids[3]
    assert [r.answered for r in received] == [500, 302, 200, 200]
    assert [r["attempts"] for r in rows(conn)] == [3, 1]
    assert counted("delivered") - before["delivered"] == 2
    assert counted("retry") - before["retry"] == 2
    assert REGISTRY.get_sample_value(
        "webhook_sync_notification_lag_seconds_count", {"event_type": "training.completed"}
    )


def test_redirect_is_not_followed() -> None:
    """A 307 with a Location is an answer of its own: one request, not delivered."""
    with WebhookReceiver(statuses=[307]) as receiver, notifier.requests.Session() as session:
        body = notifier.body_bytes({"id": "evt_1"})
        headers = notifier.signed_headers(notifier.signing.decode_secret(SECRET), "evt_1", body)
        attempt = notifier.post_notification(session, receiver.url, headers, body)

    assert (attempt.status_code, attempt.delivered, attempt.error) == (307, False, "HTTP 307")
    assert [r.answered for r in receiver.received] == [307]


def test_gone_endpoint_is_disabled_and_retry_enables_it(
    conn: db.Connection, running: callable
) -> None:
    """410 disables the endpoint and gives up its pending rows; `retry --dead` sends again."""
    disabled_before = counted("disabled")
    with WebhookReceiver(statuses=[410]) as receiver:
        configure(conn, receiver.url)
        track(conn)
        apply(conn, "processing")
        apply(conn, "succeeded")
        running((receiver.url,))

        wait_until(lambda: len(rows(conn, status="dead")) == 2, 30, message="dead")
        with conn:
            endpoint = outbox.select_endpoints(conn)[0]
        with conn:
            retried, enabled = outbox.retry_notifications(conn)
        wait_until(lambda: len(rows(conn, status="delivered")) == 2, 30, message="delivered")

    assert endpoint["disabled_at"] is not None and "410" in endpoint["disabled_reason"]
    assert (retried, enabled) == (2, [receiver.url])
    assert [r.answered for r in receiver.received] == [410, 200, 200]
    assert counted("disabled") - disabled_before == 1


def test_failure_past_max_age_is_dead_and_the_next_event_goes(
    conn: db.Connection, running: callable
) -> None:
    """A failure past NOTIFY_MAX_AGE makes a row dead; the later event of its training then
    goes out."""
    dead_before = counted("dead")
    with WebhookReceiver(statuses=[503]) as receiver:
        configure(conn, receiver.url)
        track(conn)
        apply(conn, "processing")
        apply(conn, "succeeded")
        running((receiver.url,), max_age_seconds=0.001)

        wait_until(lambda: len(rows(conn, status="delivered")) == 1, 30, message="delivered")

    assert [(r["event_type"], r["status"]) for r in rows(conn)] == [
        ("training.processing", "dead"),
        ("training.completed", "delivered"),
    ]
    assert json.loads(receiver.received[1].body)["type"] == "training.completed"
    assert counted("dead") - dead_before == 1


def test_retried_row_counts_max_age_from_the_retry(conn: db.Connection) -> None:
    """After `notifications retry`, NOTIFY_MAX_AGE counts from the retry, not from the
    status change: an old row that fails again is retried, not dead at once."""
    url = "http://127.0.0.1:9/nothing-listens"
    configure(conn, url)
    track(conn)
    apply(conn, "processing")
    with conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE webhook_sync.notifications"
            " SET status = 'dead', created_at = now() - interval '2 days'"
        )
    with conn:
        outbox.retry_notifications(conn)
    loop = notifier.Notifier(
        settings((url,), max_age_seconds=86400), lambda: conn, threading.Event()
    )

    with conn:
        claimed = outbox.claim_notifications(conn, loop.owner, 10, 30)
    loop.record(conn, claimed[0], loop._attempt(claimed[0]))

    assert [r["status"] for r in rows(conn)] == ["pending"]


def test_unreachable_endpoint_is_retried_with_backoff(conn: db.Connection) -> None:
    """A connection error schedules the next attempt about a second later, then two."""
    url = "http://127.0.0.1:9/nothing-listens"
    configure(conn, url)
    track(conn)
    apply(conn, "processing")
    loop = notifier.Notifier(settings((url,)), lambda: conn, threading.Event())

    with conn:
        claimed = outbox.claim_notifications(conn, loop.owner, 10, 30)
    loop.record(conn, claimed[0], loop._attempt(claimed[0]))
    first = rows(conn)[0]

    assert first["status"] == "pending" and first["last_error"].startswith("connection error")
    delay = (first["next_attempt_at"] - first["last_attempt_at"]).total_seconds()
    assert 0.5 < delay < 1.5
    assert [notifier.retry_delay(n) > 0 for n in (1, 40)] == [True, True]
    assert max(notifier.retry_delay(40) for _ in range(50)) <= 3600
    assert max(notifier.retry_delay(40, 8) for _ in range(50)) <= 8


def test_claims_skip_locked_and_keep_pairs_in_order(conn: db.Connection, database_url: str) -> None:
    """Two claimers never hold the same row, and a training's later event is not claimable
    while its earlier one is pending."""
    configure(conn, "https://a.example/hook")
    for training_id in ("t1", "t2"):
        track(conn, training_id)
        apply(conn, "processing", training_id)
        apply(conn, "succeeded", training_id)
    other = db.connect(database_url)
    try:
        with conn:
            first = outbox.claim_notifications(conn, "a", 10, 30)
            with other:
                second = outbox.claim_notifications(other, "b", 10, 30)
    finally:
        other.close()

    assert sorted((r["training_id"], r["event_type"]) for r in first) == [
        ("t1", "training.processing"),
        ("t2", "training.processing"),
    ]
    assert second == []


def test_expired_lease_is_claimed_again_and_the_late_owner_records_nothing(
    conn: db.Connection,
) -> None:
    """A lease that ran out (its notifier died or stalled) lets another claim the row, same
    event id; the first owner's late failure then changes nothing."""
    configure(conn, "https://a.example/hook")
    track(conn)
    apply(conn, "processing")

    with conn:
        first = outbox.claim_notifications(conn, "a", 10, 0)
    with conn:
        second = outbox.claim_notifications(conn, "b", 10, 30)
    with conn:
        late = outbox.mark_failed(
            conn,
            first[0]["id"],
            "a",
            status_code=500,
            error="HTTP 500",
            retry_in_seconds=60,
            max_age_seconds=0,
        )
    with conn, conn.cursor() as cur:
        cur.execute("SELECT status, lease_owner, attempts FROM webhook_sync.notifications")
        stored = cur.fetchall()

    assert [r["event_id"] for r in second] == [first[0]["event_id"]]
    assert late is None
    assert stored == [("pending", "b", 2)]


def test_worker_without_notify_urls_unconfigures_every_endpoint(
    conn: db.Connection, database_url: str
) -> None:
    """A worker started with NOTIFY_URLS empty records that no endpoint is configured, so the
    funnel stops queueing."""
    configure(conn, "https://a.example/hook")
    config = Config.from_env({"DATABASE_URL": database_url, "REPLICATE_API_TOKEN": "r8_x"})

    worker.Worker(config).unconfigure_notify_endpoints()
    track(conn)
    apply(conn, "processing")
    with conn:
        endpoints = outbox.select_endpoints(conn)

    assert [(e["url"], e["configured"]) for e in endpoints] == [("https://a.example/hook", False)]
    assert rows(conn) == []


def test_a_stop_request_ends_the_loop_without_waiting_for_the_next_scan(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop wakes the idle loop at once: with scans an hour apart, a loop stopped while
    it waits still ends (the 30 s bound only catches the hang of a stop that would wait
    for the next scan)."""
    monkeypatch.setattr(notifier, "SCAN_SECONDS", 3600.0)
    name = "test notifier stop"
    stop = threading.Event()
    loop = notifier.Notifier(
        settings(("http://127.0.0.1:9/",)), lambda: db.connect(database_url, name), stop
    )
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()

    def waiting() -> bool:
        # The loop's own thread is inside its wait (select), where only a wake-up or the
        # scan interval can end it.
        frame = sys._current_frames().get(thread.ident)
        while frame is not None:
            if frame.f_code.co_name == "_wait":
                return True
            frame = frame.f_back
        return False

    wait_until(waiting, message="the notifier waiting")
    stop.set()
    thread.join(30)
    assert not thread.is_alive()


def test_the_inbox_prune_takes_finished_notifications_and_keeps_pending_ones(
    conn: db.Connection,
) -> None:
    """`prune_events` also deletes delivered and dead notifications created before its
    cutoff, never a pending one however old, nor a recent one; --dry-run deletes none."""
    configure(conn, "https://a.example/hook")
    track(conn)
    for status in ("processing", "succeeded"):
        apply(conn, status)
    track(conn, "outboxtraining0000000000b")
    for status in ("processing", "failed"):
        apply(conn, status, "outboxtraining0000000000b")
    ids = [row["id"] for row in rows(conn)]
    aged = dict(zip(ids, ("delivered", "dead", "pending", "delivered"), strict=True))
    with conn, conn.cursor() as cur:
        for notification_id, status in aged.items():
            age = "1 hour" if notification_id == ids[-1] else "40 days"
            cur.execute(
                "UPDATE webhook_sync.notifications SET status = %s,"
                " created_at = now() - %s::interval WHERE id = %s",
                (status, age, notification_id),
            )

    operations.prune_events(conn, timedelta(days=30), dry_run=True)
    after_dry_run = [row["id"] for row in rows(conn)]
    operations.prune_events(conn, timedelta(days=30))

    assert after_dry_run == ids
    assert [(row["id"], row["status"]) for row in rows(conn)] == [
        (ids[2], "pending"),
        (ids[3], "delivered"),
    ]
