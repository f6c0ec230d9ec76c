"""Webhook signatures: the published vectors, standardwebhooks as the reference, rotation,
tolerance, malformed headers and strictly decoded secrets."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
import standardwebhooks
import time_machine
from hypothesis import given
from hypothesis import strategies as st

from tests.support import FIXTURES
from tests.web_support import OTHER_SECRET, SECRET, UNKNOWN_SECRET, sign_headers
from webhook_sync import errors, signing

VECTORS = json.loads(
    (FIXTURES / "replicate" / "webhook-signature-test-vectors.json").read_text(encoding="utf-8")
)
VALID = VECTORS["valid"]
CANONICAL = VALID[0]
NEGATIVE_CASES = [
    (next(v for v in VALID if v["name"] == name.removeprefix("invalid_for_vector_")), case)
    for name, cases in VECTORS.items()
    if name.startswith("invalid_for_vector_")
    for case in cases
]
MALFORMED_ENTRIES = ["v1abc", "v1,a,b", "v1,!!!not-base64", "v1,abc", "v1,YWJj", ",x"]


def vector_headers(vector: dict[str, str], signature: str | None = None) -> dict[str, str]:
    """The headers of a published vector, with its own or another signature header."""
    return {
        "webhook-id": vector["webhook_id"],
        "webhook-timestamp": vector["webhook_timestamp"],
        "webhook-signature": signature or vector["expected_signature"],
    }


def at_signing_time(vector: dict[str, str]) -> time_machine.travel:
    """The clock stopped at the moment the vector was signed."""
    return time_machine.travel(int(vector["webhook_timestamp"]), tick=False)


def verify(headers: dict[str, str], body: bytes | str, *secrets: str) -> signing.Verified:
    """Verify with the live 5-minute tolerance against `secrets` (SECRET by default)."""
    return signing.Verifier(secrets or (SECRET,)).verify(headers, body)


# --- the published vectors and the reference library ----------------------------------------


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_published_vectors_verify_at_their_signing_time(vector: dict[str, str]) -> None:
    """Each published vector verifies live with the clock at its timestamp, as it does in
    standardwebhooks under the same clock, and signed_at is that moment in UTC."""
    with at_signing_time(vector):
        verified = verify(vector_headers(vector), vector["body"], vector["secret"])
        standardwebhooks.Webhook(vector["secret"]).verify(vector["body"], vector_headers(vector))

    assert verified.webhook_id == vector["webhook_id"]
    assert verified.signed_at == datetime.fromtimestamp(int(vector["webhook_timestamp"]), UTC)
    assert verified.secret_position == 1


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_published_vectors_verify_at_any_age_without_a_tolerance(vector: dict[str, str]) -> None:
    """A replay's check (tolerance=None) accepts the 2021/2022 vectors today."""
    verifier = signing.Verifier([vector["secret"]], tolerance=None)

    verified = verifier.verify(vector_headers(vector), vector["body"])

    assert verified.signed_at.year in (2021, 2022)


def test_published_vector_is_stale_today() -> None:
    """A correctly signed delivery from 2021 is refused live as outside the tolerance."""
    with pytest.raises(errors.StaleTimestampError, match="more than 5 minutes old"):
        verify(vector_headers(CANONICAL), CANONICAL["body"], CANONICAL["secret"])


@pytest.mark.parametrize(("vector", "case"), NEGATIVE_CASES, ids=lambda v: v.get("why", "")[:30])
def test_published_invalid_signatures_are_refused(
    vector: dict[str, str], case: dict[str, str]
) -> None:
    """The published wrong signatures are refused live and in replays alike."""
    headers = vector_headers(vector, case["signature_header"])

    with at_signing_time(vector), pytest.raises(errors.SignatureError):
        verify(headers, vector["body"], vector["secret"])
    with pytest.raises(errors.SignatureError):
        signing.Verifier([vector["secret"]], tolerance=None).verify(headers, vector["body"])


