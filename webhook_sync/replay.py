"""Manual replay: push a saved payload or a stored inbox event through the webhook path again.

A replay goes through `inbox` exactly as a delivery does (stored, then applied by
`service.apply_update` with source `replay`), so it obeys the same rules: never backwards,
a contradicting terminal status refused and recorded, and an untracked training is adopted
as a live delivery's is (`registration.adopt_for_delivery`, with the owners of
PUBLIC_WEBHOOK_URL and ADOPT_DESTINATION_PATTERN). Only a payload Replicate is known to
have signed may name its owner: a stored delivery, a stored replay that was verified (it
keeps `signed_at`; `inbox.is_signed`), or a saved delivery `verify_saved_delivery` just
checked. An unverified file could name any user, so its training waits `pending` for
`track`.

A dry run writes nothing at all, not even inside a rolled-back transaction: it reads the
row and asks the same pure function `apply_update` asks (`service.decide`, built on
`status.decide` and `status.decide_fields`). That way it takes no row lock, sends no NOTIFY and
logs no `training_update` line claiming a change that never happened; a test checks that the
preview agrees with the real replay on every published example.

A file is read with the web process's JSON decoder (`untrusted_json`), and a saved
delivery is verified by `verify_saved_delivery` with the web process's signature code
(`signing`, without the age limit) and its secret fetch (`replicate.fetch_webhook_secret`).
How a replay is told to people (sentences, JSON, exit codes) is the CLI's business
(`cli/replay_output.py`).
"""

from __future__ import annotations

import dataclasses
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from webhook_sync import (
    db,
    errors,
    inbox,
    registration,
    replicate,
    service,
    signing,
    status,
    untrusted_json,
)
from webhook_sync.config import Config
from webhook_sync.training import Training, parse_training
from webhook_sync.vocabulary import AppStatus, Outcome, Source

REPLAY_ID_PREFIX = "replay_"
# Columns shown as "before -> after"; bookkeeping such as updated_at would only add noise.
_NOT_SHOWN = frozenset(
    {
        "id",
        "user_id",
        "created_at",
        "updated_at",
        "next_check_at",
        "last_checked_at",
        "check_failures",
        "needs_attention",
    }
)
CHANGE_COLUMNS = tuple(column for column in db.TRAINING_COLUMNS if column not in _NOT_SHOWN)


@dataclass(frozen=True)
class ReplayInput:
    """What a replay file holds: the decoded payload and, for a saved delivery, its headers
    and raw body. The payload is judged only when used, so a signature is checked first."""

    payload: Any
    name: str
    headers: dict[str, str] | None = None
    body: str | None = None

    @property
    def is_delivery(self) -> bool:
        """True for a saved delivery (`{"headers": …, "body": …}`)."""
        return self.headers is not None

    @property
    def training(self) -> Training:
        """The payload as a training; InvalidTrainingError naming the input when it is not one."""
        try:
            return parse_training(self.payload)
        except errors.InvalidTrainingError as exc:
            what = f"{self.name}'s body" if self.is_delivery else self.name
            raise errors.InvalidTrainingError(f"{what} is not a training object: {exc}") from exc


@dataclass(frozen=True)
class ReplayReport:
    """What replaying (or previewing) one payload did or would do to its training row."""

    training_id: str
    outcome: Outcome  # applied | unchanged | duplicate | ignored | conflict | pending | failed
    reason: str
    webhook_id: str | None = None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    dry_run: bool = False
    error: str | None = None

    @property
    def changes(self) -> list[tuple[str, Any, Any]]:
        """(column, before, after) for each shown column the replay changes."""
        if self.before is None or self.after is None:
            return []
        return [
            (column, self.before.get(column), self.after.get(column))
            for column in CHANGE_COLUMNS
            if self.before.get(column) != self.after.get(column)
        ]


def new_replay_id() -> str:
    """An inbox id that says the event came from a replay, unique per replay."""
    return f"{REPLAY_ID_PREFIX}{uuid.uuid4().hex}"


