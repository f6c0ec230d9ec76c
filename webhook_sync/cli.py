"""The `webhook-sync` command: each subcommand builds a Config and calls service."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from webhook_sync import config as config_module
from webhook_sync import (
    db,
    doctor,
    errors,
    logs,
    migrations,
    operations,
    replicate,
    service,
    sweep,
    worker,
)
from webhook_sync import demo as demo_module
from webhook_sync import replay as replay_module
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


# --- the operator's tools: replay, events, prune, doctor --------------------------------


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


# A duration such as 30d, 12h, 90m or 1d12h.
DURATION = ParsedType("duration", operations.parse_duration)
# An ISO time (UTC unless it says otherwise) or a duration ago such as 2h.
WHEN = ParsedType("when", lambda text: operations.parse_when(text, datetime.now(UTC)))


def logs_to_stderr() -> None:
    """Operator commands print their report on stdout, so their log lines go to stderr."""
    for handler in logging.getLogger(logs.LOGGER_NAME).handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)


REPLAY_TABLE_COLUMNS = ("webhook_id", "training_id", "outcome", "change", "reason")


@main.command()
@click.argument("file", required=False)
@click.option("--event", "event_id", metavar="WEBHOOK_ID", help="Re-apply this stored event.")
@click.option("--failed", is_flag=True, help="Re-apply every stored event that failed.")
@click.option("--since", type=WHEN, help="With --failed: received at or after WHEN.")
@click.option("--until", type=WHEN, help="With --failed: received before WHEN.")
@click.option(
    "--verify", is_flag=True, help="Check a saved delivery's signature first (no age limit)."
)
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_context
def replay(
    ctx: Context,
    file: str | None,
    event_id: str | None,
    failed: bool,
    since: datetime | None,
    until: datetime | None,
    verify: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Push a payload through the webhook path again: FILE (`-` for stdin) holding a
    training object or a saved delivery {"headers": {...}, "body": "<raw body>"}, a
    stored event (--event), or every failed one (--failed). It never moves a status
    backwards.

    Exit codes: 0 applied or nothing to change (with --dry-run: would be); 1 error
    (unreadable file, not JSON, not a training object, database, configuration, or an
    event failed again); 2 wrong usage; 3 refused: the signature matches no configured
    secret (nothing applied), or the status would move backwards or contradicts a
    terminal one (recorded, the row unchanged); 4 the training is not tracked: the event
    is stored as pending and applied once the printed `webhook-sync track` command runs.
    """
    logs_to_stderr()
    if sum((file is not None, event_id is not None, failed)) != 1:
        raise click.UsageError("give exactly one of FILE, --event WEBHOOK_ID or --failed")
    if (since or until) and not failed:
        raise click.UsageError("--since and --until only bound --failed")
    if verify and file is None:
        raise click.UsageError("--verify checks a saved delivery FILE")
    with failures_exit(ctx):
        verified = None
        if file is not None:
            replay_input = replay_module.load_input(file)
            if verify:
                try:
                    verified = replay_module.verify_input(replay_input, ctx.config.webhook_secrets)
                except errors.SignatureError as exc:
                    message = f"signature check failed: {exc}; nothing applied"
                    if as_json:
                        echo_json({"dry_run": dry_run, "verified": False, "error": message})
                    click.echo(f"refused: {message}", err=True)
                    sys.exit(replay_module.EXIT_REFUSED)
                if not as_json:
                    # Said before applying, so it shows even if the body then proves unusable.
                    click.echo(
                        f"signature ok: secret #{verified.secret_position} signed"
                        f" {verified.webhook_id} at {verified.signed_at:%Y-%m-%d %H:%M:%S} UTC"
                        " (age not checked)"
                    )
        conn = open_connection(ctx, "webhook-sync replay")
        try:
            if file is not None:
                signed_at = verified.signed_at if verified else None
                reports = [
                    replay_module.replay_payload(
                        conn, replay_input, dry_run=dry_run, signed_at=signed_at
                    )
                ]
            elif event_id is not None:
                reports = [replay_module.replay_event(conn, event_id, dry_run=dry_run)]
            else:
                reports = replay_module.replay_failed(
                    conn, since=since, until=until, dry_run=dry_run
                )
        finally:
            conn.close()
    code = replay_module.exit_code(reports)
    if as_json:
        echo_json(
            {
                "dry_run": dry_run,
                "verified": None
                if verified is None
                else {
                    "secret": verified.secret_position,
                    "webhook_id": verified.webhook_id,
                    "signed_at": verified.signed_at,
                },
                "results": [report.as_dict() for report in reports],
                "summary": replay_module.summarize(reports),
                "exit_code": code,
            }
        )
    else:
        if file is not None:
            echo_replay_report(reports[0])
        else:
            echo_replay_batch(reports, dry_run)
    sys.exit(code)


