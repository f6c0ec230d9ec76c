"""Hostile input against the web app: random requests, and requests that look signed, never
get a 5xx and never write without a valid signature; a valid signature over any bytes is
applied or refused as a 400; SQL metacharacters, NUL bytes, lone surrogates, huge or deeply
nested JSON and non-UTF-8 bytes get a clear 4xx or are stored literally."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from tests.web_support import SECRET, UNKNOWN_SECRET, WEBHOOK_PATH, sign_headers
from webhook_sync import db, service, web
from webhook_sync.config import Config
from webhook_sync.training import parse_training

MAX_BYTES = 256 * 1024
TABLES = ("trainings", "webhook_events", "training_transitions")
FUZZ = settings(
    max_examples=150,
    deadline=None,
    # One database serves every example on purpose: no example may leave a row behind.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SQL_IDS = [
    "'; DROP TABLE trainings; --",
    'x" OR "1"="1',
    "a'b''c",
    "%(id)s",
    "%s%s%s",
    "\\x00\\\\",
    "$$; SELECT pg_sleep(10); $$",
    "id--comment /* */ ;",
    "日本語-ΩΣ-🙂",
    "tab\tnew\nline",
]


def training(training_id: str, status: str = "processing", **extra: Any) -> dict[str, Any]:
    """A small training object as a webhook carries it."""
    return {"id": training_id, "status": status, "logs": "", "output": None, **extra}


@pytest.fixture()
def app(database_url: str) -> Iterator[Flask]:
    """The web app on this test's database with a small body limit."""
    config = Config(
        database_url=database_url, webhook_secrets=(SECRET,), max_webhook_bytes=MAX_BYTES
    )
    application = web.create_app(config)
    yield application
    application.extensions["webhook_sync"].close()


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    """A test client of the app."""
    return app.test_client()


def counts(conn: db.Connection) -> dict[str, int]:
    """Rows in every table the web process may write."""
    with conn, conn.cursor() as cur:
        found = {}
        for table in TABLES:
            cur.execute(f"SELECT count(*) FROM webhook_sync.{table}")
            found[table] = cur.fetchone()[0]
        return found


def post_writing_nothing(client: FlaskClient, conn: db.Connection, **request: Any) -> TestResponse:
    """POST to the webhook and assert that no table the web process may write changed."""
    before = counts(conn)
    response = client.post(WEBHOOK_PATH, **request)
    assert counts(conn) == before
    return response


def track(conn: db.Connection, training_id: str) -> None:
    """Register a training the way the host platform does."""
    with conn:
        service.track_training(conn, training_id, "user-1")


