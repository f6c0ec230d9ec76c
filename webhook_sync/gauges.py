"""Gauges of the whole system read from the database when /metrics is scraped, so that
one scrape of the public web process shows the workers too (worker dynos take no inbound
traffic): the last finished sweep, trainings due, stuck and needing attention, recent
conflicts and terminal transitions by source, failed inbox events, undelivered
notifications. Read in one read-only transaction; nothing is cached between scrapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta

import psycopg2
import psycopg2.errors
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from webhook_sync import db, heartbeat
from webhook_sync.config import Config
from webhook_sync.vocabulary import Outcome

PREFIX = "webhook_sync_"
# Recent figures (conflicts, terminal transitions by source) are counted over this window.
RECENT = timedelta(hours=1)

_COUNT_TRAININGS = (
    "SELECT"
    " count(*) FILTER (WHERE next_check_at <= now()) AS due,"
    " count(*) FILTER (WHERE created_at < now() - make_interval(secs => %(stuck)s)) AS stuck,"
    " count(*) FILTER (WHERE needs_attention IS NOT NULL) AS attention"
    " FROM {schema}.trainings WHERE training_status = {training}"
)
_COUNT_RECENT_TRANSITIONS = (
    "SELECT"
    " count(*) FILTER (WHERE outcome = 'conflict') AS conflicts,"
    " count(*) FILTER (WHERE outcome = 'applied' AND source = 'webhook'"
    "   AND to_training_status <> {training}) AS by_webhook,"
    " count(*) FILTER (WHERE outcome = 'applied' AND source = 'poll'"
    "   AND to_training_status <> {training}) AS by_poll,"
    " count(*) FILTER (WHERE outcome = 'applied' AND source = 'replay'"
    "   AND to_training_status <> {training}) AS by_replay"
    " FROM {schema}.training_transitions"
    " WHERE created_at > now() - make_interval(secs => %(recent)s)"
)
_COUNT_FAILED_EVENTS = "SELECT count(*) FROM {schema}.webhook_events WHERE outcome = %(failed)s"
# The outbox lane's table (migration 0005); absent before it is migrated.
_NOTIFICATIONS_EXIST = "SELECT to_regclass(%(name)s) IS NOT NULL"
_COUNT_UNDELIVERED = (
    "SELECT status, count(*),"
    " EXTRACT(EPOCH FROM now() - min(created_at))::double precision"
    " FROM {schema}.notifications WHERE status <> 'delivered' GROUP BY status"
)


def render(conn: db.Connection, config: Config) -> bytes:
    """The gauges in Prometheus' text format (reads only; rolls its transaction back)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Readings(read_gauges(conn, config)))
    return generate_latest(registry)


def render_unavailable(reason: str) -> bytes:
    """`webhook_sync_database_up 0` when the database cannot be read at scrape time."""
    gauge = GaugeMetricFamily(
        PREFIX + "database_up",
        "1 when /metrics could read the system's gauges from the database, else 0.",
        labels=["reason"],
    )
    gauge.add_metric([reason[:60]], 0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Readings([gauge]))
    return generate_latest(registry)


def read_gauges(conn: db.Connection, config: Config) -> list[Metric]:
    """Read every gauge in one transaction, rolled back (nothing is written)."""
    try:
        return _read(conn, config)
    finally:
        conn.rollback()


