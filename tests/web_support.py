"""Helpers for tests that talk to the web app: signed deliveries and a real HTTP server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from flask import Flask
from werkzeug.serving import make_server

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
OTHER_SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
UNKNOWN_SECRET = "whsec_5WbX5kEWLlfzsGNjH64I8lOOqUB6e8FH"
WEBHOOK_PATH = "/webhooks/replicate"


def new_webhook_id() -> str:
    """A fresh Standard Webhooks message id."""
    return f"msg_{uuid.uuid4().hex}"


def sign_headers(
    body: bytes,
    *,
    secret: str = SECRET,
    webhook_id: str | None = None,
    signed_at: datetime | None = None,
) -> dict[str, str]:
    """The three Standard Webhooks headers for `body`: the one way the tests sign.

    Written from the specification, not from our signing module: `v1,` and the base64
    HMAC-SHA256, keyed by the secret's base64 after `whsec_`, of `{id}.{seconds}.{body}`.
    It signs any bytes (standardwebhooks' own sign() takes text only), and test_signing
    checks that it agrees with that sign() on text."""
    webhook_id = webhook_id or new_webhook_id()
    seconds = str(int((signed_at or datetime.now(UTC)).timestamp()))
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{webhook_id}.{seconds}.".encode() + body
    digest = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": seconds,
        "webhook-signature": f"v1,{digest}",
        "content-type": "application/json",
    }


def training_payload(training_id: str, status: str, **extra: Any) -> dict[str, Any]:
    """A Replicate training object as a webhook carries it."""
    payload: dict[str, Any] = {
        "id": training_id,
        "model": "ostris/flux-dev-lora-trainer",
        "version": "e440909d3512c31646ee2e0c7d6f6f4923224863a6a10c494606e79fb5844497",
        "status": status,
        "input": {"steps": 1000},
        "logs": "",
        "error": None,
        "output": None,
        "created_at": "2026-11-28T10:00:00.123Z",
        "urls": {"get": f"https://api.replicate.com/v1/predictions/{training_id}"},
    }
    if status == "succeeded":
        payload["output"] = {
            "version": "acme/flux-lora:" + "a" * 64,
            "weights": f"https://replicate.delivery/xezq/{training_id}/trained_model.tar",
        }
        payload["completed_at"] = "2026-11-28T10:20:00.990893084Z"
    payload.update(extra)
    return payload


def signed_delivery(
    payload: Mapping[str, Any] | bytes, **sign_options: Any
) -> tuple[bytes, dict[str, str]]:
    """The body bytes and signed headers of one delivery."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
    return body, sign_headers(body, **sign_options)


@contextmanager
def serve(app: Flask) -> Iterator[str]:
    """Serve `app` over real HTTP on a free port in a thread; yield its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
