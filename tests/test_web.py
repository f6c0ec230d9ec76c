"""The web app: every answer of the webhook route, health, readiness, metrics, and the
behaviour that is about HTTP (413, concurrency, 503) over a real server thread."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.exceptions import HTTPException
from werkzeug.test import EnvironBuilder, run_wsgi_app

from tests.support import database_name, free_port, run_cli, wait_until
from tests.web_support import (
    OTHER_SECRET,
    SECRET,
    UNKNOWN_SECRET,
    WEBHOOK_PATH,
    new_webhook_id,
    serve,
    sign_headers,
    signed_delivery,
    training_payload,
)
from webhook_sync import db, errors, inbox, logs, service, signing, web
from webhook_sync.config import Config
from webhook_sync.dev.simulator import DEFAULT_TOKEN, Simulator, SimulatorServer, start_in_thread

TRAINING_ID = "zz4ibbonubfz7carwiefibzgga"


def make_config(database_url: str, **overrides: object) -> Config:
    """Settings for a web app on this test's database, signed with SECRET."""
    return replace(Config(database_url=database_url, webhook_secrets=(SECRET,)), **overrides)


@pytest.fixture()
def app(database_url: str) -> Iterator[Flask]:
    """The web app on this test's database; its pool is closed afterwards."""
    application = web.create_app(make_config(database_url))
    yield application
    application.extensions["webhook_sync"].close()


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    """Flask's test client, for behaviour that is not about HTTP itself."""
    return app.test_client()


def track(database_url: str, training_id: str = TRAINING_ID) -> None:
    """Register a training the way the platform does, on a short connection of its own."""
    conn = db.connect(database_url)
    try:
        with conn:
            service.track_training(conn, training_id, "user-1")
    finally:
        conn.close()


def fetch_row(database_url: str, training_id: str = TRAINING_ID) -> dict | None:
    """The training row as the platform reads it."""
    conn = db.connect(database_url)
    try:
        return db.select_training(conn, training_id)
    finally:
        conn.close()


def count_rows(database_url: str, sql: str, **params: object) -> int:
    """Run a COUNT query on a short connection."""
    conn = db.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()[0]
    finally:
        conn.close()


def post(client: FlaskClient, payload: dict | bytes, **sign_options: object):
    """Send one signed delivery through the test client."""
    body, headers = signed_delivery(payload, **sign_options)
    return client.post(WEBHOOK_PATH, data=body, headers=headers)