@given(
    key=st.binary(min_size=signing.MIN_SECRET_BYTES, max_size=64),
    webhook_id=st.from_regex(r"msg_[A-Za-z0-9]{1,40}", fullmatch=True),
    body=st.text(max_size=300),
    seconds_ago=st.integers(min_value=0, max_value=290),
    split=st.integers(min_value=0, max_value=400),
)
def test_what_standardwebhooks_signs_verifies_in_any_chunks(
    key: bytes, webhook_id: str, body: str, seconds_ago: int, split: int
) -> None:
    """A signature made by standardwebhooks' own sign() verifies, whether the body is fed at
    once or in two chunks split anywhere."""
    secret = "whsec_" + base64.b64encode(key).decode()
    signed_at = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    signature = standardwebhooks.Webhook(secret).sign(webhook_id, signed_at, body)
    headers = {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(signed_at.timestamp())),
        "webhook-signature": signature,
    }
    raw = body.encode("utf-8")
    verifier = signing.Verifier([secret])
    check = verifier.start(signing.check_headers(headers))
    check.update(raw[:split])
    check.update(raw[split:])

    assert check.finish().webhook_id == webhook_id
    assert verifier.verify(headers, raw).webhook_id == webhook_id


@given(
    key=st.binary(min_size=signing.MIN_SECRET_BYTES, max_size=64),
    webhook_id=st.from_regex(r"msg_[A-Za-z0-9]{1,40}", fullmatch=True),
    body=st.text(max_size=300),
    seconds_ago=st.integers(min_value=0, max_value=10**9),
)
def test_the_tests_signer_agrees_with_standardwebhooks(
    key: bytes, webhook_id: str, body: str, seconds_ago: int
) -> None:
    """sign_headers, the one signer of the tests, makes what standardwebhooks' own sign()
    makes for the same text."""
    secret = "whsec_" + base64.b64encode(key).decode()
    signed_at = datetime.fromtimestamp(2_000_000_000 - seconds_ago, UTC)

    headers = sign_headers(body.encode(), secret=secret, webhook_id=webhook_id, signed_at=signed_at)

    assert headers["webhook-signature"] == standardwebhooks.Webhook(secret).sign(
        webhook_id, signed_at, body
    )


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_the_tests_signer_matches_the_published_vectors(vector: dict[str, str]) -> None:
    """sign_headers reproduces each published vector's expected signature."""
    signed_at = datetime.fromtimestamp(int(vector["webhook_timestamp"]), UTC)

    headers = sign_headers(
        vector["body"].encode(),
        secret=vector["secret"],
        webhook_id=vector["webhook_id"],
        signed_at=signed_at,
    )

    assert vector["expected_signature"] in headers["webhook-signature"].split()


def test_timestamp_digits_are_read_as_standardwebhooks_reads_them() -> None:
    """Leading zeros in webhook-timestamp are accepted by both, or by neither."""
    headers = vector_headers(CANONICAL)
    headers["webhook-timestamp"] = "00" + CANONICAL["webhook_timestamp"]

    with at_signing_time(CANONICAL):
        ours = verify(headers, CANONICAL["body"], CANONICAL["secret"])
        standardwebhooks.Webhook(CANONICAL["secret"]).verify(CANONICAL["body"], headers)

    assert ours.webhook_id == CANONICAL["webhook_id"]


# --- several entries, several secrets ---------------------------------------------------------


def test_decoys_before_the_valid_signature_are_skipped() -> None:
    """A header listing decoy v1 and v2 entries before the valid one verifies."""
    decoys = VECTORS["multi_signature_decoys"]["decoy_entries"]
    header = " ".join([*decoys, CANONICAL["expected_signature"]])

    with at_signing_time(CANONICAL):
        verified = verify(vector_headers(CANONICAL, header), CANONICAL["body"], CANONICAL["secret"])

    assert verified.webhook_id == CANONICAL["webhook_id"]


def test_replicate_docs_multi_signature_header_verifies() -> None:
    """The header example from Replicate's docs (valid entry first) verifies."""
    header = VECTORS["multi_signature_decoys"]["replicate_docs_header_example"]

    with at_signing_time(CANONICAL):
        verified = verify(vector_headers(CANONICAL, header), CANONICAL["body"], CANONICAL["secret"])

    assert verified.webhook_id == CANONICAL["webhook_id"]


