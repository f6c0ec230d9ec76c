"""Manual replay: push a saved payload or a stored inbox event through the webhook path again.

A replay goes through `inbox` exactly as a delivery does (stored, then applied by
`service.apply_update` with source `replay`), so it obeys the same rules: never backwards,
a contradicting terminal status refused and recorded.

A dry run writes nothing at all, not even inside a rolled-back transaction: it reads the
row and asks the same pure functions `apply_update` asks (`status.effective_replicate_status`,
`status.decide`, `service.changed_fields`). That way it takes no row lock, sends no NOTIFY and
logs no `training_update` line claiming a change that never happened; a test checks that the
preview agrees with the real replay on every published example.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from webhook_sync import db, errors, inbox, replicate, service, signing_offline, status
from webhook_sync.config import Config
from webhook_sync.training import Training, parse_training

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
PENDING = "pending"
FAILED = "failed"
OK_OUTCOMES = (status.APPLIED, status.UNCHANGED, inbox.DUPLICATE)
REFUSED_OUTCOMES = (status.IGNORED, status.CONFLICT)

# Exit codes shared by the CLI and its help text.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REFUSED = 3
EXIT_NOT_TRACKED = 4


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
    outcome: str  # applied | unchanged | duplicate | ignored | conflict | pending | failed
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

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (dates stay datetimes for the caller's encoder)."""
        return {
            "webhook_id": self.webhook_id,
            "training_id": self.training_id,
            "outcome": self.outcome,
            "reason": self.reason,
            "dry_run": self.dry_run,
            "error": self.error,
            "changes": [
                {"field": name, "before": old, "after": new} for name, old, new in self.changes
            ],
            "before": _visible(self.before),
            "after": _visible(self.after),
        }


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
    """Parse a training object or a saved delivery `{"headers": {...}, "body": "<raw>"}`."""
    obj = _loads(text, name)
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
        payload = _loads(raw_body, f"{name}'s body")
        body: str | None = raw_body
    else:
        # A body saved as parsed JSON still replays; only its signature cannot be checked.
        payload, body = raw_body, None
    return ReplayInput(payload, name, dict(headers), body)


