"""`webhook-sync trigger` against a real HTTP receiver that verifies with standardwebhooks."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import standardwebhooks

from tests.support import FIXTURES, free_port, run_cli
from tests.web_support import sign_headers
from tests.webhook_receiver import Received, WebhookReceiver
from webhook_sync.dev import trigger, trigger_events

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def check(delivery: Received) -> int:
    """What a strict receiver answers: 200 if it verifies, 401 if not, 400 if malformed."""
    try:
        standardwebhooks.Webhook(SECRET).verify(delivery.body, delivery.headers)
    except standardwebhooks.WebhookVerificationError:
        return 401
    except ValueError:
        return 400
    return 200


@pytest.fixture()
def receiver() -> Iterator[WebhookReceiver]:
    """A receiver that verifies each webhook with SECRET and answers accordingly."""
    with WebhookReceiver(respond=check) as recorder:
        yield recorder


def send(event: str, receiver: WebhookReceiver, **options: Any) -> list[trigger.Answer]:
    """Trigger `event` at the receiver with SECRET, printing nothing."""
    return trigger.trigger(event, receiver.url, secret=SECRET, echo=lambda line: None, **options)


def body(delivery: Received) -> dict[str, Any]:
    """The decoded JSON body of a received webhook."""
    return json.loads(delivery.body)


@pytest.mark.parametrize("event", trigger_events.STATUS_EVENTS)
def test_each_status_sends_one_verified_webhook(receiver: WebhookReceiver, event: str):
    """A status event sends one webhook that verifies, whose body has that status."""
    answers = send(event, receiver)

    (delivery,) = receiver.received
    assert delivery.answered == 200
    assert answers[0].status == 200
    assert body(delivery)["status"] == event
    assert re.fullmatch(r"[a-z0-9]{26}", body(delivery)["id"])
    assert delivery.headers["content-type"] == "application/json"


def test_succeeded_has_the_published_completed_webhook_keys(receiver: WebhookReceiver):
    """The succeeded body has every key of the captured completed webhook, output included."""
    send("succeeded", receiver)

    sent = body(receiver.received[0])
    example = json.loads(
        (FIXTURES / "replicate" / "training-webhook-completed-event-succeeded.json").read_text()
    )
    assert set(example) <= set(sent)
    assert re.fullmatch(r"[\w-]+/[\w-]+:[0-9a-f]{64}", sent["output"]["version"])
    assert sent["output"]["weights"].startswith("https://")


def test_training_id_option_sets_the_body_id(receiver: WebhookReceiver):
    """--training-id puts that id in the body."""
    send("processing", receiver, training_id="abcdefghijklmnopqrstuvwxyz")

    assert body(receiver.received[0])["id"] == "abcdefghijklmnopqrstuvwxyz"


def test_duplicate_sends_the_same_message_twice(receiver: WebhookReceiver):
    """duplicate sends one succeeded message twice: same webhook-id, same bytes."""
    send("duplicate", receiver)

    first, second = receiver.received
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    assert [first.answered, second.answered] == [200, 200]


def test_out_of_order_sends_a_late_processing_after_succeeded(receiver: WebhookReceiver):
    """out-of-order sends succeeded, then processing for the same training, both verified."""
    send("out-of-order", receiver)

    first, second = receiver.received
    assert [body(first)["status"], body(second)["status"]] == ["succeeded", "processing"]
    assert body(first)["id"] == body(second)["id"]
    assert first.headers["webhook-id"] != second.headers["webhook-id"]
    assert [first.answered, second.answered] == [200, 200]


def test_stale_timestamp_is_signed_but_too_old(receiver: WebhookReceiver):
    """stale-timestamp carries a correct signature for a timestamp ten minutes back."""
    send("stale-timestamp", receiver)

    (delivery,) = receiver.received
    assert delivery.answered == 401
    stamp = datetime.fromtimestamp(int(delivery.headers["webhook-timestamp"]), tz=UTC)
    expected = sign_headers(
        delivery.body, secret=SECRET, webhook_id=delivery.headers["webhook-id"], signed_at=stamp
    )["webhook-signature"]
    assert delivery.headers["webhook-signature"] == expected


@pytest.mark.parametrize("event", ["old-secret", "bad-signature"])
def test_wrong_signatures_do_not_verify(receiver: WebhookReceiver, event: str):
    """old-secret and bad-signature send well-formed signatures that do not match."""
    send(event, receiver)

    (delivery,) = receiver.received
    assert delivery.answered == 401
    assert delivery.headers["webhook-signature"].startswith("v1,")


def test_malformed_signature_header_trips_the_valueerror(receiver: WebhookReceiver):
    """malformed-signature-header makes standardwebhooks raise ValueError, not its own error."""
    send("malformed-signature-header", receiver)

    assert receiver.received[0].answered == 400


def test_huge_logs_sends_megabytes_that_still_verify(receiver: WebhookReceiver):
    """huge-logs sends a succeeded body with about 5 MiB of multi-line logs, signed."""
    send("huge-logs", receiver)

    (delivery,) = receiver.received
    assert len(delivery.body) > 5 * 1024 * 1024
    assert body(delivery)["logs"].count("\n") > 10_000
    assert delivery.answered == 200


def test_the_cli_prints_each_answer_and_uses_the_configured_secret(receiver: WebhookReceiver):
    """`webhook-sync trigger duplicate` signs with REPLICATE_WEBHOOK_SECRET, prints 2 answers."""
    result = run_cli(
        "trigger", "duplicate", "--url", receiver.url, env={"REPLICATE_WEBHOOK_SECRET": SECRET}
    )

    assert result.returncode == 0, result.stderr
    answers = [line for line in result.stdout.splitlines() if line.startswith("<- ")]
    assert answers == ['<- 200 {"ok":true}', '<- 200 {"ok":true}']
    assert [delivery.answered for delivery in receiver.received] == [200, 200]


def test_the_cli_prints_a_refusal_too(receiver: WebhookReceiver):
    """A 401 from the endpoint is printed with its body; the command still succeeds."""
    result = run_cli("trigger", "bad-signature", "--url", receiver.url, "--secret", SECRET)

    assert result.returncode == 0, result.stderr
    assert '<- 401 {"error":"refused"}' in result.stdout


def test_the_cli_fails_when_nothing_listens():
    """An endpoint that does not answer is a short error and exit code 1."""
    url = f"http://127.0.0.1:{free_port()}/webhooks/replicate"

    result = run_cli("trigger", "succeeded", "--url", url, "--secret", SECRET)

    assert result.returncode == 1
    assert "did not answer" in result.stderr


def test_the_cli_needs_a_secret():
    """Without --secret or REPLICATE_WEBHOOK_SECRET the command says what is missing."""
    result = run_cli(
        "trigger",
        "succeeded",
        "--url",
        "http://127.0.0.1:9/x",
        env={"REPLICATE_WEBHOOK_SECRET": ""},
    )

    assert result.returncode == 1
    assert "REPLICATE_WEBHOOK_SECRET" in result.stderr


def test_the_cli_refuses_a_malformed_secret():
    """A --secret that is not whsec_<base64> is a short error, and nothing is sent."""
    result = run_cli("trigger", "succeeded", "--url", "http://127.0.0.1:9/x", "--secret", "nope")

    assert result.returncode == 1
    assert "whsec_" in result.stderr
