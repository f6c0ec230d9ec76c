"""The web process: `create_app(config)` serves the Replicate webhook, health, readiness,
metrics and the OpenAPI description; `app` is built from the environment on first access.

The webhook route reads the raw body within MAX_WEBHOOK_BYTES, verifies its signature,
and only then parses it and hands it to `inbox.receive_delivery`, which stores and applies
it before the answer is sent.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
import traceback
from collections.abc import Callable
from importlib import resources
from typing import Any

import psycopg2
import psycopg2.errors
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from webhook_sync import errors, inbox, logs, metrics, migrations, pool, replicate, signing
from webhook_sync.config import Config
from webhook_sync.logs import log_event

WEBHOOK_PATH = "/webhooks/replicate"
# Advice to the sender (Replicate retries on its own schedule; the header costs nothing).
RETRY_AFTER_SECONDS = 5
_READ_CHUNK = 1024 * 1024
# Deeper bodies are refused: storing and logging them would recurse past Python's limit.
# A training object nests a few levels; its `input` is the trainer's own small JSON.
MAX_JSON_DEPTH = 100
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_DB_DOWN = (errors.DatabaseUnavailableError, psycopg2.OperationalError, psycopg2.InterfaceError)
_DB_NOT_MIGRATED = (psycopg2.errors.UndefinedTable, psycopg2.errors.UndefinedColumn)
NO_SIGNING_SETTINGS_MESSAGE = (
    "the web process needs REPLICATE_WEBHOOK_SECRET (one or more whsec_… secrets) or"
    " REPLICATE_API_TOKEN (to fetch the account's signing secret from Replicate);"
    " unsigned deliveries are never accepted"
)


def check_config(config: Config) -> None:
    """Raise ConfigError naming what the web process lacks to start, or which configured
    webhook secret (by position) is unusable."""
    config.require_database_url()
    if not config.webhook_secrets and not config.api_token:
        raise errors.ConfigError(NO_SIGNING_SETTINGS_MESSAGE)
    if config.webhook_secrets:
        # Checked here, in gunicorn's master, so that a secret that is not base64 stops the
        # server with one line instead of a traceback from every worker that boots.
        signing.Verifier(config.webhook_secrets)


class SecretSource:
    """The verifier for the configured secrets, or for the account's default secret,
    fetched from Replicate on first use and then kept for the life of the process."""

    def __init__(self, secrets: tuple[str, ...], fetch: Callable[[], str]) -> None:
        self._verifier = signing.Verifier(secrets) if secrets else None
        self._fetch = fetch
        self._lock = threading.Lock()

    def verifier(self) -> signing.Verifier:
        """The verifier; ReplicateError when the secret cannot be fetched (try again later)."""
        if self._verifier is None:
            with self._lock:
                if self._verifier is None:
                    self._verifier = signing.Verifier([self._fetch()])
                    log_event("webhook_secret_fetched")
        return self._verifier


def fetch_default_secret(config: Config) -> str:
    """GET /webhooks/default/secret with REPLICATE_API_TOKEN, once, within a request's time."""
    client = replicate.ReplicateClient.from_config(config, max_attempts=2, read_timeout=5.0)
    try:
        return client.get_webhook_secret()
    finally:
        client.close()


class WebState:
    """What the app's requests share: settings, the connection pool, the secrets."""

    def __init__(self, config: Config, fetch_secret: Callable[[], str] | None = None) -> None:
        self.config = config
        self.pool = pool.ConnectionPool(
            config.require_database_url(),
            size=config.db_pool_max,
            application_name="webhook-sync web",
            statement_timeout_ms=config.statement_timeout_ms,
        )
        self.secrets = SecretSource(
            config.webhook_secrets, fetch_secret or (lambda: fetch_default_secret(config))
        )

    def close(self) -> None:
        """Close this process's database connections."""
        self.pool.close()


def create_app(config: Config, *, fetch_secret: Callable[[], str] | None = None) -> Flask:
    """Build the Flask app (connects to nothing until the first request that needs it)."""
    check_config(config)
    app = Flask(__name__)
    # The webhook route enforces the same limit itself while reading the raw stream.
    app.config["MAX_CONTENT_LENGTH"] = config.max_webhook_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # Flask answers OPTIONS itself with an empty text/html 200; the contract (openapi.yaml)
    # is a JSON 405 with Allow for every method a route does not serve.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    state = WebState(config, fetch_secret)
    app.extensions["webhook_sync"] = state

    app.before_request(_start_timer)
    app.after_request(_observe_request)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)

    @app.post(WEBHOOK_PATH)
    def receive_webhook() -> Response:
        return _receive_webhook(state)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        return _readiness(state)

    @app.get("/metrics")
    def metrics_text() -> Response:
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)

    @app.get("/openapi.yaml")
    def openapi() -> Response:
        text = resources.files("webhook_sync").joinpath("openapi.yaml").read_text("utf-8")
        return Response(text, content_type="application/yaml")

    return app


