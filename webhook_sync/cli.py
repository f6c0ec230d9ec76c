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
from webhook_sync import simulator as simulator_module
from webhook_sync import trigger as trigger_module

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


SHARE = click.FloatRange(0, 1)


@main.command("simulator", context_settings={"show_default": True})
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8090, show_default=True)
@click.option("--seed", type=int, help="Repeat ids, outcomes and webhook faults of a run.")
@click.option("--secret", help="Signing secret whsec_… [default: REPLICATE_WEBHOOK_SECRET or new]")
@click.option("--token", "tokens", multiple=True, help="Accepted API token (repeatable).")
@click.option("--start-seconds", type=click.FloatRange(min=0), default=2.0, help="In starting.")
@click.option("--train-seconds", type=click.FloatRange(min=0), default=20.0, help="Processing.")
@click.option("--fail-rate", type=SHARE, default=0.1, help="Share of trainings that fail.")
@click.option("--drop-rate", type=SHARE, default=0.0, help="Share of webhooks never sent.")
@click.option("--duplicate-rate", type=SHARE, default=0.0, help="Share sent twice.")
@click.option("--delay-rate", type=SHARE, default=0.0, help="Share sent --delay-seconds late.")
@click.option("--delay-seconds", type=click.FloatRange(min=0), default=3.0, help="How late.")
@click.option("--reorder-rate", type=SHARE, default=0.0, help="Share held until after the last.")
@click.option("--latency-ms", type=click.IntRange(min=0), default=0, help="Added to API calls.")
@click.option("--error-rate", type=SHARE, default=0.0, help="Share of API calls answered 5xx.")
@click.option("--throttle-rate", type=SHARE, default=0.0, help="Share of API calls answered 429.")
@click.option("--throttle-retry-after/--no-throttle-retry-after", default=True, show_default=True)
@click.option("--rpm", type=click.IntRange(min=0), default=3000, help="Reads per minute.")
@click.option("--create-rpm", type=click.IntRange(min=0), default=600, help="Creates per minute.")
@click.option("--retry-window", type=click.FloatRange(min=0), default=60.0, help="Seconds.")
@pass_context
def simulator_command(
    ctx: Context,
    host: str,
    port: int,
    seed: int | None,
    secret: str | None,
    tokens: tuple[str, ...],
    retry_window: float,
    **settings: Any,
) -> None:
    """Run the local Replicate simulator in the foreground until Ctrl-C.

    It serves the trainings API under /v1 (token: --token, default printed on start),
    signs webhooks with the secret, and takes faults on the fly at /_admin/faults.
    Rates are shares from 0 to 1; an rpm of 0 means no limit.
    """
    lifecycle = {key: settings.pop(key) for key in ("start_seconds", "train_seconds", "fail_rate")}
    settings["read_rpm"] = settings.pop("rpm")
    with failures_exit(ctx):
        simulator_module.run(
            host=host,
            port=port,
            seed=seed,
            secret=secret,
            tokens=tokens,
            lifecycle=lifecycle,
            faults=settings,
            retry_window_seconds=retry_window,
            environ=os.environ,
            echo=click.echo,
        )


@main.command("trigger")
@click.argument("event", type=click.Choice(trigger_module.EVENTS))
@click.option("--url", required=True, help="Where to POST (the service's webhook URL).")
@click.option("--training-id", help="The training id in the body [default: a new one].")
@click.option("--secret", help="Signing secret whsec_… [default: REPLICATE_WEBHOOK_SECRET's first]")
@pass_context
def trigger_command(
    ctx: Context, event: str, url: str, training_id: str | None, secret: str | None
) -> None:
    """Sign and send a Replicate training webhook to URL, like `stripe trigger`.

    Statuses: starting, processing, succeeded, failed, canceled. Adversarial: duplicate
    (same webhook-id twice), out-of-order (succeeded, then a late processing),
    stale-timestamp, old-secret, bad-signature, malformed-signature-header, huge-logs
    (5 MiB of logs). Prints each request and the status and body of its response.
    """
    with failures_exit(ctx):
        trigger_module.trigger(
            event,
            url,
            secret=secret or trigger_module.configured_secret(os.environ),
            training_id=training_id,
            echo=click.echo,
        )