def stored_event(conn: db.Connection, webhook_id: str) -> dict[str, Any] | None:
    """The inbox row of one delivery."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT training_id, payload FROM webhook_sync.webhook_events"
            " WHERE webhook_id = %(id)s",
            {"id": webhook_id},
        )
        row = cur.fetchone()
        return {"training_id": row[0], "payload": row[1]} if row else None


header_names = st.sampled_from(
    ["webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "x-junk"]
)
header_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80),
    st.sampled_from(
        [
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
            "v1,invalid_signature",
            "v1abc",
            "v1,a,b",
            "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            "-1",
            "99999999999999999999",
            str(int(time.time())),
            "1614265330",
            "",
        ]
    ),
)
# JSON as hostile senders write it: NaN, overflowing numbers, lone surrogate escapes.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.sampled_from([1e308, -1e308, 5e-324])
    | st.text(st.characters(codec="utf-8") | st.sampled_from(["\x00", "\ud800", "\udfff"])),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
training_like = st.fixed_dictionaries(
    {
        "id": st.one_of(st.text(max_size=30), json_values),
        "status": st.one_of(
            st.sampled_from(["starting", "processing", "succeeded", "failed", "canceled"]),
            st.text(max_size=20),
            json_values,
        ),
    },
    optional={
        "output": json_values | st.fixed_dictionaries({"version": json_values}),
        "error": json_values,
        "logs": json_values,
        "completed_at": st.text(max_size=40) | json_values,
    },
)
bodies = st.one_of(
    st.binary(max_size=2048),
    st.text(max_size=512).map(str.encode),
    json_values.map(lambda value: json.dumps(value).encode()),
    training_like.map(lambda value: json.dumps(value).encode()),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
    st.sampled_from([b'{"id": "x", "status": "failed", "m": 1e400}', b"[-1e999]", b"NaN"]),
)

# Headers that look signed: what an HTTP server can hand the app as a header value
# (latin-1 without CR or LF), signatures that look right or almost right, times near now.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x09, max_codepoint=0xFF, exclude_characters="\r\n"),
    max_size=120,
)
signature_entries = st.builds(
    lambda version, raw: f"{version},{base64.b64encode(raw).decode()}",
    st.sampled_from(["v1", "v2", "v1a", ""]),
    st.binary(min_size=0, max_size=40),
)
looks_signed = st.fixed_dictionaries(
    {},
    optional={
        "webhook-id": st.one_of(header_text, st.just("msg_fuzz")),
        "webhook-timestamp": st.one_of(
            header_text,
            st.integers(min_value=-600, max_value=600).map(
                lambda offset: str(int(time.time()) + offset)
            ),
            st.integers().map(str),
        ),
        "webhook-signature": st.one_of(
            header_text,
            st.lists(signature_entries, min_size=1, max_size=4).map(" ".join),
            st.just("v1,"),
        ),
        "Content-Type": st.sampled_from(
            ["application/json", "application/x-www-form-urlencoded", "multipart/form-data", "x"]
        ),
    },
)


def trackable(training_id: Any) -> bool:
    """Whether a platform could track this id at all (text PostgreSQL can store and index)."""
    if not isinstance(training_id, str) or not training_id.strip() or "\x00" in training_id:
        return False
    try:
        return len(training_id.encode("utf-8")) <= 200
    except UnicodeEncodeError:  # a lone surrogate
        return False


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
    path=st.sampled_from([WEBHOOK_PATH, WEBHOOK_PATH + "/", WEBHOOK_PATH + "?id=x", "/", "/x"]),
    headers=st.dictionaries(header_names, header_values, max_size=5),
    body=bodies,
)
def test_unsigned_requests_never_5xx_and_never_write(
    client: FlaskClient,
    conn: db.Connection,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
) -> None:
    """Random methods, paths, headers and bodies without a valid signature: 4xx, no write."""
    before = counts(conn)

    response = client.open(path, method=method, headers=headers, data=body)

    assert response.status_code < 500, response.get_data(as_text=True)
    assert response.status_code >= 400 or method in ("OPTIONS", "HEAD") or path == "/"
    assert counts(conn) == before


@FUZZ
@given(body=bodies, tracked=st.booleans())
def test_valid_signature_over_junk_never_5xx(
    client: FlaskClient, conn: db.Connection, body: bytes, tracked: bool
) -> None:
    """A valid signature over any bytes: never a 5xx; a 400 writes nothing, a 200 stores the
    event, and only a training object gets a 200."""
    try:
        decoded = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past Python's own limit
        decoded = None
    is_training = (
        isinstance(decoded, dict)
        and isinstance(decoded.get("id"), str)
        and isinstance(decoded.get("status"), str)
    )
    if tracked and is_training and trackable(decoded["id"]):
        track(conn, decoded["id"])
    before = counts(conn)
    headers = sign_headers(body)

    response = client.post(WEBHOOK_PATH, headers=headers, data=body)

    assert response.status_code < 500, response.get_data(as_text=True)
    if response.status_code == 200:
        assert is_training
        assert stored_event(conn, headers["webhook-id"]) is not None
    else:
        assert response.status_code == 400, response.get_data(as_text=True)
        assert counts(conn) == before


@FUZZ
@given(skew=st.integers(min_value=-(10**9), max_value=10**9))
def test_timestamps_outside_five_minutes_are_refused(
    client: FlaskClient, conn: db.Connection, skew: int
) -> None:
    """Any signing time: within five minutes accepted, beyond refused with 401 and no write."""
    training_id = f"ts{uuid.uuid4().hex[:20]}"
    body = json.dumps(training(training_id)).encode()
    signed_at = datetime.fromtimestamp(max(0, int(time.time()) + skew), UTC)
    before = counts(conn)

    response = client.post(WEBHOOK_PATH, headers=sign_headers(body, signed_at=signed_at), data=body)

    if abs(skew) < 290:
        assert response.status_code == 200
    elif abs(skew) > 310:
        assert response.status_code in (400, 401)
        assert counts(conn) == before


@FUZZ
@given(body=bodies)
def test_signature_by_another_secret_is_refused(
    client: FlaskClient, conn: db.Connection, body: bytes
) -> None:
    """A correct signature made with a secret we do not hold: 4xx and nothing written."""
    headers = sign_headers(body, secret=UNKNOWN_SECRET)

    response = post_writing_nothing(client, conn, headers=headers, data=body)

    assert response.status_code in (400, 401)


@FUZZ
@given(headers=looks_signed, body=bodies)
def test_posts_that_look_signed_are_refused_without_writing(
    client: FlaskClient, conn: db.Connection, headers: dict[str, str], body: bytes
) -> None:
    """Near-valid signatures, timestamps near now, any body: a 400 or 401 naming the error,
    and nothing written."""
    response = post_writing_nothing(client, conn, data=body, headers=headers)

    assert response.status_code in {400, 401}, response.get_data(as_text=True)
    assert set(response.get_json()) == {"error"}


@FUZZ
@given(body=bodies)
def test_signature_of_another_body_writes_nothing(
    client: FlaskClient, conn: db.Connection, body: bytes
) -> None:
    """A valid signature over different bytes is a 401 (or 400) and stores nothing."""
    track(conn, "another-body")
    headers = sign_headers(json.dumps({"id": "another-body", "status": "succeeded"}).encode())
    response = post_writing_nothing(client, conn, data=body + b" ", headers=headers)

    assert response.status_code in {400, 401}


@pytest.mark.parametrize("training_id", SQL_IDS)
def test_sql_metacharacters_in_ids_are_stored_literally(
    client: FlaskClient, conn: db.Connection, training_id: str
) -> None:
    """Ids full of quotes, placeholders and comments are stored and matched byte for byte."""
    track(conn, training_id)
    payload = training(training_id, "succeeded", error=training_id, logs=training_id)
    body = json.dumps(payload).encode()
    headers = sign_headers(body)

    response = client.post(WEBHOOK_PATH, headers=headers, data=body)
    row = db.select_training(conn, training_id)
    event = stored_event(conn, headers["webhook-id"])

    assert response.status_code == 200, response.get_data(as_text=True)
    assert row is not None
    assert row["training_status"] == "completed"
    assert row["error"] == training_id
    assert event == {"training_id": training_id, "payload": payload}
    assert counts(conn)["trainings"] == 1


def test_sql_metacharacters_in_the_webhook_id_are_stored_literally(
    client: FlaskClient, conn: db.Connection
) -> None:
    """A webhook-id with quotes and semicolons is a key like any other."""
    body = json.dumps(training("abc")).encode()
    webhook_id = "msg_';DROP_TABLE_webhook_events;--"
    headers = sign_headers(body, webhook_id=webhook_id)

    response = client.post(WEBHOOK_PATH, headers=headers, data=body)

    assert response.status_code == 200, response.get_data(as_text=True)
    assert stored_event(conn, webhook_id) is not None


@pytest.mark.parametrize(
    "payload",
    [
        training("nul\x00id"),
        training("abc", "proc\x00essing"),
        {"id": "", "status": "processing"},
        {"id": "x" * 10_000, "status": "processing"},
        {"id": 123, "status": "processing"},
        {"id": ["a"], "status": "processing"},
        {"id": "abc", "status": None},
        {"id": "abc"},
        [training("abc")],
        "a string",
        12345,
        None,
    ],
    ids=lambda value: repr(value)[:40],
)
def test_not_a_training_is_a_clear_400(
    client: FlaskClient, conn: db.Connection, payload: Any
) -> None:
    """Signed JSON that is not a usable training object: 400 with a reason, nothing written."""
    body = json.dumps(payload).encode()
    response = post_writing_nothing(client, conn, headers=sign_headers(body), data=body)

    assert response.status_code == 400
    assert response.get_json()["error"]


def test_nul_bytes_inside_a_training_are_dropped_not_fatal(
    client: FlaskClient, conn: db.Connection
) -> None:
    """NULs in logs, error and keys (PostgreSQL text cannot hold them) do not cost the event."""
    track(conn, "nulcarrier")
    payload = training("nulcarrier", "failed", error="bad\x00thing", logs="a\x00b", **{"k\x00": 1})
    body = json.dumps(payload).encode()
    headers = sign_headers(body)

    response = client.post(WEBHOOK_PATH, headers=headers, data=body)
    event = stored_event(conn, headers["webhook-id"])

    assert response.status_code == 200, response.get_data(as_text=True)
    assert event is not None
    assert event["payload"]["logs"] == "ab"
    assert db.select_training(conn, "nulcarrier")["training_status"] == "failed"


@pytest.mark.parametrize(
    "text", ["\ud800", "a\udfffb", "\udbff\udc00"], ids=["lone-high", "lone-low", "pair"]
)
def test_unicode_escapes_postgresql_rejects_never_5xx(
    client: FlaskClient, conn: db.Connection, text: str
) -> None:
    """Lone surrogates (valid JSON escapes, invalid text) in a signed body: never a 5xx."""
    track(conn, "surrogates")
    body = json.dumps(training("surrogates", "succeeded", logs=text, error=text)).encode()
    headers = sign_headers(body)

    response = client.post(WEBHOOK_PATH, headers=headers, data=body)

    assert response.status_code in (200, 400), response.get_data(as_text=True)
    if response.status_code == 200:
        assert stored_event(conn, headers["webhook-id"]) is not None


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe\xfd", b'{"id": "abc", "status": "\xe9t\xe9"}', b"\xc3\x28", b"\x80" * 100],
    ids=["ff-fe", "latin1-in-json", "bad-2-byte", "continuations"],
)
def test_non_utf8_bytes_with_a_valid_signature_are_a_clear_400(
    client: FlaskClient, conn: db.Connection, body: bytes
) -> None:
    """A correctly signed body that is not UTF-8: 400 that says so, nothing written."""
    response = post_writing_nothing(client, conn, headers=sign_headers(body), data=body)

    assert response.status_code == 400
    assert "UTF-8" in response.get_json()["error"]


@pytest.mark.parametrize("depth", [100, 5_000, 100_000])
def test_deeply_nested_json_never_5xx(client: FlaskClient, conn: db.Connection, depth: int) -> None:
    """Deep nesting inside a training (or instead of one): stored, or refused with 400."""
    nested = "[" * depth + "]" * depth
    track(conn, "deep")
    body = ('{"id": "deep", "status": "processing", "input": ' + nested + "}").encode()
    bare = nested.encode()

    inside = client.post(WEBHOOK_PATH, headers=sign_headers(body), data=body)
    alone = client.post(WEBHOOK_PATH, headers=sign_headers(bare), data=bare)

    assert inside.status_code in (200, 400), inside.get_data(as_text=True)
    assert alone.status_code == 400, alone.get_data(as_text=True)


def test_huge_bodies_are_413_before_verification(client: FlaskClient, conn: db.Connection) -> None:
    """Past MAX_WEBHOOK_BYTES: 413 whether signed or not; nothing written."""
    payload = training("big", logs="x" * MAX_BYTES)
    body = json.dumps(payload).encode()
    before = counts(conn)

    signed = client.post(WEBHOOK_PATH, headers=sign_headers(body), data=body)
    unsigned = client.post(WEBHOOK_PATH, data=body)

    assert signed.status_code == 413
    assert unsigned.status_code == 413
    assert counts(conn) == before


def test_large_logs_within_the_limit_are_stored_as_a_tail(
    client: FlaskClient, conn: db.Connection
) -> None:
    """A body just under the limit (big logs) is accepted; the inbox keeps only the tail."""
    track(conn, "biglogs")
    logs = "line " * ((MAX_BYTES - 1000) // 5)
    body = json.dumps(training("biglogs", "succeeded", logs=logs)).encode()
    headers = sign_headers(body)

    response = client.post(WEBHOOK_PATH, headers=headers, data=body)
    event = stored_event(conn, headers["webhook-id"])

    assert response.status_code == 200
    assert event is not None
    assert len(event["payload"]["logs"]) <= 4001
    assert db.select_training(conn, "biglogs")["training_status"] == "completed"


@FUZZ
@given(
    training_id=st.text(min_size=1, max_size=60).filter(lambda text: text.strip()),
    status=st.sampled_from(["starting", "processing", "succeeded", "failed", "canceled", "x'y"]),
    error=st.text(max_size=60),
)
def test_any_text_in_fields_is_stored_literally_or_refused(
    client: FlaskClient, conn: db.Connection, training_id: str, status: str, error: str
) -> None:
    """Arbitrary Unicode in id, status and error: a 400, or stored exactly as sent."""
    payload = training(training_id, status, error=error)
    body = json.dumps(payload).encode()
    headers = sign_headers(body)

    response = client.post(WEBHOOK_PATH, headers=headers, data=body)

    assert response.status_code in (200, 400), response.get_data(as_text=True)
    if response.status_code == 200:
        event = stored_event(conn, headers["webhook-id"])
        assert event is not None
        assert event["training_id"] == training_id
        assert event["payload"]["error"] == error.replace("\x00", "")


def test_lone_surrogate_from_the_api_does_not_break_the_funnel(conn: db.Connection) -> None:
    """A training fetched from the API (JSON may decode to lone surrogates) still applies."""
    track(conn, "apisurrogate")
    reported = parse_training(
        json.loads('{"id": "apisurrogate", "status": "failed", "error": "bad \\ud800"}')
    )

    with conn:
        result = service.apply_update(conn, reported, "poll")

    assert result.outcome == "applied"
    assert db.select_training(conn, "apisurrogate")["training_status"] == "failed"
