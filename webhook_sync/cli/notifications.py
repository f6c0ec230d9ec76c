"""`notifications` and `notifications retry`: the outbox as the operator sees it."""

from __future__ import annotations

from datetime import datetime

import click

from webhook_sync import outbox
from webhook_sync.cli import base
from webhook_sync.cli.operator import WHEN
from webhook_sync.vocabulary import NotificationStatus

TABLE_COLUMNS = (
    "id",
    "created_at",
    "training_id",
    "event_type",
    "status",
    "attempts",
    "last_status_code",
    "last_error",
    "endpoint",
)


@base.main.group(invoke_without_command=True)
@click.option(
    "--status",
    type=click.Choice([str(status) for status in NotificationStatus]),
    help="Only notifications in this state.",
)
@click.option("--training", "training_id", help="Only this training's notifications.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def notifications(
    click_ctx: click.Context,
    status: str | None,
    training_id: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Show the notifications sent (or still to send) to NOTIFY_URLS, newest first: the
    event, its endpoint, its state (pending, delivered, dead), attempts and last error.

    Exit codes: 0 shown (also when nothing matches), 1 error, 2 wrong usage.
    """
    if click_ctx.invoked_subcommand is not None:
        return
    ctx: base.Context = click_ctx.find_object(base.Context)
    base.logs_to_stderr()
    conn = base.open_connection(ctx, "webhook-sync notifications")
    try:
        with conn:
            rows = outbox.select_notifications(
                conn, status=status, training_id=training_id, limit=limit
            )
    finally:
        conn.close()
    base.echo_rows(
        rows,
        outbox.NOTIFICATION_COLUMNS,
        TABLE_COLUMNS,
        as_json=as_json,
        none_match="no notifications match",
    )


@notifications.command()
@click.argument("notification_id", required=False, type=click.IntRange(min=1))
@click.option("--dead", is_flag=True, help="Retry every dead notification.")
@click.option("--since", type=WHEN, help="With --dead: last attempted at or after WHEN.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@base.pass_context
def retry(
    ctx: base.Context,
    notification_id: int | None,
    dead: bool,
    since: datetime | None,
    as_json: bool,
) -> None:
    """Send notification ID again (whatever its state), or every dead one (--dead), at the
    notifier's next turn; NOTIFY_MAX_AGE counts afresh, and an endpoint disabled by a 410
    is enabled again.

    Exit codes: 0 done (also when nothing matched --dead), 1 error or ID unknown, 2 wrong
    usage.
    """
    if (notification_id is None) == (not dead):
        raise click.UsageError("give either a notification ID or --dead")
    if since is not None and not dead:
        raise click.UsageError("--since goes with --dead")
    base.logs_to_stderr()
    conn = base.open_connection(ctx, "webhook-sync notifications retry")
    try:
        with conn:
            count, enabled = outbox.retry_notifications(
                conn, notification_id=notification_id, dead_since=since
            )
    finally:
        conn.close()
    if notification_id is not None and not count:
        raise click.ClickException(f"no notification {notification_id}")
    if as_json:
        base.echo_json({"retried": count, "enabled_endpoints": enabled})
        return
    click.echo(f"{count} notification(s) due again now")
    for url in enabled:
        click.echo(f"endpoint enabled again: {url}")
