"""The operator's tools: `replay`, `events`, `prune` and `doctor`."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta

import click

from webhook_sync import (
    db,
    doctor,
    errors,
    operations,
    registration,
)
from webhook_sync import replay as replay_module
from webhook_sync.cli import base, replay_output
from webhook_sync.vocabulary import EVENT_OUTCOMES

# A duration such as 30d, 12h, 90m or 1d12h (operations.parse_duration: the one rule).
DURATION = base.ParsedType("duration", operations.parse_duration)
# An ISO time (UTC unless it says otherwise) or a duration ago such as 2h.
WHEN = base.ParsedType("when", lambda text: operations.parse_when(text, datetime.now(UTC)))


@base.main.command()
@click.argument("file", required=False)
@click.option("--event", "event_id", metavar="WEBHOOK_ID", help="Re-apply this stored event.")
@click.option("--failed", is_flag=True, help="Re-apply every stored event that failed.")
@click.option("--since", type=WHEN, help="With --failed: received at or after WHEN.")
@click.option("--until", type=WHEN, help="With --failed: received before WHEN.")
@click.option(
    "--verify",
    is_flag=True,
    help="Check a saved delivery's signature first (no age limit) against"
    " REPLICATE_WEBHOOK_SECRET, or the account's secret fetched with the token.",
)
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@base.pass_context
def replay(
    ctx: base.Context,
    file: str | None,
    event_id: str | None,
    failed: bool,
    since: datetime | None,
    until: datetime | None,
    verify: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Push a payload through the webhook path again: FILE (`-` for stdin) holding a
    training object or a saved delivery {"headers": {...}, "body": "<raw body>"}, a
    stored event (--event), or every failed one (--failed). It never moves a status
    backwards. An untracked training is adopted as a delivery's would be (its signed
    `webhook` URL, or ADOPT_DESTINATION_PATTERN) when Replicate signed the payload: a
    stored delivery or verified replay, or FILE checked with --verify.

    Exit codes: 0 applied or nothing to change (with --dry-run: would be); 1 error
    (unreadable file, not JSON, not a training object, database, configuration, or an
    event failed again); 2 wrong usage; 3 refused: the signature matches no configured
    secret (nothing applied), or the status would move backwards or contradicts a
    terminal one (recorded, the row unchanged); 4 the training is not tracked: the event
    is stored as pending and applied once the printed `webhook-sync track` command runs.
    """
    base.logs_to_stderr()
    if sum((file is not None, event_id is not None, failed)) != 1:
        raise click.UsageError("give exactly one of FILE, --event WEBHOOK_ID or --failed")
    if (since or until) and not failed:
        raise click.UsageError("--since and --until only bound --failed")
    if verify and file is None:
        raise click.UsageError("--verify checks a saved delivery FILE")
    check = None
    replay_input = replay_module.load_input(file) if file is not None else None
    if replay_input is not None and verify:
        try:
            check = replay_module.verify_saved_delivery(replay_input, ctx.config)
        except errors.SignatureError as exc:
            replay_output.exit_refused(exc, dry_run=dry_run, as_json=as_json)
        if not as_json:
            replay_output.echo_signature_ok(check)
    elif replay_input is not None:
        replay_output.echo_unverified(replay_input)
    owners = registration.Owners.from_config(ctx.config)
    conn = base.open_connection(ctx, "webhook-sync replay")
    try:
        if replay_input is not None:
            signed_at = check.verified.signed_at if check else None
            reports = [
                replay_module.replay_payload(
                    conn, replay_input, dry_run=dry_run, signed_at=signed_at, owners=owners
                )
            ]
        elif event_id is not None:
            reports = [replay_module.replay_event(conn, event_id, dry_run=dry_run, owners=owners)]
        else:
            reports = replay_module.replay_failed(
                conn, since=since, until=until, dry_run=dry_run, owners=owners
            )
    finally:
        conn.close()
    replay_output.echo_results(
        reports, check, dry_run=dry_run, as_json=as_json, one_file=replay_input is not None
    )
    sys.exit(replay_output.exit_code(reports))


EVENTS_TABLE_COLUMNS = (
    "received_at",
    "webhook_id",
    "training_id",
    "source",
    "reported_status",
    "outcome",
    "attempts",
    "error",
)