# --- the webhook -------------------------------------------------------------------------


def _receive_webhook(state: WebState) -> Response:
    """Answer one delivery and log one line about it."""
    started = time.monotonic()
    fields: dict[str, Any] = {"webhook_id": None, "training_id": None}
    try:
        status_code, result, body = _process_delivery(state, fields)
    except Exception as exc:  # the process edge: every failure gets a precise answer
        status_code, result, body = _refusal(exc)
        if fields["webhook_id"] is None:
            fields["webhook_id"] = _claimed_webhook_id()
    if status_code >= 400:
        fields["error"] = body["error"]
    fields["ms"] = round((time.monotonic() - started) * 1000, 1)
    level = logging.INFO if status_code < 400 else logging.WARNING
    if status_code >= 500 and result == "error":
        level = logging.ERROR
    log_event("webhook_delivery", level, result=result, status=status_code, **fields)
    metrics.count_delivery(result)
    response = jsonify(body)
    response.status_code = status_code
    if status_code == 503:
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


def _process_delivery(state: WebState, fields: dict[str, Any]) -> tuple[int, str, dict[str, Any]]:
    """Read, verify, parse, store and apply; fill `fields` for the log line as it goes."""
    raw = read_body(state.config.max_webhook_bytes)
    delivery = state.secrets.verifier().verify(raw, request.headers)
    fields["webhook_id"] = delivery.webhook_id
    payload = parse_json(delivery.body)
    outcome = _store_and_apply(state, delivery, payload)
    fields["training_id"] = outcome.training_id
    if outcome.update is not None:
        fields["old"] = outcome.update.old_status
        fields["new"] = outcome.update.new_status
    return 200, outcome.result, {"result": outcome.result, "training_id": outcome.training_id}


def _claimed_webhook_id() -> str | None:
    """The webhook-id a refused delivery claims, when its headers are well-formed (the id is
    then printable ASCII without spaces, safe in a log line), so a sender's report of a
    refused delivery can be found; None otherwise."""
    try:
        return signing.required_headers(request.headers)[0]
    except errors.MalformedHeadersError:
        return None


def _store_and_apply(
    state: WebState, delivery: signing.VerifiedDelivery, payload: Any
) -> inbox.DeliveryResult:
    """Hand the delivery to the inbox; a pooled connection found dead is replaced."""
    retries_left = state.pool.size
    while True:
        with state.pool.connection() as conn:
            try:
                return inbox.receive_delivery(
                    conn,
                    webhook_id=delivery.webhook_id,
                    payload=payload,
                    signed_at=delivery.signed_at,
                )
            except _DB_DOWN:
                # Only a connection that died while idle (the database restarted) is worth
                # another try, and the inbox makes that safe: whatever was stored is
                # recognised by its webhook-id. Timeouts and refusals are answered 503.
                if not conn.closed or retries_left == 0:
                    raise
        retries_left -= 1


def _refusal(exc: Exception) -> tuple[int, str, dict[str, Any]]:
    """The status code, metric label and body for a delivery that was not accepted."""
    if isinstance(exc, RequestEntityTooLarge):
        return 413, "too_large", {"error": "body is larger than MAX_WEBHOOK_BYTES"}
    if isinstance(exc, errors.SignatureError):
        reason = _SIGNATURE_REASONS.get(type(exc), "invalid_signature")
        metrics.count_verification_failure(reason)
        code = 400 if isinstance(exc, errors.MalformedHeadersError) else 401
        return code, reason, {"error": str(exc)}
    if isinstance(exc, errors.InvalidTrainingError):
        return 400, "invalid_body", {"error": str(exc)}
    if isinstance(exc, _DB_DOWN):
        log_event("database_unavailable", logging.WARNING, error=_driver_message(exc))
        return 503, "database_unavailable", {"error": "database unavailable, retry later"}
    if isinstance(exc, _DB_NOT_MIGRATED):
        # A deploy whose release phase has not run yet: Replicate should retry, not give up.
        log_event("database_not_migrated", logging.WARNING, error=_driver_message(exc))
        return 503, "database_not_migrated", {"error": "database not migrated, retry later"}
    if isinstance(exc, errors.ReplicateError | errors.ConfigError):
        log_event("webhook_secret_unavailable", logging.ERROR, error=str(exc))
        return 503, "secret_unavailable", {"error": "signing secret unavailable, retry later"}
    if isinstance(exc, HTTPException) and exc.code and exc.code < 500:
        return exc.code, "bad_request", {"error": exc.description or exc.name}
    _log_unexpected(exc)
    return 500, "error", {"error": "internal error"}


