"""The webhook route, `POST /webhooks/replicate`, answered in plain WSGI ahead of Flask.

`Receiver` wraps the Flask app's WSGI callable (`app.wsgi_app`, the place Flask gives
middleware): a POST to the webhook path is answered here, every other request goes on to
Flask, which keeps the route in its URL map so that other methods get its JSON 405 with
`Allow`. Flask's request context, URL adapter, hooks and JSON provider cost about as much
CPU per request as everything a refused delivery needs done (`python -m bench.percall`:
a 401 through Flask took 3 times a Flask hello-world's CPU), and every delivery, signed
or not, paid it. Unsigned traffic must cost us almost nothing.

The route judges everything it can before reading the body: the announced length, the
signature headers, the timestamp's age, a secret to check against. Only then does it read
the raw body, within MAX_WEBHOOK_BYTES, feeding each chunk to the HMAC and to a spool that
moves to a temporary file past SPOOL_BYTES, so a worker holds at most one copy of a body,
and little of it in memory, until the signature is known good. Then it decodes the JSON
and hands it to `inbox.receive_delivery`, which stores and applies it before the answer is
sent. Each delivery is logged as one `webhook_delivery` line and counted.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.wsgi import get_content_length, get_input_stream

from webhook_sync import (
    db,
    errors,
    inbox,
    metrics,
    pool,
    redaction,
    registration,
    signing,
    signing_secret,
    untrusted_json,
)
from webhook_sync.logs import log_event

WEBHOOK_PATH = "/webhooks/replicate"
# Advice to the sender (Replicate retries on its own schedule; the header costs nothing).
RETRY_AFTER_SECONDS = 5
_READ_CHUNK = 256 * 1024
# Bodies up to this size stay in memory while their signature is checked; larger ones (a
# succeeded training's logs) are spooled to a temporary file, so that concurrent large
# posts with bad signatures cost disk, not a worker's memory.
SPOOL_BYTES = 1024 * 1024
DB_DOWN = (errors.DatabaseUnavailableError, *db.CONNECTION_LOST_ERRORS)
# The answer to a request that found the database down (DB_DOWN), here and in `web`.
DB_UNAVAILABLE = "database unavailable, retry later"
# The answer when the platform's bound table refused a change; it goes to whoever sent the
# request, so it names no table (the log and the stored event do).
HOST_REFUSED = "the platform's table refused the change, retry later"
# The signature headers as the WSGI server puts them in the environ.
_HEADER_KEYS = tuple(
    (name, "HTTP_" + name.upper().replace("-", "_")) for name in signing.HEADER_NAMES
)
_STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Answer = tuple[int, str, dict[str, Any]]  # status code, metric label, JSON body


class Receiver:
    """The WSGI app that answers webhook deliveries itself and passes the rest to `app`."""

    def __init__(
        self,
        app: WsgiApp,
        *,
        connections: pool.ConnectionPool,
        secrets: signing_secret.SigningSecret,
        owners: registration.Owners,
        max_bytes: int,
    ) -> None:
        self.app = app
        self.connections = connections
        self.secrets = secrets
        self.owners = owners
        self.max_bytes = max_bytes

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        # The method as Flask routes it (upper case): a `post` passed on would reach the
        # URL rule that has no view, a 500.
        if (
            environ.get("PATH_INFO") != WEBHOOK_PATH
            or environ.get("REQUEST_METHOD", "").upper() != "POST"
        ):
            return self.app(environ, start_response)
        started = time.monotonic()
        status_code, body = self.receive(environ)
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if status_code == 503:
            headers.append(("Retry-After", str(RETRY_AFTER_SECONDS)))
        start_response(_STATUS_LINES.get(status_code, f"{status_code} Error"), headers)
        metrics.observe_request(WEBHOOK_PATH, "POST", status_code, time.monotonic() - started)
        return [body]

    def receive(self, environ: dict[str, Any]) -> tuple[int, bytes]:
        """Answer one delivery (status code and JSON body) and log one line about it."""
        started = time.monotonic()
        fields: dict[str, Any] = {"webhook_id": None, "training_id": None}
        headers = {name: environ.get(key, "") for name, key in _HEADER_KEYS}
        try:
            status_code, result, body = self._process(environ, headers, fields)
        except Exception as exc:  # the process edge: every failure gets a precise answer
            status_code, result, body = refusal(exc)
            if fields["webhook_id"] is None:
                fields["webhook_id"] = _claimed_webhook_id(headers)
        if status_code >= 400:
            fields["error"] = body["error"]
        fields["ms"] = round((time.monotonic() - started) * 1000, 1)
        level = logging.INFO if status_code < 400 else logging.WARNING
        if status_code >= 500 and result == "error":
            level = logging.ERROR
        log_event("webhook_delivery", level, result=result, status=status_code, **fields)
        metrics.count_delivery(result)
        # As Flask's JSON answers are written: compact, ASCII, one line.
        return status_code, (json.dumps(body, separators=(",", ":")) + "\n").encode()

    def _process(
        self, environ: dict[str, Any], headers: dict[str, str], fields: dict[str, Any]
    ) -> Answer:
        """Judge the headers, read and verify the body, parse, store and apply; fill
        `fields` for the log line as it goes."""
        announced = get_content_length(environ)
        if announced is not None and announced > self.max_bytes:
            raise RequestEntityTooLarge()
        signed = signing.check_headers(headers)
        fields["webhook_id"] = signed.webhook_id
        check = self.secrets.verifier().start(signed)
        verified, raw = read_verified_body(environ, announced, check, self.max_bytes)
        payload = untrusted_json.decode(raw, "body")
        clean = not untrusted_json.may_hold_nul(raw)
        # A body this small is stored as received (no encoding of the payload again); a
        # larger one (megabytes of logs, cut before storing) is let go before the call.
        body = raw if len(raw) <= SPOOL_BYTES else None
        del raw
        outcome = self._store_and_apply(verified, payload, clean, body, fields)
        fields["training_id"] = outcome.training_id
        if outcome.update is not None:
            fields["old"] = outcome.update.old_status
            fields["new"] = outcome.update.new_status
        return 200, outcome.result, {"result": outcome.result, "training_id": outcome.training_id}

    def _store_and_apply(
        self,
        delivery: signing.Verified,
        payload: Any,
        clean: bool,
        body: bytes | None,
        fields: dict[str, Any],
    ) -> inbox.DeliveryResult:
        """Hand the delivery to the inbox; a pooled connection found dead is replaced (the
        log line's `retries` says how many were)."""
        retries_left = self.connections.size
        while True:
            with self.connections.connection() as conn:
                try:
                    return inbox.receive_delivery(
                        conn,
                        webhook_id=delivery.webhook_id,
                        payload=payload,
                        signed_at=delivery.signed_at,
                        owners=self.owners,
                        clean=clean,
                        body=body,
                    )
                except DB_DOWN:
                    # A connection found closed is worth another try on a fresh one: one
                    # that died while idle (the database restarted), or during the call
                    # itself. The call is one autocommit statement, committed whole or not
                    # at all, and the inbox recognises a committed one by its webhook-id:
                    # the retry then answers `duplicate` (the change's own log line was
                    # never written; its transition row and NOTIFY were), and the
                    # delivery's line says `retries`, so that such a duplicate can be told
                    # from a sender's. Timeouts and refusals are answered 503.
                    if not conn.closed or retries_left == 0:
                        raise
            retries_left -= 1
            fields["retries"] = self.connections.size - retries_left


def read_verified_body(
    environ: dict[str, Any], announced: int | None, check: signing.BodyCheck, limit: int
) -> tuple[signing.Verified, bytes]:
    """Read the raw body through the signature check; the body is returned only once its
    signature matched. RequestEntityTooLarge as soon as more than `limit` bytes arrive
    (the length was not announced: chunked)."""
    # werkzeug bounds this stream by Content-Length, or, when the server terminates a
    # chunked body itself, by one byte past the limit so that an overflow can be seen; the
    # count below does not rely on either.
    stream = get_input_stream(environ, max_content_length=limit + 1)
    if announced is not None and announced <= SPOOL_BYTES:
        # A body announced this small stays in memory anyway: no spool object per request
        # (the stream still ends at the announced length, and the count still holds).
        chunks: list[bytes] = []
        _feed(stream, check, limit, chunks.append)
        return check.finish(), b"".join(chunks)
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        _feed(stream, check, limit, spool.write)
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


def _claimed_webhook_id(headers: dict[str, str]) -> str | None:
    """The webhook-id a refused delivery claims, when its headers are well-formed (the id is
    then printable ASCII without spaces, safe in a log line), so a sender's report of a
    refused delivery can be found; None otherwise."""
    try:
        return signing.parse_headers(headers).webhook_id
    except errors.MalformedHeadersError:
        return None


def refusal(exc: Exception) -> Answer:
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
    if isinstance(exc, DB_DOWN):
        log_event("database_unavailable", logging.WARNING, error=redaction.describe_error(exc))
        return 503, "database_unavailable", {"error": DB_UNAVAILABLE}
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
    log_unexpected(exc)
    return 500, "error", {"error": "internal error"}


_SIGNATURE_REASONS = {
    errors.MalformedHeadersError: "malformed_headers",
    errors.StaleTimestampError: "stale_timestamp",
    errors.NoMatchingSecretError: "no_matching_secret",
}


def log_unexpected(exc: BaseException) -> None:
    """Log an unexpected error's type and innermost frame; its message may hold payload data."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].name}" if frames else None
    log_event("web_error", logging.ERROR, error_type=type(exc).__name__, where=where)