def read_http_response(sock: socket.socket) -> bytes:
    """Read one HTTP response with a Content-Length from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def post_headers_only(base_url: str, headers: dict[str, str], content_length: int) -> bytes:
    """Send a POST's head announcing `content_length` body bytes, send none of them, and
    return the answer (the socket timeout only catches a server waiting for the body)."""
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            (
                f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: localhost\r\n{head}"
                f"Content-Length: {content_length}\r\n\r\n"
            ).encode()
        )
        return read_http_response(sock)


def http_post(base_url: str, payload: dict | bytes, **sign_options: object) -> requests.Response:
    """Send one signed delivery over real HTTP."""
    body, headers = signed_delivery(payload, **sign_options)
    return requests.post(base_url + WEBHOOK_PATH, data=body, headers=headers, timeout=60)


# --- 200 answers ---------------------------------------------------------------------------


def test_signed_delivery_updates_the_row_before_answering(
    client: FlaskClient, database_url: str
) -> None:
    """A succeeded webhook for a tracked training is applied and answered `applied`."""
    track(database_url)

    response = post(client, training_payload(TRAINING_ID, "succeeded"))

    assert response.status_code == 200
    assert response.get_json() == {"result": "applied", "training_id": TRAINING_ID}
    row = fetch_row(database_url)
    assert row["training_status"] == "completed"
    assert row["replicate_status"] == "succeeded"
    assert row["version_id"] == "a" * 64
    assert row["updated_by"] == "webhook"


def test_same_status_again_is_unchanged(client: FlaskClient, database_url: str) -> None:
    """A second, different delivery reporting the same status changes nothing."""
    track(database_url)
    post(client, training_payload(TRAINING_ID, "processing"))

    response = post(client, training_payload(TRAINING_ID, "processing"))

    assert response.get_json() == {"result": "unchanged", "training_id": TRAINING_ID}


def test_resent_webhook_id_is_a_duplicate(client: FlaskClient, database_url: str) -> None:
    """A retry with the same webhook-id is answered `duplicate` and writes nothing more."""
    track(database_url)
    webhook_id = new_webhook_id()
    payload = training_payload(TRAINING_ID, "succeeded")
    post(client, payload, webhook_id=webhook_id)

    response = post(client, payload, webhook_id=webhook_id)

    assert response.status_code == 200
    assert response.get_json() == {"result": "duplicate", "training_id": TRAINING_ID}
    transitions = count_rows(
        database_url,
        "SELECT count(*) FROM webhook_sync.training_transitions WHERE training_id = %(id)s",
        id=TRAINING_ID,
    )
    assert transitions == 1


def test_processing_after_succeeded_is_ignored(client: FlaskClient, database_url: str) -> None:
    """Out of order: `processing` arriving after `succeeded` never moves the row back."""
    track(database_url)
    post(client, training_payload(TRAINING_ID, "succeeded"))

    response = post(client, training_payload(TRAINING_ID, "processing"))

    assert response.get_json() == {"result": "ignored", "training_id": TRAINING_ID}
    assert fetch_row(database_url)["replicate_status"] == "succeeded"


def test_contradicting_terminal_status_is_a_conflict(
    client: FlaskClient, database_url: str
) -> None:
    """`failed` after `succeeded` is refused as a conflict and the row keeps `succeeded`."""
    track(database_url)
    post(client, training_payload(TRAINING_ID, "succeeded"))

    response = post(client, training_payload(TRAINING_ID, "failed", error="boom"))

    assert response.get_json() == {"result": "conflict", "training_id": TRAINING_ID}
    assert fetch_row(database_url)["training_status"] == "completed"


def test_early_webhook_is_pending_and_applied_on_track(
    client: FlaskClient, database_url: str
) -> None:
    """A webhook before the training is tracked is kept, then applied by `webhook-sync track`."""
    response = post(client, training_payload(TRAINING_ID, "succeeded"))

    tracked = run_cli("track", TRAINING_ID, "--user", "user-1", env={"DATABASE_URL": database_url})

    assert response.status_code == 200
    assert response.get_json() == {"result": "pending", "training_id": TRAINING_ID}
    assert tracked.returncode == 0, tracked.stderr
    row = fetch_row(database_url)
    assert row["replicate_status"] == "succeeded"
    assert row["training_status"] == "completed"


def test_failed_processing_is_processed_again_on_retry(
    client: FlaskClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery whose processing failed is answered 500, kept, and applied on the retry."""
    track(database_url)
    webhook_id = new_webhook_id()
    payload = training_payload(TRAINING_ID, "succeeded")
    real_apply = service.apply_delivery

    def broken_apply(*args: object, **kwargs: object) -> service.ApplyResult:
        monkeypatch.setattr(service, "apply_delivery", real_apply)
        raise RuntimeError("a bug for one call")

    monkeypatch.setattr(service, "apply_delivery", broken_apply)

    first = post(client, payload, webhook_id=webhook_id)
    second = post(client, payload, webhook_id=webhook_id)

    assert first.status_code == 500
    assert first.get_json() == {"error": "internal error"}
    assert second.get_json() == {"result": "applied", "training_id": TRAINING_ID}


def test_nul_characters_are_stored_without_them(client: FlaskClient, database_url: str) -> None:
    """NUL characters, which jsonb cannot hold, are dropped instead of failing the delivery."""
    track(database_url)
    payload = training_payload(TRAINING_ID, "failed", error="bad\u0000input", logs="a\u0000b")

    response = post(client, payload)

    assert response.get_json()["result"] == "applied"
    assert fetch_row(database_url)["error"] == "badinput"


def test_escaped_emoji_is_stored(client: FlaskClient, database_url: str) -> None:
    """A surrogate pair escape (an emoji as ASCII-only JSON) is ordinary text."""
    track(database_url)

    response = post(client, training_payload(TRAINING_ID, "failed", error="sad \U0001f622"))

    assert response.get_json()["result"] == "applied"
    assert fetch_row(database_url)["error"] == "sad \U0001f622"


def test_number_jsonb_cannot_hold_is_stored_as_decoded(
    client: FlaskClient, database_url: str
) -> None:
    """Python reads 0e-20000 as 0.0, where jsonb refuses its text (past numeric's scale):
    the delivery is applied and its event stored with the decoded value, not a 500."""
    track(database_url)
    body = json.dumps(training_payload(TRAINING_ID, "processing"))[:-1]
    body += ', "metrics": {"x": 0e-20000}}'

    response = post(client, body.encode())

    assert response.status_code == 200
    assert response.get_json()["result"] == "applied"
    sql = "SELECT count(*) FROM webhook_sync.webhook_events WHERE payload #> '{metrics,x}' = '0'"
    assert count_rows(database_url, sql) == 1


def test_query_string_is_ignored(client: FlaskClient, database_url: str) -> None:
    """The unsigned query string plays no part: the body's id is what is applied."""
    track(database_url)
    body, headers = signed_delivery(training_payload(TRAINING_ID, "processing"))

    response = client.post(WEBHOOK_PATH + "?training=other", data=body, headers=headers)

    assert response.get_json() == {"result": "applied", "training_id": TRAINING_ID}


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_header_is_400(client: FlaskClient, missing: str) -> None:
    """Each signature header is required."""
    body, headers = signed_delivery(training_payload(TRAINING_ID, "processing"))
    del headers[missing]

    response = client.post(WEBHOOK_PATH, data=body, headers=headers)

    assert response.status_code == 400
    assert missing in response.get_json()["error"]


