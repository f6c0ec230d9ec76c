"""Verify a saved Standard Webhooks delivery without a timestamp limit, for replays (pure).

The live path (`signing`) wraps `standardwebhooks`, whose 5-minute window cannot be turned
off; a replayed delivery is late by nature, so this checks only the HMAC: SHA-256 over
`{webhook-id}.{webhook-timestamp}.{body}` keyed with the base64 secret after `whsec_`,
compared in constant time against every `v1,` entry of `webhook-signature`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from webhook_sync import errors

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"


@dataclass(frozen=True)
class Verified:
    """A delivery whose signature matched: which secret (1-based position) and its headers."""

    secret_position: int
    webhook_id: str
    timestamp: int

    @property
    def signed_at(self) -> datetime:
        """When the sender signed the delivery (its `webhook-timestamp`), in UTC."""
        return datetime.fromtimestamp(self.timestamp, UTC)


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; SignatureError when it is not base64."""
    text = secret.strip()
    if text.startswith(SECRET_PREFIX):
        text = text[len(SECRET_PREFIX) :]
    try:
        # Unpadded secrets exist in the wild; standardwebhooks accepts them too.
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise errors.SignatureError("the secret is not valid base64") from exc
    if not key:
        raise errors.SignatureError("the secret is empty")
    return key


def compute_signature(secret: str, webhook_id: str, timestamp: int | str, body: str | bytes) -> str:
    """The `v1,<base64>` signature a sender holding `secret` puts on this delivery."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    signed = f"{webhook_id}.{timestamp}.".encode() + raw
    digest = hmac.new(decode_secret(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value looked up case-insensitively, or None."""
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name:
            return value if isinstance(value, str) else None
    return None


def signature_entries(header: str) -> list[bytes]:
    """The decoded `v1` signatures of a header; other versions and malformed entries are skipped."""
    entries = []
    for entry in header.split():
        version, sep, encoded = entry.partition(",")
        if version != "v1" or not sep:
            continue
        try:
            entries.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return entries


def verify_delivery(
    secrets: Sequence[str], headers: Mapping[str, str], body: str | bytes
) -> Verified:
    """Check a saved delivery against each secret in turn, ignoring its age.

    Raises MalformedHeadersError when a header is missing or unusable, NoMatchingSecretError
    when no secret produced any of its signatures. Messages name secrets by position only.
    """
    webhook_id = header_value(headers, ID_HEADER)
    timestamp_text = header_value(headers, TIMESTAMP_HEADER)
    signature = header_value(headers, SIGNATURE_HEADER)
    missing = [
        name
        for name, value in (
            (ID_HEADER, webhook_id),
            (TIMESTAMP_HEADER, timestamp_text),
            (SIGNATURE_HEADER, signature),
        )
        if not value
    ]
    if missing:
        raise errors.MalformedHeadersError("missing header(s): " + ", ".join(missing))
    assert webhook_id and timestamp_text and signature  # narrowed by the check above
    timestamp_text = timestamp_text.strip()
    # Ten or eleven ASCII digits covers every date a datetime can hold after 2001.
    if not re.fullmatch(r"[0-9]{1,11}", timestamp_text):
        raise errors.MalformedHeadersError(f"{TIMESTAMP_HEADER} is not a whole number of seconds")
    candidates = signature_entries(signature)
    if not candidates:
        raise errors.MalformedHeadersError(f"{SIGNATURE_HEADER} holds no usable v1 signature")
    if not secrets:
        raise errors.NoMatchingSecretError("no webhook secret is configured")
    raw = body.encode("utf-8") if isinstance(body, str) else body
    signed = f"{webhook_id}.{timestamp_text}.".encode() + raw
    unusable = []
    for position, secret in enumerate(secrets, start=1):
        try:
            key = decode_secret(secret)
        except errors.SignatureError:
            unusable.append(position)
            continue
        expected = hmac.new(key, signed, hashlib.sha256).digest()
        # Every entry is compared, matched or not, so timing says nothing about which one.
        matches = [hmac.compare_digest(expected, candidate) for candidate in candidates]
        if any(matches):
            return Verified(position, webhook_id, int(timestamp_text))
    note = f"; secret(s) #{', #'.join(map(str, unusable))} are not valid base64" if unusable else ""
    raise errors.NoMatchingSecretError(
        f"the signature matches none of the {len(secrets)} configured secret(s){note}"
    )
