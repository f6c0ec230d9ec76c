"""Standard Webhooks signatures: the one implementation for live deliveries and replays (pure).

A signature is `v1,` + base64(HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")),
where the key is the base64 after `whsec_` in the secret. `standardwebhooks` computes the
same thing, but only over a whole body held in memory and with a 5-minute window that
cannot be turned off; here the headers and the timestamp are judged first (`check_headers`),
the body is fed in chunks as it arrives (`BodyCheck.update`), and a replay of a saved
delivery passes `tolerance=None`. The tests keep `standardwebhooks` as the reference: the
published vectors and anything its `sign()` produces must verify.

Secrets are decoded strictly (`decode_secret`) by the settings, by this verifier and for
the account's secret fetched from Replicate; a refusal names a secret by position only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from webhook_sync import errors

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
# The spec asks for 24 to 64 random bytes and Replicate's are 24; under 16 is a typo or a
# placeholder (`whsec_AA` is one byte), not a key anyone should accept forgeries against.
MIN_SECRET_BYTES = 16
ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
HEADER_NAMES = (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
TOLERANCE = timedelta(minutes=5)
# The id is the inbox's primary key: keep it short enough for an index entry and printable.
MAX_WEBHOOK_ID_LENGTH = 256
# 9999-12-31T23:59:59Z, the last second a datetime can hold.
MAX_TIMESTAMP = 253_402_300_799
SIGNATURE_BYTES = hashlib.sha256().digest_size
_PRINTABLE_ID = re.compile(r"[\x21-\x7e]+")
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
# Standard base64 only, padding optional: unpadded secrets exist in the wild.
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_ENTRY_FORMAT = f"v1,<base64 of {SIGNATURE_BYTES} bytes>"


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; ValueError saying what is wrong with it
    (the message never contains the secret; callers add its position)."""
    if not secret.startswith(SECRET_PREFIX) or len(secret) == len(SECRET_PREFIX):
        raise ValueError("must look like whsec_<base64>")
    text = secret[len(SECRET_PREFIX) :]
    if not _BASE64.fullmatch(text):
        raise ValueError("is not valid base64 after whsec_")
    try:
        key = base64.b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64 after whsec_") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"is shorter than {MIN_SECRET_BYTES} bytes once decoded")
    return key


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value of a body sent with this id and timestamp, signed with
    one decoded secret (`decode_secret`): what our own notifications carry."""
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


@dataclass(frozen=True)
class SignedHeaders:
    """The three headers of a delivery, read: its id, timestamp and decoded `v1` entries."""

    webhook_id: str
    timestamp: int
    signatures: tuple[bytes, ...]
    malformed: int  # entries that could not be read (no comma, bad base64, wrong length)

    @property
    def signed_at(self) -> datetime:
        """When the sender signed this attempt (its `webhook-timestamp`), in UTC."""
        return datetime.fromtimestamp(self.timestamp, UTC)


@dataclass(frozen=True)
class Verified:
    """A delivery whose signature matched: its id, when it was signed, and which secret."""

    webhook_id: str
    signed_at: datetime
    secret_position: int


def header_value(headers: Mapping[str, str], name: str) -> str:
    """A header's value looked up case-insensitively, stripped; "" when absent."""
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name:
            return value.strip() if isinstance(value, str) else ""
    return ""


def parse_headers(headers: Mapping[str, str]) -> SignedHeaders:
    """Read the id, timestamp and signature headers; MalformedHeadersError when one is
    missing or unusable. Malformed signature entries are only counted here: a valid entry
    beside them is still checked (Standard Webhooks lets senders add entries we cannot read)."""
    webhook_id = header_value(headers, ID_HEADER)
    timestamp = header_value(headers, TIMESTAMP_HEADER)
    signature = header_value(headers, SIGNATURE_HEADER)
    found = {ID_HEADER: webhook_id, TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature}
    missing = [name for name, value in found.items() if not value]
    if missing:
        raise errors.MalformedHeadersError("missing header " + ", ".join(missing))
    if len(webhook_id) > MAX_WEBHOOK_ID_LENGTH or not _PRINTABLE_ID.fullmatch(webhook_id):
        raise errors.MalformedHeadersError(
            f"webhook-id must be 1 to {MAX_WEBHOOK_ID_LENGTH} printable ASCII characters"
        )
    if not _TIMESTAMP.fullmatch(timestamp) or int(timestamp) > MAX_TIMESTAMP:
        raise errors.MalformedHeadersError("webhook-timestamp must be whole seconds since 1970")
    signatures, malformed = _read_entries(signature)
    return SignedHeaders(webhook_id, int(timestamp), signatures, malformed)