@pytest.mark.parametrize("signature", ["v1abc", "v1,a,b", "v1abc v1,a,b"])
def test_malformed_signature_is_400_not_500(client: FlaskClient, signature: str) -> None:
    """A header of nothing but malformed entries is a 400."""
    body, headers = signed_delivery(training_payload(TRAINING_ID, "processing"))
    headers["webhook-signature"] = signature.format(valid=headers["webhook-signature"])

    response = client.post(WEBHOOK_PATH, data=body, headers=headers)

    assert response.status_code == 400
    assert "webhook-signature" in response.get_json()["error"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"status": "succeeded"}', "no id"),
        (b'{"id": "x"}', "no status"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"id": "t", "status": "failed", "input": ' + b"[" * 500 + b"]" * 500 + b"}", "deeper"),
        (b'{"id": "t", "status": "failed", "logs": "\\ud800"}', "surrogate"),
        (b'{"id": "t", "status": "failed", "metrics": {"total_time": NaN}}', "NaN"),
        (b'{"id": "t", "status": "failed", "": -Infinity}', "Infinity"),
        (b'{"id": "t", "status": "failed", "metrics": {"predict_time": 1e400}}', "range"),
    ],
    ids=[
        "not-json",
        "array",
        "no-id",
        "no-status",
        "deeply-nested",
        "nested-500",
        "surrogate",
        "nan",
        "infinity",
        "float-overflow",
    ],
)
def test_signed_body_that_is_not_a_training_is_400(
    client: FlaskClient, database_url: str, body: bytes, reason: str
) -> None:
    """A correctly signed body that is not a JSON training object is refused; nothing stored."""
    response = post(client, body)

    assert response.status_code == 400
    assert reason in response.get_json()["error"]
    assert count_rows(database_url, "SELECT count(*) FROM webhook_sync.webhook_events") == 0


@pytest.mark.parametrize("valid_first", [True, False], ids=["valid-first", "valid-last"])
def test_malformed_entry_beside_a_valid_one_is_accepted_in_any_order(
    client: FlaskClient, database_url: str, valid_first: bool
) -> None:
    """A malformed entry next to the valid v1 entry does not matter, before or after it."""
    track(database_url)
    body, headers = signed_delivery(training_payload(TRAINING_ID, "processing"))
    entries = [headers["webhook-signature"], "v1abc"]
    headers["webhook-signature"] = " ".join(entries if valid_first else entries[::-1])

    response = client.post(WEBHOOK_PATH, data=body, headers=headers)

    assert response.get_json() == {"result": "applied", "training_id": TRAINING_ID}


def test_no_match_beside_a_malformed_entry_is_a_precise_400(client: FlaskClient) -> None:
    """With no entry matching and one malformed, the answer names both."""
    body, headers = signed_delivery(
        training_payload(TRAINING_ID, "processing"), secret=UNKNOWN_SECRET
    )
    headers["webhook-signature"] += " v1abc"

    response = client.post(WEBHOOK_PATH, data=body, headers=headers)

    assert response.status_code == 400
    assert response.get_json() == {
        "error": "webhook-signature has 1 malformed entry and none of the 1 readable ones"
        " matches (expected space-separated v1,<base64 of 32 bytes>)"
    }


def test_body_that_is_not_utf8_is_judged_after_its_signature(client: FlaskClient) -> None:
    """Bytes that are not UTF-8 under a signature of other bytes are a 401: nothing of an
    unsigned body is looked at (a signed one is a 400, in test_hostile_input)."""
    headers = sign_headers(b"{}")

    response = client.post(WEBHOOK_PATH, data=b'{"id": "\xff\xfe"}', headers=headers)

    assert response.status_code == 401


def test_unknown_secret_is_401(client: FlaskClient, database_url: str) -> None:
    """A delivery signed with a secret we do not hold is refused and writes nothing."""
    track(database_url)

    response = post(client, training_payload(TRAINING_ID, "succeeded"), secret=UNKNOWN_SECRET)

    assert response.status_code == 401
    assert "error" in response.get_json()
    assert fetch_row(database_url)["replicate_status"] is None


@pytest.mark.parametrize("minutes", [-6, 6])
def test_timestamp_outside_tolerance_is_401(client: FlaskClient, minutes: int) -> None:
    """Six minutes off either way is outside the 5-minute tolerance."""
    signed_at = datetime.now(UTC) + timedelta(minutes=minutes)

    response = post(client, training_payload(TRAINING_ID, "succeeded"), signed_at=signed_at)

    assert response.status_code == 401
    assert "5 minutes" in response.get_json()["error"]


