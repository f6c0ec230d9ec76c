"""`webhook-sync trigger`: sign and send Replicate-shaped webhooks to any endpoint.

Like `stripe trigger`: one event name builds one or more training webhooks (the same
body shape the simulator sends), signs each per Standard Webhooks and POSTs it. Besides
the five statuses there are adversarial events a receiver must survive: a duplicate, an
out-of-order pair, a stale timestamp, an old secret, a bad or malformed signature, and
a body with megabytes of logs.
"""

from __future__ import annotations

import base64
import json
import random
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests
import standardwebhooks

from webhook_sync import errors
from webhook_sync.dev import trigger_events
from webhook_sync.dev.simulator import settings
from webhook_sync.dev.simulator import state as simulator_state

HUGE_LOGS_BYTES = 5 * 1024 * 1024
# Outside the 5-minute tolerance that Replicate's docs and standardwebhooks use.
STALE_SECONDS = 10 * 60
SHOWN_BODY_CHARS = 500


class TriggerError(errors.WebhookSyncError):
    """The webhook could not be triggered."""


@dataclass(frozen=True)
class Outgoing:
    """One signed request to send: what it is, its headers and its exact body."""

    label: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Answer:
    """What the endpoint answered to one request (status None: no answer at all)."""

    outgoing: Outgoing
    status: int | None
    body: str
    error: str | None = None


def training_object(
    training_id: str, status: str, now: datetime, webhook: str | None = None
) -> dict[str, Any]:
    """A training in `status` at `now`, shaped like a Replicate training webhook body."""
    now_us = round(now.timestamp() * simulator_state.US)
    minute = 60 * simulator_state.US
    started, completed = now_us - minute, now_us + 10 * minute
    if status in ("succeeded", "failed"):
        completed = now_us - 1000
    elif status == "starting":
        started = now_us + minute
    training = simulator_state.SimTraining(
        id=training_id,
        model="sim-owner/sim-trainer",
        version="5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa",
        destination="sim-owner/sim-destination",
        input={"input_images": "https://example.com/images.zip", "steps": 1000},
        created_us=started - minute // 2,
        started_us=started,
        completed_us=completed,
        outcome="failed" if status == "failed" else "succeeded",
        webhook=webhook,
        events=("start", "completed") if webhook else settings.EVENTS,
        canceled_us=now_us - 1000 if status == "canceled" else None,
    )
    return training.render(now_us, "webhook")


def sign(secret: str, webhook_id: str, timestamp: datetime, body: str) -> dict[str, str]:
    """The three Standard Webhooks headers (plus Content-Type) for `body` with `secret`."""
    try:
        settings.check_secret(secret)
    except settings.SimulatorError as exc:
        raise TriggerError(str(exc)) from exc
    signer = standardwebhooks.Webhook(secret)
    return {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signer.sign(webhook_id, timestamp, body),
    }


def new_webhook_id() -> str:
    """A fresh `msg_…` id."""
    return "msg_" + secrets.token_urlsafe(20).replace("-", "x").replace("_", "y")


def new_training_id() -> str:
    """A fresh 26-character training id."""
    return simulator_state.new_id(random.Random(secrets.randbits(64)))


