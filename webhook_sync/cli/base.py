"""What every `webhook-sync` subcommand shares: the click group, settings, output helpers."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TextIO

import click
import psycopg2

from webhook_sync import config as config_module
from webhook_sync import (
    db,
    errors,
    logs,
    redaction,
    replicate,
)

EXIT_CODES_HELP = (
    "Exit codes: 0 success, 1 error (a one-line cause is printed; -v adds the traceback),"
    " 2 wrong usage or a HOST_* binding the database does not take."
)
# A wrong binding is a wrong setting, not a failure: the process must not be restarted
# as it is (the same exit code as a wrong usage, and the gunicorn master's).
EXIT_WRONG_BINDING = 2
# click's own ways out of a command (an exit code, ^C, its errors): not ours to catch.
CLICK_FLOW = (click.exceptions.Exit, click.exceptions.Abort, click.ClickException)


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


def exit_on_error(exc: Exception, *, verbose: bool) -> NoReturn:
    """Print an error's cause in one line (a database error through the redactor; an
    unmigrated database says what to run), or with -v the traceback with every message
    redacted, on stderr; exit 1 (2 and the one line for a wrong HOST_* binding)."""
    url = os.environ.get("DATABASE_URL")
    if isinstance(exc, errors.HostBindingError):
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_WRONG_BINDING)
    if verbose:
        click.echo(redaction.format_traceback(exc, url).rstrip(), err=True)
        sys.exit(1)
    cause = _driver_cause(exc)
    if isinstance(cause, db.NOT_MIGRATED_ERRORS):
        message = (
            "the database is not migrated (our schema or a table of it is missing):"
            " run `webhook-sync migrate`"
        )
    elif isinstance(exc, errors.WebhookSyncError | OSError):
        message = redaction.error_message(exc, url)
    elif cause is not None:
        message = f"database error: {redaction.describe_error(cause, url)}"
    else:
        message = f"unexpected {redaction.describe_error(exc, url)} (-v shows the traceback)"
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _driver_cause(exc: BaseException) -> psycopg2.Error | None:
    """The database driver's error that `exc` is, or was raised from."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, psycopg2.Error):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class Group(click.Group):
    """The `webhook-sync` group and the CLI's one error boundary: any error a command (or a
    subgroup's command) raises is reported by `exit_on_error` (one line, exit code 1), a wrong
    usage one line and exit code 2. Commands therefore catch nothing themselves."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            where = f" (see {exc.ctx.command_path} --help)" if exc.ctx else ""
            click.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        except CLICK_FLOW:
            raise
        except Exception as exc:  # the process edge: every failure becomes one redacted line
            exit_on_error(exc, verbose=bool(ctx.params.get("verbose")))


class ParsedType(click.ParamType):
    """An option value read by a parser that raises ValueError, which click reports as usage."""

    def __init__(self, name: str, parse: Callable[[str], Any]) -> None:
        self.name = name
        self.parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return self.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def echo_json(obj: Any) -> None:
    """Print one JSON object on one line (dates as ISO strings)."""
    click.echo(json.dumps(obj, default=lambda value: value.isoformat(), sort_keys=False))


@click.group(cls=Group, epilog=EXIT_CODES_HELP)
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
        host=config.host_binding,
    )


def echo_rows(
    rows: list[dict[str, Any]],
    json_columns: tuple[str, ...],
    table_columns: tuple[str, ...],
    *,
    as_json: bool,
    none_match: str | None = None,
) -> None:
    """Print a listing: each row as one JSON object of `json_columns` with --json, else a
    table of `table_columns`; `none_match` (if given) instead of an empty table."""
    if as_json:
        for row in rows:
            echo_json({column: row.get(column) for column in json_columns})
    elif rows:
        click.echo(format_table(rows, table_columns))
    elif none_match is not None:
        click.echo(none_match)


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


@dataclass(frozen=True)
class ReplicateRun:
    """What a one-off command working through Replicate holds: its database connection, its
    Replicate client, the event Ctrl-C sets, and where (if anywhere) its progress bar shows."""

    conn: db.Connection
    client: replicate.ReplicateClient
    stop: threading.Event
    progress_file: TextIO
    interactive: bool

    def progressbar(self, length: int, label: str, **options: Any) -> Any:
        """A click progress bar on `progress_file`, drawn only on a terminal without --json."""
        return click.progressbar(
            length=length,
            label=label,
            hidden=not self.interactive,
            file=self.progress_file,
            **options,
        )


@contextmanager
def replicate_run(
    ctx: Context, application_name: str, *, as_json: bool, progress_file: TextIO
) -> Iterator[ReplicateRun]:
    """Set up a one-off command that works through Replicate (`sweep`, `import`): log lines
    to stderr, only warnings while a progress bar is drawn (unless -v); a Replicate client
    and a database connection, both closed on the way out; and Ctrl-C setting `stop`
    instead of interrupting, as SIGTERM stops a worker (leases handed back, the summary
    still printed), until the command is done."""
    logs_to_stderr()
    interactive = progress_file.isatty() and not as_json
    if interactive and not ctx.verbose:
        # One line per training would tear the progress bar apart.
        logging.getLogger(logs.LOGGER_NAME).setLevel(logging.WARNING)
    stop = threading.Event()
    client = replicate.ReplicateClient.from_config(ctx.config, stop=stop)
    try:
        conn = open_connection(ctx, application_name)
        try:
            with signals_set(stop, signal.SIGINT):
                yield ReplicateRun(conn, client, stop, progress_file, interactive)
        finally:
            conn.close()
    finally:
        client.close()


@contextmanager
def signals_set(stop: threading.Event, *signums: signal.Signals) -> Iterator[None]:
    """While the block runs, each of `signums` sets `stop` instead of its usual effect;
    the handlers it replaced are back afterwards (a command leaves the process as it was)."""
    previous = {
        signum: signal.signal(signum, lambda _signum, _frame: stop.set()) for signum in signums
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def echo_summary(fields: dict[str, Any], text: str, *, as_json: bool) -> None:
    """Print a command's summary: `fields` as one JSON object with --json, else `text`."""
    if as_json:
        echo_json(fields)
    else:
        click.echo(text)
