"""What `webhook-sync replay` tells people and scripts: sentences, tables, JSON, exit codes."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NoReturn

import click

from webhook_sync import db, errors
from webhook_sync import replay as replay_module
from webhook_sync.cli import base
from webhook_sync.replay import ReplayReport
from webhook_sync.vocabulary import REFUSED_OUTCOMES, Outcome

# The exit codes the command's help text lists.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REFUSED = 3
EXIT_NOT_TRACKED = 4
BATCH_COLUMNS = ("webhook_id", "training_id", "outcome", "change", "reason")


def exit_code(reports: Iterable[ReplayReport]) -> int:
    """The command's exit code: an error beats a refusal, which beats an untracked training."""
    outcomes = {report.outcome for report in reports}
    if Outcome.FAILED in outcomes:
        return EXIT_ERROR
    if outcomes & set(REFUSED_OUTCOMES):
        return EXIT_REFUSED
    if Outcome.PENDING in outcomes:
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
    if report.outcome == Outcome.PENDING:
        stored = (
            "nothing would be applied; a replay would be stored as pending"
            if would
            else f"the event is stored as pending ({report.webhook_id})"
        )
        return (
            f"{subject} is not tracked: {stored} and applied once it is tracked:"
            f" {track_command(report.training_id)}"
        )
    if report.outcome == Outcome.FAILED:
        return f"{subject}: processing failed: {report.reason}"
    if report.outcome in REFUSED_OUTCOMES:
        verb = "would be refused" if would else "refused"
        return f"{subject}: {verb} ({report.outcome}): {report.reason}; the row is unchanged"
    if report.outcome == Outcome.DUPLICATE:
        return f"{subject}: already processed ({report.webhook_id}); nothing to do"
    if not report.changes:
        return f"{subject}: nothing {'would change' if would else 'changed'} ({report.reason})"
    verb = "would change" if would else "changed"
    return f"{subject}: {verb}: {report.reason}"


def report_as_dict(report: ReplayReport) -> dict[str, Any]:
    """A JSON-ready view of one report (dates stay datetimes for the encoder)."""
    return {
        "webhook_id": report.webhook_id,
        "training_id": report.training_id,
        "outcome": report.outcome,
        "reason": report.reason,
        "dry_run": report.dry_run,
        "error": report.error,
        "changes": [
            {"field": name, "before": old, "after": new} for name, old, new in report.changes
        ],
        "before": _visible(report.before),
        "after": _visible(report.after),
    }


def echo_unverified(replay_input: replay_module.ReplayInput) -> None:
    """Warn on stderr that nothing vouches for where a replayed file came from."""
    click.echo(
        f"warning: the origin of {replay_input.name} is unverified: nothing checked that"
        " Replicate sent it (replay a saved delivery with --verify to check its signature)",
        err=True,
    )


def echo_signature_ok(check: replay_module.SignatureCheck) -> None:
    """Say who signed, before anything is applied, so it shows even if the body then
    proves unusable."""
    verified = check.verified
    click.echo(
        f"signature ok: {check.signer} signed {verified.webhook_id}"
        f" at {verified.signed_at:%Y-%m-%d %H:%M:%S} UTC (age not checked)"
    )


def exit_refused(exc: errors.SignatureError, *, dry_run: bool, as_json: bool) -> NoReturn:
    """Report a signature that matched no secret and exit 3; nothing was applied."""
    message = f"signature check failed: {exc}; nothing applied"
    if as_json:
        base.echo_json({"dry_run": dry_run, "verified": False, "error": message})
    click.echo(f"refused: {message}", err=True)
    sys.exit(EXIT_REFUSED)


def echo_results(
    reports: list[ReplayReport],
    check: replay_module.SignatureCheck | None,
    *,
    dry_run: bool,
    as_json: bool,
    one_file: bool,
) -> None:
    """Print the replay's outcome: one JSON object, one report with its changes (a file),
    or a table and a summary (stored events)."""
    if as_json:
        base.echo_json(
            {
                "dry_run": dry_run,
                "verified": None if check is None else _signature_as_dict(check),
                "results": [report_as_dict(report) for report in reports],
                "summary": summarize(reports),
                "exit_code": exit_code(reports),
            }
        )
    elif one_file:
        _echo_report(reports[0])
    else:
        _echo_batch(reports, dry_run)


def _signature_as_dict(check: replay_module.SignatureCheck) -> dict[str, Any]:
    return {
        "secret": check.verified.secret_position,
        "fetched": check.fetched,
        "webhook_id": check.verified.webhook_id,
        "signed_at": check.verified.signed_at,
    }


def _echo_report(report: ReplayReport) -> None:
    """One replay for people: the outcome, why, and each field before and after."""
    suffix = " (dry run)" if report.dry_run else ""
    click.echo(f"{report.outcome}{suffix}: {describe(report)}")
    if report.webhook_id:
        click.echo(f"inbox event: {report.webhook_id}")
    if report.changes:
        rows = [{"field": name, "before": old, "after": new} for name, old, new in report.changes]
        click.echo(base.format_table(rows, ("field", "before", "after")))


def _echo_batch(reports: list[ReplayReport], dry_run: bool) -> None:
    """One line per replayed event, then a summary."""
    rows = [
        {
            "webhook_id": report.webhook_id,
            "training_id": report.training_id,
            "outcome": report.outcome,
            "change": _status_change(report),
            "reason": report.reason,
        }
        for report in reports
    ]
    if rows:
        click.echo(base.format_table(rows, BATCH_COLUMNS))
    counts = summarize(reports)
    breakdown = ", ".join(f"{count} {outcome}" for outcome, count in counts.items())
    click.echo(
        f"summary: {len(reports)} event(s)"
        + (f": {breakdown}" if breakdown else "")
        + ("; dry run, nothing written" if dry_run else "")
    )
    for report in reports:
        if report.outcome == Outcome.PENDING:
            click.echo(f"not tracked: {track_command(report.training_id)}")


def _status_change(report: ReplayReport) -> str | None:
    """`before -> after` of the Replicate status, when the replay moves it."""
    for name, old, new in report.changes:
        if name == "replicate_status":
            return f"{old or 'none'} -> {new}"
    return None


def _visible(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {column: row.get(column) for column in db.TRAINING_COLUMNS}