def plan(
    event: str, training_id: str, secret: str, url: str, now: datetime | None = None
) -> list[Outgoing]:
    """The signed requests that make up `event`, in the order they are to be sent."""
    if event not in trigger_events.EVENTS:
        raise TriggerError(f"unknown event {event!r}; known: {', '.join(trigger_events.EVENTS)}")
    now = now or datetime.now(UTC)

    def message(
        status: str, label: str, *, at: datetime | None = None, logs: str | None = None
    ) -> tuple[str, str, dict[str, str]]:
        obj = training_object(training_id, status, now, webhook=url)
        if logs is not None:
            obj["logs"] = logs
        body = json.dumps(obj, separators=(",", ":"))
        webhook_id = new_webhook_id()
        return label, body, sign(secret, webhook_id, at or now, body)

    if event in trigger_events.STATUS_EVENTS:
        planned = [message(event, event)]
    elif event == "duplicate":
        label, body, headers = message("succeeded", "succeeded")
        # A redelivery keeps the webhook-id and the body: receivers must de-duplicate on it.
        planned = [(label, body, headers), ("succeeded again, same webhook-id", body, headers)]
    elif event == "out-of-order":
        planned = [
            message("succeeded", "succeeded"),
            message("processing", "processing, arriving late"),
        ]
    elif event == "stale-timestamp":
        stale = datetime.fromtimestamp(now.timestamp() - STALE_SECONDS, tz=UTC)
        planned = [message("succeeded", "succeeded, signed 10 minutes ago", at=stale)]
    elif event == "old-secret":
        label, body, headers = message("succeeded", "succeeded, signed with another secret")
        other = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        planned = [(label, body, sign(other, headers["webhook-id"], now, body))]
    elif event == "bad-signature":
        label, body, headers = message("succeeded", "succeeded, wrong signature")
        forged = "v1," + base64.b64encode(secrets.token_bytes(32)).decode()
        planned = [(label, body, {**headers, "webhook-signature": forged})]
    elif event == "malformed-signature-header":
        label, body, headers = message("succeeded", "succeeded, malformed signature header")
        # No comma: standardwebhooks raises a bare ValueError on this, not its own error.
        planned = [(label, body, {**headers, "webhook-signature": "v1abc"})]
    else:  # huge-logs
        planned = [message("succeeded", "succeeded with 5 MiB of logs", logs=huge_logs())]
    return [Outgoing(label, headers, body.encode()) for label, body, headers in planned]


def huge_logs(size: int = HUGE_LOGS_BYTES) -> str:
    """Multi-line training logs of about `size` bytes."""
    line = "step {:>7} loss=0.1234 lr=0.0004 | INFO  | writing checkpoint shard to disk\n"
    count = size // len(line.format(0)) + 1
    return "".join(line.format(step) for step in range(count))


def send(url: str, outgoing: list[Outgoing], timeout: float = 10.0) -> list[Answer]:
    """POST each request in turn, exactly as planned (same headers and bytes).

    A connection failure is reported as an answer with no status rather than raised.
    """
    answers = []
    with requests.Session() as session:
        for request in outgoing:
            try:
                response = session.post(
                    url,
                    data=request.body,
                    headers=request.headers,
                    timeout=timeout,
                    allow_redirects=False,
                )
                answers.append(Answer(request, response.status_code, response.text))
            except requests.RequestException as exc:
                answers.append(Answer(request, None, "", error=type(exc).__name__))
    return answers


def configured_secret(environ: Mapping[str, str]) -> str:
    """The first secret in REPLICATE_WEBHOOK_SECRET; TriggerError if there is none."""
    try:
        secret = settings.configured_secret(environ)
    except settings.SimulatorError as exc:
        raise TriggerError(str(exc)) from exc
    if secret is None:
        raise TriggerError("no secret: pass --secret or set REPLICATE_WEBHOOK_SECRET")
    return secret


def trigger(
    event: str,
    url: str,
    *,
    secret: str,
    training_id: str | None = None,
    timeout: float = 10.0,
    echo: Callable[[str], None] = print,
) -> list[Answer]:
    """Build, sign and send `event` to `url`, printing each request and answer via `echo`."""
    training_id = training_id or new_training_id()
    answers = send(url, plan(event, training_id, secret, url), timeout)
    for answer in answers:
        request = answer.outgoing
        echo(
            f"-> POST {url}  {request.label}  training={training_id}"
            f"  webhook-id={request.headers['webhook-id']}  {len(request.body)} bytes"
        )
        if answer.status is None:
            echo(f"<- no answer ({answer.error})")
        else:
            cut = len(answer.body) > SHOWN_BODY_CHARS
            shown = answer.body[:SHOWN_BODY_CHARS] + ("…" if cut else "")
            echo(f"<- {answer.status} {shown}")
    if all(answer.status is None for answer in answers):
        raise TriggerError(f"{url} did not answer ({answers[0].error})")
    return answers
