"""The HTTP API /v1/trainings over a real HTTP server: off without API_TOKENS, bearer
tokens compared with every configured one, register / read / list round trips."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest
import requests

from tests.web_support import SECRET, serve, training_payload
from webhook_sync import api, db, inbox, web
from webhook_sync.config import Config

TOKEN = "tok-aaaaaaaaaaaaaaaaaaaa"
OLD_TOKEN = "tok-bbbbbbbbbbbbbbbbbbbb"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_config(database_url: str, **overrides: object) -> Config:
    """Settings for the web app on this test's database."""
    return replace(Config(database_url=database_url, webhook_secrets=(SECRET,)), **overrides)


@pytest.fixture()
def base_url(database_url: str) -> Iterator[str]:
    """The web app with two API tokens, served over HTTP."""
    app = web.create_app(make_config(database_url, api_tokens=(TOKEN, OLD_TOKEN)))
    with serve(app) as url:
        yield url
    app.extensions["webhook_sync"].close()


def post(base_url: str, body: object, headers: dict[str, str] | None = None) -> requests.Response:
    """POST /v1/trainings with JSON and the token."""
    return requests.post(base_url + "/v1/trainings", json=body, headers=headers or AUTH, timeout=10)


def test_the_api_is_404_when_api_tokens_is_unset(database_url: str) -> None:
    """Without API_TOKENS no route of the API exists, with or without a token."""
    app = web.create_app(make_config(database_url))
    with serve(app) as url:
        created = post(url, {"id": "t1", "user_id": "u1"})
        listed = requests.get(url + "/v1/trainings", headers=AUTH, timeout=10)
    app.extensions["webhook_sync"].close()

    assert (created.status_code, listed.status_code) == (404, 404)
    assert "error" in created.json()


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer", "Bearer wrong-token-aaaaaaaaaa", f"Basic {TOKEN}", f"Bearer {TOKEN}x"],
)
def test_without_a_valid_token_it_is_a_401_with_a_challenge(
    base_url: str, authorization: str | None
) -> None:
    """Missing, wrong or non-bearer credentials: 401, WWW-Authenticate, JSON error."""
    headers = {"Authorization": authorization} if authorization else {}

    response = requests.get(base_url + "/v1/trainings", headers=headers, timeout=10)

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="webhook-sync"')
    assert response.json()["error"]


def test_register_read_and_list_round_trip_with_either_token(base_url: str) -> None:
    """201 on create, 200 again (idempotent), the row by id, in the list; the old token
    still works during rotation."""
    created = post(base_url, {"id": "t1", "user_id": "u1", "destination": "acme/lora"})
    again = post(base_url, {"id": "t1", "user_id": "u1"}, {"Authorization": f"Bearer {OLD_TOKEN}"})
    one = requests.get(base_url + "/v1/trainings/t1", headers=AUTH, timeout=10)
    page = requests.get(base_url + "/v1/trainings", headers=AUTH, timeout=10)

    assert (created.status_code, again.status_code, one.status_code) == (201, 200, 200)
    assert created.json()["user_id"] == "u1"
    assert created.json()["destination"] == "acme/lora"
    assert created.json()["training_status"] == "training"
    assert one.json() == again.json()
    assert set(one.json()) == set(api.PUBLIC_COLUMNS)
    assert page.json() == {"trainings": [one.json()], "next": None}


def test_another_user_for_a_tracked_training_is_a_409(base_url: str, conn: db.Connection) -> None:
    """A conflicting user_id is refused and changes nothing."""
    post(base_url, {"id": "t1", "user_id": "u1"})

    response = post(base_url, {"id": "t1", "user_id": "u2"})

    assert response.status_code == 409
    with conn:
        assert db.select_training(conn, "t1")["user_id"] == "u1"


def test_a_waiting_webhook_is_applied_in_the_same_request(
    base_url: str, conn: db.Connection
) -> None:
    """The event that arrived before registration is applied before the 201 answers."""
    payload = training_payload("t9", "succeeded")
    inbox.receive_delivery(conn, webhook_id="msg_t9", payload=payload, signed_at=None)

    response = post(base_url, {"id": "t9", "user_id": "u1"})

    assert response.status_code == 201
    assert (response.json()["training_status"], response.json()["replicate_status"]) == (
        "completed",
        "succeeded",
    )


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"user_id": "u1"}, 400),
        ({"id": "t1"}, 400),
        ({"id": "t 1", "user_id": "u1"}, 400),
        ({"id": "t1", "user_id": ""}, 400),
        ({"id": "t1", "user_id": 5}, 400),
        ({"id": "t1", "user_id": "u1", "destination": "no-slash"}, 400),
        (["t1", "u1"], 400),
        ({"id": "t1", "user_id": "u1", "pad": "x" * api.MAX_BODY_BYTES}, 413),
    ],
)
def test_bad_bodies_are_json_4xx(base_url: str, body: object, status: int) -> None:
    """Missing or malformed fields, a non-object, an oversized body: JSON errors."""
    response = post(base_url, body)

    assert response.status_code == status
    assert response.json()["error"]


def test_a_body_that_is_not_json_is_a_400(base_url: str) -> None:
    """Bytes that are not JSON are refused with the reason."""
    response = requests.post(base_url + "/v1/trainings", data=b"\xff{", headers=AUTH, timeout=10)

    assert response.status_code == 400
    assert "UTF-8" in response.json()["error"]


def test_an_unknown_training_is_a_404(base_url: str) -> None:
    """GET of an id nobody registered."""
    response = requests.get(base_url + "/v1/trainings/nope", headers=AUTH, timeout=10)

    assert response.status_code == 404
    assert response.json() == {"error": "training is not tracked"}


def test_an_id_that_is_no_training_id_is_a_400(base_url: str) -> None:
    """GET of an id with a space in it is refused, not looked up."""
    response = requests.get(base_url + "/v1/trainings/t%201", headers=AUTH, timeout=10)

    assert response.status_code == 400
    assert response.json() == {"error": "id must be a Replicate training id"}


def test_pages_are_newest_first_and_filtered(base_url: str, conn: db.Connection) -> None:
    """user_id and status filter; limit and the cursor walk every row exactly once."""
    for number in range(7):
        post(base_url, {"id": f"t{number}", "user_id": "u1" if number % 2 else "u2"})
    with conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE webhook_sync.trainings SET created_at = now() - make_interval(mins => "
            "substr(id, 2)::int)"
        )
        cur.execute("UPDATE webhook_sync.trainings SET training_status = 'failed' WHERE id = 't3'")
    seen: list[str] = []
    after = None
    while True:
        params = {"user_id": "u1", "limit": "2", **({"after": after} if after else {})}
        page = requests.get(
            base_url + "/v1/trainings", params=params, headers=AUTH, timeout=10
        ).json()
        seen += [row["id"] for row in page["trainings"]]
        after = page["next"]
        if after is None:
            break
    failed = requests.get(
        base_url + "/v1/trainings", params={"status": "failed"}, headers=AUTH, timeout=10
    ).json()

    assert seen == ["t1", "t3", "t5"]
    assert [row["id"] for row in failed["trainings"]] == ["t3"]


@pytest.mark.parametrize(
    "params",
    [{"limit": "0"}, {"limit": "201"}, {"limit": "x"}, {"after": "bm9wZQ"}, {"status": "done"}],
)
def test_bad_list_parameters_are_400(base_url: str, params: dict[str, str]) -> None:
    """A limit out of range, a cursor we did not issue, an unknown status."""
    response = requests.get(base_url + "/v1/trainings", params=params, headers=AUTH, timeout=10)

    assert response.status_code == 400
    assert response.json()["error"]
