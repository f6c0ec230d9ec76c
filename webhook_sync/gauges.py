"""Gauges of the whole system read from the database when /metrics is scraped, so that
one scrape of the public web process shows the workers too (worker dynos take no inbound
traffic): the last finished sweep, trainings due, stuck and needing attention, recent
conflicts and terminal transitions by source, failed inbox events, undelivered
notifications. Read by one statement, rolled back; nothing is cached between scrapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import timedelta

import psycopg2.extras
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from webhook_sync import db, heartbeat
from webhook_sync.config import Config
from webhook_sync.vocabulary import Outcome

PREFIX = "webhook_sync_"
# Recent figures (conflicts, terminal transitions by source) are counted over this window.
RECENT = timedelta(hours=1)

# Every figure in one statement (one round trip per scrape); each aggregate without GROUP BY
# is exactly one row, so the CTEs cross-join into one.
_READ_GAUGES = (
    "WITH latest AS ("
    "  SELECT summary,"
    "  EXTRACT(EPOCH FROM clock_timestamp() - sweep_finished_at)::double precision AS age"
    "  FROM {schema}.worker_heartbeats WHERE sweep_finished_at IS NOT NULL"
    "  ORDER BY sweep_finished_at DESC LIMIT 1),"
    " failing AS ("
    "  SELECT count(*) FILTER (WHERE last_error_kind = %(auth)s) AS auth,"
    "  count(*) FILTER (WHERE last_error_kind = %(other)s) AS other"
    "  FROM {schema}.worker_heartbeats"
    "  WHERE updated_at > now() - make_interval(secs => %(within)s)),"
    " trainings AS ("
    "  SELECT count(*) FILTER (WHERE next_check_at <= now()) AS due,"
    "  count(*) FILTER (WHERE created_at < now() - make_interval(secs => %(stuck)s)) AS stuck,"
    "  count(*) FILTER (WHERE needs_attention IS NOT NULL) AS attention"
    "  FROM {schema}.trainings WHERE training_status = {training}),"
    " transitions AS ("
    "  SELECT count(*) FILTER (WHERE outcome = 'conflict') AS conflicts,"
    "  count(*) FILTER (WHERE outcome = 'applied' AND source = 'webhook'"
    "    AND to_training_status <> {training}) AS by_webhook,"
    "  count(*) FILTER (WHERE outcome = 'applied' AND source = 'poll'"
    "    AND to_training_status <> {training}) AS by_poll,"
    "  count(*) FILTER (WHERE outcome = 'applied' AND source = 'replay'"
    "    AND to_training_status <> {training}) AS by_replay"
    "  FROM {schema}.training_transitions"
    "  WHERE created_at > now() - make_interval(secs => %(recent)s)),"
    " events AS ("
    "  SELECT count(*) AS failed FROM {schema}.webhook_events WHERE outcome = %(failed)s),"
    " undelivered AS ("
    "  SELECT count(*) FILTER (WHERE status = 'pending') AS pending,"
    "  EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE status = 'pending'))"
    "   ::double precision AS pending_age,"
    "  count(*) FILTER (WHERE status = 'dead') AS dead,"
    "  EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE status = 'dead'))"
    "   ::double precision AS dead_age"
    "  FROM {schema}.notifications WHERE status <> 'delivered')"
    " SELECT (SELECT age FROM latest) AS age, (SELECT summary FROM latest) AS summary,"
    " failing.*, trainings.*, transitions.*, events.*, undelivered.*"
    " FROM failing, trainings, transitions, events, undelivered"
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
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(
            db.render(conn, _READ_GAUGES),
            {
                "auth": heartbeat.AUTH_FAILURE,
                "other": heartbeat.OTHER_FAILURE,
                "within": 2 * config.poll_interval_seconds,
                "stuck": config.stuck_after_seconds,
                "recent": RECENT.total_seconds(),
                "failed": Outcome.FAILED,
            },
        )
        row = cur.fetchone()
    age = row["age"] if row["age"] is not None else math.inf
    summary = row["summary"] or {}
    failing = GaugeMetricFamily(
        PREFIX + "workers_failing",
        "Workers whose last sweep failed within two intervals, by kind (replicate_auth: the"
        " token was refused).",
        labels=["kind"],
    )
    failing.add_metric([heartbeat.AUTH_FAILURE], row["auth"])
    failing.add_metric([heartbeat.OTHER_FAILURE], row["other"])
    terminal = GaugeMetricFamily(
        PREFIX + "terminal_transitions_recent",
        "Trainings that reached a terminal status in the last hour, by the source that got"
        " there first (poll: the webhook was missed or late).",
        labels=["source"],
    )
    for source in ("webhook", "poll", "replay"):
        terminal.add_metric([source], row[f"by_{source}"])
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
        undelivered.add_metric([status], row[status])
        oldest.add_metric([status], row[f"{status}_age"] or 0.0)
    return [
        _gauge("database_up", "1 when the gauges were read.", 1),
        _gauge(
            "poll_interval_seconds",
            "POLL_INTERVAL_SECONDS as this process reads it (the alerts measure sweeps by it).",
            config.poll_interval_seconds,
        ),
        _gauge(
            "worker_last_sweep_age_seconds",
            "Seconds since any worker last finished a sweep (+Inf when none ever did).",
            max(0.0, age),
        ),
        _gauge(
            "worker_last_sweep_duration_seconds",
            "How long the last finished sweep took.",
            float(summary.get("duration") or 0.0),
        ),
        failing,
        _gauge("trainings_due", "Trainings in `training` whose check is due now.", row["due"]),
        _gauge(
            "trainings_stuck",
            "Trainings still in `training` past STUCK_AFTER_SECONDS.",
            row["stuck"],
        ),
        _gauge(
            "trainings_needing_attention",
            "Trainings in `training` that a person should look at (repeated 404s).",
            row["attention"],
        ),
        _gauge(
            "transition_conflicts_recent",
            "Status reports refused as conflicts in the last hour.",
            row["conflicts"],
        ),
        _gauge(
            "inbox_events_failed", "Inbox events whose apply failed (replay them).", row["failed"]
        ),
        terminal,
        undelivered,
        oldest,
    ]


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


class _Readings:
    """A collector handing out the gauges read for this scrape."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)
