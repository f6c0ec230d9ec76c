"""`import`: track the trainings that already exist at Replicate."""

from __future__ import annotations

import sys
from datetime import timedelta

import click

from webhook_sync import config as config_module
from webhook_sync import importing, operations, registration
from webhook_sync.cli import base
from webhook_sync.cli.operator import DURATION


@base.main.command("import")
@click.option(
    "--since",
    type=DURATION,
    default="7d",
    show_default=True,
    help="How far back to walk Replicate's list of trainings (12h, 7d, 1d12h).",
)
@click.option(
    "--include-finished",
    is_flag=True,
    help="Also track finished trainings (their final status is applied at once).",
)
@click.option("--user", "user_id", help="Attribute every imported training to this user.")
@click.option(
    "--user-from-destination",
    "pattern",
    help="A regex with a named group `user`, matched against the destination.",
)
@click.option("--dry-run", is_flag=True, help="Count what would be imported; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@base.pass_context
def import_command(
    ctx: base.Context,
    since: timedelta,
    include_finished: bool,
    user_id: str | None,
    pattern: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Track the trainings that exist at Replicate and are not tracked yet.

    Walks the account's trainings back to --since. Each one not tracked, in flight (or
    finished too, with --include-finished), is attributed to --user, or by the
    self-registration query of its webhook URL (`…?user_id=`), or by the destination
    pattern (--user-from-destination, else ADOPT_DESTINATION_PATTERN); those that cannot
    be attributed are skipped and counted. Safe to run twice and beside running workers.
    Exit codes: 0 done, 1 error (e.g. REPLICATE_API_TOKEN refused).
    """
    if user_id is not None and pattern is not None:
        raise click.UsageError("--user and --user-from-destination exclude each other")
    if user_id is not None and registration.plausible_user_id(user_id) is None:
        raise click.BadParameter("must be 1 to 200 printable characters", param_hint="--user")
    config = ctx.config
    owners = registration.Owners.from_config(config)
    if pattern is not None:
        try:
            compiled = config_module.parse_user_pattern(pattern)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--user-from-destination") from None
        owners = registration.Owners(owners.public_webhook_url, compiled)
    options = importing.ImportOptions(
        since=since,
        include_finished=include_finished,
        user=user_id,
        owners=owners,
        dry_run=dry_run,
        concurrency=config.poll_concurrency,
        check_after=timedelta(seconds=config.poll_interval_seconds),
    )
    with (
        base.replicate_run(
            ctx, "webhook-sync import", as_json=as_json, progress_file=sys.stderr
        ) as run,
        run.progressbar(int(since.total_seconds()), "import", show_percent=True) as bar,
    ):

        def progress(done: int, total: int) -> None:
            bar.update(done - bar.pos)

        summary = importing.import_trainings(
            run.conn, run.client, options, progress=progress, stop=run.stop
        )
    verb = "would import" if dry_run else "imported"
    text = (
        f"{verb} {summary.imported} ({summary.imported_finished} finished) of"
        f" {summary.listed} trainings of the last {operations.format_duration(since)};"
        f" already tracked {summary.already_tracked},"
        f" finished and skipped {summary.skipped_finished}, not attributable"
        f" {summary.unattributed}, fetch failed {summary.fetch_failed};"
        f" {summary.pages + summary.fetched} API calls"
    )
    base.echo_summary(summary.as_dict(), text, as_json=as_json)