def _loads(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.ReplayError(f"{name} is not JSON: {exc}") from None
    except RecursionError:
        # Thousands of nested brackets exhaust the decoder's stack; no training is that deep.
        raise errors.ReplayError(f"{name} is nested too deeply to be a training") from None


def verify_input(replay_input: ReplayInput, secrets: Sequence[str]) -> signing_offline.Verified:
    """Check a saved delivery's signature against every secret, with no timestamp limit.

    Raises ReplayError when the input cannot be verified at all (no headers, or a body that
    is not the raw text) and SignatureError when no secret matches.
    """
    if not replay_input.is_delivery or replay_input.headers is None:
        raise errors.ReplayError(
            '--verify needs a saved delivery {"headers": {...}, "body": "<raw body>"},'
            " not a bare training object"
        )
    if replay_input.body is None:
        raise errors.ReplayError(
            "--verify needs the body as the raw text received (a JSON string);"
            " re-serialized JSON never matches its signature"
        )
    if not secrets:
        raise errors.ConfigError(
            "REPLICATE_WEBHOOK_SECRET is not set (nor REPLICATE_API_TOKEN to fetch the"
            " account's secret); --verify needs one of them"
        )
    return signing_offline.verify_delivery(secrets, replay_input.headers, replay_input.body)


def fetch_account_secret(config: Config) -> str:
    """The account's signing secret from GET /webhooks/default/secret, as the web process
    fetches it when REPLICATE_WEBHOOK_SECRET is unset; ReplicateError when it cannot."""
    client = replicate.ReplicateClient.from_config(config, max_attempts=2)
    try:
        return client.get_webhook_secret()
    finally:
        client.close()


def replay_payload(
    conn: db.Connection,
    replay_input: ReplayInput,
    *,
    dry_run: bool = False,
    signed_at: datetime | None = None,
) -> ReplayReport:
    """Store the payload in the inbox under a new replay id and apply it (commits), or with
    dry_run only say what would happen."""
    training = replay_input.training
    if dry_run:
        return preview(conn, training)
    before = _read_training(conn, training.id)
    webhook_id = new_replay_id()
    delivered = inbox.receive_delivery(
        conn,
        webhook_id=webhook_id,
        payload=replay_input.payload,
        signed_at=signed_at,
        source="replay",
    )
    return _report(delivered, webhook_id, before)


def replay_event(conn: db.Connection, webhook_id: str, *, dry_run: bool = False) -> ReplayReport:
    """Apply a stored inbox event again (commits), or with dry_run say what would happen.

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
            return ReplayReport(training_id, FAILED, str(exc), webhook_id, dry_run=True)
        return dataclasses.replace(preview(conn, training), webhook_id=webhook_id)
    before = _read_training(conn, training_id)
    try:
        delivered = inbox.reprocess_event(conn, webhook_id, source="replay")
    except errors.InvalidTrainingError as exc:
        return ReplayReport(training_id, FAILED, str(exc), webhook_id, before, error=str(exc))
    return _report(delivered, webhook_id, before)


def replay_failed(
    conn: db.Connection,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    dry_run: bool = False,
) -> list[ReplayReport]:
    """Apply again every stored event whose processing failed, oldest first (each event
    commits on its own), or with dry_run say what each would do."""
    with conn:
        events = db.select_events(
            conn,
            outcome=FAILED,
            received_since=since,
            received_before=until,
            limit=None,
            newest_first=False,
        )
    reports = []
    for event in events:
        try:
            reports.append(replay_event(conn, event["webhook_id"], dry_run=dry_run))
        except errors.WebhookSyncError as exc:
            # One event that cannot be applied must not stop the others.
            reports.append(
                ReplayReport(
                    event["training_id"] or "?",
                    FAILED,
                    str(exc),
                    event["webhook_id"],
                    dry_run=dry_run,
                    error=str(exc),
                )
            )
    return reports


def preview(conn: db.Connection, training: Training) -> ReplayReport:
    """What applying `training` would do to its row, decided exactly as `apply_update` decides
    but without writing anything."""
    row = _read_training(conn, training.id)
    if row is None:
        return ReplayReport(training.id, PENDING, "training is not tracked", dry_run=True)
    current = status.effective_replicate_status(row["replicate_status"], row["training_status"])
    decision = status.decide(current, training.status)
    if decision.refused:
        return ReplayReport(
            training.id, decision.outcome, decision.reason, before=row, after=row, dry_run=True
        )
    after = {**row, **service.changed_fields(row, training)}
    if decision.outcome == status.APPLIED:
        after["replicate_status"] = training.status
        after["training_status"] = status.app_status_for(training.status)
    if after != row:
        after["updated_by"] = "replay"
    return ReplayReport(
        training.id, decision.outcome, decision.reason, before=row, after=after, dry_run=True
    )


def exit_code(reports: Iterable[ReplayReport]) -> int:
    """The command's exit code: an error beats a refusal, which beats an untracked training."""
    outcomes = {report.outcome for report in reports}
    if FAILED in outcomes:
        return EXIT_ERROR
    if outcomes & set(REFUSED_OUTCOMES):
        return EXIT_REFUSED
    if PENDING in outcomes:
        return EXIT_NOT_TRACKED
    return EXIT_OK


def summarize(reports: Sequence[ReplayReport]) -> dict[str, int]:
    """How many reports hold each outcome, in the order they first appear."""
    counts: dict[str, int] = {}
    for report in reports:
        counts[report.outcome] = counts.get(report.outcome, 0) + 1
    return counts


def track_command(training_id: str) -> str:
    """The command that makes an untracked training's pending events apply."""
    return f"webhook-sync track {training_id} --user USER"


def describe(report: ReplayReport) -> str:
    """One sentence for people saying what happened (or would happen) and why."""
    would = report.dry_run
    subject = f"training {report.training_id}"
    if report.outcome == PENDING:
        stored = (
            "nothing would be applied; a replay would be stored as pending"
            if would
            else f"the event is stored as pending ({report.webhook_id})"
        )
        return (
            f"{subject} is not tracked: {stored} and applied once it is tracked:"
            f" {track_command(report.training_id)}"
        )
    if report.outcome == FAILED:
        return f"{subject}: processing failed: {report.reason}"
    if report.outcome in REFUSED_OUTCOMES:
        verb = "would be refused" if would else "refused"
        return f"{subject}: {verb} ({report.outcome}): {report.reason}; the row is unchanged"
    if report.outcome == inbox.DUPLICATE:
        return f"{subject}: already processed ({report.webhook_id}); nothing to do"
    if not report.changes:
        return f"{subject}: nothing {'would change' if would else 'changed'} ({report.reason})"
    verb = "would change" if would else "changed"
    return f"{subject}: {verb}: {report.reason}"


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


def _visible(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {column: row.get(column) for column in db.TRAINING_COLUMNS}
