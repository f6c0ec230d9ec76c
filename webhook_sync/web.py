"""The web process: `create_app(config)` serves the Replicate webhook, health, readiness,
metrics and the OpenAPI description; gunicorn calls `create_app_from_env()` in each worker.

The webhook itself is answered by `receiver.Receiver`, which wraps the app's WSGI callable
ahead of Flask (see there why); Flask serves everything else.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from importlib import resources

import psycopg2
from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from webhook_sync import (
    api,
    db,
    errors,
    gauges,
    logs,
    metrics,
    migrations,
    pool,
    receiver,
    redaction,
    registration,
    replicate,
    signing_secret,
)
from webhook_sync.config import Config
from webhook_sync.logs import log_event

WEBHOOK_PATH = receiver.WEBHOOK_PATH
# /readyz is public: each process checks the database at most once per this many seconds.
READINESS_CACHE_SECONDS = 1.0


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
    # The webhook route enforces MAX_WEBHOOK_BYTES itself (receiver); the other routes'
    # bodies (the API's) are held to the same bound by werkzeug.
    app.config["MAX_CONTENT_LENGTH"] = config.max_webhook_bytes
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

    # The route is served by the Receiver below, ahead of Flask; Flask keeps it in its URL
    # map (without a view it never reaches) so that another method gets its JSON 405.
    app.add_url_rule(WEBHOOK_PATH, endpoint="receive_webhook", methods=["POST"])
    app.wsgi_app = receiver.Receiver(  # type: ignore[method-assign]
        app.wsgi_app,
        connections=state.pool,
        secrets=state.secrets,
        owners=state.owners,
        max_bytes=config.max_webhook_bytes,
    )

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
    if isinstance(exc, receiver.DB_DOWN):
        return _retry_later(receiver.DB_UNAVAILABLE)
    if isinstance(exc, errors.HostTableRefusedError):
        # A registration through the API applies the webhooks that came first: the
        # platform's table may refuse one, and the client should retry as for the database.
        return _retry_later(receiver.HOST_REFUSED)
    receiver.log_unexpected(exc)
    return jsonify(error="internal error"), 500


def _retry_later(message: str) -> tuple[Response, int]:
    """A JSON 503 with Retry-After: the request may succeed as it is, later."""
    response = jsonify(error=message)
    response.headers["Retry-After"] = str(receiver.RETRY_AFTER_SECONDS)
    return response, 503


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
