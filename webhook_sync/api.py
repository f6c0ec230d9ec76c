"""The HTTP API for platforms in any language: register a training, read one, list them.

Served by the web process only when API_TOKENS is set (otherwise every path under
/v1/trainings is a 404). Each request carries `Authorization: Bearer <token>`, compared in
constant time with every configured token (several: rotation); anything else is a 401
with `WWW-Authenticate`. Errors are JSON `{"error": …}` like the webhook route's, bodies
are capped at MAX_BODY_BYTES, and times are ISO 8601.

- `POST /v1/trainings` `{"id", "user_id", "destination"?}`: 201 with the row when
  created, 200 when it existed (idempotent), 409 when tracked under another user; the
  webhooks already waiting for it are applied in the same transaction.
- `GET /v1/trainings/{id}`: the row, or 404.
- `GET /v1/trainings?user_id=&status=&limit=&after=`: a page, newest first, and the
  cursor of the next page (`next`, null on the last).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from webhook_sync import db, errors, pool, registration, registry, untrusted_json
from webhook_sync.training import MAX_ID_LENGTH
from webhook_sync.vocabulary import AppStatus

PREFIX = "/v1/trainings"
MAX_BODY_BYTES = 16 * 1024
DEFAULT_LIMIT = 50
MAX_LIMIT = 200
MAX_DESTINATION_LENGTH = 200
# What a platform reads of a row; the poller's schedule stays ours.
_SCHEDULE_COLUMNS = frozenset({"next_check_at", "last_checked_at", "check_failures"})
PUBLIC_COLUMNS = tuple(c for c in db.TRAINING_COLUMNS if c not in _SCHEDULE_COLUMNS)
_CHALLENGE = 'Bearer realm="webhook-sync"'
_STATUSES = frozenset(AppStatus)


class _Refused(Exception):
    """A request answered with a JSON error (status, message)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def create_blueprint(connections: pool.ConnectionPool, tokens: Sequence[str]) -> Blueprint:
    """The /v1/trainings routes on `connections`, for requests bearing one of `tokens`."""
    expected = [token.encode() for token in tokens]
    api = Blueprint("api", __name__)

    @api.before_request
    def authenticate() -> Response | None:
        return _check_bearer(expected)

    @api.errorhandler(_Refused)
    def refused(exc: _Refused) -> Response:
        return _error(exc.status, exc.message)

    @api.post(PREFIX)
    def register() -> Response:
        body = _json_body()
        training_id = _training_id(body.get("id"))
        user_id = registration.plausible_user_id(body.get("user_id"))
        if user_id is None:
            raise _Refused(400, "user_id must be a string of 1 to 200 printable characters")
        destination = _destination(body.get("destination"))
        try:
            with connections.connection() as conn, conn:
                row, created = registration.register_training(
                    conn, training_id, user_id, destination
                )
        except registration.UserConflictError as exc:
            raise _Refused(409, str(exc)) from exc
        return _json(public_row(row), 201 if created else 200)

    @api.get(f"{PREFIX}/<path:training_id>")
    def read_one(training_id: str) -> Response:
        training_id = _training_id(training_id)  # a 400 takes no pooled connection
        with connections.connection() as conn, conn:
            row = db.select_training(conn, training_id)
        if row is None:
            raise _Refused(404, "training is not tracked")
        return _json(public_row(row))

    @api.get(PREFIX)
    def read_page() -> Response:
        user_id = request.args.get("user_id")
        if user_id is not None and registration.plausible_user_id(user_id) is None:
            raise _Refused(400, "user_id must be a string of 1 to 200 printable characters")
        status = request.args.get("status")
        if status is not None and status not in _STATUSES:
            raise _Refused(400, f"status must be one of {', '.join(sorted(_STATUSES))}")
        limit = _limit(request.args.get("limit"))
        after = request.args.get("after")
        position = decode_cursor(after) if after is not None else None
        with connections.connection() as conn, conn:
            rows = registry.select_training_page(
                conn, user_id=user_id, status=status, after=position, limit=limit + 1
            )
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = encode_cursor(rows[-1]["created_at"], rows[-1]["id"]) if more else None
        return _json({"trainings": [public_row(row) for row in rows], "next": cursor})

    return api


def _check_bearer(expected: list[bytes]) -> Response | None:
    """None when the request bears a configured token, else the 401 to answer."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    candidate = presented.strip().encode("utf-8", "replace")
    # Every token is compared, whatever matches first: the time taken says nothing.
    matched = False
    for token in expected:
        matched |= hmac.compare_digest(candidate, token)
    if scheme.lower() == "bearer" and matched:
        return None
    response = _error(401, "a valid bearer token is required (API_TOKENS)")
    challenge = _CHALLENGE + (', error="invalid_token"' if presented else "")
    response.headers["WWW-Authenticate"] = challenge
    return response


def _json_body() -> dict[str, Any]:
    """The request's JSON object, read within MAX_BODY_BYTES (chunked bodies too)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise RequestEntityTooLarge()
    raw = request.stream.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise RequestEntityTooLarge()
    try:
        body = untrusted_json.decode(raw, "body")
    except errors.InvalidJSONError as exc:
        raise _Refused(400, str(exc)) from exc
    if not isinstance(body, dict):
        raise _Refused(400, "body must be a JSON object")
    return body


def _training_id(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not value
        or len(value) > MAX_ID_LENGTH
        or not value.isprintable()
        or any(ch.isspace() for ch in value)
    ):
        raise _Refused(400, "id must be a Replicate training id")
    return value


def _destination(value: Any) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or len(value) > MAX_DESTINATION_LENGTH
        or value.count("/") != 1
        or not all(value.split("/"))
        or not value.isprintable()
    ):
        raise _Refused(400, "destination must be owner/name")
    return value


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise _Refused(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def public_row(row: db.Row) -> dict[str, Any]:
    """A row as the API shows it: the public columns, times in ISO 8601."""
    return {column: _plain(row.get(column)) for column in PUBLIC_COLUMNS}


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def encode_cursor(created_at: datetime, training_id: str) -> str:
    """An opaque cursor for the position after (created_at, id)."""
    text = json.dumps([created_at.isoformat(), training_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) position of a cursor of ours; a 400 for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, training_id = untrusted_json.decode(raw, "cursor")
        position = datetime.fromisoformat(created), training_id
    except (binascii.Error, ValueError, TypeError, errors.InvalidJSONError):
        raise _Refused(400, "after is not a cursor this API returned") from None
    if position[0].tzinfo is None or not isinstance(training_id, str):
        raise _Refused(400, "after is not a cursor this API returned")
    return position


def _json(body: Any, status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)
