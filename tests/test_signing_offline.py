"""The replay verifier: the published vectors at their old timestamps, tampering, bad headers."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import FIXTURES
from webhook_sync import errors, signing_offline

VECTORS = json.loads(
    (FIXTURES / "replicate" / "webhook-signature-test-vectors.json").read_text(encoding="utf-8")
)
VALID = VECTORS["valid"]
OTHER_SECRET = "whsec_5WbX5kEWLlfzsGNjH64I8lOOqUB6e8FH"


def headers_for(vector: dict[str, Any], signature: str | None = None) -> dict[str, str]:
    """The three Standard Webhooks headers of a vector, optionally with another signature."""
    return {
        "webhook-id": vector["webhook_id"],
        "webhook-timestamp": vector["webhook_timestamp"],
        "webhook-signature": signature or vector["expected_signature"],
    }


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_published_vector_signs_to_its_signature(vector: dict[str, Any]) -> None:
    """compute_signature reproduces each published signature exactly."""
    signature = signing_offline.compute_signature(
        vector["secret"], vector["webhook_id"], vector["webhook_timestamp"], vector["body"]
    )

    assert signature == vector["expected_signature"]


@pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
def test_published_vector_verifies_despite_its_age(vector: dict[str, Any]) -> None:
    """A 2021/2022 timestamp is accepted: replays have no age limit."""
    verified = signing_offline.verify_delivery(
        [vector["secret"]], headers_for(vector), vector["body"]
    )

    assert verified.secret_position == 1
    assert verified.webhook_id == vector["webhook_id"]
    assert verified.timestamp == int(vector["webhook_timestamp"])
    assert verified.signed_at.year in (2021, 2022)


def test_reports_which_secret_matched_by_position() -> None:
    """With several secrets configured, the matching one is named by its position."""
    vector = VALID[0]

    verified = signing_offline.verify_delivery(
        [OTHER_SECRET, VALID[1]["secret"], vector["secret"]], headers_for(vector), vector["body"]
    )

    assert verified.secret_position == 3


def test_headers_are_case_insensitive() -> None:
    """Headers saved with any capitalisation are found."""
    vector = VALID[0]
    headers = {key.title(): value for key, value in headers_for(vector).items()}

    verified = signing_offline.verify_delivery([vector["secret"]], headers, vector["body"])

    assert verified.secret_position == 1


def test_tampered_body_is_refused() -> None:
    """Changing one character of the body fails the check."""
    vector = VALID[0]
    tampered = vector["body"].replace("2432232314", "2432232315")

    with pytest.raises(errors.NoMatchingSecretError):
        signing_offline.verify_delivery([vector["secret"]], headers_for(vector), tampered)


@pytest.mark.parametrize(
    "vector_name, case",
    [
        (name.removeprefix("invalid_for_vector_"), case)
        for name, cases in VECTORS.items()
        if name.startswith("invalid_for_vector_")
        for case in cases
    ],
)
def test_published_negative_signatures_are_refused(vector_name: str, case: dict[str, str]) -> None:
    """Each published invalid signature is refused, and no error is a plain ValueError."""
    vector = next(v for v in VALID if v["name"] == vector_name)

    with pytest.raises(errors.SignatureError):
        signing_offline.verify_delivery(
            [vector["secret"]], headers_for(vector, case["signature_header"]), vector["body"]
        )


def test_decoys_and_malformed_entries_before_the_valid_one_are_tolerated() -> None:
    """Decoy v1/v2 entries and malformed ones are skipped; the valid entry still matches."""
    vector = VALID[0]
    entries = [*VECTORS["multi_signature_decoys"]["decoy_entries"], "v1abc", "v1,a,b", "v1,%%%"]
    header = " ".join([*entries, vector["expected_signature"]])

    verified = signing_offline.verify_delivery(
        [vector["secret"]], headers_for(vector, header), vector["body"]
    )

    assert verified.secret_position == 1


def test_replicate_docs_multi_signature_header_verifies() -> None:
    """Replicate's documented multi-signature header starts with vector 1's signature."""
    vector = VALID[0]
    header = VECTORS["multi_signature_decoys"]["replicate_docs_header_example"]

    verified = signing_offline.verify_delivery(
        [vector["secret"]], headers_for(vector, header), vector["body"]
    )

    assert verified.webhook_id == vector["webhook_id"]


@pytest.mark.parametrize(
    "change",
    [
        {"webhook-id": ""},
        {"webhook-timestamp": "yesterday"},
        {"webhook-timestamp": "1614265330.5"},
        {"webhook-signature": "v2,abc"},
    ],
)
def test_malformed_headers_are_refused(change: dict[str, str]) -> None:
    """Missing or unusable headers raise MalformedHeadersError."""
    vector = VALID[0]
    headers = {**headers_for(vector), **change}

    with pytest.raises(errors.MalformedHeadersError):
        signing_offline.verify_delivery([vector["secret"]], headers, vector["body"])


def test_message_never_contains_a_secret() -> None:
    """A failed check names how many secrets were tried and which are unusable, not them."""
    vector = VALID[0]
    secrets = [OTHER_SECRET, "whsec_not*base64"]

    with pytest.raises(errors.NoMatchingSecretError) as caught:
        signing_offline.verify_delivery(secrets, headers_for(vector), vector["body"])

    message = str(caught.value)
    assert "2 configured secret(s)" in message
    assert "#2" in message
    assert OTHER_SECRET.removeprefix("whsec_") not in message
    assert "not*base64" not in message


@given(
    header=st.text(max_size=200),
    timestamp=st.text(max_size=20),
    body=st.text(max_size=200),
)
def test_arbitrary_input_only_raises_signature_errors(
    header: str, timestamp: str, body: str
) -> None:
    """Whatever the headers and body hold, the verifier raises SignatureError or succeeds."""
    headers = {"webhook-id": "msg_1", "webhook-timestamp": timestamp, "webhook-signature": header}

    try:
        verified = signing_offline.verify_delivery([VALID[0]["secret"]], headers, body)
    except errors.SignatureError:
        return

    assert verified.secret_position == 1
