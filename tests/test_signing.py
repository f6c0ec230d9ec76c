"""Webhook signature checks: the published vectors, rotation, tolerance and malformed input."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
import standardwebhooks.webhooks

from tests.support import FIXTURES
from tests.web_support import OTHER_SECRET, SECRET, UNKNOWN_SECRET, sign_headers
from webhook_sync import errors, signing

VECTORS = json.loads(
    (FIXTURES / "replicate" / "webhook-signature-test-vectors.json").read_text(encoding="utf-8")
)
CANONICAL = VECTORS["valid"][0]


def freeze_clock(monkeypatch: pytest.MonkeyPatch, timestamp: str) -> None:
    """Make standardwebhooks' tolerance check see `timestamp` as the current time."""
    frozen = datetime.fromtimestamp(int(timestamp), tz=UTC)

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def, override]
            return frozen.astimezone(tz) if tz else frozen.replace(tzinfo=None)

    monkeypatch.setattr(standardwebhooks.webhooks, "datetime", FrozenDatetime)


def vector_headers(vector: dict[str, str], signature: str) -> dict[str, str]:
    """The headers of a published vector with the given signature header."""
    return {
        "webhook-id": vector["webhook_id"],
        "webhook-timestamp": vector["webhook_timestamp"],
        "webhook-signature": signature,
    }


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_published_vectors_verify_with_the_clock_frozen(
    monkeypatch: pytest.MonkeyPatch, vector: dict[str, str]
) -> None:
    """Each published vector verifies, and signed_at is its timestamp in UTC."""
    freeze_clock(monkeypatch, vector["webhook_timestamp"])
    headers = vector_headers(vector, vector["expected_signature"])

    delivery = signing.Verifier([vector["secret"]]).verify(vector["body"].encode(), headers)

    assert delivery.webhook_id == vector["webhook_id"]
    assert delivery.body == vector["body"]
    assert delivery.signed_at == datetime.fromtimestamp(int(vector["webhook_timestamp"]), UTC)
    assert delivery.signed_at.tzinfo is not None


@pytest.mark.parametrize(
    ("vector", "case"),
    [
        (VECTORS["valid"][0], case)
        for case in VECTORS["invalid_for_vector_svix-standardwebhooks-canonical"]
    ]
    + [
        (VECTORS["valid"][1], case)
        for case in VECTORS["invalid_for_vector_standardwebhooks-rust-test_sign"]
    ],
    ids=lambda value: value.get("why", value.get("name", ""))[:40],
)
def test_published_invalid_signatures_are_refused(
    monkeypatch: pytest.MonkeyPatch, vector: dict[str, str], case: dict[str, str]
) -> None:
    """The published wrong signatures match no secret."""
    freeze_clock(monkeypatch, vector["webhook_timestamp"])
    headers = vector_headers(vector, case["signature_header"])

    with pytest.raises(errors.NoMatchingSecretError):
        signing.Verifier([vector["secret"]]).verify(vector["body"].encode(), headers)


def test_published_vector_is_stale_without_a_frozen_clock() -> None:
    """A correctly signed delivery from 2021 is refused as outside the tolerance."""
    headers = vector_headers(CANONICAL, CANONICAL["expected_signature"])

    with pytest.raises(errors.StaleTimestampError):
        signing.Verifier([CANONICAL["secret"]]).verify(CANONICAL["body"].encode(), headers)


def test_decoys_before_the_valid_signature_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A header listing decoy v1 and v2 entries before the valid one verifies."""
    freeze_clock(monkeypatch, CANONICAL["webhook_timestamp"])
    decoys = VECTORS["multi_signature_decoys"]["decoy_entries"]
    header = " ".join([*decoys, CANONICAL["expected_signature"]])

    delivery = signing.Verifier([CANONICAL["secret"]]).verify(
        CANONICAL["body"].encode(), vector_headers(CANONICAL, header)
    )

    assert delivery.webhook_id == CANONICAL["webhook_id"]


def test_replicate_docs_multi_signature_header_verifies(monkeypatch: pytest.MonkeyPatch) -> None:
    """The header example from Replicate's docs (valid entry first) verifies."""
    freeze_clock(monkeypatch, CANONICAL["webhook_timestamp"])
    header = VECTORS["multi_signature_decoys"]["replicate_docs_header_example"]

    delivery = signing.Verifier([CANONICAL["secret"]]).verify(
        CANONICAL["body"].encode(), vector_headers(CANONICAL, header)
    )

    assert delivery.body == CANONICAL["body"]