def test_rotation_accepts_both_configured_secrets_and_refuses_a_third(
    database_url: str,
) -> None:
    """With old and new secret configured, both are accepted and a third is refused."""
    track(database_url)
    app = web.create_app(make_config(database_url, webhook_secrets=(SECRET, OTHER_SECRET)))
    client = app.test_client()
    try:
        old = post(client, training_payload(TRAINING_ID, "processing"), secret=SECRET)
        new = post(client, training_payload(TRAINING_ID, "succeeded"), secret=OTHER_SECRET)
        third = post(client, training_payload(TRAINING_ID, "succeeded"), secret=UNKNOWN_SECRET)
    finally:
        app.extensions["webhook_sync"].close()

    assert old.get_json()["result"] == "applied"
    assert new.get_json()["result"] == "applied"
    assert third.status_code == 401


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_other_methods_are_405_as_json(client: FlaskClient, method: str) -> None:
    """Any method but POST on the webhook URL (OPTIONS too) is 405, Allow and a JSON body."""
    response = client.open(WEBHOOK_PATH, method=method)

    assert response.status_code == 405
    assert "POST" in response.headers["Allow"]
    assert "error" in response.get_json()


def test_a_lowercase_post_is_answered_as_a_post(app: Flask, database_url: str) -> None:
    """A server that passes the method as sent (werkzeug's, gunicorn with
    permit_unconventional_http_method) may give `post`: Flask routes it as POST, to the
    URL rule that has no view, so the receiver must answer it (not a 500)."""
    track(database_url)
    body, headers = signed_delivery(training_payload(TRAINING_ID, "processing"))
    environ = EnvironBuilder(path=WEBHOOK_PATH, method="POST", data=body, headers=headers)
    environ = environ.get_environ()
    environ["REQUEST_METHOD"] = "post"

    answer, status, _ = run_wsgi_app(app.wsgi_app, environ)

    assert status.startswith("200")
    assert json.loads(b"".join(answer)) == {"result": "applied", "training_id": TRAINING_ID}