def load_input(path: str) -> ReplayInput:
    """Read a replay file (`-` for stdin) and decode it; ReplayError when that fails."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise errors.ReplayError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.ReplayError(f"{path}: cannot read it ({exc})") from exc
    return parse_input(text, "stdin" if path == "-" else path)


def parse_input(text: str, name: str = "input") -> ReplayInput:
    """Parse a training object or a saved delivery `{"headers": {...}, "body": "<raw>"}`,
    with the decoder the web process uses (InvalidJSONError naming `name`)."""
    obj = untrusted_json.decode(text, name)
    if isinstance(obj, Mapping) and "headers" in obj and "body" in obj and "id" not in obj:
        return _parse_delivery(obj, name)
    return ReplayInput(obj, name)


def _parse_delivery(obj: Mapping[str, Any], name: str) -> ReplayInput:
    headers = obj["headers"]
    if not isinstance(headers, Mapping) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in headers.items()
    ):
        raise errors.ReplayError(f"{name}: `headers` must be an object of strings")
    raw_body = obj["body"]
    if isinstance(raw_body, str):
        payload = untrusted_json.decode(raw_body, f"{name}'s body")
        body: str | None = raw_body
    else:
        # A body saved as parsed JSON still replays; only its signature cannot be checked.
        payload, body = raw_body, None
    return ReplayInput(payload, name, dict(headers), body)


@dataclass(frozen=True)
class SignatureCheck:
    """A saved delivery whose signature matched, and which secret signed it."""

    verified: signing.Verified
    fetched: bool  # the account's secret, fetched from Replicate with the token

    @property
    def signer(self) -> str:
        """Which secret signed, for people (never the secret itself)."""
        if self.fetched:
            return "the account's secret (fetched from Replicate)"
        return f"secret #{self.verified.secret_position}"


def verify_saved_delivery(replay_input: ReplayInput, config: Config) -> SignatureCheck:
    """Check a saved delivery's signature, with no age limit, against REPLICATE_WEBHOOK_SECRET
    or else the account's secret fetched with REPLICATE_API_TOKEN, as the web process does.

    Raises ReplayError when the input cannot be verified at all (no headers, or a body that
    is not the raw text), ConfigError without a secret or token, ReplicateError when the
    secret cannot be fetched, and SignatureError when no secret matches.
    """
    if replay_input.headers is None:
        raise errors.ReplayError(
            '--verify needs a saved delivery {"headers": {...}, "body": "<raw body>"},'
            " not a bare training object"
        )
    if replay_input.body is None:
        raise errors.ReplayError(
            "--verify needs the body as the raw text received (a JSON string);"
            " re-serialized JSON never matches its signature"
        )
    secrets = config.webhook_secrets
    if not secrets and not config.api_token:
        raise errors.ConfigError(
            "REPLICATE_WEBHOOK_SECRET is not set (nor REPLICATE_API_TOKEN to fetch the"
            " account's secret); --verify needs one of them"
        )
    fetched = not secrets
    if fetched:
        secrets = (replicate.fetch_webhook_secret(config),)
    verifier = signing.Verifier(secrets, tolerance=None)
    try:
        verified = verifier.verify(replay_input.headers, replay_input.body)
    except errors.SignatureError as exc:
        tried = "the account's secret" if fetched else f"{len(secrets)} configured secret(s)"
        raise type(exc)(f"{str(exc).rstrip('.')} (tried {tried})") from None
    return SignatureCheck(verified, fetched)


def replay_payload(
    conn: db.Connection,
    replay_input: ReplayInput,
    *,
    dry_run: bool = False,
    signed_at: datetime | None = None,
    owners: registration.Owners | None = None,
) -> ReplayReport:
    """Store the payload in the inbox under a new replay id and apply it (commits), or with
    dry_run only say what would happen.

    `signed_at` is the time of the signature `verify_saved_delivery` checked (None: not
    verified). Only a verified payload adopts an untracked training (`owners`: by its
    signed `webhook` URL or the destination pattern) as a live delivery does: a file
    nobody verified could name any user, so its training waits `pending` for `track`.
    """
    training = replay_input.training
    owners = owners if signed_at is not None else None
    if dry_run:
        return preview(conn, training, _owner(owners, replay_input.payload, training))
    before = _read_training(conn, training.id)
    webhook_id = new_replay_id()
    delivered = inbox.receive_delivery(
        conn,
        webhook_id=webhook_id,
        payload=replay_input.payload,
        signed_at=signed_at,
        source=Source.REPLAY,
        owners=owners,
    )
    return _report(delivered, webhook_id, before)


def replay_event(
    conn: db.Connection,
    webhook_id: str,
    *,
    dry_run: bool = False,
    owners: registration.Owners | None = None,
) -> ReplayReport:
    """Apply a stored inbox event again (commits), or with dry_run say what would happen.

    An untracked training is adopted (`owners`) as a live delivery's would be when the
    event was verified before it was stored (`inbox.is_signed`: a delivery, or a replay
    made with --verify); an unverified replay's event is not.
    ReplayError when no such event is stored; a payload that is not a training gives a
    `failed` report (and, unless dry_run, marks the event failed).
    """
    with conn:
        event = db.select_event(conn, webhook_id)
    if event is None:
        raise errors.ReplayError(f"no inbox event with webhook-id {webhook_id}")
    training_id = event["training_id"] or "?"
    if dry_run:
        try:
            training = parse_training(event["payload"])
        except errors.InvalidTrainingError as exc:
            return ReplayReport(training_id, Outcome.FAILED, str(exc), webhook_id, dry_run=True)
        owner = _owner(owners, event["payload"], training) if inbox.is_signed(event) else None
        return dataclasses.replace(preview(conn, training, owner), webhook_id=webhook_id)
    before = _read_training(conn, training_id)
    try:
        delivered = inbox.reprocess_event(conn, webhook_id, source=Source.REPLAY, owners=owners)
    except errors.InvalidTrainingError as exc:
        return ReplayReport(
            training_id, Outcome.FAILED, str(exc), webhook_id, before, error=str(exc)
        )
    return _report(delivered, webhook_id, before)


def replay_failed(
    conn: db.Connection,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    dry_run: bool = False,
    owners: registration.Owners | None = None,
) -> list[ReplayReport]:
    """Apply again every stored event whose processing failed, oldest first (each event
    commits on its own, adopting as `replay_event` does), or with dry_run say what each
    would do."""
    with conn:
        events = db.select_events(
            conn,
            outcome=Outcome.FAILED,
            received_since=since,
            received_before=until,
            limit=None,
            newest_first=False,
        )
    reports = []
    for event in events:
        try:
            reports.append(replay_event(conn, event["webhook_id"], dry_run=dry_run, owners=owners))
        except errors.WebhookSyncError as exc:
            # One event that cannot be applied must not stop the others.
            reports.append(
                ReplayReport(
                    event["training_id"] or "?",
                    Outcome.FAILED,
                    str(exc),
                    event["webhook_id"],
                    dry_run=dry_run,
                    error=str(exc),
                )
            )
    return reports


def preview(
    conn: db.Connection, training: Training, owner: registration.Owner | None = None
) -> ReplayReport:
    """What applying `training` would do to its row, decided exactly as `apply_update` decides
    but without writing anything. An untracked training the replay would adopt (`owner`)
    is previewed against the row adoption inserts (the events that waited for it are not
    previewed)."""
    row = _read_training(conn, training.id)
    adopted = ""
    if row is None:
        if owner is None:
            return ReplayReport(
                training.id, Outcome.PENDING, "training is not tracked", dry_run=True
            )
        row = _adopted_row(training, owner)
        adopted = f"adopted for user {owner.user_id} by its {owner.how}; "
    decision, changes = service.decide(row, training)
    reason = adopted + decision.reason
    if decision.refused:
        return ReplayReport(
            training.id, decision.outcome, reason, before=row, after=row, dry_run=True
        )
    after = {**row, **changes}
    if decision.outcome == Outcome.APPLIED:
        after["replicate_status"] = training.status
        after["training_status"] = status.app_status_for(training.status)
    if after != row:
        after["updated_by"] = Source.REPLAY
    return ReplayReport(
        training.id, decision.outcome, reason, before=row, after=after, dry_run=True
    )


def _adopted_row(training: Training, owner: registration.Owner) -> dict[str, Any]:
    """The row adoption would insert (`db.insert_training`), before the report is applied."""
    return {
        **dict.fromkeys(db.TRAINING_COLUMNS),
        "id": training.id,
        "user_id": owner.user_id,
        "destination": training.destination,
        "training_status": AppStatus.TRAINING,
        "updated_by": Source.TRACK,
        "check_failures": 0,
    }


def _owner(
    owners: registration.Owners | None, payload: Any, training: Training
) -> registration.Owner | None:
    """Who a replay would adopt an untracked training for (None: nobody)."""
    if owners is None or not isinstance(payload, Mapping):
        return None
    return owners.owner_of(payload, training)


def _read_training(conn: db.Connection, training_id: str) -> dict[str, Any] | None:
    with conn:
        return db.select_training(conn, training_id)


def _report(
    delivered: inbox.DeliveryResult, webhook_id: str, before: dict[str, Any] | None
) -> ReplayReport:
    update = delivered.update
    reason = update.reason if update is not None else delivered.result
    after = update.row if update is not None and update.row is not None else before
    return ReplayReport(delivered.training_id, delivered.result, reason, webhook_id, before, after)