@base.main.command()
@click.option("--training", "training_id", metavar="ID", help="Only this training's events.")
@click.option(
    "--outcome",
    type=click.Choice([str(outcome) for outcome in EVENT_OUTCOMES]),
    help="Only this outcome.",
)
@click.option("--since", type=WHEN, help="Received at or after WHEN (2h, ISO time).")
@click.option("--until", type=WHEN, help="Received before WHEN.")
@click.option(
    "--limit", default=100, show_default=True, type=click.IntRange(min=1), help="At most N."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@base.pass_context
def events(
    ctx: base.Context,
    training_id: str | None,
    outcome: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    as_json: bool,
) -> None:
    """Show what the inbox holds, newest first: each delivery or replay, the status it
    reported, and what processing it did (its outcome, attempts and error).

    Exit codes: 0 shown (also when nothing matches), 1 error, 2 wrong usage.
    """
    base.logs_to_stderr()
    conn = base.open_connection(ctx, "webhook-sync events")
    try:
        rows = operations.list_events(
            conn,
            training_id=training_id,
            outcome=outcome,
            since=since,
            until=until,
            limit=limit,
        )
    finally:
        conn.close()
    base.echo_rows(
        rows, db.EVENT_COLUMNS, EVENTS_TABLE_COLUMNS, as_json=as_json, none_match="no events match"
    )


@base.main.command()
@click.option(
    "--older-than",
    type=DURATION,
    help="Delete events received longer ago than this (30d, 12h, 1d12h)"
    " [default: EVENT_RETENTION_DAYS].",
)
@click.option(
    "--transitions-older-than",
    type=DURATION,
    help="Delete transitions (the change feed's history) recorded longer ago than this"
    " [default: TRANSITION_RETENTION_DAYS].",
)
@click.option("--dry-run", is_flag=True, help="Only count them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@base.pass_context
def prune(
    ctx: base.Context,
    older_than: timedelta | None,
    transitions_older_than: timedelta | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Delete inbox events past retention, whatever their outcome, and the transitions
    behind the change feed past theirs (the worker does this daily); trainings are kept.
    A `changes` reader further behind than the transitions' retention has lost changes
    and should resync from the trainings table.

    Exit codes: 0 pruned (also when nothing was old enough), 1 error, 2 wrong usage.
    """
    base.logs_to_stderr()
    age = older_than or timedelta(days=ctx.config.event_retention_days)
    transitions_age = transitions_older_than or timedelta(days=ctx.config.transition_retention_days)
    conn = base.open_connection(ctx, "webhook-sync prune")
    try:
        count = operations.prune_events(conn, age, dry_run=dry_run)
        transitions = operations.prune_transitions(conn, transitions_age, dry_run=dry_run)
    finally:
        conn.close()
    shown = operations.format_duration(age)
    transitions_shown = operations.format_duration(transitions_age)
    fields = {
        "deleted": 0 if dry_run else count,
        "matched": count,
        "older_than": shown,
        "transitions_deleted": 0 if dry_run else transitions,
        "transitions_matched": transitions,
        "transitions_older_than": transitions_shown,
        "dry_run": dry_run,
    }
    verb = "would delete" if dry_run else "deleted"
    text = (
        f"{verb} {count} inbox event(s) received more than {shown} ago\n"
        f"{verb} {transitions} transition(s) recorded more than {transitions_shown} ago"
    )
    base.echo_summary(fields, text, as_json=as_json)


@base.main.command("doctor")
@click.option(
    "--clock-tolerance",
    type=DURATION,
    default="5s",
    show_default=True,
    help="Largest accepted difference from the database's clock.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=doctor.DEFAULT_HTTP_TIMEOUT,
    show_default=True,
    help="Seconds to wait for Replicate.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@base.pass_context
def doctor_command(
    ctx: base.Context, clock_tolerance: timedelta, timeout: float, as_json: bool
) -> None:
    """Check the setup, one line per check: configuration complete, database reachable and
    migrated, Replicate token valid, webhook secret matching Replicate's (neither is
    printed), clock agreeing with the database's, stuck trainings and failed inbox events
    (these two only warn).

    Exit codes: 0 every check passed (warnings allowed), 1 the doctor itself failed,
    2 wrong usage, 3 at least one check failed.
    """
    base.logs_to_stderr()
    checks = doctor.run_checks(os.environ, clock_tolerance=clock_tolerance, http_timeout=timeout)
    broken = doctor.failed(checks)
    if as_json:
        base.echo_json({"ok": not broken, "checks": [check.as_dict() for check in checks]})
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            click.echo(f"{check.status:<4}  {check.name:<{width}}  {check.detail}")
    sys.exit(3 if broken else 0)
