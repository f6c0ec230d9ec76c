"""The Procfile's gevent web process under many connections, over real sockets: clients
that trickle their requests, concurrent deliveries sharing the pool, and the account's
secret fetched over HTTPS from a worker gevent patched."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.support import free_port, wait_until
from tests.test_web import TRAINING_ID, fetch_row, track
from tests.test_web_process import WebProcess, running_web, web_env, web_process
from tests.web_support import SECRET, WEBHOOK_PATH, signed_delivery, training_payload

__all__ = ["web_process"]  # the fixture, shared with test_web_process

pytestmark = pytest.mark.slow
TRICKLERS = 64
# Issue 11: with 64 trickling connections open, each answer within a second.
ANSWER_WITHIN = 1.0


@contextlib.contextmanager
def trickling_connections(base_url: str, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that each send a request line and one header, then stall."""
    port = int(base_url.rsplit(":", 1)[1])
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: localhost\r\n".encode())
            sockets.append(sock)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def timed(call: Callable[[], requests.Response]) -> tuple[requests.Response, float]:
    """Run one request; its response and how long it took in seconds."""
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_trickling_clients_leave_health_and_deliveries_answered(
    web_process: WebProcess, database_url: str
) -> None:
    """With 64 connections that sent one header line and stalled (more than the threads a
    thread-per-request server has), /healthz and a signed delivery each answer within 1 s."""
    track(database_url)
    body, headers = signed_delivery(training_payload(TRAINING_ID, "succeeded"))
    url = web_process.base_url

    with trickling_connections(url, TRICKLERS) as stalled:
        health, health_seconds = timed(
            lambda: requests.get(url + "/healthz", timeout=ANSWER_WITHIN)
        )
        delivery, delivery_seconds = timed(
            lambda: requests.post(
                url + WEBHOOK_PATH, data=body, headers=headers, timeout=ANSWER_WITHIN
            )
        )
        still_open = sum(1 for sock in stalled if sock.fileno() != -1)

    assert health.status_code == 200
    assert health_seconds < ANSWER_WITHIN
    assert delivery.json() == {"result": "applied", "training_id": TRAINING_ID}
    assert delivery_seconds < ANSWER_WITHIN
    assert still_open == TRICKLERS
    assert fetch_row(database_url)["training_status"] == "completed"


def test_concurrent_deliveries_share_each_workers_pool(
    web_process: WebProcess, database_url: str
) -> None:
    """Forty deliveries at once, over two workers of two database connections each, are all
    applied: greenlets take turns on the pool, none shares a connection."""
    ids = [f"trainingconcurrent{n:02d}" for n in range(40)]
    for training_id in ids:
        track(database_url, training_id)
    signed = [signed_delivery(training_payload(training_id, "succeeded")) for training_id in ids]

    def send(delivery: tuple[bytes, dict[str, str]]) -> dict:
        body, headers = delivery
        return requests.post(
            web_process.base_url + WEBHOOK_PATH,
            data=body,
            headers={**headers, "Connection": "close"},
            timeout=30,
        ).json()

    with ThreadPoolExecutor(max_workers=len(signed)) as pool:
        answers = list(pool.map(send, signed))

    assert [answer["result"] for answer in answers] == ["applied"] * len(ids)
    assert {fetch_row(database_url, training_id)["training_status"] for training_id in ids} == {
        "completed"
    }


class SecretHandler(http.server.BaseHTTPRequestHandler):
    """Replicate's GET /v1/webhooks/default/secret, answering SECRET."""

    def do_GET(self) -> None:
        """Answer the secret at its path, 404 elsewhere."""
        found = self.path == "/v1/webhooks/default/secret"
        body = json.dumps({"key": SECRET} if found else {"detail": "not found"}).encode()
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet."""


@contextlib.contextmanager
def https_secret_server(folder: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS server on 127.0.0.1 with a fresh self-signed certificate; its API base URL
    and the certificate to trust."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        [*openssl, "-keyout", str(key), "-out", str(cert), *subject],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SecretHandler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_port}/v1", cert
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_gevent_worker_fetches_the_secret_over_https(database_url: str, tmp_path: Path) -> None:
    """With only REPLICATE_API_TOKEN, each gevent worker fetches the account's secret over
    HTTPS at boot, and a delivery signed with it is applied."""
    track(database_url)
    with https_secret_server(tmp_path) as (api_base_url, cert):
        env = web_env(
            DATABASE_URL=database_url,
            PORT=str(free_port()),
            REPLICATE_API_TOKEN="r8_test_token",
            REPLICATE_API_BASE_URL=api_base_url,
            REQUESTS_CA_BUNDLE=str(cert),
            WEB_CONCURRENCY="1",
        )
        with running_web(env, tmp_path) as web:
            wait_until(
                lambda: "webhook_secret_fetch" in web.output(),
                timeout=30,
                message="the worker's first secret fetch",
            )
            body, headers = signed_delivery(training_payload(TRAINING_ID, "succeeded"))
            response = requests.post(
                web.base_url + WEBHOOK_PATH, data=body, headers=headers, timeout=30
            )
        output = web.output()

    assert "webhook_secret_fetched" in output
    assert "RecursionError" not in output
    assert response.json() == {"result": "applied", "training_id": TRAINING_ID}, output


def test_a_database_that_never_answers_is_a_503_not_a_hang(tmp_path: Path) -> None:
    """A database that accepts connections and never answers: /readyz and a delivery are
    answered 503 once connect_timeout has passed (libpq ignores it in gevent's
    non-blocking mode; the wait callback enforces it), rather than waiting for good."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        # Two seconds, not our default five (test_connection_params checks that one): each
        # connection attempt of the run waits it out, and any value shows it is enforced.
        port = silent.getsockname()[1]
        database_url = f"postgresql://nobody@127.0.0.1:{port}/nowhere?connect_timeout=2"
        env = web_env(
            DATABASE_URL=database_url,
            PORT=str(free_port()),
            REPLICATE_WEBHOOK_SECRET=SECRET,
            WEB_CONCURRENCY="1",
        )
        with running_web(env, tmp_path) as web:
            ready = requests.get(web.base_url + "/readyz", timeout=30)
            body, headers = signed_delivery(training_payload(TRAINING_ID, "succeeded"))
            delivery = requests.post(
                web.base_url + WEBHOOK_PATH, data=body, headers=headers, timeout=30
            )

    assert ready.status_code == 503
    assert delivery.status_code == 503
    assert delivery.headers["Retry-After"]
