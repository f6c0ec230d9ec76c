"""The web process: `create_app(config)` serves the Replicate webhook, health, readiness,
metrics and the OpenAPI description; gunicorn calls `create_app_from_env()` in each worker.

The webhook route judges everything it can before reading the body: the announced
length, the signature headers, the timestamp's age, a secret to check against. Only then
does it read the raw body, within MAX_WEBHOOK_BYTES, feeding each chunk to the HMAC and to
a spool that moves to a temporary file past SPOOL_BYTES, so a worker holds at most one
copy of a body, and little of it in memory, until the signature is known good. Then it
decodes the JSON and hands it to `inbox.receive_delivery`, which stores and applies it
before the answer is sent.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from importlib import resources
from typing import Any

import psycopg2
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from webhook_sync import (
    api,
    db,
    errors,
    gauges,
    inbox,
    logs,
    metrics,
    migrations,
    pool,
    redaction,
    registration,
    replicate,
    signing,
    signing_secret,
    untrusted_json,
)
from webhook_sync.config import Config
from webhook_sync.logs import log_event

WEBHOOK_PATH = "/webhooks/replicate"
# Advice to the sender (Replicate retries on its own schedule; the header costs nothing).
RETRY_AFTER_SECONDS = 5
_READ_CHUNK = 256 * 1024
# Bodies up to this size stay in memory while their signature is checked; larger ones (a
# succeeded training's logs) are spooled to a temporary file, so that concurrent large
# posts with bad signatures cost disk, not a worker's memory.
SPOOL_BYTES = 1024 * 1024
# /readyz is public: each process checks the database at most once per this many seconds.
READINESS_CACHE_SECONDS = 1.0
_DB_DOWN = (errors.DatabaseUnavailableError, *db.CONNECTION_LOST_ERRORS)
# The answer when the platform's bound table refused a change; it goes to whoever sent the
# request, so it names no table (the log and the stored event do).
HOST_REFUSED = "the platform's table refused the change, retry later"


def check_config(config: Config) -> None:
    """Raise ConfigError naming what the web process lacks to start (configured secrets
    were already decoded strictly when the settings were read)."""
    config.require_database_url()
    signing_secret.check_settings(config)


class WebState:
    """What the app's requests share: settings, the connection pool, the secrets."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pool = pool.ConnectionPool(
            config.require_database_url(),
            size=config.db_pool_max,
            application_name="webhook-sync web",
            statement_timeout_ms=config.statement_timeout_ms,
            schema=config.database_schema,
            host=config.host_binding,
        )
        self.secrets = signing_secret.SigningSecret(
            config.webhook_secrets,
            # One attempt per try: the secret source retries on its own schedule.
            lambda: replicate.fetch_webhook_secret(config, max_attempts=1),
        )
        self.readiness = CachedAnswer(READINESS_CACHE_SECONDS)
        self.owners = registration.Owners.from_config(config)

    def close(self) -> None:
        """Close this process's database connections and stop fetching the secret."""
        self.secrets.close()
        self.pool.close()


