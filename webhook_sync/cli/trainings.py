"""`migrate`, `track` and `status`: the schema and the rows the host platform reads."""

from __future__ import annotations

import sys
from datetime import timedelta

import click

from webhook_sync import (
    db,
    host,
    migrations,
    outbox,
    service,
)
from webhook_sync.cli import base


@base.main.command()
@base.pass_context
def migrate(ctx: base.Context) -> None:
    """Apply pending migrations from sql/ (safe to run twice or concurrently).

    Then checks the HOST_* binding, if any, against the database, so that a release
    phase stops a deploy whose web and worker would refuse to start.

    Exit codes: 0 applied or nothing to do, 1 a migration failed (its name and the
    PostgreSQL error are printed), 2 the database does not take the HOST_* binding.
    """
    conn = base.open_connection(ctx, "webhook-sync migrate")
    try:
        applied = migrations.migrate(conn)
        if ctx.config.notify_urls:
            # Before a new release's web processes queue notifications for them.
            with conn:
                outbox.sync_endpoints(conn, ctx.config.notify_urls, ctx.config.notify_events)
        click.echo(
            f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else "")
        )
        if ctx.config.host_binding is not None:
            host.require_binding(conn, ctx.config.host_binding)
    finally:
        conn.close()


@base.main.command()
@click.argument("training_id")
@click.option("--user", "user_id", required=True, help="The host platform's user id.")
@click.option("--destination", help="The destination model, owner/name.")
@click.option("--json", "as_json", is_flag=True, help="Print the row as one JSON object.")
@base.pass_context
def track(
    ctx: base.Context, training_id: str, user_id: str, destination: str | None, as_json: bool
) -> None:
    """Register TRAINING_ID in the `training` state (idempotent) and print its row.

    Webhooks that arrived before the training was tracked are applied now.
    Exit codes: 0 tracked (or already tracked), 1 error.
    """
    conn = base.open_connection(ctx)
    try:
        with conn:
            row, created = service.track_training(conn, training_id, user_id, destination)
    finally:
        conn.close()
    if as_json:
        base.echo_json({column: row.get(column) for column in db.TRAINING_COLUMNS})
    else:
        click.echo(("tracked" if created else "already tracked") + f" {training_id}")
        click.echo(base.format_table([row], STATUS_TABLE_COLUMNS))


STATUS_TABLE_COLUMNS = (
    "id",
    "user_id",
    "training_status",
    "replicate_status",
    "destination",
    "version_id",
    "updated_by",
    "updated_at",
)


@base.main.command("status")
@click.argument("training_ids", nargs=-1)
@click.option(
    "--stuck", is_flag=True, help="Only trainings in `training` past STUCK_AFTER_SECONDS."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, keys as columns.")
@click.option("--limit", default=1000, show_default=True, help="At most this many rows.")
@base.pass_context
def status_command(
    ctx: base.Context, training_ids: tuple[str, ...], stuck: bool, as_json: bool, limit: int
) -> None:
    """Show training rows (all, or the given ids).

    Exit codes: 0 shown, 1 error or (with ids) none of them is tracked.
    """
    conn = base.open_connection(ctx)
    try:
        with conn:
            stuck_before = None
            if stuck:
                stuck_before = db.select_now(conn) - timedelta(
                    seconds=ctx.config.stuck_after_seconds
                )
            rows = db.select_trainings(
                conn, list(training_ids) or None, stuck_before=stuck_before, limit=limit
            )
    finally:
        conn.close()
    base.echo_rows(rows, db.TRAINING_COLUMNS, STATUS_TABLE_COLUMNS, as_json=as_json)
    missing = set(training_ids) - {row["id"] for row in rows}
    for training_id in sorted(missing):
        click.echo(f"not tracked: {training_id}", err=True)
    if training_ids and not rows:
        sys.exit(1)
