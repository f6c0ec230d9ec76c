"""`changes`: the change feed for an app that was not listening (docs/changes.md)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import click

from webhook_sync import changes, db, redaction
from webhook_sync.cli import base
from webhook_sync.logs import log_event

# A change's `position`, or 0 / start for the beginning.
POSITION = base.ParsedType("position", changes.parse_position)


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
    help=(
        "Keep reading: print each new change as it commits, until Ctrl-C or SIGTERM;"
        " reconnect when the database connection is lost."
    ),
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

    With --follow, a database that cannot be reached at the start is an error (exit 1);
    a connection lost once following (a restart, a failover, an idle connection killed)
    is not: the command logs a warning line on stderr, reconnects after 1 s, doubling to
    30 s while it fails, and resumes after the last change it printed.

    Exit codes: 0 printed (also when there was nothing new; with --follow, stopped by
    Ctrl-C or SIGTERM), 1 error, 2 wrong usage (a malformed position).
    """
    base.logs_to_stderr()
    conn = _connect_reader(ctx)
    try:
        if not changes.is_kept(conn, after):
            click.echo(
                f"warning: the change at {after} is no longer kept (pruned after"
                " TRANSITION_RETENTION_DAYS, or never recorded here): changes after it may"
                " be lost too; resync from the trainings table",
                err=True,
            )
        if not follow:
            _echo_changes(changes.read_changes(conn, after), as_json)
            return
    finally:
        conn.close()
    _follow(ctx, after, as_json)


def _follow(ctx: base.Context, after: changes.Position, as_json: bool) -> None:
    """Print changes as they become readable, across lost connections, until SIGINT or
    SIGTERM asks to stop; the signal also writes to a wake-up pipe, so that the wait
    between reads ends at once (and the wait before reconnecting, as it sets `stop`)."""
    stop = threading.Event()
    url = ctx.config.require_database_url()

    def reconnecting(error: Exception, delay: float, position: changes.Position) -> None:
        """One warning line per attempt, the error redacted (no user, password, host)."""
        log_event(
            "changes_follow_reconnecting",
            logging.WARNING,
            error=redaction.describe_error(error, url),
            retry_in=delay,
            after=str(position),
        )

    with base.signals_set(stop, signal.SIGINT, signal.SIGTERM):
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        previous_wake_fd = signal.set_wakeup_fd(wake_write)
        try:
            rows = changes.follow_changes(
                lambda: _connect_session(ctx),
                after,
                stop,
                wake_fd=wake_read,
                on_lost=reconnecting,
            )
            _echo_changes(rows, as_json)
        finally:
            signal.set_wakeup_fd(previous_wake_fd)
            os.close(wake_read)
            os.close(wake_write)


def _connect_reader(ctx: base.Context) -> db.Connection:
    """The connection the feed is read on, in autocommit (one statement, one snapshot)."""
    conn = base.open_connection(ctx, "webhook-sync changes")
    conn.autocommit = True
    return conn


def _connect_session(ctx: base.Context) -> tuple[db.Connection, db.Connection]:
    """A follower's reader and its LISTEN connection (both autocommit); none left open
    when the second cannot be opened."""
    reader = _connect_reader(ctx)
    try:
        listener = base.open_connection(ctx, "webhook-sync changes --follow")
    except BaseException:
        reader.close()
        raise
    listener.autocommit = True
    return reader, listener


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