class CachedAnswer:
    """The last answer of a costly check, reused for `seconds`; one caller at a time
    computes it, so a burst of requests costs one check, not one each."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._answer: tuple[bytes, int] | None = None
        self._expires = 0.0

    def get(self, compute: Callable[[], tuple[bytes, int]]) -> tuple[bytes, int]:
        """The cached (body, status), or a fresh one from `compute` once it has expired."""
        with self._lock:
            if self._answer is None or self.clock() >= self._expires:
                self._answer = compute()
                self._expires = self.clock() + self.seconds
            return self._answer


def create_app(config: Config) -> Flask:
    """Build the Flask app: it connects to the database on the first request that needs it
    and, without REPLICATE_WEBHOOK_SECRET, starts fetching the account's secret at once."""
    check_config(config)
    app = Flask(__name__)
    # The webhook route enforces MAX_WEBHOOK_BYTES itself while reading the raw stream; it
    # reads one byte past the limit to see a chunked body overflow, and werkzeug refuses
    # that read past its own maximum, so its maximum is one byte higher (else a body of
    # exactly MAX_WEBHOOK_BYTES would be a 413 under gunicorn).
    app.config["MAX_CONTENT_LENGTH"] = config.max_webhook_bytes + 1
    app.json.sort_keys = False  # type: ignore[attr-defined]
    # Flask answers OPTIONS itself with an empty text/html 200; the contract (openapi.yaml)
    # is a JSON 405 with Allow for every method a route does not serve.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    state = WebState(config)
    app.extensions["webhook_sync"] = state
    # Built in each gunicorn worker after the fork: this is the worker's boot.
    state.secrets.start()

    app.before_request(_start_timer)
    app.after_request(_observe_request)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected_error)

    if config.api_tokens:
        app.register_blueprint(api.create_blueprint(state.pool, config.api_tokens))

    @app.post(WEBHOOK_PATH)
    def receive_webhook() -> Response:
        return _receive_webhook(state)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> Response:
        body, status_code = state.readiness.get(lambda: _readiness_answer(state))
        return Response(body, status=status_code, content_type="application/json")

    @app.get("/metrics")
    def metrics_text() -> Response:
        return _metrics_response(state)

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
    """Judge the headers, read and verify the body, parse, store and apply; fill `fields`
    for the log line as it goes."""
    limit = state.config.max_webhook_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge()
    signed = signing.check_headers(_signature_headers())
    fields["webhook_id"] = signed.webhook_id
    check = state.secrets.verifier().start(signed)
    verified, raw = read_verified_body(check, limit)
    payload = untrusted_json.decode(raw, "body")
    clean = not untrusted_json.may_hold_nul(raw)
    del raw
    outcome = _store_and_apply(state, verified, payload, clean)
    fields["training_id"] = outcome.training_id
    if outcome.update is not None:
        fields["old"] = outcome.update.old_status
        fields["new"] = outcome.update.new_status
    return 200, outcome.result, {"result": outcome.result, "training_id": outcome.training_id}


def _signature_headers() -> dict[str, str]:
    """The three signature headers alone: werkzeug finds each in the WSGI environ at once,
    where walking every header (as `signing.header_value` does on a mapping) rebuilds them
    all, three times per delivery, before anything is known about the sender."""
    headers = request.headers
    return {name: headers.get(name, "") for name in signing.HEADER_NAMES}


def read_verified_body(check: signing.BodyCheck, limit: int) -> tuple[signing.Verified, bytes]:
    """Read the raw body through the signature check; the body is returned only once its
    signature matched. RequestEntityTooLarge as soon as more than `limit` bytes arrive
    (the length was not announced: chunked)."""
    # werkzeug bounds this stream by Content-Length, or by MAX_CONTENT_LENGTH when the
    # server terminates a chunked body itself; the count below does not rely on either.
    announced = request.content_length
    if announced is not None and announced <= SPOOL_BYTES:
        # A body announced this small stays in memory anyway: no spool object per request
        # (the stream still ends at the announced length, and the count still holds).
        chunks: list[bytes] = []
        _feed(request.stream, check, limit, chunks.append)
        return check.finish(), b"".join(chunks)
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        _feed(request.stream, check, limit, spool.write)
        verified = check.finish()
        spool.seek(0)
        return verified, spool.read()


def _feed(
    stream: Any, check: signing.BodyCheck, limit: int, keep: Callable[[bytes], object]
) -> None:
    """Pass the raw body to the HMAC and to `keep`, chunk by chunk, up to `limit` bytes."""
    received = 0
    while chunk := stream.read(min(_READ_CHUNK, limit + 1 - received)):
        received += len(chunk)
        if received > limit:
            raise RequestEntityTooLarge()
        check.update(chunk)
        keep(chunk)


def _claimed_webhook_id() -> str | None:
    """The webhook-id a refused delivery claims, when its headers are well-formed (the id is
    then printable ASCII without spaces, safe in a log line), so a sender's report of a
    refused delivery can be found; None otherwise."""
    try:
        return signing.parse_headers(_signature_headers()).webhook_id
    except errors.MalformedHeadersError:
        return None