@pytest.mark.parametrize("malformed", MALFORMED_ENTRIES)
@pytest.mark.parametrize("valid_first", [True, False], ids=["valid-first", "valid-last"])
def test_malformed_entry_beside_a_valid_one_is_ignored_in_any_order(
    malformed: str, valid_first: bool
) -> None:
    """A malformed entry does not spoil a header whose valid v1 entry matches, before or
    after it (standardwebhooks refuses it when the malformed one comes first)."""
    body = b"{}"
    headers = sign_headers(body)
    entries = [headers["webhook-signature"], malformed]
    headers["webhook-signature"] = " ".join(entries if valid_first else entries[::-1])

    verified = verify(headers, body)

    assert verified.webhook_id == headers["webhook-id"]


def test_no_match_beside_malformed_entries_says_both() -> None:
    """When nothing matches and some entries were malformed, the refusal counts both."""
    body = b"{}"
    headers = sign_headers(body, secret=UNKNOWN_SECRET)
    headers["webhook-signature"] += " v1abc v1,a,b"

    with pytest.raises(errors.MalformedHeadersError) as raised:
        verify(headers, body)

    assert "2 malformed entries" in str(raised.value)
    assert "none of the 1 readable ones matches" in str(raised.value)


@pytest.mark.parametrize("header", [*MALFORMED_ENTRIES, "v1abc v1,a,b"])
def test_only_malformed_entries_are_malformed_headers(header: str) -> None:
    """A header with nothing readable is refused as malformed before any HMAC."""
    headers = sign_headers(b"{}")
    headers["webhook-signature"] = header

    with pytest.raises(errors.MalformedHeadersError, match="webhook-signature"):
        signing.check_headers(headers)


def test_only_other_versions_match_nothing() -> None:
    """A header holding only v2 entries is well-formed but has nothing we can check."""
    headers = sign_headers(b"{}")
    headers["webhook-signature"] = headers["webhook-signature"].replace("v1,", "v2,")

    with pytest.raises(errors.NoMatchingSecretError, match="no v1 entry"):
        signing.check_headers(headers)


def test_rotation_accepts_old_and_new_secret_and_refuses_a_third() -> None:
    """With two secrets configured either signs a valid delivery, named by position."""
    body = b'{"id": "t1", "status": "starting"}'
    verifier = signing.Verifier([SECRET, OTHER_SECRET])

    old = verifier.verify(sign_headers(body, secret=SECRET), body)
    new = verifier.verify(sign_headers(body, secret=OTHER_SECRET), body)

    assert (old.secret_position, new.secret_position) == (1, 2)
    with pytest.raises(errors.NoMatchingSecretError):
        verifier.verify(sign_headers(body, secret=UNKNOWN_SECRET), body)


def test_signature_over_other_bytes_does_not_match() -> None:
    """Re-serialised JSON with the same meaning is not the signed body."""
    headers = sign_headers(b'{"a": 1}')

    with pytest.raises(errors.NoMatchingSecretError):
        verify(headers, b'{"a":1}')


# --- the timestamp -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "words"),
    [(timedelta(minutes=-5, seconds=-1), "old"), (timedelta(minutes=5, seconds=1), "future")],
)
def test_timestamps_beyond_five_minutes_either_way_are_stale(offset: timedelta, words: str) -> None:
    """One second past the tolerance either way is refused, before any secret is needed."""
    signed_at = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    headers = sign_headers(b"{}", signed_at=signed_at)

    with (
        time_machine.travel(signed_at - offset, tick=False),
        pytest.raises(errors.StaleTimestampError, match=words),
    ):
        signing.check_headers(headers)


def test_timestamp_at_the_edge_of_the_tolerance_is_accepted() -> None:
    """A delivery signed exactly five minutes ago still verifies."""
    signed_at = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
    headers = sign_headers(b"{}", signed_at=signed_at)

    with time_machine.travel(signed_at + timedelta(minutes=5), tick=False):
        verified = verify(headers, b"{}")

    assert verified.signed_at == signed_at