def echo_replay_report(report: replay_module.ReplayReport) -> None:
    """Print one replay for people: the outcome, why, and each field before and after."""
    suffix = " (dry run)" if report.dry_run else ""
    click.echo(f"{report.outcome}{suffix}: {replay_module.describe(report)}")
    if report.webhook_id:
        click.echo(f"inbox event: {report.webhook_id}")
    if report.changes:
        rows = [{"field": name, "before": old, "after": new} for name, old, new in report.changes]
        click.echo(format_table(rows, ("field", "before", "after")))


def echo_replay_batch(reports: list[replay_module.ReplayReport], dry_run: bool) -> None:
    """Print one line per replayed event and a summary."""
    rows = [
        {
            "webhook_id": report.webhook_id,
            "training_id": report.training_id,
            "outcome": report.outcome,
            "change": replay_status_change(report),
            "reason": report.reason,
        }
        for report in reports
    ]
    if rows:
        click.echo(format_table(rows, REPLAY_TABLE_COLUMNS))
    counts = replay_module.summarize(reports)
    breakdown = ", ".join(f"{count} {outcome}" for outcome, count in counts.items())
    click.echo(
        f"summary: {len(reports)} event(s)"
        + (f": {breakdown}" if breakdown else "")
        + ("; dry run, nothing written" if dry_run else "")
    )
    for report in reports:
        if report.outcome == replay_module.PENDING:
            click.echo(f"not tracked: {replay_module.track_command(report.training_id)}")


def replay_status_change(report: replay_module.ReplayReport) -> str | None:
    """`before -> after` of the Replicate status, when the replay moves it."""
    for name, old, new in report.changes:
        if name == "replicate_status":
            return f"{old or 'none'} -> {new}"
    return None


EVENTS_TABLE_COLUMNS = (
    "received_at",
    "webhook_id",
    "training_id",
    "source",
    "reported_status",
    "outcome",
    "attempts",
    "error",
)


