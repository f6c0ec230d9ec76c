"""The `webhook-sync` command: each subcommand builds a Config and calls service."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import click

from webhook_sync import config as config_module
from webhook_sync import db, errors, logs, migrations, service

EXIT_CODES_HELP = (
    "Exit codes: 0 success, 1 error (a short cause is printed; -v adds the traceback)."
)


class Context:
    """What every subcommand shares: the settings and the verbosity flag."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self._config: config_module.Config | None = None

    @property
    def config(self) -> config_module.Config:
        """The settings from the environment, read once."""
        if self._config is None:
            self._config = config_module.Config.from_env(os.environ)
        return self._config


@contextmanager
def failures_exit(ctx: Context) -> Iterator[None]:
    """Turn our errors into a short message and exit code 1 (a traceback only with -v)."""
    try:
        yield
    except (errors.WebhookSyncError, OSError) as exc:
        if ctx.verbose:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def echo_json(obj: Any) -> None:
    """Print one JSON object on one line (dates as ISO strings)."""
    click.echo(json.dumps(obj, default=lambda value: value.isoformat(), sort_keys=False))


@click.group(epilog=EXIT_CODES_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def main(click_ctx: click.Context, verbose: bool) -> None:
    """Keep Replicate training status in PostgreSQL in sync."""
    click_ctx.obj = Context(verbose)
    level = "DEBUG" if verbose else os.environ.get("LOG_LEVEL", "INFO").upper()
    logs.configure(
        level if level in {"DEBUG", "INFO", "WARNING", "ERROR"} else "INFO",
        os.environ.get("LOG_FORMAT", "kv").lower(),
    )


pass_context = click.make_pass_decorator(Context)


def open_connection(ctx: Context, application_name: str = "webhook-sync cli") -> db.Connection:
    """Connect to DATABASE_URL with the configured statement timeout."""
    config = ctx.config
    return db.connect(config.require_database_url(), application_name, config.statement_timeout_ms)


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    """Render rows as an aligned text table for people."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if hasattr(value, "isoformat"):
            return value.strftime("%Y-%m-%d %H:%M:%S")
        text = str(value).replace("\n", " ")
        return text if len(text) <= 60 else text[:57] + "..."

    table = [list(columns)] + [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(value.ljust(width) for value, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


@main.command()
@pass_context
def migrate(ctx: Context) -> None:
    """Apply pending migrations from sql/ (safe to run twice or concurrently).

    Exit codes: 0 applied or nothing to do, 1 a migration failed (its name and the
    PostgreSQL error are printed).
    """
    with failures_exit(ctx):
        conn = open_connection(ctx, "webhook-sync migrate")
        try:
            applied = migrations.migrate(conn)
        finally:
            conn.close()
        click.echo(
            f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else "")
        )


@main.command()
@click.argument("training_id")
@click.option("--user", "user_id", required=True, help="The host platform's user id.")
@click.option("--destination", help="The destination model, owner/name.")
@click.option("--json", "as_json", is_flag=True, help="Print the row as one JSON object.")
@pass_context
def track(
    ctx: Context, training_id: str, user_id: str, destination: str | None, as_json: bool
) -> None:
    """Register TRAINING_ID in the `training` state (idempotent) and print its row.

    Webhooks that arrived before the training was tracked are applied now.
    Exit codes: 0 tracked (or already tracked), 1 error.
    """
    with failures_exit(ctx):
        conn = open_connection(ctx)
        try:
            with conn:
                row, created = service.track_training(conn, training_id, user_id, destination)
        finally:
            conn.close()
        if as_json:
            echo_json({column: row.get(column) for column in db.TRAINING_COLUMNS})
        else:
            click.echo(("tracked" if created else "already tracked") + f" {training_id}")
            click.echo(format_table([row], STATUS_TABLE_COLUMNS))


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


@main.command("status")
@click.argument("training_ids", nargs=-1)
@click.option(
    "--stuck", is_flag=True, help="Only trainings in `training` past STUCK_AFTER_SECONDS."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, keys as columns.")
@click.option("--limit", default=1000, show_default=True, help="At most this many rows.")
@pass_context
def status_command(
    ctx: Context, training_ids: tuple[str, ...], stuck: bool, as_json: bool, limit: int
) -> None:
    """Show training rows (all, or the given ids).

    Exit codes: 0 shown, 1 error or (with ids) none of them is tracked.
    """
    with failures_exit(ctx):
        conn = open_connection(ctx)
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
        if as_json:
            for row in rows:
                echo_json({column: row.get(column) for column in db.TRAINING_COLUMNS})
        elif rows:
            click.echo(format_table(rows, STATUS_TABLE_COLUMNS))
        missing = set(training_ids) - {row["id"] for row in rows}
        for training_id in sorted(missing):
            click.echo(f"not tracked: {training_id}", err=True)
        if training_ids and not rows:
            sys.exit(1)
