"""What unsigned traffic may cost the public endpoints: bounded /metrics series over real
HTTP, and /readyz answered from a per-process cache for a second."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest
from flask import Flask

from tests.test_web import make_config, read_http_response
from tests.web_support import serve
from webhook_sync import db, web

ODD_METHODS = 300
SERIES = re.compile(r"^webhook_sync_http_request_duration_seconds_count\{(.*)\}", re.MULTILINE)


@pytest.fixture()
def app(database_url: str) -> Iterator[Flask]:
    """The web app on this test's database; its pool is closed afterwards."""
    application = web.create_app(make_config(database_url))
    yield application
    application.extensions["webhook_sync"].close()


def odd_method(n: int) -> str:
    """A distinct method of capital letters, as gunicorn would accept one."""
    letters = ""
    for _ in range(4):
        n, digit = divmod(n, 26)
        letters += chr(ord("A") + digit)
    return "X" + letters


def send_raw(base_url: str, method: str, path: str) -> bytes:
    """One request with any method over a raw socket; the answer's head and body."""
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        return read_http_response(sock)


def series_labels(text: str) -> set[str]:
    """The label sets of the request-duration histogram, one per series."""
    return set(SERIES.findall(text))


def test_odd_methods_add_no_metric_series(app: Flask) -> None:
    """Hundreds of distinct made-up methods, on known and unknown paths, add at most one
    series per route and status (`method="other"`), not one per method."""
    with serve(app) as base_url:
        before = series_labels(send_raw(base_url, "GET", "/metrics").decode())
        for n in range(ODD_METHODS):
            path = "/healthz" if n % 2 else f"/nowhere/{n}"
            answer = send_raw(base_url, odd_method(n), path)
            assert answer.startswith(b"HTTP/1.1 4"), answer[:40]
        text = send_raw(base_url, "GET", "/metrics").decode()

    added = series_labels(text) - before
    methods = {re.search(r'method="([^"]*)"', labels).group(1) for labels in series_labels(text)}
    routes = {re.search(r'route="([^"]*)"', labels).group(1) for labels in series_labels(text)}
    assert len(added) <= 3
    assert methods <= {"GET", "POST", "HEAD", "OPTIONS", "other"}
    assert "other" in methods
    assert not any(route.startswith("/nowhere") for route in routes)


def test_readyz_is_checked_at_most_once_per_second(app: Flask, conn: db.Connection) -> None:
    """Within a second of a check, /readyz answers from its cache without asking the
    database (a migration record removed meanwhile goes unnoticed, however many ask);
    once the second is over, the next request checks again and sees it."""
    now = [1000.0]
    app.extensions["webhook_sync"].readiness.clock = lambda: now[0]
    client = app.test_client()
    first = client.get("/readyz")
    with conn, conn.cursor() as cur:
        # A fresh check would now find a migration pending.
        cur.execute(
            "DELETE FROM webhook_sync.schema_migrations"
            " WHERE name = (SELECT max(name) FROM webhook_sync.schema_migrations)"
        )

    now[0] += 0.9
    cached = [client.get("/readyz") for _ in range(50)]
    now[0] += 0.1
    fresh = client.get("/readyz")

    assert first.status_code == 200
    assert first.get_json() == {"status": "ready"}
    assert {(answer.status_code, answer.get_data()) for answer in cached} == {
        (200, first.get_data())
    }
    assert fresh.status_code == 503
    assert fresh.content_type == "application/json"
    assert fresh.get_json()["status"] == "unavailable"
