"""Prometheus metrics: the funnel counts every decided report by source and outcome."""

from __future__ import annotations

from prometheus_client import REGISTRY

from webhook_sync import db, metrics, service
from webhook_sync.training import parse_training


def transitions(source: str, outcome: str) -> float:
    """The current value of the status-transition counter for one label pair."""
    value = REGISTRY.get_sample_value(
        "webhook_sync_status_transitions_total", {"source": source, "outcome": outcome}
    )
    return value or 0.0


def test_apply_update_counts_each_decision_by_source(conn: db.Connection) -> None:
    """An applied poll and a refused regression are both counted under their source."""
    with conn:
        service.track_training(conn, "t-metrics", "user-1")
    applied_before = transitions("poll", "applied")
    ignored_before = transitions("poll", "ignored")

    with conn:
        service.apply_update(
            conn, parse_training({"id": "t-metrics", "status": "succeeded"}), "poll"
        )
        service.apply_update(
            conn, parse_training({"id": "t-metrics", "status": "starting"}), "poll"
        )

    assert transitions("poll", "applied") == applied_before + 1
    assert transitions("poll", "ignored") == ignored_before + 1


def test_render_exposes_every_metric_family() -> None:
    """The exposition text names the four families the issue asks for."""
    metrics.count_delivery("applied")
    metrics.count_verification_failure("stale_timestamp")
    metrics.observe_request("/healthz", "GET", 200, 0.001)
    metrics.count_transition("webhook", "applied")

    text, content_type = metrics.render()

    assert content_type.startswith("text/plain")
    for family in (
        "webhook_sync_webhook_deliveries_total",
        "webhook_sync_webhook_verification_failures_total",
        "webhook_sync_http_request_duration_seconds_bucket",
        "webhook_sync_status_transitions_total",
    ):
        assert family.encode() in text


def test_worker_gauges_hold_the_last_value_published() -> None:
    """The stuck-trainings gauge shows what was set last."""
    metrics.set_stuck_trainings(7)
    metrics.set_stuck_trainings(4)

    assert REGISTRY.get_sample_value("webhook_sync_stuck_trainings") == 4


def test_adoptions_are_counted_under_a_fixed_set_of_labels() -> None:
    """Each way of adopting has its label; anything else counts as `other`, so no value
    can grow /metrics."""

    def adopted(how: str) -> float:
        labels = {"how": how}
        return REGISTRY.get_sample_value("webhook_sync_trainings_adopted_total", labels) or 0.0

    before = {how: adopted(how) for how in ("host_table", "other", "made-up")}

    metrics.count_adoptions("host_table", 3)
    metrics.count_adoptions("made-up")

    assert adopted("host_table") - before["host_table"] == 3
    assert adopted("other") - before["other"] == 1
    assert adopted("made-up") == before["made-up"] == 0


def test_reconciled_host_rows_are_counted_under_our_finished_statuses() -> None:
    """Each finished status of ours has its label; anything else counts as `other`."""

    def reconciled(status: str) -> float:
        labels = {"status": status}
        return REGISTRY.get_sample_value("webhook_sync_host_rows_reconciled_total", labels) or 0.0

    before = {status: reconciled(status) for status in ("failed", "other", "training")}

    metrics.count_host_rows_reconciled("failed", 2)
    metrics.count_host_rows_reconciled("training", 1)

    assert reconciled("failed") - before["failed"] == 2
    assert reconciled("other") - before["other"] == 1
    assert reconciled("training") == before["training"] == 0
