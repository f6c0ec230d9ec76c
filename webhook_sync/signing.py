"""Standard Webhooks signature checks over the raw body, with several secrets (pure).

`standardwebhooks` does the HMAC, the constant-time comparison and the 5-minute
tolerance. This module only adds what it lacks: more than one secret (rotation), a
precise reason for each refusal, and the same refusal whatever odd input the library
answers with a plain ValueError (a malformed signature entry, bad base64).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import standardwebhooks
from standardwebhooks.webhooks import EmptyWebhookSecretError, WebhookVerificationError

from webhook_sync import errors

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
# The id is the inbox's primary key: keep it short enough for an index entry and printable.
MAX_WEBHOOK_ID_LENGTH = 256
_PRINTABLE_ID = re.compile(r"[\x21-\x7e]+")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
# standardwebhooks words its refusals this way (pinned <2 in setup.cfg).
_STALE_MESSAGES = {
    "Message timestamp too old": "webhook-timestamp is more than 5 minutes old",
    "Message timestamp too new": "webhook-timestamp is more than 5 minutes in the future",
}
_NO_MATCH_MESSAGE = "No matching signature found"


@dataclass(frozen=True)
class VerifiedDelivery:
    """A delivery whose signature matched one of our secrets."""

    webhook_id: str
    signed_at: datetime
    body: str


class Verifier:
    """Checks deliveries against every configured secret; a match with any one is enough."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise errors.ConfigError("no webhook secret configured")
        webhooks = []
        for position, secret in enumerate(secrets, start=1):
            try:
                webhooks.append(standardwebhooks.Webhook(secret))
            except (EmptyWebhookSecretError, ValueError) as exc:
                # The secret is never echoed; its position identifies it.
                raise errors.ConfigError(f"webhook secret #{position} is not usable") from exc
        self._webhooks = tuple(webhooks)

    def verify(self, body: bytes, headers: Mapping[str, str]) -> VerifiedDelivery:
        """Return the verified delivery, or raise MalformedHeadersError, StaleTimestampError
        or NoMatchingSecretError (the body must be UTF-8: JSON is)."""
        webhook_id, timestamp, signature = required_headers(headers)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.InvalidTrainingError("body is not UTF-8 text") from None
        signed = {ID_HEADER: webhook_id, TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature}
        for webhook in self._webhooks:
            try:
                webhook.verify(text, signed, json_parse=False)
            except WebhookVerificationError as exc:
                reason = str(exc)
                if reason in _STALE_MESSAGES:
                    raise errors.StaleTimestampError(_STALE_MESSAGES[reason]) from None
                if reason != _NO_MATCH_MESSAGE:
                    raise errors.MalformedHeadersError(
                        f"invalid webhook headers: {reason}"
                    ) from None
            except ValueError:
                # standardwebhooks raises a plain ValueError for an entry without a comma,
                # with two, or with bad base64, even when a valid entry follows.
                raise errors.MalformedHeadersError(
                    "webhook-signature is malformed (expected space-separated v1,<base64>)"
                ) from None
            else:
                return VerifiedDelivery(webhook_id, parse_timestamp(timestamp), text)
        raise errors.NoMatchingSecretError()


def required_headers(headers: Mapping[str, str]) -> tuple[str, str, str]:
    """The id, timestamp and signature headers, checked for shape; MalformedHeadersError."""
    lowered = {key.lower(): value for key, value in headers.items()}
    missing = [
        name for name in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER) if not lowered.get(name)
    ]
    if missing:
        raise errors.MalformedHeadersError("missing header " + ", ".join(missing))
    webhook_id = lowered[ID_HEADER].strip()
    timestamp = lowered[TIMESTAMP_HEADER].strip()
    signature = lowered[SIGNATURE_HEADER].strip()
    if len(webhook_id) > MAX_WEBHOOK_ID_LENGTH or not _PRINTABLE_ID.fullmatch(webhook_id):
        raise errors.MalformedHeadersError(
            f"webhook-id must be 1 to {MAX_WEBHOOK_ID_LENGTH} printable ASCII characters"
        )
    if not _TIMESTAMP.fullmatch(timestamp):
        raise errors.MalformedHeadersError("webhook-timestamp must be whole seconds since 1970")
    return webhook_id, timestamp, signature


def parse_timestamp(timestamp: str) -> datetime:
    """The `webhook-timestamp` header (seconds since the epoch) as a UTC datetime."""
    return datetime.fromtimestamp(int(timestamp), tz=UTC)
