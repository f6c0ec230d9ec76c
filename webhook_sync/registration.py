"""Who a training belongs to, and adopting it: the signed body's `webhook` URL (the
self-registration query `user_id`), or ADOPT_DESTINATION_PATTERN against its destination.

A training created with `webhook="https://sync.example.com/webhooks/replicate?user_id=42"`
is registered by that URL alone: Replicate signs the whole training object, `webhook`
included, so the URL inside a verified body is the platform's word. The query string of
the request that delivered it is never read: it is not covered by the signature.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import SplitResult, parse_qs, urlsplit

from webhook_sync import db, errors, metrics, service
from webhook_sync.config import Config
from webhook_sync.logs import log_event
from webhook_sync.training import MAX_USER_ID_LENGTH, Training
from webhook_sync.vocabulary import Source

# The webhook route (web.WEBHOOK_PATH): what a `webhook` URL must name when
# PUBLIC_WEBHOOK_URL does not say more.
WEBHOOK_PATH = "/webhooks/replicate"
USER_QUERY_KEY = "user_id"
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Owner:
    """A training's user, and how it was found: `webhook_url` or `destination`."""

    user_id: str
    how: str


@dataclass(frozen=True)
class Owners:
    """The rules that attribute a training to a user (pure; `from_config` reads them)."""

    public_webhook_url: str | None = None
    destination_pattern: re.Pattern[str] | None = None

    @classmethod
    def from_config(cls, config: Config) -> Owners:
        """PUBLIC_WEBHOOK_URL and ADOPT_DESTINATION_PATTERN."""
        return cls(config.public_webhook_url, config.adopt_destination_pattern)

    def owner_of(self, obj: Mapping[str, Any], training: Training) -> Owner | None:
        """The user a training object belongs to: its `webhook` URL's `user_id` when the URL
        points at this service, else the destination pattern's `user` group; None if neither."""
        user_id = self.user_from_webhook(obj.get("webhook") or obj.get("webhook_completed"))
        if user_id is not None:
            return Owner(user_id, "webhook_url")
        user_id = self.user_from_destination(training.destination)
        if user_id is not None:
            return Owner(user_id, "destination")
        return None

    def user_from_webhook(self, url: Any) -> str | None:
        """The `user_id` of a webhook URL that points at this service (exactly one value)."""
        if not isinstance(url, str) or len(url) > 2048:
            return None
        try:
            parts = urlsplit(url)
        except ValueError:
            return None
        if not self.points_here(parts):
            return None
        values = parse_qs(parts.query).get(USER_QUERY_KEY, [])
        return plausible_user_id(values[0]) if len(values) == 1 else None

    def user_from_destination(self, destination: str | None) -> str | None:
        """The pattern's `user` group in a destination `owner/name`, if it matches."""
        if self.destination_pattern is None or not destination:
            return None
        match = self.destination_pattern.search(destination)
        return plausible_user_id(match.group("user")) if match else None

    def points_here(self, parts: SplitResult) -> bool:
        """True when a URL names our webhook route: PUBLIC_WEBHOOK_URL's scheme, host, port
        and path, or, when that is unset, the route's path on any host."""
        if self.public_webhook_url is None:
            return _route(parts.path) == WEBHOOK_PATH
        public = urlsplit(self.public_webhook_url)
        origin = _origin(parts)
        return (
            origin is not None
            and origin == _origin(public)
            and _route(parts.path) == _route(public.path)
        )


def plausible_user_id(value: Any) -> str | None:
    """A user id we store: printable text of 1 to 200 characters without outer spaces."""
    if not isinstance(value, str) or not value or len(value) > MAX_USER_ID_LENGTH:
        return None
    if value != value.strip() or not value.isprintable():
        return None
    return value


def _route(path: str) -> str:
    return path.rstrip("/") or "/"


def _origin(parts: SplitResult) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) with the scheme's default port filled in; None if the port is
    not a number."""
    try:
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    return scheme, parts.hostname or "", port or _DEFAULT_PORTS.get(scheme)


def adopt_training(
    conn: db.Connection,
    training: Training,
    owner: Owner,
    source: Source,
    *,
    held_event: str | None = None,
) -> db.Row | None:
    """Track an untracked training under its owner and apply the webhooks that waited for
    it; return its row, or None when it was tracked already (by someone else meanwhile).
    The report in hand (and its stored event `held_event`, if it waits too) is the
    caller's to apply. Does not commit."""
    inserted = db.insert_training(conn, training.id, owner.user_id, training.destination)
    if inserted is None:
        return None
    metrics.count_adoptions(owner.how)
    log_event(
        "training_adopted",
        training_id=training.id,
        user_id=owner.user_id,
        how=owner.how,
        source=source,
    )
    service.apply_pending_events(conn, [training.id], held_event=held_event)
    return db.select_training(conn, training.id)


def adopt_for_delivery(
    conn: db.Connection,
    owners: Owners | None,
    payload: Mapping[str, Any],
    training: Training,
    *,
    source: Source = Source.WEBHOOK,
    held_event: str | None = None,
) -> db.Row | None:
    """For a verified delivery of an untracked training (or a replay of a signed one,
    stored as `held_event`): adopt it when its signed body names its owner; return the new
    row (None: not ours, or not attributable). Does not commit."""
    if owners is None:
        return None
    owner = owners.owner_of(payload, training)
    if owner is None:
        return None
    adopted = adopt_training(conn, training, owner, source, held_event=held_event)
    return adopted or db.select_training(conn, training.id)


def adopt_and_apply(
    conn: db.Connection, training: Training, owner: Owner, next_check_at: datetime
) -> service.ApplyResult:
    """Track a training fetched from Replicate under its owner (if nobody did meanwhile),
    apply what Replicate said through the funnel (source `poll`) and schedule its next
    check. Does not commit."""
    adopt_training(conn, training, owner, Source.POLL)
    return service.apply_check(conn, training, next_check_at=next_check_at)


class UserConflictError(errors.WebhookSyncError):
    """The training is already tracked under another user."""


def register_training(
    conn: db.Connection, training_id: str, user_id: str, destination: str | None = None
) -> tuple[db.Row, bool]:
    """Track a training for a user (idempotent), applying the webhooks that waited for it;
    return (row, created). UserConflictError when it is tracked under another user (the
    caller's transaction must then roll back). Does not commit."""
    row, created = service.track_training(conn, training_id, user_id, destination)
    if row["user_id"] != user_id:
        raise UserConflictError(f"training {training_id} is tracked under another user")
    return row, created