@pytest.mark.parametrize(
    "timestamp", ["soon", "1.5e9", "nan", "-1", "9" * 13, "999999999999", "", " "]
)
def test_unusable_timestamp_is_malformed(timestamp: str) -> None:
    """A webhook-timestamp that is not whole seconds a date can hold is refused, live and in
    replays alike (one parser)."""
    headers = sign_headers(b"{}")
    headers["webhook-timestamp"] = timestamp

    with pytest.raises(errors.MalformedHeadersError, match="webhook-timestamp"):
        signing.check_headers(headers)
    with pytest.raises(errors.MalformedHeadersError, match="webhook-timestamp"):
        signing.check_headers(headers, tolerance=None)


# --- the other headers --------------------------------------------------------------------------


def test_header_names_are_case_insensitive() -> None:
    """Upper-case header names are read like lower-case ones."""
    headers = {key.upper(): value for key, value in sign_headers(b"{}").items()}

    verified = verify(headers, b"{}")

    assert verified.webhook_id == headers["WEBHOOK-ID"]


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_malformed(missing: str) -> None:
    """Each of the three headers is required."""
    headers = sign_headers(b"{}")
    del headers[missing]

    with pytest.raises(errors.MalformedHeadersError, match=missing):
        signing.check_headers(headers)


@pytest.mark.parametrize("webhook_id", ["msg 1", "x" * 257, "msg\x001", "msg_é"])
def test_implausible_webhook_id_is_malformed(webhook_id: str) -> None:
    """A webhook-id the inbox could not key on is refused."""
    headers = sign_headers(b"{}")
    headers["webhook-id"] = webhook_id

    with pytest.raises(errors.MalformedHeadersError, match="webhook-id"):
        signing.check_headers(headers)


@given(header=st.text(max_size=200), timestamp=st.text(max_size=20), body=st.binary(max_size=200))
def test_arbitrary_headers_only_raise_signature_errors(
    header: str, timestamp: str, body: bytes
) -> None:
    """Whatever the headers and body hold, verifying succeeds or raises a SignatureError."""
    headers = {"webhook-id": "msg_1", "webhook-timestamp": timestamp, "webhook-signature": header}

    try:
        verified = signing.Verifier([SECRET], tolerance=None).verify(headers, body)
    except errors.SignatureError:
        return

    assert verified.secret_position == 1


# --- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        ("whsec_AA", "shorter than 16 bytes"),
        ("whsec_" + base64.b64encode(b"x" * 15).decode(), "shorter than 16 bytes"),
        ("whsec_dGVzdA$$==", "not valid base64"),
        ("whsec_dGVz dA==", "not valid base64"),
        ("whsec_" + base64.urlsafe_b64encode(b"\xfb" * 24).decode(), "not valid base64"),
        ("whsec_", "whsec_<base64>"),
        ("v1,MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_<base64>"),
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_<base64>"),
    ],
)
def test_weak_or_malformed_secrets_are_refused_by_position(secret: str, reason: str) -> None:
    """A secret under 16 bytes or not strict base64 is refused, named by its position and
    never echoed."""
    with pytest.raises(errors.ConfigError, match=reason) as raised:
        signing.Verifier([SECRET, secret])

    assert "#2" in str(raised.value)
    assert secret == "whsec_" or secret.removeprefix("whsec_") not in str(raised.value)


def test_unpadded_secret_is_the_same_key_as_the_padded_one() -> None:
    """Unpadded secrets exist in the wild and decode to the same key."""
    padded = "whsec_" + base64.b64encode(b"k" * 20).decode()

    assert padded.endswith("=")
    assert signing.decode_secret(padded.rstrip("=")) == signing.decode_secret(padded) == b"k" * 20


def test_no_secret_is_a_config_error() -> None:
    """A verifier without secrets cannot be built."""
    with pytest.raises(errors.ConfigError):
        signing.Verifier([])