@main.command()
@click.option("--training", "training_id", metavar="ID", help="Only this training's events.")
@click.option("--outcome", type=click.Choice(operations.EVENT_OUTCOMES), help="Only this outcome.")
@click.option("--since", type=WHEN, help="Received at or after WHEN (2h, ISO time).")
@click.option("--until", type=WHEN, help="Received before WHEN.")
@click.option(
    "--limit", default=100, show_default=True, type=click.IntRange(min=1), help="At most N."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@pass_context
def events(
    ctx: Context,
    training_id: str | None,
    outcome: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    as_json: bool,
) -> None:
    """Show what the inbox holds, newest first: each delivery or replay, the status it
    reported, and what processing it did (its outcome, attempts and error).

    Exit codes: 0 shown (also when nothing matches), 1 error, 2 wrong usage.
    """
    logs_to_stderr()
    with failures_exit(ctx):
        conn = open_connection(ctx, "webhook-sync events")
        try:
            rows = operations.list_events(
                conn,
                training_id=training_id,
                outcome=outcome,
                since=since,
                until=until,
                limit=limit,
            )
        finally:
            conn.close()
    if as_json:
        for row in rows:
            echo_json({column: row.get(column) for column in db.EVENT_COLUMNS})
    elif rows:
        click.echo(format_table(rows, EVENTS_TABLE_COLUMNS))
    else:
        click.echo("no events match")


@main.command()
@click.option(
    "--older-than",
    type=DURATION,
    help="Delete events received longer ago than this (30d, 12h) [default: EVENT_RETENTION_DAYS].",
)
@click.option("--dry-run", is_flag=True, help="Only count them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_context
def prune(ctx: Context, older_than: timedelta | None, dry_run: bool, as_json: bool) -> None:
    """Delete inbox events past retention, whatever their outcome (the worker does this
    daily); trainings and their transition history are kept.

    Exit codes: 0 pruned (also when nothing was old enough), 1 error, 2 wrong usage.
    """
    logs_to_stderr()
    with failures_exit(ctx):
        age = older_than or timedelta(days=ctx.config.event_retention_days)
        conn = open_connection(ctx, "webhook-sync prune")
        try:
            count = operations.prune_events(conn, age, dry_run=dry_run)
        finally:
            conn.close()
    shown = operations.format_duration(age)
    if as_json:
        echo_json(
            {
                "deleted": 0 if dry_run else count,
                "matched": count,
                "older_than": shown,
                "dry_run": dry_run,
            }
        )
    else:
        verb = "would delete" if dry_run else "deleted"
        click.echo(f"{verb} {count} inbox event(s) received more than {shown} ago")


@main.command("doctor")
@click.option(
    "--clock-tolerance",
    type=DURATION,
    default="5s",
    show_default=True,
    help="Largest accepted difference from the database's clock.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=doctor.DEFAULT_HTTP_TIMEOUT,
    show_default=True,
    help="Seconds to wait for Replicate.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_context
def doctor_command(ctx: Context, clock_tolerance: timedelta, timeout: float, as_json: bool) -> None:
    """Check the setup, one line per check: configuration complete, database reachable and
    migrated, Replicate token valid, webhook secret matching Replicate's (neither is
    printed), clock agreeing with the database's, stuck trainings and failed inbox events
    (these two only warn).

    Exit codes: 0 every check passed (warnings allowed), 1 the doctor itself failed,
    2 wrong usage, 3 at least one check failed.
    """
    logs_to_stderr()
    with failures_exit(ctx):
        checks = doctor.run_checks(
            os.environ, clock_tolerance=clock_tolerance, http_timeout=timeout
        )
    broken = doctor.failed(checks)
    if as_json:
        echo_json({"ok": not broken, "checks": [check.as_dict() for check in checks]})
    else:
        width = max(len(check.name) for check in checks)
        for check in checks:
            click.echo(f"{check.status:<4}  {check.name:<{width}}  {check.detail}")
    sys.exit(3 if broken else 0)


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


@main.command("demo", context_settings={"show_default": True})
@click.option(
    "--webhook-url",
    default=lambda: f"http://127.0.0.1:{os.environ.get('PORT') or 8000}/webhooks/replicate",
    help="The service's webhook URL  [default: http://127.0.0.1:${PORT:-8000}/webhooks/replicate]",
    show_default=False,
)
@click.option("--count", type=click.IntRange(1, 100), default=6, help="Trainings to create.")
@click.option("--drop-rate", type=click.FloatRange(0, 1), default=0.5, help="Webhooks dropped.")
@click.option(
    "--finish-in",
    type=(click.FloatRange(min=0), click.FloatRange(min=0)),
    default=(15.0, 45.0),
    help="The trainings end between MIN and MAX seconds from now.",
)
@click.option("--timeout", type=click.FloatRange(min=1), default=600.0, help="Seconds to watch.")
@click.option("--user", "user_id", default="demo-user", help="The user the trainings belong to.")
@pass_context
def demo_command(
    ctx: Context,
    webhook_url: str,
    count: int,
    drop_rate: float,
    finish_in: tuple[float, float],
    timeout: float,
    user_id: str,
) -> None:
    """Create trainings in the local simulator with webhooks dropped, and watch them converge.

    Needs `make run` (or a simulator at REPLICATE_API_BASE_URL and DATABASE_URL) running.
    Prints each change and, at the end, which rows a webhook completed and which the
    poller repaired. Exit codes: 0 every row reached its final status, 1 otherwise.
    """
    logs_to_stderr()
    with failures_exit(ctx):
        converged = demo_module.run_demo(
            environ=os.environ,
            webhook_url=webhook_url,
            count=count,
            drop_rate=drop_rate,
            finish_in=finish_in,
            timeout=timeout,
            user_id=user_id,
            echo=click.echo,
        )
    sys.exit(0 if converged else 1)


# --- the poller: worker, sweep, sync ---------------------------------------------------


@main.command("worker")
@pass_context
def worker_command(ctx: Context) -> None:
    """Run the poller (the Procfile's `worker:`): a sweep at start and then every
    POLL_INTERVAL_SECONDS, and the inbox prune daily.

    SIGTERM or SIGINT: no new sweep starts, the running one finishes or hands its leases
    back within 20 s. Exit codes: 0 stopped by a signal, 1 configuration error.
    """
    with failures_exit(ctx):
        code = worker.run_worker(ctx.config)
    sys.exit(code)


@main.command("sweep")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@pass_context
def sweep_command(ctx: Context, as_json: bool) -> None:
    """Run one sweep now: check every due training against Replicate and apply what it says.

    Safe beside running workers (rows are leased). Shows a progress bar on a terminal and
    prints the summary at the end. Exit codes: 0 done (failed checks are counted in
    `errors` and retried later), 1 error (e.g. REPLICATE_API_TOKEN refused).
    """
    logs_to_stderr()
    interactive = sys.stdout.isatty() and not as_json
    if interactive and not ctx.verbose:
        # One line per training would tear the progress bar apart.
        logging.getLogger(logs.LOGGER_NAME).setLevel(logging.WARNING)
    with failures_exit(ctx):
        config = ctx.config
        stop = threading.Event()
        client = replicate.ReplicateClient.from_config(config, stop=stop)
        conn = open_connection(ctx, "webhook-sync sweep")
        # Ctrl-C stops the sweep as SIGTERM stops a worker: leases handed back, summary shown.
        signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
        try:
            with conn:
                due = db.count_due_trainings(conn)
            with click.progressbar(
                length=max(due, 1), label="sweep", show_pos=True, hidden=not interactive
            ) as bar:

                def progress(done: int, claimed: int) -> None:
                    bar.length = max(bar.length or 0, claimed)
                    bar.update(done - bar.pos)

                result = sweep.run_sweep(
                    conn,
                    client,
                    sweep.SweepSettings.from_config(config),
                    stop=stop,
                    progress=progress,
                )
        finally:
            conn.close()
            client.close()
    fields = result.log_fields()
    if as_json:
        echo_json(fields)
    else:
        click.echo(" ".join(f"{key}={logs.format_value(value)}" for key, value in fields.items()))


SYNC_TABLE_COLUMNS = ("training_id", "outcome", "old_status", "new_status", "error")


@main.command("sync")
@click.argument("training_ids", nargs=-1, required=True, metavar="TRAINING_ID...")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per training.")
@pass_context
def sync_command(ctx: Context, training_ids: tuple[str, ...], as_json: bool) -> None:
    """Fetch TRAINING_ID ... from Replicate now, due or not, and apply what it says.

    Exit codes: 0 every training was fetched and decided, 1 error (a fetch failed, a
    training is not tracked, or REPLICATE_API_TOKEN was refused).
    """
    logs_to_stderr()
    with failures_exit(ctx):
        config = ctx.config
        client = replicate.ReplicateClient.from_config(config)
        conn = open_connection(ctx, "webhook-sync sync")
        try:
            results = sweep.sync_trainings(
                conn, client, list(training_ids), sweep.SweepSettings.from_config(config)
            )
        finally:
            conn.close()
            client.close()
    rows = [
        {column: getattr(result, column) for column in SYNC_TABLE_COLUMNS} for result in results
    ]
    if as_json:
        for row in rows:
            echo_json(row)
    else:
        click.echo(format_table(rows, SYNC_TABLE_COLUMNS))
    if any(result.outcome in ("error", service.UNKNOWN) for result in results):
        sys.exit(1)
