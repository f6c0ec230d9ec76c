"""The lenient training parser on every published example and on odd input."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import FIXTURES
from webhook_sync import errors, training, untrusted_json
from webhook_sync.training import parse_timestamp, parse_training, payload_for_storage

REPLICATE = FIXTURES / "replicate"
TRAINING_FIXTURES = sorted(
    path for path in REPLICATE.glob("training*.json") if not path.name.startswith("trainings-list")
)


def load(name: str) -> dict:
    """Read one fixture."""
    return json.loads((REPLICATE / name).read_text())


@pytest.mark.parametrize("path", TRAINING_FIXTURES, ids=lambda p: p.name)
def test_every_published_training_parses(path) -> None:
    """Each published training object yields its id and status."""
    raw = json.loads(path.read_text())

    parsed = parse_training(raw)

    assert parsed.id == raw["id"]
    assert parsed.status == raw["status"]


def test_list_page_results_parse() -> None:
    """Every training on the published list page parses (they omit logs)."""
    page = load("trainings-list-page-docs-example.json")

    parsed = [parse_training(item) for item in page["results"]]

    assert [t.id for t in parsed] == [item["id"] for item in page["results"]]


def test_succeeded_output_splits_destination_and_version() -> None:
    """`output.version` owner/name:hash becomes destination and version id; weights kept."""
    raw = load("training-webhook-completed-event-succeeded.json")

    parsed = parse_training(raw)

    owner_name, version_hash = raw["output"]["version"].split(":")
    assert parsed.destination == owner_name
    assert parsed.version_id == version_hash
    assert parsed.weights_url == raw["output"]["weights"]
    assert parsed.completed_at is not None and parsed.completed_at.tzinfo is not None


def test_placeholder_version_yields_no_destination() -> None:
    """The docs example's `...` placeholders give no destination rather than a wrong one."""
    parsed = parse_training(load("training-succeeded-docs-example.json"))

    assert (parsed.destination, parsed.version_id) == (None, None)


def test_failed_error_kept_as_text() -> None:
    """A failed training keeps its error text."""
    raw = load("training-failed.json")

    assert parse_training(raw).error == raw["error"]


@pytest.mark.parametrize(
    ("error", "expected"),
    [({"code": 1}, '{"code": 1}'), (["a"], '["a"]'), (42, "42"), ("", None), (None, None)],
)
def test_error_of_any_type_becomes_text(error: object, expected: str | None) -> None:
    """`error` of any JSON type is kept as text."""
    assert parse_training({"id": "x", "status": "failed", "error": error}).error == expected


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("2023-08-16T19:54:32.23Z", 230000),
        ("2023-08-16T19:54:26.864Z", 864000),
        ("2023-08-16T19:54:56.990893Z", 990893),
        ("2023-08-16T19:54:56.990893084Z", 990893),
        ("2023-08-16T19:54:56Z", 0),
    ],
)
def test_timestamps_with_2_to_9_fraction_digits(text: str, micro: int) -> None:
    """Timestamps with Z and 0, 2, 3, 6 or 9 fractional digits parse to aware UTC."""
    parsed = parse_timestamp(text)

    assert parsed == datetime(2023, 8, 16, 19, 54, parsed.second, micro, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2023-08-16T21:54:56.990893084+02:00", datetime(2023, 8, 16, 19, 54, 56, 990893, UTC)),
        (" 2023-08-16T19:54:56 ", datetime(2023, 8, 16, 19, 54, 56, tzinfo=UTC)),
        ("2023-08-16T19:54:56.Z", datetime(2023, 8, 16, 19, 54, 56, tzinfo=UTC)),
        ("yesterday", None),
        ("2023-08-16T25:00:00Z", None),
        ("", None),
        (1692215696, None),
    ],
)
def test_timestamps_with_offsets_none_or_nonsense(text: object, expected: datetime | None) -> None:
    """Another offset is converted, no offset means UTC, and what is no time is None."""
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    "obj",
    [
        [],
        "text",
        1,
        None,
        {"status": "succeeded"},
        {"id": "x"},
        {"id": "", "status": "x"},
        {"id": "x", "status": 3},
        {"id": "a\x00b", "status": "succeeded"},
    ],
)
def test_non_training_is_refused_clearly(obj: object) -> None:
    """Input without an id or a status raises InvalidTrainingError."""
    with pytest.raises(errors.InvalidTrainingError):
        parse_training(obj)


def test_missing_and_extra_keys_are_tolerated() -> None:
    """Unknown keys are ignored and missing ones become None."""
    parsed = parse_training({"id": "x", "status": "Processing", "data_removed": True, "new": {}})

    assert parsed.status == "processing"
    assert parsed.started_at is None and parsed.destination is None