def test_a_status_code_http_does_not_name_still_gets_a_status_line(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal passes on the code of any werkzeug HTTPException below 500: one that
    http.HTTPStatus does not name (499) is still answered with its code and a JSON body,
    not a bare 500 from the server."""

    class ClientClosed(HTTPException):
        code = 499
        description = "client closed the request"

    def refuse(headers: object) -> None:
        raise ClientClosed()

    monkeypatch.setattr(signing, "check_headers", refuse)
    body, headers = signed_delivery(training_payload(TRAINING_ID, "processing"))

    response = client.post(WEBHOOK_PATH, data=body, headers=headers)

    assert response.status == "499 Error"
    assert response.get_json() == {"error": "client closed the request"}


def test_unknown_path_is_404_as_json(client: FlaskClient) -> None:
    """Anything else is a JSON 404."""
    response = client.post("/webhooks/other", data=b"{}")

    assert response.status_code == 404
    assert "error" in response.get_json()


def test_unexpected_bug_is_a_json_500_without_a_stack_trace(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error nobody planned for is answered JSON 500 and the body carries no traceback."""

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("payload-secret-ish")

    monkeypatch.setattr(inbox, "receive_delivery", broken)

    response = post(client, training_payload(TRAINING_ID, "succeeded"))

    assert response.status_code == 500
    assert response.get_json() == {"error": "internal error"}
    assert b"Traceback" not in response.data


# --- logging -------------------------------------------------------------------------------


@pytest.fixture()
def log_lines() -> Iterator[io.StringIO]:
    """The package's log lines, as the web process writes them, for one test."""
    logger = logging.getLogger(logs.LOGGER_NAME)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    logs.configure("INFO", "kv")
    buffer = io.StringIO()
    logger.handlers[0].setStream(buffer)  # type: ignore[attr-defined]
    yield buffer
    logger.handlers[:], logger.level, logger.propagate = saved


def test_one_log_line_per_delivery_without_secret_or_payload(
    client: FlaskClient, database_url: str, log_lines: io.StringIO
) -> None:
    """The delivery line names id, training, result, old -> new and ms; never secret or body."""
    track(database_url)
    webhook_id = new_webhook_id()
    payload = training_payload(TRAINING_ID, "succeeded", logs="very-private-log-line")

    post(client, payload, webhook_id=webhook_id)

    lines = [line for line in log_lines.getvalue().splitlines() if "webhook_delivery" in line]
    assert len(lines) == 1
    line = lines[0]
    for expected in (
        f"webhook_id={webhook_id}",
        f"training_id={TRAINING_ID}",
        "result=applied",
        "old=-",
        "new=succeeded",
        "ms=",
    ):
        assert expected in line
    assert SECRET.removeprefix("whsec_") not in line
    assert "very-private-log-line" not in line


def test_refused_delivery_is_logged_with_the_webhook_id_it_claims(
    client: FlaskClient, log_lines: io.StringIO
) -> None:
    """A 401 is logged with the delivery's webhook-id, so an operator can find the delivery
    a sender reports as refused; never the secret or the body."""
    webhook_id = new_webhook_id()
    payload = training_payload(TRAINING_ID, "succeeded", logs="very-private-log-line")

    response = post(client, payload, webhook_id=webhook_id, secret=UNKNOWN_SECRET)

    lines = [line for line in log_lines.getvalue().splitlines() if "webhook_delivery" in line]
    assert response.status_code == 401
    assert len(lines) == 1
    assert f"webhook_id={webhook_id}" in lines[0]
    assert "result=no_matching_secret" in lines[0]
    assert UNKNOWN_SECRET.removeprefix("whsec_") not in lines[0]
    assert "very-private-log-line" not in lines[0]


# --- the secret from Replicate ------------------------------------------------------------


SECRET_ROUTE = "GET /v1/webhooks/default/secret"


def secret_requests(simulator: SimulatorServer) -> int:
    """How many times the simulator was asked for the signing secret (its admin API)."""
    counts = requests.get(simulator.url + "/_admin/requests", timeout=10).json()
    return counts["by_route"].get(SECRET_ROUTE, 0)


@pytest.fixture()
def simulator() -> Iterator[SimulatorServer]:
    """The Replicate simulator, signing with SECRET, on a free port."""
    server = start_in_thread(Simulator(secret=SECRET, seed=11))
    yield server
    server.shutdown()


def token_only_config(database_url: str, simulator: SimulatorServer) -> Config:
    """Settings with REPLICATE_API_TOKEN for the simulator and no REPLICATE_WEBHOOK_SECRET."""
    return make_config(
        database_url,
        webhook_secrets=(),
        api_token=DEFAULT_TOKEN,
        api_base_url=simulator.api_base_url,
    )


@pytest.fixture()
def token_only_app(database_url: str, simulator: SimulatorServer) -> Iterator[Flask]:
    """The web app fetching the account's secret from the simulator."""
    application = web.create_app(token_only_config(database_url, simulator))
    yield application
    application.extensions["webhook_sync"].close()


def unsigned_posts(base_url: str, count: int) -> list[int]:
    """Status codes of `count` posts with malformed headers and of `count` with well-formed
    headers but a signature by a secret nobody holds."""
    codes = []
    for _ in range(count):
        codes.append(requests.post(base_url + WEBHOOK_PATH, data=b"{}", timeout=30).status_code)
        codes.append(http_post(base_url, {"id": "x"}, secret=UNKNOWN_SECRET).status_code)
    return codes


def test_secret_is_fetched_once_at_boot_and_never_per_request(
    token_only_app: Flask, simulator: SimulatorServer, database_url: str
) -> None:
    """With only the token set, the account's secret is fetched when the app is built,
    before any request, and unsigned or forged posts never fetch it again."""
    fetched_at_boot = wait_until(lambda: secret_requests(simulator) == 1, message="boot fetch")
    track(database_url)

    with serve(token_only_app) as base_url:
        refused = unsigned_posts(base_url, 10)
        applied = http_post(base_url, training_payload(TRAINING_ID, "processing"))

    assert fetched_at_boot
    assert set(refused) == {400, 401}
    assert applied.json() == {"result": "applied", "training_id": TRAINING_ID}
    assert secret_requests(simulator) == 1


def test_secret_fetch_failures_are_retried_with_backoff_not_per_request(
    database_url: str, simulator: SimulatorServer
) -> None:
    """While Replicate fails, the fetch is retried on its own schedule: twenty posts cost
    no extra request, signed ones get 503 + Retry-After, malformed ones their 400; once
    Replicate answers, deliveries apply."""
    track(database_url)
    requests.post(simulator.url + "/_admin/faults", json={"error_rate": 1.0}, timeout=10)
    config = make_config(
        database_url,
        webhook_secrets=(),
        api_token=DEFAULT_TOKEN,
        api_base_url=simulator.api_base_url,
    )
    app = web.create_app(config)
    try:
        with serve(app) as base_url:
            wait_until(lambda: secret_requests(simulator) >= 2, message="a retried fetch")
            before = secret_requests(simulator)
            signed = [http_post(base_url, training_payload(TRAINING_ID, "processing"))]
            refused = unsigned_posts(base_url, 10)
            signed += [http_post(base_url, training_payload(TRAINING_ID, "processing"))]
            during = secret_requests(simulator) - before
            requests.post(simulator.url + "/_admin/faults", json={"error_rate": 0.0}, timeout=10)
            applied = wait_until(
                lambda: (
                    http_post(base_url, training_payload(TRAINING_ID, "processing"))
                    .json()
                    .get("result")
                    == "applied"
                ),
                timeout=60,
                interval=0.5,
                message="the fetch to succeed after the fault ends",
            )
    finally:
        app.extensions["webhook_sync"].close()

    assert [response.status_code for response in signed] == [503, 503]
    assert all(response.headers["Retry-After"] for response in signed)
    assert 400 in refused
    assert during <= 2
    assert applied


def test_app_refuses_to_start_without_secret_or_token(database_url: str) -> None:
    """With neither setting the factory says which variables to set."""
    with pytest.raises(errors.ConfigError) as raised:
        web.create_app(Config(database_url=database_url))

    assert "REPLICATE_WEBHOOK_SECRET" in str(raised.value)
    assert "REPLICATE_API_TOKEN" in str(raised.value)


# --- health, readiness, metrics, OpenAPI ---------------------------------------------------


@pytest.fixture()
def unreachable_app() -> Flask:
    """The web app with a database URL where nothing listens."""
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    return web.create_app(Config(database_url=url, webhook_secrets=(SECRET,)))


def test_healthz_touches_nothing(unreachable_app: Flask) -> None:
    """/healthz answers even when the database URL points nowhere."""
    response = unreachable_app.test_client().get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_is_200_on_a_migrated_database(client: FlaskClient) -> None:
    """A reachable, fully migrated database is ready."""
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ready"}


def test_readyz_is_503_with_the_pending_migrations(
    empty_database_url: str, log_lines: io.StringIO
) -> None:
    """A database without our schema is not ready: a fixed reason; the log names the
    migrations."""
    app = web.create_app(make_config(empty_database_url))
    try:
        response = app.test_client().get("/readyz")
    finally:
        app.extensions["webhook_sync"].close()

    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "reason": "migrations pending"}
    assert "0001_trainings.sql" in log_lines.getvalue()