def _read_entries(header: str) -> tuple[tuple[bytes, ...], int]:
    """The decoded `v1` entries of a signature header and how many entries were malformed;
    entries of other versions (`v2,…`) are skipped as the spec says."""
    signatures = []
    malformed = 0
    for entry in header.split():
        version, sep, encoded = entry.partition(",")
        if not sep or not version:
            malformed += 1
            continue
        if version != "v1":
            continue
        decoded = _decode_signature(encoded)
        if decoded is None:
            malformed += 1
        else:
            signatures.append(decoded)
    return tuple(signatures), malformed


def _decode_signature(encoded: str) -> bytes | None:
    if not _BASE64.fullmatch(encoded) or len(encoded) % 4:
        return None
    try:
        decoded = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded if len(decoded) == SIGNATURE_BYTES else None


def check_headers(
    headers: Mapping[str, str], *, tolerance: timedelta | None = TOLERANCE
) -> SignedHeaders:
    """Everything that can be judged before reading the body or knowing a secret: the
    headers' shape, a readable `v1` entry, the timestamp within `tolerance` of now (None:
    any age). Raises MalformedHeadersError, NoMatchingSecretError or StaleTimestampError."""
    signed = parse_headers(headers)
    if not signed.signatures:
        raise _no_match(signed)
    if tolerance is not None:
        age = time.time() - signed.timestamp
        limit = tolerance.total_seconds()
        minutes = f"{limit / 60:g} minutes"
        if age > limit:
            raise errors.StaleTimestampError(f"webhook-timestamp is more than {minutes} old")
        if age < -limit:
            raise errors.StaleTimestampError(
                f"webhook-timestamp is more than {minutes} in the future"
            )
    return signed


class BodyCheck:
    """The HMAC of one delivery under every secret, fed the body chunk by chunk."""

    def __init__(self, keys: Sequence[bytes], signed: SignedHeaders) -> None:
        self._signed = signed
        prefix = f"{signed.webhook_id}.{signed.timestamp}.".encode()
        self._macs = [hmac.new(key, prefix, hashlib.sha256) for key in keys]

    def update(self, chunk: bytes) -> None:
        """Feed the next bytes of the raw body, exactly as received."""
        for mac in self._macs:
            mac.update(chunk)

    def finish(self) -> Verified:
        """The verified delivery; NoMatchingSecretError when no entry matches any secret, or
        MalformedHeadersError when none matches and some entries could not be read."""
        for position, mac in enumerate(self._macs, start=1):
            expected = mac.digest()
            # Every entry is compared, so timing does not tell which one came close.
            matches = [hmac.compare_digest(expected, entry) for entry in self._signed.signatures]
            if any(matches):
                return Verified(self._signed.webhook_id, self._signed.signed_at, position)
        raise _no_match(self._signed)


def _no_match(signed: SignedHeaders) -> errors.SignatureError:
    """The refusal when nothing matched: malformed entries are the likelier cause, if any."""
    if signed.malformed:
        readable = f" and none of the {len(signed.signatures)} readable ones matches"
        return errors.MalformedHeadersError(
            f"webhook-signature has {signed.malformed} malformed entr"
            f"{'y' if signed.malformed == 1 else 'ies'}"
            + (readable if signed.signatures else "")
            + f" (expected space-separated {_ENTRY_FORMAT})"
        )
    if not signed.signatures:
        return errors.NoMatchingSecretError("webhook-signature holds no v1 entry")
    return errors.NoMatchingSecretError()


class Verifier:
    """Checks deliveries against every configured secret; a match with any one is enough.

    `tolerance` bounds how far the signing time may be from now, either way; None turns
    the check off (a saved delivery replayed later is late by nature).
    """

    def __init__(self, secrets: Sequence[str], *, tolerance: timedelta | None = TOLERANCE) -> None:
        if not secrets:
            raise errors.ConfigError("no webhook secret configured")
        keys = []
        for position, secret in enumerate(secrets, start=1):
            try:
                keys.append(decode_secret(secret))
            except ValueError as exc:
                raise errors.ConfigError(f"webhook secret #{position} {exc}") from None
        self._keys = tuple(keys)
        self._tolerance = tolerance

    def start(self, signed: SignedHeaders) -> BodyCheck:
        """A check of these headers' signatures over a body still to be fed."""
        return BodyCheck(self._keys, signed)

    def verify(self, headers: Mapping[str, str], body: bytes | str) -> Verified:
        """Check a whole body at once (a saved delivery, a test); the errors of
        `check_headers` and `BodyCheck.finish`."""
        check = self.start(check_headers(headers, tolerance=self._tolerance))
        check.update(body.encode("utf-8") if isinstance(body, str) else body)
        return check.finish()