def _read(conn: db.Connection, config: Config) -> list[Metric]:
    gauges: list[Metric] = [
        _gauge("database_up", "1 when the gauges were read.", 1),
        _gauge(
            "poll_interval_seconds",
            "POLL_INTERVAL_SECONDS as this process reads it (the alerts measure sweeps by it).",
            config.poll_interval_seconds,
        ),
    ]
    latest = heartbeat.select_latest_sweep(conn)
    age = latest["age_seconds"] if latest is not None else math.inf
    gauges.append(
        _gauge(
            "worker_last_sweep_age_seconds",
            "Seconds since any worker last finished a sweep (+Inf when none ever did).",
            max(0.0, age),
        )
    )
    summary = (latest or {}).get("summary") or {}
    gauges.append(
        _gauge(
            "worker_last_sweep_duration_seconds",
            "How long the last finished sweep took.",
            float(summary.get("duration") or 0.0),
        )
    )
    failing = heartbeat.count_failing_workers(conn, 2 * config.poll_interval_seconds)
    family = GaugeMetricFamily(
        PREFIX + "workers_failing",
        "Workers whose last sweep failed within two intervals, by kind (replicate_auth: the"
        " token was refused).",
        labels=["kind"],
    )
    for kind in (heartbeat.AUTH_FAILURE, heartbeat.OTHER_FAILURE):
        family.add_metric([kind], failing.get(kind, 0))
    gauges.append(family)
    with conn.cursor() as cur:
        cur.execute(db.render(conn, _COUNT_TRAININGS), {"stuck": config.stuck_after_seconds})
        due, stuck, attention = cur.fetchone()
        cur.execute(db.render(conn, _COUNT_RECENT_TRANSITIONS), {"recent": RECENT.total_seconds()})
        conflicts, by_webhook, by_poll, by_replay = cur.fetchone()
        cur.execute(db.render(conn, _COUNT_FAILED_EVENTS), {"failed": Outcome.FAILED})
        (failed_events,) = cur.fetchone()
    gauges += [
        _gauge("trainings_due", "Trainings in `training` whose check is due now.", due),
        _gauge("trainings_stuck", "Trainings still in `training` past STUCK_AFTER_SECONDS.", stuck),
        _gauge(
            "trainings_needing_attention",
            "Trainings in `training` that a person should look at (repeated 404s).",
            attention,
        ),
        _gauge(
            "transition_conflicts_recent",
            "Status reports refused as conflicts in the last hour.",
            conflicts,
        ),
        _gauge(
            "inbox_events_failed", "Inbox events whose apply failed (replay them).", failed_events
        ),
    ]
    terminal = GaugeMetricFamily(
        PREFIX + "terminal_transitions_recent",
        "Trainings that reached a terminal status in the last hour, by the source that got"
        " there first (poll: the webhook was missed or late).",
        labels=["source"],
    )
    for source, count in (("webhook", by_webhook), ("poll", by_poll), ("replay", by_replay)):
        terminal.add_metric([source], count)
    gauges.append(terminal)
    gauges.extend(_notification_gauges(conn))
    return gauges


def _notification_gauges(conn: db.Connection) -> Iterator[Metric]:
    """Undelivered notifications by status and the oldest one's age; nothing before the
    outbox's table exists."""
    with conn.cursor() as cur:
        cur.execute(_NOTIFICATIONS_EXIST, {"name": f"{conn.schema}.notifications"})
        if not cur.fetchone()[0]:
            return
        try:
            cur.execute(db.render(conn, _COUNT_UNDELIVERED))
        except (psycopg2.errors.UndefinedColumn, psycopg2.errors.UndefinedTable):
            # A table of that name with another shape: leave the gauge out.
            conn.rollback()
            return
        rows = {status: (count, age) for status, count, age in cur.fetchall()}
    undelivered = GaugeMetricFamily(
        PREFIX + "notifications_undelivered",
        "Notifications not delivered, by status (pending: still retried; dead: given up).",
        labels=["status"],
    )
    oldest = GaugeMetricFamily(
        PREFIX + "notifications_oldest_undelivered_seconds",
        "Age of the oldest undelivered notification, by status.",
        labels=["status"],
    )
    for status in ("pending", "dead"):
        count, age = rows.get(status, (0, 0.0))
        undelivered.add_metric([status], count)
        oldest.add_metric([status], age or 0.0)
    yield undelivered
    yield oldest


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


class _Readings:
    """A collector handing out the gauges read for this scrape."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)