def test_delivery_before_migrations_is_503_so_replicate_retries(empty_database_url: str) -> None:
    """A database without our schema (release not run yet) answers 503 with Retry-After."""
    app = web.create_app(make_config(empty_database_url))
    try:
        response = post(app.test_client(), training_payload(TRAINING_ID, "succeeded"))
    finally:
        app.extensions["webhook_sync"].close()

    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.get_json() == {"error": "database not migrated, retry later"}


def test_readyz_is_503_when_the_database_is_unreachable(
    unreachable_app: Flask, log_lines: io.StringIO
) -> None:
    """Nothing listening on the database port is a 503 with a fixed reason; the cause, without
    the host, goes to the log."""
    response = unreachable_app.test_client().get("/readyz")

    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "reason": "database unavailable"}
    assert "cannot connect to the database" in log_lines.getvalue()
    assert "127.0.0.1" not in log_lines.getvalue() and "nobody" not in log_lines.getvalue()


def test_metrics_count_deliveries_and_verification_failures(
    client: FlaskClient, database_url: str
) -> None:
    """/metrics is Prometheus text with the delivery and refusal counters."""
    track(database_url)
    post(client, training_payload(TRAINING_ID, "processing"))
    post(client, training_payload(TRAINING_ID, "succeeded"), secret=UNKNOWN_SECRET)

    response = client.get("/metrics")

    text = response.get_data(as_text=True)
    assert response.status_code == 200
    assert 'webhook_sync_webhook_deliveries_total{result="applied"}' in text
    assert 'webhook_sync_webhook_verification_failures_total{reason="no_matching_secret"}' in text
    assert 'webhook_sync_status_transitions_total{outcome="applied",source="webhook"}' in text
    assert 'route="/webhooks/replicate"' in text


def test_openapi_description_ships_with_the_package(client: FlaskClient) -> None:
    """The OpenAPI file is served and describes every route and webhook answer."""
    response = client.get("/openapi.yaml")

    text = response.get_data(as_text=True)
    assert response.status_code == 200
    for fragment in ("/webhooks/replicate:", "/healthz:", "/readyz:", "/metrics:", '"413":'):
        assert fragment in text


def test_importing_the_module_needs_no_settings() -> None:
    """Importing web with an empty environment works and builds no app; gunicorn's factory
    call `create_app_from_env()` is what reads the settings."""
    code = (
        "import webhook_sync.web as web\n"
        "assert not hasattr(web, 'app')\n"
        "try:\n"
        "    web.create_app_from_env()\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], env={}, capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ConfigError DATABASE_URL is not set")


# --- over real HTTP ------------------------------------------------------------------------


def test_twenty_mib_succeeded_payload_is_accepted(app: Flask, database_url: str) -> None:
    """A succeeded training with 20 MiB of logs is applied; the inbox keeps only their tail."""
    track(database_url)
    logs_text = ("step 1000/1000 loss=0.0123\n" * 800_000)[: 20 * 1024 * 1024]
    body, headers = signed_delivery(training_payload(TRAINING_ID, "succeeded", logs=logs_text))

    with serve(app) as base_url:
        response = requests.post(base_url + WEBHOOK_PATH, data=body, headers=headers, timeout=60)

    assert len(body) > 20 * 1024 * 1024
    assert response.status_code == 200
    assert response.json()["result"] == "applied"
    stored = count_rows(
        database_url, "SELECT max(length(payload->>'logs')) FROM webhook_sync.webhook_events"
    )
    assert stored < 10_000


