"""The events `webhook-sync trigger` sends, apart from the sending: the CLI lists them
in its help without importing the simulator, requests and standardwebhooks."""

from __future__ import annotations

STATUS_EVENTS = ("starting", "processing", "succeeded", "failed", "canceled")
ADVERSARIAL_EVENTS = (
    "duplicate",
    "out-of-order",
    "stale-timestamp",
    "old-secret",
    "bad-signature",
    "malformed-signature-header",
    "huge-logs",
)
EVENTS = STATUS_EVENTS + ADVERSARIAL_EVENTS
