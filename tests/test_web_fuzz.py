"""Property-based tests of the webhook route: random headers and bodies never cause a 5xx,
and nothing is written without a valid signature."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_web import TRAINING_ID, count_rows, fetch_row, make_config, track
from tests.web_support import WEBHOOK_PATH, new_webhook_id, sign_headers
from webhook_sync import web

FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    # One database serves every example on purpose: no example may leave a row behind.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# What an HTTP server can hand the app as a header value: latin-1 without CR, LF or NUL.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x09, max_codepoint=0xFF, exclude_characters="\r\n"),
    max_size=120,
)
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
        "id": st.one_of(st.just(TRAINING_ID), st.text(max_size=30), json_values),
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
    st.binary(max_size=400),
    json_values.map(lambda value: json.dumps(value).encode()),
    training_like.map(lambda value: json.dumps(value).encode()),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
    st.sampled_from([b'{"id": "x", "status": "failed", "m": 1e400}', b"[-1e999]", b"NaN"]),
)


def signature_values() -> st.SearchStrategy[str]:
    """Signature headers that look right, look almost right, or are noise."""
    entry = st.builds(
        lambda version, raw: f"{version},{base64.b64encode(raw).decode()}",
        st.sampled_from(["v1", "v2", "v1a", ""]),
        st.binary(min_size=0, max_size=40),
    )
    return st.one_of(
        header_text, st.lists(entry, min_size=1, max_size=4).map(" ".join), st.just("v1,")
    )


timestamps = st.one_of(
    header_text,
    st.integers(min_value=-600, max_value=600).map(lambda offset: str(int(time.time()) + offset)),
    st.integers().map(str),
)
header_sets = st.fixed_dictionaries(
    {},
    optional={
        "webhook-id": st.one_of(header_text, st.just("msg_fuzz")),
        "webhook-timestamp": timestamps,
        "webhook-signature": signature_values(),
        "Content-Type": st.sampled_from(
            ["application/json", "application/x-www-form-urlencoded", "multipart/form-data", "x"]
        ),
    },
)


@pytest.fixture()
def app(database_url: str) -> Iterator[Flask]:
    """The web app on this test's database, with one tracked training."""
    track(database_url)
    application = web.create_app(make_config(database_url))
    yield application
    application.extensions["webhook_sync"].close()


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    """Flask's test client (these properties are about the route, not about HTTP)."""
    return app.test_client()


@FUZZ_SETTINGS
@given(headers=header_sets, body=bodies)
def test_unsigned_input_is_refused_without_writing(
    client: FlaskClient, database_url: str, headers: dict[str, str], body: bytes
) -> None:
    """Whatever the headers and body, without a valid signature: a 4xx and no row touched."""
    response = client.post(WEBHOOK_PATH, data=body, headers=headers)

    assert response.status_code in {400, 401}, response.get_data(as_text=True)
    assert set(response.get_json()) == {"error"}
    assert count_rows(database_url, "SELECT count(*) FROM webhook_sync.webhook_events") == 0
    assert count_rows(database_url, "SELECT count(*) FROM webhook_sync.training_transitions") == 0
    assert fetch_row(database_url)["replicate_status"] is None


@FUZZ_SETTINGS
@given(body=bodies)
def test_signed_input_is_never_a_server_error(
    client: FlaskClient, database_url: str, body: bytes
) -> None:
    """A correctly signed body of any shape is applied or refused as a 400, never a 5xx."""
    expected = {200, 400}
    try:
        headers = sign_headers(body, webhook_id=new_webhook_id())
    except UnicodeDecodeError:
        # standardwebhooks signs text only: these bytes carry another body's signature,
        # which is refused before anything of the body is judged.
        headers = sign_headers(b"{}", webhook_id=new_webhook_id())
        expected = {401}

    response = client.post(WEBHOOK_PATH, data=body, headers=headers)

    assert response.status_code in expected, response.get_data(as_text=True)
    if response.status_code == 200:
        assert set(response.get_json()) == {"result", "training_id"}
    else:
        assert set(response.get_json()) == {"error"}


@FUZZ_SETTINGS
@given(body=bodies)
def test_signature_of_another_body_writes_nothing(
    client: FlaskClient, database_url: str, body: bytes
) -> None:
    """A valid signature over different bytes is a 401 (or 400) and stores nothing."""
    headers = sign_headers(json.dumps({"id": TRAINING_ID, "status": "succeeded"}).encode())

    response = client.post(WEBHOOK_PATH, data=body + b" ", headers=headers)

    assert response.status_code in {400, 401}
    assert count_rows(database_url, "SELECT count(*) FROM webhook_sync.webhook_events") == 0
    assert fetch_row(database_url)["replicate_status"] is None
