"""Prometheus counters and histograms, in multi-process mode when PROMETHEUS_MULTIPROC_DIR is set.

Under gunicorn each worker writes its samples to files in PROMETHEUS_MULTIPROC_DIR (the
gunicorn config creates a temporary one when it is unset) and `/metrics` adds them up,
so any worker answers for all of them. Every metric has labels, so nothing is written
until a value is first counted: importing this module touches no file.
"""

from __future__ import annotations

import functools
import os
import threading
from http import HTTPStatus
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from webhook_sync.vocabulary import AppStatus, Source

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

DELIVERIES = Counter(
    "webhook_sync_webhook_deliveries_total",
    "Webhook deliveries answered, by result (applied, duplicate, pending, … or the refusal).",
    ["result"],
)
VERIFICATION_FAILURES = Counter(
    "webhook_sync_webhook_verification_failures_total",
    "Webhook deliveries refused before their body was trusted, by reason.",
    ["reason"],
)
REQUEST_LATENCY = Histogram(
    "webhook_sync_http_request_duration_seconds",
    "Time to answer an HTTP request, by route, method and status code.",
    ["route", "method", "status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0),
)
TRANSITIONS = Counter(
    "webhook_sync_status_transitions_total",
    "Status reports decided by the one funnel, by source (webhook, poll, replay, track)"
    " and outcome (applied, unchanged, ignored, conflict, unknown).",
    ["source", "outcome"],
)


# Per request, `.labels()` takes the metric's lock and validates its arguments every time;
# this remembers each label set's child instead. Its keys come from fixed sets (the
# webhook's results and refusal reasons, a transition's source and outcome, the normalised
# route, method and status below), and the bound keeps them small whatever a bug passes.
_BOUND_LABEL_SETS = 1024  # for the four metrics below together


@functools.lru_cache(maxsize=_BOUND_LABEL_SETS)
def _child(metric: Any, **labels: str) -> Any:
    """`metric.labels(**labels)`, looked up once per label set."""
    return metric.labels(**labels)


def count_delivery(result: str) -> None:
    """Count one answered webhook delivery."""
    _child(DELIVERIES, result=result).inc()


def count_verification_failure(reason: str) -> None:
    """Count one delivery refused by the signature checks."""
    _child(VERIFICATION_FAILURES, reason=reason).inc()


# Label values come from fixed sets: gunicorn accepts any method of 3 to 20 letters, and
# each new label value is a new series, so unsigned traffic could grow /metrics at will.
METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS"})
OTHER = "other"
_STATUSES = frozenset(str(code.value) for code in HTTPStatus)


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """Record how long one HTTP request took; `route` is the matched rule or `unmatched`,
    any method outside METHODS counts as `other`, any unknown status code as `other`."""
    status_text = str(status)
    _child(
        REQUEST_LATENCY,
        route=route,
        method=method if method in METHODS else OTHER,
        status=status_text if status_text in _STATUSES else OTHER,
    ).observe(seconds)


def count_transition(source: str, outcome: str) -> None:
    """Count one status report decided by `service.apply_update` (it calls this itself)."""
    _child(TRANSITIONS, source=source, outcome=outcome).inc()


def render() -> tuple[bytes, str]:
    """The exposition text for every process of this server, and its content type."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Tell the multi-process collector that a worker is gone (gunicorn's child_exit hook)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)


# --- the poller's delivery-gap telemetry (the worker process) ---------------------------

MISSED_WEBHOOKS = Counter(
    "webhook_sync_missed_webhooks_total",
    "Terminal statuses reached by the poller rather than by a webhook: webhooks that never"
    " arrived (or arrived later than the poll), by the terminal status reached.",
    ["status"],
)
TERMINAL_LAG = Histogram(
    "webhook_sync_terminal_lag_seconds",
    "From Replicate's completed_at to our update of the row, by the source that made it.",
    ["source"],
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 6 * 3600, 24 * 3600),
)
# Gauges the worker publishes, created on first use (a gauge writes its file when it is
# created, and importing this module touches no file); by name.
_gauges: dict[str, Gauge] = {}
_gauges_lock = threading.Lock()


def _set_gauge(name: str, documentation: str, value: float) -> None:
    """Set a worker-published gauge (the highest value across processes wins)."""
    with _gauges_lock:
        gauge = _gauges.get(name)
        if gauge is None:
            gauge = _gauges[name] = Gauge(name, documentation, multiprocess_mode="max")
        gauge.set(value)


def observe_terminal_update(source: str, new_status: str, lag_seconds: float | None) -> None:
    """Record a row reaching a terminal status: its lag by source, and a missed webhook when
    the poller got there first."""
    if source == Source.POLL:
        MISSED_WEBHOOKS.labels(status=new_status).inc()
    if lag_seconds is not None:
        TERMINAL_LAG.labels(source=source).observe(max(0.0, lag_seconds))


ADOPTIONS = Counter(
    "webhook_sync_trainings_adopted_total",
    "Trainings we started tracking without a `track` call, by how their user was found:"
    " host_table (a row in flight in HOST_TABLE), webhook_url or destination.",
    ["how"],
)
# The `how` label's values: a fixed set, so no input can grow /metrics.
ADOPTION_WAYS = frozenset({"host_table", "webhook_url", "destination"})


def count_adoptions(how: str, count: int = 1) -> None:
    """Count trainings adopted one way (`how`, one of ADOPTION_WAYS; else `other`)."""
    ADOPTIONS.labels(how=how if how in ADOPTION_WAYS else OTHER).inc(count)


def set_stuck_trainings(count: int) -> None:
    """Publish how many trainings are in `training` past STUCK_AFTER_SECONDS (last sweep)."""
    _set_gauge(
        "webhook_sync_stuck_trainings",
        "Trainings still in `training` past STUCK_AFTER_SECONDS, as of the last sweep.",
        count,
    )


# --- the outbox: notifications to the platform's app (the worker process) ---------------

NOTIFICATIONS = Counter(
    "webhook_sync_notifications_total",
    "Notification attempts to the platform's endpoints, by result: delivered (2xx), retry"
    " (failed, due again), dead (failed past NOTIFY_MAX_AGE), disabled (410 Gone).",
    ["result"],
)
NOTIFICATION_LAG = Histogram(
    "webhook_sync_notification_lag_seconds",
    "From a status change to its endpoint's 2xx, by event type.",
    ["event_type"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600, 6 * 3600, 24 * 3600),
)


def observe_notification(result: str, event_type: str, lag_seconds: float | None) -> None:
    """Count one notification attempt; a delivered one also records its lag."""
    NOTIFICATIONS.labels(result=result).inc()
    if lag_seconds is not None:
        NOTIFICATION_LAG.labels(event_type=event_type).observe(max(0.0, lag_seconds))


# --- the platform's bound table (HOST_*) -----------------------------------------------

HOST_ROWS_MISSING = Counter(
    "webhook_sync_host_rows_missing_total",
    "Status changes whose training has no row in the platform's bound table (HOST_TABLE):"
    " ours was written, theirs could not be, by source (webhook, poll, replay, track).",
    ["source"],
)
HOST_REFUSALS = Counter(
    "webhook_sync_host_writes_refused_total",
    "Writes the platform's bound table refused (a constraint, a trigger, a permission):"
    " nothing was written and the write is retried, by source (webhook, poll, replay,"
    " track: a status change; reconcile: a sweep's correction of rows left in flight).",
    ["source"],
)
HOST_ROWS_RECONCILED = Counter(
    "webhook_sync_host_rows_reconciled_total",
    "Rows of the platform's bound table a sweep found still in flight while we track their"
    " training as finished, and wrote as the mirror would, by our status written"
    " (completed, failed, canceled).",
    ["status"],
)
# The `status` label's values: our finished statuses, a fixed set.
_RECONCILED_STATUSES = frozenset(AppStatus) - {AppStatus.TRAINING}


def count_host_row_missing(source: str) -> None:
    """Count one status change that found no host row to mirror it to."""
    HOST_ROWS_MISSING.labels(source=source).inc()


def count_host_refusal(source: str) -> None:
    """Count one write refused by the host's table."""
    HOST_REFUSALS.labels(source=source).inc()


def count_host_rows_reconciled(status: str, count: int) -> None:
    """Count host rows a sweep corrected to one of our finished statuses (`status`; any
    other value counts as `other`)."""
    HOST_ROWS_RECONCILED.labels(status=status if status in _RECONCILED_STATUSES else OTHER).inc(
        count
    )