def test_storage_keeps_a_bounded_tail_of_logs() -> None:
    """Stored payloads keep only the end of huge logs and drop NUL characters."""
    payload = {"id": "x", "status": "succeeded", "logs": "a" * 100_000 + "END", "k\x00": "v\x00"}

    stored = payload_for_storage(payload, tail_chars=100)

    assert stored["logs"].endswith("END") and len(stored["logs"]) <= 101
    assert stored["k"] == "v"


@given(
    value=st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.text(st.characters(codec="utf-8") | st.sampled_from(["\x00", "\ud800", "\udfff"])),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=20,
    ),
    ascii_only=st.booleans(),
)
def test_a_body_without_a_nul_escape_is_stored_as_decoded(value: object, ascii_only: bool) -> None:
    """JSON text that untrusted_json accepts and that has no \\u0000 escape decodes to a
    payload the NUL and surrogate cleaning would leave as it is: the web skips that walk."""
    try:
        data = json.dumps({"id": "x", "v": value}, ensure_ascii=ascii_only).encode("utf-8")
        decoded = untrusted_json.decode(data)
    except (UnicodeEncodeError, errors.InvalidJSONError):
        return  # not a body the web would store
    if untrusted_json.may_hold_nul(data):
        return

    assert "\\u0000" not in json.dumps(decoded)  # json.dumps escapes every NUL so
    assert payload_for_storage(decoded, clean=True) == payload_for_storage(decoded)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    )
)
def test_parser_never_crashes_on_any_json(value: object) -> None:
    """Any JSON value either parses into an id and a status or raises InvalidTrainingError."""
    try:
        parsed = parse_training(value)
    except errors.InvalidTrainingError:
        return

    assert parsed.id.strip() and parsed.status.strip()


@pytest.mark.parametrize("extra_brackets_in_strings", [0, 500])
def test_nesting_is_refused_past_the_limit_exactly(extra_brackets_in_strings: int) -> None:
    """Arrays nested MAX_DEPTH deep decode, one more level is refused, and brackets inside
    strings neither count as nesting nor hide it."""
    padding = json.dumps("[{" * extra_brackets_in_strings)
    limit = untrusted_json.MAX_DEPTH

    def nested(depth: int) -> str:
        return "[" * depth + padding + "]" * depth

    at_limit = untrusted_json.decode(nested(limit))
    with pytest.raises(errors.InvalidJSONError, match=f"nested deeper than {limit}"):
        untrusted_json.decode(nested(limit + 1))

    assert isinstance(at_limit, list)


def test_stored_json_is_the_body_itself_when_nothing_needs_changing() -> None:
    """A clean body with short logs is stored as received, escapes and spacing included."""
    body = b'{"id": "t1", "status": "processing", "logs": "caf\\u00e9 step 1", "n": 1.10}'

    stored = training.stored_json(json.loads(body), body, clean=True)

    assert stored == body.decode()


@pytest.mark.parametrize("case", ["long logs", "NUL escape"])
def test_stored_json_is_the_payload_made_storable_otherwise(case: str) -> None:
    """Logs past the tail are cut and NULs dropped: the stored text is the value
    payload_for_storage gives, encoded."""
    logs = "x" * (training.LOGS_TAIL_CHARS + 10) if case == "long logs" else "a\u0000b"
    value = {"id": "t1", "status": "processing", "logs": logs}
    body = json.dumps(value).encode()
    clean = case != "NUL escape"

    stored = training.stored_json(value, body, clean=clean)

    assert json.loads(stored) == training.payload_for_storage(value, clean=clean)
    assert "\\u0000" not in stored
    assert len(stored) < len(body) or case == "NUL escape"


@pytest.mark.parametrize("number", ["1e-400", "0e-20000", "0e2147483648", "1." + "5" * 20000])
def test_stored_json_encodes_again_a_number_jsonb_reads_otherwise(number: str) -> None:
    """jsonb keeps a number's text exact and refuses one past numeric's range, which
    Python reads as 0.0 or rounds: such a body is stored as its decoded value, encoded."""
    body = ('{"id": "t1", "status": "processing", "metrics": {"x": ' + number + "}}").encode()
    value = untrusted_json.decode(body)

    stored = training.stored_json(value, body, clean=True)

    assert stored == json.dumps(payload_for_storage(value, clean=True))


def test_stored_json_keeps_hex_digests_and_small_exponents_as_received() -> None:
    """Digests with `e` between digits and ordinary exponents do not cost the body its
    stored-as-received path."""
    body = b'{"id": "t1", "status": "processing", "v": "a3e4519e2000", "loss": 1.5e-05}'

    assert training.stored_json(json.loads(body), body, clean=True) == body.decode()