def test_overlong_status_is_a_clear_400_not_a_failed_notify(app: Flask, database_url: str) -> None:
    """A signed status of 9,000 characters would make pg_notify fail at commit: it is a
    400 naming the status, and nothing is stored; a status at the limit is applied."""
    track(database_url)

    with serve(app) as base_url:
        overlong = http_post(base_url, training_payload(TRAINING_ID, "s" * 9000))
        at_limit = http_post(base_url, training_payload(TRAINING_ID, "s" * 64))

    assert overlong.status_code == 400
    assert overlong.json() == {"error": "training status is longer than 64 characters"}
    assert at_limit.status_code == 200
    assert at_limit.json()["result"] == "applied"
    assert count_rows(database_url, "SELECT count(*) FROM webhook_sync.webhook_events") == 1
    assert fetch_row(database_url)["replicate_status"] == "s" * 64


def test_announced_length_over_the_limit_is_413_before_the_body_is_sent(app: Flask) -> None:
    """Headers announcing 40 MiB are answered 413 although not one body byte was sent."""
    _, headers = signed_delivery(training_payload(TRAINING_ID, "succeeded"))

    with serve(app) as base_url:
        answer = post_headers_only(base_url, headers, 40 * 1024 * 1024)

    assert answer.startswith(b"HTTP/1.1 413")
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
        "error": "body is larger than MAX_WEBHOOK_BYTES"
    }


HEADER_REFUSALS = {
    "no-headers": ({}, 400),
    "malformed-signature": ({"webhook-signature": "v1abc"}, 400),
    "only-v2": ({"webhook-signature": "v2,abc="}, 401),
    "stale": ({"webhook-timestamp": str(int(datetime.now(UTC).timestamp()) - 3600)}, 401),
}


@pytest.mark.parametrize("case", list(HEADER_REFUSALS))
def test_refusals_the_headers_decide_come_before_the_body(app: Flask, case: str) -> None:
    """A post its headers already condemn is answered without reading its body: the
    announced 1 MiB is never sent, and the answer comes anyway."""
    change, expected = HEADER_REFUSALS[case]
    _, signed = signed_delivery(training_payload(TRAINING_ID, "processing"))
    headers = {**signed, **change} if change else {"content-type": "application/json"}

    with serve(app) as base_url:
        answer = post_headers_only(base_url, headers, 1024 * 1024)

    assert answer.startswith(f"HTTP/1.1 {expected}".encode())