_SIGNATURE_REASONS = {
    errors.MalformedHeadersError: "malformed_headers",
    errors.StaleTimestampError: "stale_timestamp",
    errors.NoMatchingSecretError: "no_matching_secret",
}


def read_body(limit: int) -> bytes:
    """The raw request body, refused with 413 from Content-Length before reading, or as soon
    as more than `limit` bytes arrive when the length is not announced (chunked)."""
    length = request.content_length
    if length is not None and length > limit:
        raise RequestEntityTooLarge()
    # werkzeug bounds this stream by Content-Length, or by MAX_CONTENT_LENGTH when the
    # server terminates a chunked body itself; the count below does not rely on either.
    stream = request.stream
    chunks: list[bytes] = []
    received = 0
    while True:
        chunk = stream.read(min(_READ_CHUNK, limit + 1 - received))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        received += len(chunk)
        if received > limit:
            raise RequestEntityTooLarge()


def parse_json(text: str) -> Any:
    """Decode the verified body; InvalidTrainingError when it is not JSON we can store."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        if _SURROGATE_ESCAPE.search(text):
            # Only a \uD800-\uDFFF escape can decode to a lone surrogate, which UTF-8 (and
            # so PostgreSQL) cannot hold; paired escapes (emoji) encode fine.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise errors.InvalidTrainingError("body is JSON nested too deeply") from None
    except UnicodeEncodeError:
        raise errors.InvalidTrainingError("body holds a lone UTF-16 surrogate escape") from None
    except ValueError as exc:
        raise errors.InvalidTrainingError(f"body is not JSON: {exc}"[:200]) from None
    if nesting_exceeds(value, MAX_JSON_DEPTH):
        raise errors.InvalidTrainingError(f"body is JSON nested deeper than {MAX_JSON_DEPTH}")
    return value


def _refuse_constant(name: str) -> Any:
    # Python reads NaN and Infinity, which are not JSON and which jsonb refuses.
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e400 is valid JSON but becomes Infinity in Python, which jsonb refuses.
        raise ValueError(f"{text[:20]} is out of range")
    return value


def nesting_exceeds(value: Any, limit: int) -> bool:
    """True when objects and arrays nest more than `limit` deep (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


# --- readiness, errors, timing -----------------------------------------------------------


def _readiness(state: WebState) -> tuple[Response, int]:
    """200 when the database answers and every migration is applied, else 503 and why."""
    try:
        with state.pool.connection() as conn:
            pending = migrations.pending_migrations(conn)
    except (errors.WebhookSyncError, psycopg2.Error) as exc:
        return jsonify(status="unavailable", reason=_driver_message(exc)), 503
    if pending:
        names = ", ".join(migration.name for migration in pending)
        return jsonify(status="unavailable", reason=f"migrations not applied: {names}"), 503
    return jsonify(status="ready"), 200


def _driver_message(exc: BaseException) -> str:
    """A short cause without the connection string (driver messages never contain it)."""
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def _http_error(exc: HTTPException) -> Response:
    """404, 405, 413 … as JSON, keeping headers such as Allow."""
    response = exc.get_response()
    response.set_data(json.dumps({"error": exc.description or exc.name}))
    response.content_type = "application/json"
    return response


def _unexpected_error(exc: Exception) -> tuple[Response, int]:
    """A bug: JSON 500 without a stack trace; the log names where, never the data."""
    if isinstance(exc, _DB_DOWN):
        response = jsonify(error="database unavailable, retry later")
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response, 503
    _log_unexpected(exc)
    return jsonify(error="internal error"), 500


def _log_unexpected(exc: BaseException) -> None:
    """Log an unexpected error's type and innermost frame; its message may hold payload data."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].name}" if frames else None
    log_event("web_error", logging.ERROR, error_type=type(exc).__name__, where=where)


def _start_timer() -> None:
    g.started = time.monotonic()


def _observe_request(response: Response) -> Response:
    started = g.get("started")
    if started is not None:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.observe_request(
            route, request.method, response.status_code, time.monotonic() - started
        )
    return response


# --- the app gunicorn loads ----------------------------------------------------------------

_app: Flask | None = None
_app_lock = threading.Lock()


def build_app_from_env() -> Flask:
    """Configure logging and build the app from the environment (gunicorn's `web:app`)."""
    config = Config.from_env(os.environ)
    logs.configure(config.log_level, config.log_format)
    return create_app(config)


def __getattr__(name: str) -> Any:
    """`app` is built on first access, in the worker that imports it, so importing this
    module reads no environment and opens nothing."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    global _app
    with _app_lock:
        if _app is None:
            _app = build_app_from_env()
    return _app
