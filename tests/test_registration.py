"""Self-registration: a signed body's `webhook` URL (or the destination pattern) names the
user of an untracked training, which is then tracked and applied at once."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import select_transitions
from tests.web_support import SECRET, WEBHOOK_PATH, signed_delivery, training_payload
from webhook_sync import db, errors, inbox, registration, web
from webhook_sync.config import Config
from webhook_sync.training import parse_training

TRAINING_ID = "qy2dts8twsrj20cjjnc87atzd0"
SELF_REGISTERING = "https://sync.example.com/webhooks/replicate?user_id=45038279"
PATTERN = re.compile(r"^[^/]+/(?P<user>\d+)-")


def make_app(database_url: str, **overrides: object) -> Flask:
    """A web app on this test's database with the given registration settings."""
    config = replace(Config(database_url=database_url, webhook_secrets=(SECRET,)), **overrides)
    return web.create_app(config)


@pytest.fixture()
def client(database_url: str) -> Iterator[FlaskClient]:
    """A test client of the web app with no registration settings (path-only matching)."""
    app = make_app(database_url)
    yield app.test_client()
    app.extensions["webhook_sync"].close()


def deliver(client: FlaskClient, payload: dict, url: str = WEBHOOK_PATH) -> dict:
    """POST one signed delivery and return its JSON answer."""
    body, headers = signed_delivery(payload)
    response = client.post(url, data=body, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def row_of(conn: db.Connection, training_id: str = TRAINING_ID) -> dict | None:
    """The training row, read in a transaction of its own."""
    with conn:
        return db.select_training(conn, training_id)


def test_a_self_registering_webhook_is_tracked_and_applied(
    client: FlaskClient, conn: db.Connection
) -> None:
    """An untracked training whose signed `webhook` names our route and a user is applied."""
    answer = deliver(client, training_payload(TRAINING_ID, "processing", webhook=SELF_REGISTERING))

    row = row_of(conn)
    assert answer == {"result": "applied", "training_id": TRAINING_ID}
    assert row is not None
    assert (row["user_id"], row["replicate_status"], row["updated_by"]) == (
        "45038279",
        "processing",
        "webhook",
    )


def test_the_request_query_string_never_registers(client: FlaskClient, conn: db.Connection) -> None:
    """`?user_id=` on the request itself is unsigned: the training stays untracked."""
    payload = training_payload(
        TRAINING_ID, "processing", webhook="https://sync.example.com/webhooks/replicate"
    )

    answer = deliver(client, payload, url=WEBHOOK_PATH + "?user_id=intruder")

    assert answer["result"] == "pending"
    assert row_of(conn) is None


@pytest.mark.parametrize(
    "webhook",
    [
        "https://sync.example.com/other/replicate?user_id=1",
        "https://sync.example.com/webhooks/replicate?user_id=1&user_id=2",
        "https://sync.example.com/webhooks/replicate?user_id=",
        "https://sync.example.com/webhooks/replicate",
        None,
        42,
    ],
)
def test_a_webhook_that_names_no_single_user_here_stays_pending(
    client: FlaskClient, conn: db.Connection, webhook: object
) -> None:
    """Another route, no user, two users, or no URL at all: nothing is adopted."""
    answer = deliver(client, training_payload(TRAINING_ID, "processing", webhook=webhook))

    assert answer["result"] == "pending"
    assert row_of(conn) is None


def test_public_webhook_url_must_match_host_and_path(
    database_url: str, conn: db.Connection
) -> None:
    """With PUBLIC_WEBHOOK_URL set, a URL for another host is not ours; ours is."""
    app = make_app(database_url, public_webhook_url="https://sync.example.com/hooks/replicate")
    client = app.test_client()
    other = training_payload("othertraining", "processing", webhook=SELF_REGISTERING)
    ours = training_payload(
        TRAINING_ID, "processing", webhook="https://SYNC.example.com:443/hooks/replicate/?user_id=7"
    )
    try:
        first = deliver(client, other)
        second = deliver(client, ours)
    finally:
        app.extensions["webhook_sync"].close()

    assert first["result"] == "pending"
    assert second["result"] == "applied"
    assert row_of(conn)["user_id"] == "7"


def test_the_destination_pattern_adopts_a_succeeded_training(
    database_url: str, conn: db.Connection
) -> None:
    """ADOPT_DESTINATION_PATTERN's `user` group names the user from `output.version`."""
    app = make_app(database_url, adopt_destination_pattern=PATTERN)
    payload = training_payload(TRAINING_ID, "succeeded")
    payload["output"]["version"] = "sandrasocial/45038279-selfie-lora:" + "b" * 64
    try:
        answer = deliver(app.test_client(), payload)
    finally:
        app.extensions["webhook_sync"].close()

    row = row_of(conn)
    assert answer["result"] == "applied"
    assert (row["user_id"], row["training_status"]) == ("45038279", "completed")
    assert row["destination"] == "sandrasocial/45038279-selfie-lora"


def test_webhooks_that_waited_are_applied_before_the_adopting_one(
    client: FlaskClient, conn: db.Connection
) -> None:
    """An earlier pending event is applied when a later delivery adopts the training."""
    early = training_payload(TRAINING_ID, "processing", started_at="2026-11-28T10:01:00Z")
    pending = inbox.receive_delivery(conn, webhook_id="msg_early", payload=early, signed_at=None)
    final = training_payload(TRAINING_ID, "succeeded", webhook=SELF_REGISTERING)

    answer = deliver(client, final)

    row = row_of(conn)
    assert pending.result == "pending"
    assert answer["result"] == "applied"
    assert [t["to_replicate_status"] for t in select_transitions(conn, TRAINING_ID)] == [
        "processing",
        "succeeded",
    ]
    assert row["started_at"] is not None


@pytest.mark.parametrize(
    ("public", "url", "expected"),
    [
        (None, "http://10.0.0.5:8000/webhooks/replicate?user_id=a", "a"),
        (None, "https://x.test/webhooks/replicate/?user_id=a&x=1", "a"),
        (None, "https://x.test/webhooks/replicatex?user_id=a", None),
        (
            "https://x.test/webhooks/replicate",
            "https://x.test:443/webhooks/replicate?user_id=b",
            "b",
        ),
        ("https://x.test/webhooks/replicate", "http://x.test/webhooks/replicate?user_id=b", None),
        (
            "https://x.test/webhooks/replicate",
            "https://x.test:8443/webhooks/replicate?user_id=b",
            None,
        ),
        (
            "https://x.test/webhooks/replicate",
            "https://evil.test/webhooks/replicate?user_id=b",
            None,
        ),
        (None, "https://x.test/webhooks/replicate?user_id=%20a", None),
        (None, "https://x.test/webhooks/replicate?user_id=" + "u" * 201, None),
        (None, "not a url", None),
        (
            "http://[::1]:8000/webhooks/replicate",
            "http://[::1]:8000/webhooks/replicate?user_id=c",
            "c",
        ),
        (
            "https://x.test/webhooks/replicate",
            "https://x.test:99999/webhooks/replicate?user_id=b",
            None,
        ),
        (
            "https://x.test/webhooks/replicate",
            "https://x.test:abc/webhooks/replicate?user_id=b",
            None,
        ),
    ],
)
def test_user_from_webhook(public: str | None, url: str, expected: str | None) -> None:
    """Only a URL naming our route, with exactly one plausible user_id, names a user."""
    owners = registration.Owners(public_webhook_url=public)

    assert owners.user_from_webhook(url) == expected


def test_the_webhook_url_wins_over_the_destination() -> None:
    """The self-registration query is the platform's own word; the pattern is a fallback."""
    owners = registration.Owners(destination_pattern=PATTERN)
    payload = training_payload(
        TRAINING_ID, "succeeded", webhook=SELF_REGISTERING.replace("45038279", "9")
    )
    payload["output"]["version"] = "sandrasocial/45038279-selfie-lora:" + "b" * 64
    without_url = {**payload, "webhook": None}

    assert owners.owner_of(payload, parse_training(payload)) == registration.Owner(
        "9", "webhook_url"
    )
    assert owners.owner_of(without_url, parse_training(without_url)) == registration.Owner(
        "45038279", "destination"
    )


def test_the_route_path_is_the_web_process_route() -> None:
    """The path registration matches is the one the web process serves."""
    assert registration.WEBHOOK_PATH == web.WEBHOOK_PATH


def test_registration_settings_are_read_and_checked() -> None:
    """The pattern needs a `user` group, tokens are split on spaces and commas, and bad
    values are named without echoing a token."""
    config = Config.from_env(
        {
            "PUBLIC_WEBHOOK_URL": "https://sync.example.com/webhooks/replicate/",
            "ADOPT_DESTINATION_PATTERN": PATTERN.pattern,
            "DISCOVERY_WINDOW_SECONDS": "600",
            "API_TOKENS": "token-aaaaaaaaaaaaaaaa, token-bbbbbbbbbbbbbbbb",
        }
    )

    assert config.public_webhook_url == "https://sync.example.com/webhooks/replicate"
    assert config.adopt_destination_pattern == PATTERN
    assert config.discovery_window_seconds == 600
    assert config.api_tokens == ("token-aaaaaaaaaaaaaaaa", "token-bbbbbbbbbbbbbbbb")
    assert "secret-short" not in repr(Config.from_env({"API_TOKENS": "x" * 16}))
    with pytest.raises(errors.ConfigError, match="named group `user`"):
        Config.from_env({"ADOPT_DESTINATION_PATTERN": r"^(\d+)-"})
    with pytest.raises(errors.ConfigError, match="API_TOKENS: token #2") as caught:
        Config.from_env({"API_TOKENS": "token-aaaaaaaaaaaaaaaa secret-short"})
    assert "secret-short" not in str(caught.value)


@settings(max_examples=300, deadline=None)
@given(
    url=st.one_of(
        st.text(max_size=300),
        st.builds(
            lambda host, path, query: f"https://{host}{path}?{query}",
            st.text(max_size=40),
            st.sampled_from(["/webhooks/replicate", "/webhooks/replicate/", "/x", ""]),
            st.text(max_size=80),
        ),
        st.integers(),
        st.none(),
    ),
    public=st.sampled_from([None, "https://sync.example.com/webhooks/replicate"]),
)
def test_any_webhook_value_gives_a_plausible_user_or_none(url: object, public: str | None) -> None:
    """Whatever a signed body's `webhook` holds, the answer is None or a storable user id."""
    user = registration.Owners(public_webhook_url=public).user_from_webhook(url)

    assert user is None or registration.plausible_user_id(user) == user