class LazyBody(io.RawIOBase):
    """`size` bytes of a body, made as they are read and never kept (seekable, because the
    test client measures the stream)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        count = max(0, min(len(buffer), self.size - self.position))
        buffer[:count] = b"x" * count
        self.position += count
        return count


def test_a_forged_large_body_is_hashed_as_it_streams_not_held(client: FlaskClient) -> None:
    """24 MiB under a signature that will not match cost the app a few MiB of memory at
    most: the body is fed to the HMAC and a disk spool chunk by chunk, never held whole."""
    size = 24 * 1024 * 1024
    headers = sign_headers(b"{}", secret=UNKNOWN_SECRET)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        response = client.post(
            WEBHOOK_PATH,
            input_stream=LazyBody(size),
            headers={**headers, "Content-Length": str(size)},
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert response.status_code == 401
    assert peak < 4 * 1024 * 1024, f"peak {peak / 2**20:.1f} MiB"


def test_chunked_body_is_read_and_refused_past_the_limit(database_url: str) -> None:
    """Without Content-Length the body is read in chunks: within the limit it is applied,
    beyond it the answer is 413."""
    track(database_url)
    app = web.create_app(make_config(database_url, max_webhook_bytes=4096))
    small, small_headers = signed_delivery(training_payload(TRAINING_ID, "processing"))
    large, large_headers = signed_delivery(
        training_payload(TRAINING_ID, "succeeded", logs="x" * 8192)
    )

    def chunks(data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    try:
        with serve(app) as base_url:
            accepted = requests.post(
                base_url + WEBHOOK_PATH, data=chunks(small), headers=small_headers, timeout=30
            )
            refused = requests.post(
                base_url + WEBHOOK_PATH, data=chunks(large), headers=large_headers, timeout=30
            )
    finally:
        app.extensions["webhook_sync"].close()

    assert accepted.json() == {"result": "applied", "training_id": TRAINING_ID}
    assert refused.status_code == 413
    assert fetch_row(database_url)["replicate_status"] == "processing"


def test_identical_deliveries_at_the_same_moment_change_the_row_once(
    database_url: str,
) -> None:
    """Eight copies of one delivery sent at once: one `applied`, the rest `duplicate`."""
    track(database_url)
    app = web.create_app(make_config(database_url, db_pool_max=8))
    body, headers = signed_delivery(training_payload(TRAINING_ID, "succeeded"))
    start = threading.Barrier(8)
    answers: list[dict] = []

    def send(base_url: str) -> None:
        start.wait()
        response = requests.post(base_url + WEBHOOK_PATH, data=body, headers=headers, timeout=30)
        answers.append(response.json())

    try:
        with serve(app) as base_url:
            threads = [threading.Thread(target=send, args=(base_url,)) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        app.extensions["webhook_sync"].close()

    results = sorted(answer["result"] for answer in answers)
    assert results == ["applied"] + ["duplicate"] * 7
    applied = count_rows(
        database_url,
        "SELECT count(*) FROM webhook_sync.training_transitions WHERE training_id = %(id)s"
        " AND outcome = 'applied'",
        id=TRAINING_ID,
    )
    assert applied == 1
    assert count_rows(database_url, "SELECT count(*) FROM webhook_sync.webhook_events") == 1


class DatabaseSwitch:
    """Makes one test database refuse connections and ends its sessions, from the admin URL,
    without touching the shared PostgreSQL server."""

    def __init__(self, pg_admin_url: str, database_url: str) -> None:
        self.admin_url = pg_admin_url
        self.dbname = database_name(database_url)

    def _execute(self, sql: str) -> int:
        admin = psycopg2.connect(self.admin_url)
        admin.autocommit = True
        try:
            with admin.cursor() as cur:
                cur.execute(sql, {"name": self.dbname})
                return cur.rowcount
        finally:
            admin.close()

    def allow_connections(self, allowed: bool) -> None:
        """Let clients connect to the database, or refuse them."""
        self._execute(f'ALTER DATABASE "{self.dbname}" ALLOW_CONNECTIONS {str(allowed).lower()}')

    def end_sessions(self) -> None:
        """Terminate every session on the database and wait until they are gone."""
        self._execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %(name)s"
        )
        wait_until(
            lambda: self._execute("SELECT pid FROM pg_stat_activity WHERE datname = %(name)s") == 0,
            message="the database's sessions to end",
        )


def test_database_stopped_mid_run_gives_503_and_the_retry_applies(
    database_url: str, pg_admin_url: str
) -> None:
    """With the app's database refusing connections the delivery is 503 + Retry-After and
    nothing is written; once it is back, the sender's retry (same webhook-id) applies."""
    track(database_url)
    switch = DatabaseSwitch(pg_admin_url, database_url)
    app = web.create_app(make_config(database_url))
    webhook_id = new_webhook_id()
    payload = training_payload(TRAINING_ID, "succeeded")

    try:
        with serve(app) as base_url:
            warm = http_post(base_url, training_payload(TRAINING_ID, "processing"))
            switch.allow_connections(False)
            switch.end_sessions()
            down = [http_post(base_url, payload, webhook_id=webhook_id) for _ in range(2)]
            switch.allow_connections(True)
            stored_while_down = count_rows(
                database_url,
                "SELECT count(*) FROM webhook_sync.webhook_events WHERE webhook_id = %(id)s",
                id=webhook_id,
            )
            retried = http_post(base_url, payload, webhook_id=webhook_id)
    finally:
        switch.allow_connections(True)
        app.extensions["webhook_sync"].close()

    assert warm.json()["result"] == "applied"
    assert [response.status_code for response in down] == [503, 503]
    assert all(response.headers["Retry-After"] for response in down)
    assert all(
        response.json() == {"error": "database unavailable, retry later"} for response in down
    )
    assert stored_while_down == 0
    assert retried.json() == {"result": "applied", "training_id": TRAINING_ID}
    assert fetch_row(database_url)["replicate_status"] == "succeeded"


def test_database_restart_between_deliveries_costs_no_503(
    database_url: str, pg_admin_url: str, log_lines: io.StringIO
) -> None:
    """Pooled connections that died while idle are replaced: the next delivery applies,
    and its log line says how many it tried first."""
    track(database_url)
    app = web.create_app(make_config(database_url, db_pool_max=2))
    state = app.extensions["webhook_sync"]
    try:
        with state.pool.connection(), state.pool.connection():
            pass  # both pooled connections are now open and idle
        DatabaseSwitch(pg_admin_url, database_url).end_sessions()
        with serve(app) as base_url:
            response = http_post(base_url, training_payload(TRAINING_ID, "succeeded"))
    finally:
        state.close()

    lines = [line for line in log_lines.getvalue().splitlines() if "webhook_delivery" in line]
    assert response.status_code == 200
    assert response.json() == {"result": "applied", "training_id": TRAINING_ID}
    assert len(lines) == 1
    assert "result=applied" in lines[0]
    assert "retries=2" in lines[0]


def test_pool_exhaustion_answers_503_quickly(database_url: str) -> None:
    """With every pooled connection borrowed elsewhere, a delivery is 503, not a hang."""
    app = web.create_app(make_config(database_url, db_pool_max=1))
    state = app.extensions["webhook_sync"]
    state.pool.acquire_timeout = 0.05
    try:
        with state.pool.connection(), serve(app) as base_url:
            response = http_post(base_url, training_payload(TRAINING_ID, "succeeded"))
    finally:
        state.close()

    assert response.status_code == 503
    assert response.headers["Retry-After"]
