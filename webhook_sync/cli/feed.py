"""`changes`: the change feed for an app that was not listening (docs/changes.md)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import click

from webhook_sync import changes, db
from webhook_sync.cli import base
from webhook_sync.cli.operator import ParsedType

# A change's `position`, or 0 / start for the beginning.
POSITION = ParsedType("position", changes.parse_position)


@base.main.command("changes")
@click.option(
    "--after",
    type=POSITION,
    default="0",
    show_default=True,
    help="The position of the last change you have (0 or start: from the beginning).",
)
@click.option(
    "--follow",
    is_flag=True,
    help="Keep reading: print each new change as it commits, until Ctrl-C or SIGTERM.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@base.pass_context
def changes_command(
    ctx: base.Context, after: changes.Position, follow: bool, as_json: bool
) -> None:
    """Print the applied status changes after a position, oldest first: position,
    training, user, replicate and app statuses (from -> to), source and time. Save the
    last position you handled and pass it as --after next time: nothing is skipped, even
    when two transactions commit out of order (a change appears once every transaction
    older than it has ended).

    A position whose change is no longer kept (older than TRANSITION_RETENTION_DAYS) is
    warned about on stderr: changes after it may have been pruned unread.

    Exit codes: 0 printed (also when there was nothing new; with --follow, stopped by
    Ctrl-C or SIGTERM), 1 error, 2 wrong usage (a malformed position).
    """
    base.logs_to_stderr()
    conn = base.open_connection(ctx, "webhook-sync changes")
    conn.autocommit = True
    try:
        if not changes.is_kept(conn, after):
            click.echo(
                f"warning: the change at {after} is no longer kept (pruned after"
                " TRANSITION_RETENTION_DAYS, or never recorded here): changes after it may"
                " be lost too; resync from the trainings table",
                err=True,
            )
        if follow:
            _follow(ctx, conn, after, as_json)
        else:
            _echo_changes(changes.read_changes(conn, after), as_json)
    finally:
        conn.close()


def _follow(ctx: base.Context, conn: db.Connection, after: changes.Position, as_json: bool) -> None:
    """Print changes as they become readable until SIGINT or SIGTERM asks to stop; the
    signal also writes to a wake-up pipe, so that the wait between reads ends at once."""
    stop = threading.Event()
    with base.signals_set(stop, signal.SIGINT, signal.SIGTERM):
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        previous_wake_fd = signal.set_wakeup_fd(wake_write)
        try:
            listener = base.open_connection(ctx, "webhook-sync changes --follow")
            listener.autocommit = True
            try:
                rows = changes.follow_changes(conn, listener, after, stop, wake_fd=wake_read)
                _echo_changes(rows, as_json)
            finally:
                listener.close()
        finally:
            signal.set_wakeup_fd(previous_wake_fd)
            os.close(wake_read)
            os.close(wake_write)


def _echo_changes(rows: Iterator[db.Row], as_json: bool) -> None:
    """One line per change, printed (and flushed) as it comes."""
    for row in rows:
        if as_json:
            base.echo_json({column: row[column] for column in changes.CHANGE_COLUMNS})
        else:
            click.echo(_line(row))


def _line(row: dict[str, Any]) -> str:
    """A change for people: position, training, user, statuses, source and time."""
    replicate = f"{row['from_replicate_status'] or '-'} -> {row['to_replicate_status']}"
    app = f"{row['from_training_status']} -> {row['to_training_status']}"
    at = row["at"].strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"{row['position']}  {row['training_id']}  user {row['user_id'] or '-'}"
        f"  replicate {replicate}  app {app}  {row['source']}  {at}"
    )