def test_rotation_accepts_old_and_new_secret_and_refuses_a_third() -> None:
    """With two secrets configured, either signs a valid delivery and a third does not."""
    verifier = signing.Verifier([SECRET, OTHER_SECRET])
    body = b'{"id": "t1", "status": "starting"}'

    old = verifier.verify(body, sign_headers(body, secret=SECRET))
    new = verifier.verify(body, sign_headers(body, secret=OTHER_SECRET))

    assert old.body == new.body
    with pytest.raises(errors.NoMatchingSecretError):
        verifier.verify(body, sign_headers(body, secret=UNKNOWN_SECRET))


@pytest.mark.parametrize(
    "offset", [timedelta(minutes=-5, seconds=-30), timedelta(minutes=5, seconds=30)]
)
def test_timestamps_beyond_five_minutes_either_way_are_stale(offset: timedelta) -> None:
    """A delivery signed more than 5 minutes in the past or future is refused."""
    body = b"{}"
    headers = sign_headers(body, signed_at=datetime.now(UTC) + offset)

    with pytest.raises(errors.StaleTimestampError):
        signing.Verifier([SECRET]).verify(body, headers)


def test_timestamp_within_tolerance_is_accepted() -> None:
    """A delivery signed four minutes ago still verifies."""
    body = b"{}"
    headers = sign_headers(body, signed_at=datetime.now(UTC) - timedelta(minutes=4))

    delivery = signing.Verifier([SECRET]).verify(body, headers)

    assert delivery.body == "{}"


def test_header_names_are_case_insensitive() -> None:
    """Upper-case header names are read like lower-case ones."""
    body = b"{}"
    headers = {key.upper(): value for key, value in sign_headers(body).items()}

    delivery = signing.Verifier([SECRET]).verify(body, headers)

    assert delivery.webhook_id == headers["WEBHOOK-ID"]


def test_signature_over_other_bytes_does_not_match() -> None:
    """Re-serialised JSON with the same meaning is not the signed body."""
    headers = sign_headers(b'{"a": 1}')

    with pytest.raises(errors.NoMatchingSecretError):
        signing.Verifier([SECRET]).verify(b'{"a":1}', headers)


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_malformed(missing: str) -> None:
    """Each of the three headers is required."""
    body = b"{}"
    headers = sign_headers(body)
    del headers[missing]

    with pytest.raises(errors.MalformedHeadersError, match=missing):
        signing.Verifier([SECRET]).verify(body, headers)


@pytest.mark.parametrize(
    "header",
    ["v1abc", "v1,a,b", "v1,!!!not-base64", "v1,abc", "v1abc {valid}"],
)
def test_malformed_signature_entries_are_malformed_not_value_errors(header: str) -> None:
    """Entries standardwebhooks answers with a plain ValueError become MalformedHeadersError."""
    body = b"{}"
    headers = sign_headers(body)
    headers["webhook-signature"] = header.format(valid=headers["webhook-signature"])

    with pytest.raises(errors.MalformedHeadersError):
        signing.Verifier([SECRET]).verify(body, headers)


@pytest.mark.parametrize("timestamp", ["soon", "1.5e9", "nan", "-1", "9" * 13, ""])
def test_unusable_timestamp_is_malformed(timestamp: str) -> None:
    """A webhook-timestamp that is not whole seconds is refused before any HMAC."""
    body = b"{}"
    headers = sign_headers(body)
    headers["webhook-timestamp"] = timestamp

    with pytest.raises(errors.MalformedHeadersError):
        signing.Verifier([SECRET]).verify(body, headers)


@pytest.mark.parametrize("webhook_id", ["msg 1", "x" * 257, "msg\x001", "msg_é"])
def test_implausible_webhook_id_is_malformed(webhook_id: str) -> None:
    """A webhook-id the inbox could not key on is refused."""
    body = b"{}"
    headers = sign_headers(body)
    headers["webhook-id"] = webhook_id

    with pytest.raises(errors.MalformedHeadersError, match="webhook-id"):
        signing.Verifier([SECRET]).verify(body, headers)


def test_body_that_is_not_utf8_is_invalid() -> None:
    """Bytes that are not UTF-8 cannot be a JSON training, signed or not."""
    headers = sign_headers(b"{}")

    with pytest.raises(errors.InvalidTrainingError, match="UTF-8"):
        signing.Verifier([SECRET]).verify(b'{"id": "\xff"}', headers)


def test_no_secret_is_a_config_error() -> None:
    """A verifier without secrets cannot be built."""
    with pytest.raises(errors.ConfigError):
        signing.Verifier([])


def test_unusable_secret_is_a_config_error_that_does_not_echo_it() -> None:
    """A secret that is not base64 is named by position, never printed."""
    with pytest.raises(errors.ConfigError, match="#2") as raised:
        signing.Verifier([SECRET, "whsec_a"])

    assert "whsec_a" not in str(raised.value)