def _store_and_apply(
    state: WebState, delivery: signing.Verified, payload: Any, clean: bool
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
                    owners=state.owners,
                    clean=clean,
                )
            except _DB_DOWN:
                # A connection found closed is worth another try on a fresh one: one that
                # died while idle (the database restarted), or during the call itself. The
                # call is one autocommit statement, committed whole or not at all, and the
                # inbox recognises a committed one by its webhook-id: the retry then answers
                # `duplicate` (the change's own log line was never written; its transition
                # row and NOTIFY were). Timeouts and refusals are answered 503.
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
        log_event("database_unavailable", logging.WARNING, error=redaction.describe_error(exc))
        return 503, "database_unavailable", {"error": "database unavailable, retry later"}
    if isinstance(exc, errors.HostTableRefusedError):
        # The platform's table refused the change (service logged which one and why, and
        # the inbox kept the event as failed): the sender retries, or an operator replays
        # once the table takes it. The answer names no table: it goes to the sender.
        return 503, "host_refused", {"error": HOST_REFUSED}
    if isinstance(exc, db.NOT_MIGRATED_ERRORS):
        # A deploy whose release phase has not run yet: Replicate should retry, not give up.
        log_event("database_not_migrated", logging.WARNING, error=redaction.describe_error(exc))
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


# --- metrics -----------------------------------------------------------------------------


def _metrics_response(state: WebState) -> Response:
    """This server's own metrics, then the whole system's gauges read from the database
    now; 401 without the METRICS_TOKEN bearer token when one is set."""
    expected = state.config.metrics_token
    if expected is not None:
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), expected.encode()
        ):
            response = jsonify(error="/metrics needs the METRICS_TOKEN bearer token")
            response.status_code = 401
            response.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    body, content_type = metrics.render()
    try:
        with state.pool.connection() as conn:
            body += gauges.render(conn, state.config)
    except (errors.DatabaseUnavailableError, psycopg2.Error) as exc:
        body += gauges.render_unavailable(type(exc).__name__)
    return Response(body, content_type=content_type)


# --- readiness, errors, timing -----------------------------------------------------------


# /readyz is public: it answers one of these fixed reasons; the details go to the log.
READY_DATABASE_UNAVAILABLE = "database unavailable"
READY_MIGRATIONS_PENDING = "migrations pending"


def _readiness_answer(state: WebState) -> tuple[bytes, int]:
    """The readiness answer as bytes, so that a cached copy can answer later requests."""
    response, status_code = _readiness(state)
    return response.get_data(), status_code


def _readiness(state: WebState) -> tuple[Response, int]:
    """200 when the database answers and every migration is applied, else 503 with a fixed
    reason; the cause (through the one redactor: no user, password, host or URL) and the
    pending migrations are logged."""
    try:
        with state.pool.connection() as conn, conn:
            pending = migrations.pending_migrations(conn)
    except db.NOT_MIGRATED_ERRORS as exc:
        log_event("not_ready", logging.WARNING, error=redaction.describe_error(exc))
        return jsonify(status="unavailable", reason=READY_MIGRATIONS_PENDING), 503
    except (errors.WebhookSyncError, psycopg2.Error) as exc:
        log_event("not_ready", logging.WARNING, error=redaction.describe_error(exc))
        return jsonify(status="unavailable", reason=READY_DATABASE_UNAVAILABLE), 503
    if pending:
        names = ",".join(migration.name for migration in pending)
        log_event("not_ready", logging.WARNING, pending_migrations=names)
        return jsonify(status="unavailable", reason=READY_MIGRATIONS_PENDING), 503
    return jsonify(status="ready"), 200


def _http_error(exc: HTTPException) -> Response:
    """404, 405, 413 … as JSON, keeping headers such as Allow."""
    response = exc.get_response()
    response.set_data(json.dumps({"error": exc.description or exc.name}))
    response.content_type = "application/json"
    return response


def _unexpected_error(exc: Exception) -> tuple[Response, int]:
    """A bug: JSON 500 without a stack trace; the log names where, never the data."""
    if isinstance(exc, _DB_DOWN):
        return _retry_later("database unavailable, retry later")
    if isinstance(exc, errors.HostTableRefusedError):
        # A registration through the API applies the webhooks that came first: the
        # platform's table may refuse one, and the client should retry as for the database.
        return _retry_later(HOST_REFUSED)
    _log_unexpected(exc)
    return jsonify(error="internal error"), 500


def _retry_later(message: str) -> tuple[Response, int]:
    """A JSON 503 with Retry-After: the request may succeed as it is, later."""
    response = jsonify(error=message)
    response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response, 503


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


def create_app_from_env() -> Flask:
    """Configure logging and build the app from the environment: the Procfile's gunicorn
    calls this in each worker after the fork (`webhook_sync.web:create_app_from_env()`)."""
    config = Config.from_env(os.environ)
    logs.configure(config.log_level, config.log_format)
    return create_app(config)
