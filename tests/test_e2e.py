"""The convergence run: the real Procfile processes under faults and Replicate's rarer
shapes reach the truth with no regression, no lost event, no 5xx but 503s while the
database is down, no training fetched by two workers at once and none flagged for a
person; every applied change notified to the platform, in order, after its commit
(`make chaos` runs the same thing bigger)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import e2e
from tests.e2e_report import analyze

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_converges_under_faults(database_url: str, pg_admin_url: str, tmp_path: Path) -> None:
    """300 trainings under every fault and real shape of e2e.Scenario's defaults: every
    promise holds."""
    scenario = e2e.Scenario(trainings=300, converge_timeout=45)
    with e2e.Cluster(database_url, scenario, tmp_path) as cluster:
        cluster.start(workers=2)
        evidence = e2e.run_scenario(cluster, pg_admin_url)
    report = analyze(evidence)
    outputs = {path.name: path.read_text(errors="replace") for path in tmp_path.glob("*.log")}

    print(report.table())  # shown with -s, and by pytest when the test fails
    assert report.problems() == []
    assert report.dropped > 0
    assert report.duplicated > 0
    assert report.by_poller > 0
    assert report.by_webhook > 0
    assert report.fetches_checked > 0
    assert report.notifications > 0
    assert len(evidence.windows) == 4
    # The platform met every fault of its own, and the outbox still kept its promises.
    assert report.outbox is not None
    assert report.outbox.answered_500 > 0 and report.outbox.slow > 0
    assert report.outbox.undelivered_rows == 0
    assert [name for name, text in outputs.items() if "Traceback" in text] == []
    # The real Replicate shapes were met, and no gateway page reached a log.
    assert report.aborted > 0
    assert report.null_logs > 0
    assert report.starting_webhooks > 0
    assert report.by_fault.get("gateway_html", 0) > 0
    assert report.by_fault.get("new_training_404", 0) > 0
    assert [name for name, text in outputs.items() if "<html" in text.lower()] == []
