"""The poller: `worker`, `sweep` and `sync`."""

from __future__ import annotations

import sys

import click

from webhook_sync import db, logs, replicate, sweep, sync
from webhook_sync.cli import base
from webhook_sync.vocabulary import Outcome


@base.main.command("worker")
@base.pass_context
def worker_command(ctx: base.Context) -> None:
    """Run the poller (the Procfile's `worker:`): a sweep at start and then every
    POLL_INTERVAL_SECONDS, and the inbox prune daily.

    SIGTERM or SIGINT: no new sweep starts, the running one finishes or hands its leases
    back within 20 s. Exit codes: 0 stopped by a signal, 1 configuration error.
    """
    # Imported here: the worker brings the scheduler (apscheduler) and prometheus's
    # server, which no other command needs and every CLI start would pay for.
    from webhook_sync import worker

    code = worker.run_worker(ctx.config)
    sys.exit(code)


@base.main.command("sweep")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@base.pass_context
def sweep_command(ctx: base.Context, as_json: bool) -> None:
    """Run one sweep now: check every due training against Replicate and apply what it says.

    Safe beside running workers (rows are leased). Shows a progress bar on a terminal and
    prints the summary at the end. Exit codes: 0 done (failed checks are counted in
    `errors` and retried later), 1 error (e.g. REPLICATE_API_TOKEN refused).
    """
    config = ctx.config
    with base.replicate_run(
        ctx, "webhook-sync sweep", as_json=as_json, progress_file=sys.stdout
    ) as run:
        with run.conn:
            due = db.count_due_trainings(run.conn)
        with run.progressbar(max(due, 1), "sweep", show_pos=True) as bar:

            def progress(done: int, claimed: int) -> None:
                bar.length = max(bar.length or 0, claimed)
                bar.update(done - bar.pos)

            result = sweep.run_sweep(
                run.conn,
                run.client,
                sweep.SweepSettings.from_config(config),
                stop=run.stop,
                progress=progress,
            )
    fields = result.log_fields()
    text = " ".join(f"{key}={logs.format_value(value)}" for key, value in fields.items())
    base.echo_summary(fields, text, as_json=as_json)


SYNC_TABLE_COLUMNS = ("training_id", "outcome", "old_status", "new_status", "error")


@base.main.command("sync")
@click.argument("training_ids", nargs=-1, required=True, metavar="TRAINING_ID...")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per training.")
@base.pass_context
def sync_command(ctx: base.Context, training_ids: tuple[str, ...], as_json: bool) -> None:
    """Fetch TRAINING_ID ... from Replicate now, due or not, and apply what it says.

    Exit codes: 0 every training was fetched and decided, 1 error (a fetch failed, a
    training is not tracked, or REPLICATE_API_TOKEN was refused).
    """
    base.logs_to_stderr()
    config = ctx.config
    client = replicate.ReplicateClient.from_config(config)
    conn = base.open_connection(ctx, "webhook-sync sync")
    try:
        results = sync.sync_trainings(
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
            base.echo_json(row)
    else:
        click.echo(base.format_table(rows, SYNC_TABLE_COLUMNS))
    if any(result.outcome in (Outcome.ERROR, Outcome.PENDING) for result in results):
        sys.exit(1)
