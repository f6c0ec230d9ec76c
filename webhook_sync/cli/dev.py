"""The local Replicate: `simulator`, `trigger` and `demo`.

The development wing is imported inside each command, not here: every `webhook-sync`
process (the release step, the worker, `--help`) builds this group, and importing the
simulator, flask and the demo just to list them was most of that start-up.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from webhook_sync.cli import base
from webhook_sync.dev import trigger_events

SHARE = click.FloatRange(0, 1)


@base.main.command("simulator", context_settings={"show_default": True})
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8090, show_default=True)
@click.option("--seed", type=int, help="Repeat ids, outcomes and webhook faults of a run.")
@click.option(
    "--secret",
    help="Signing secret whsec_… (a development one)  [default: the published dev secret]",
)
@click.option("--token", "tokens", multiple=True, help="Accepted API token (repeatable).")
@click.option("--start-seconds", type=click.FloatRange(min=0), default=2.0, help="In starting.")
@click.option("--train-seconds", type=click.FloatRange(min=0), default=20.0, help="Processing.")
@click.option("--fail-rate", type=SHARE, default=0.1, help="Share of trainings that fail.")
@click.option("--abort-rate", type=SHARE, default=0.0, help="Share aborted before they start.")
@click.option("--null-logs-rate", type=SHARE, default=0.0, help="Share showing `logs: null`.")
@click.option(
    "--starting-webhook-rate",
    type=SHARE,
    default=0.0,
    help="Share whose start webhook goes on creation, saying starting.",
)
@click.option("--drop-rate", type=SHARE, default=0.0, help="Share of webhooks never sent.")
@click.option("--duplicate-rate", type=SHARE, default=0.0, help="Share sent twice.")
@click.option("--delay-rate", type=SHARE, default=0.0, help="Share sent --delay-seconds late.")
@click.option("--delay-seconds", type=click.FloatRange(min=0), default=3.0, help="How late.")
@click.option("--reorder-rate", type=SHARE, default=0.0, help="Share held until after the last.")
@click.option("--latency-ms", type=click.IntRange(min=0), default=0, help="Added to API calls.")
@click.option("--error-rate", type=SHARE, default=0.0, help="Share of API calls answered 5xx.")
@click.option(
    "--gateway-error-rate", type=SHARE, default=0.0, help="Share answered a 502 HTML page."
)
@click.option("--throttle-rate", type=SHARE, default=0.0, help="Share of API calls answered 429.")
@click.option("--throttle-retry-after/--no-throttle-retry-after", default=True, show_default=True)
@click.option("--rpm", type=click.IntRange(min=0), default=3000, help="Reads per minute.")
@click.option("--create-rpm", type=click.IntRange(min=0), default=600, help="Creates per minute.")
@click.option(
    "--new-training-404-rate",
    type=SHARE,
    default=0.0,
    help="Share of new trainings that GET answers 404 at first.",
)
@click.option(
    "--new-training-404-seconds",
    type=click.FloatRange(min=0),
    default=2.0,
    help="For how long after creation.",
)
@click.option("--unauthenticated-title/--no-unauthenticated-title", default=True)
@click.option("--retry-window", type=click.FloatRange(min=0), default=60.0, help="Seconds.")
def simulator_command(
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
    from webhook_sync.dev import simulator as simulator_module

    lifecycle_keys = set(simulator_module.Lifecycle.__dataclass_fields__)
    lifecycle = {key: settings.pop(key) for key in lifecycle_keys & settings.keys()}
    settings["read_rpm"] = settings.pop("rpm")
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


@base.main.command("trigger")
@click.argument("event", type=click.Choice(trigger_events.EVENTS))
@click.option("--url", required=True, help="Where to POST (the service's webhook URL).")
@click.option("--training-id", help="The training id in the body [default: a new one].")
@click.option("--secret", help="Signing secret whsec_… [default: REPLICATE_WEBHOOK_SECRET's first]")
def trigger_command(event: str, url: str, training_id: str | None, secret: str | None) -> None:
    """Sign and send a Replicate training webhook to URL, like `stripe trigger`.

    Statuses: starting, processing, succeeded, failed, canceled. Adversarial: duplicate
    (same webhook-id twice), out-of-order (succeeded, then a late processing),
    stale-timestamp, old-secret, bad-signature, malformed-signature-header, huge-logs
    (5 MiB of logs). Prints each request and the status and body of its response.
    """
    from webhook_sync.dev import trigger as trigger_module

    trigger_module.trigger(
        event,
        url,
        secret=secret or trigger_module.configured_secret(os.environ),
        training_id=training_id,
        echo=click.echo,
    )


@base.main.command("demo", context_settings={"show_default": True})
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
def demo_command(
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
    from webhook_sync.dev import demo as demo_module

    base.logs_to_stderr()
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
