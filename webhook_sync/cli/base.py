"""What every `webhook-sync` subcommand shares: the click group, settings, output helpers."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from webhook_sync import config as config_module
from webhook_sync import (
    db,
    errors,
    logs,
)

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
    return db.connect(
        config.require_database_url(),
        application_name,
        config.statement_timeout_ms,
        schema=config.database_schema,
    )


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


def logs_to_stderr() -> None:
    """Operator commands print their report on stdout, so their log lines go to stderr."""
    for handler in logging.getLogger(logs.LOGGER_NAME).handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)
