"""Judging an end-to-end run from the records alone: the simulator's (truth, deliveries),
the database's (transitions, inbox, rows), the NOTIFYs heard and the proxies' fetch logs.

`analyze(evidence)` returns a `Report`: the numbers `make chaos` prints and the list of
broken promises (`Report.problems()`), which the pytest run asserts is empty.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tests import e2e_outbox
from tests.e2e_support import Fetch
from tests.support import TERMINAL_STATUSES, lifecycle_position
from webhook_sync import status
from webhook_sync.vocabulary import ReplicateStatus

# Windows in which the database was unreachable; a 503 is the right answer inside them.
DATABASE_WINDOWS = ("connections cut", "postgres restart")
# A cut connection is noticed on its next use, which may come a little after the cut.
DATABASE_GRACE_SECONDS = 5.0


@dataclass(frozen=True)
class Window:
    """A fault that took something away for a while (epoch seconds)."""

    kind: str
    started: float
    ended: float


@dataclass(frozen=True)
class LeaseChange:
    """One change of a training's lease owner (a sweep's claim, release or takeover)."""

    training_id: str
    old_owner: str | None
    new_owner: str | None
    at: float


@dataclass
class Evidence:
    """Everything a run left behind, gathered after it converged."""

    poll_interval: int
    ids: list[str]
    truth: dict[str, str]
    finished_at: dict[str, float | None]
    tracked_at: dict[str, float]
    canceled: list[str]
    deliveries: list[dict[str, Any]]
    api_requests: dict[str, Any]
    transitions: list[dict[str, Any]]
    inbox: dict[str, str]
    rows: dict[str, tuple[str, str | None]]
    notifications: list[dict[str, Any]]
    fetches: list[Fetch]
    windows: list[Window]
    leases: list[LeaseChange] = field(default_factory=list)
    sweep_seconds: list[float] = field(default_factory=list)
    null_logs: list[str] = field(default_factory=list)
    attention_flags: list[str] = field(default_factory=list)
    # The outbox: what the platform's receiver logged (None: notifications were off), and
    # every notification queued.
    platform_receipts: list[e2e_outbox.Receipt] | None = None
    outbox_rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    """The run's numbers and its broken promises (each a readable line)."""

    trainings: int = 0
    messages: int = 0
    attempts: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0
    reordered: int = 0
    answered_2xx: int = 0
    answered_5xx: int = 0
    unanswered: int = 0
    api_requests: int = 0
    api_errors: int = 0
    by_webhook: int = 0
    by_poller: int = 0
    fetches_checked: int = 0
    notifications: int = 0
    lags: list[float] = field(default_factory=list)
    poller_lags: list[float] = field(default_factory=list)
    bound_seconds: float = 0.0
    longest_sweep: float = 0.0
    windows: list[Window] = field(default_factory=list)
    not_converged: list[str] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)
    lost_events: list[str] = field(default_factory=list)
    unfinished_events: list[str] = field(default_factory=list)
    stranded_events: list[str] = field(default_factory=list)
    bad_5xx: list[str] = field(default_factory=list)
    double_fetches: list[str] = field(default_factory=list)
    double_claims: list[str] = field(default_factory=list)
    claims: int = 0
    takeovers: int = 0
    aborted: int = 0
    null_logs: int = 0
    starting_webhooks: int = 0
    by_fault: dict[str, int] = field(default_factory=dict)
    flagged_attention: list[str] = field(default_factory=list)
    outbox: e2e_outbox.OutboxReport | None = None

    def problems(self) -> list[str]:
        """Every broken promise, at most a few examples of each."""
        found = []
        for name in (
            "not_converged",
            "late",
            "regressions",
            "lost_events",
            "unfinished_events",
            "bad_5xx",
            "double_fetches",
            "double_claims",
            "flagged_attention",
        ):
            items = getattr(self, name)
            if items:
                examples = "; ".join(items[:5])
                found.append(f"{name.replace('_', ' ')}: {len(items)} (e.g. {examples})")
        if self.outbox is not None:
            found += self.outbox.problems()
        return found

    def table(self) -> str:
        """The printed report: one line per number, with what it must be where it matters."""
        rows = [
            ("trainings", f"{self.trainings}", ""),
            ("webhooks sent (messages / attempts)", f"{self.messages} / {self.attempts}", ""),
            ("webhooks dropped", f"{self.dropped}", ""),
            ("webhooks duplicated", f"{self.duplicated}", ""),
            ("webhooks delayed / reordered", f"{self.delayed} / {self.reordered}", ""),
            (
                "deliveries answered 2xx / 5xx / not at all",
                f"{self.answered_2xx} / {self.answered_5xx} / {self.unanswered}",
                "5xx only 503 while the DB was down",
            ),
            ("API requests (5xx and 429 injected)", f"{self.api_requests} ({self.api_errors})", ""),
            (
                "  5xx JSON / 502 HTML / 429 / 404 just after create",
                " / ".join(
                    str(self.by_fault.get(kind, 0))
                    for kind in ("server_error", "gateway_html", "throttled", "new_training_404")
                ),
                "",
            ),
            (
                "aborted / logs null / start webhooks saying starting",
                f"{self.aborted} / {self.null_logs} / {self.starting_webhooks}",
                "",
            ),
            ("finished by webhook", f"{self.by_webhook}", ""),
            ("repaired by the poller", f"{self.by_poller}", ""),
            (
                "time to converge median / max",
                _median_max(self.lags),
                f"max <= {self.bound_seconds:.0f} s",
            ),
            ("  of those repaired by the poller", _median_max(self.poller_lags), ""),
            ("longest sweep", f"{self.longest_sweep:.1f} s", "(part of the bound)"),
            ("not converged", f"{len(self.not_converged)}", "must be 0"),
            ("regressions", f"{len(self.regressions)}", "must be 0"),
            ("lost events", f"{len(self.lost_events)}", "must be 0"),
            ("accepted inbox events left unapplied", f"{len(self.unfinished_events)}", "must be 0"),
            (
                "stored events left unapplied after a 503",
                f"{len(self.stranded_events)}",
                "covered by the poller",
            ),
            ("5xx other than 503 during DB outage", f"{len(self.bad_5xx)}", "must be 0"),
            (
                "fetched by two workers at once",
                f"{len(self.double_fetches)} of {self.fetches_checked} fetches",
                "must be 0",
            ),
            (
                "claims taken over from a sweep still running",
                f"{len(self.double_claims)} of {self.claims} claims",
                "must be 0",
            ),
            ("expired leases taken over (killed or failed sweeps)", f"{self.takeovers}", ""),
            ("trainings flagged needs_attention", f"{len(self.flagged_attention)}", "must be 0"),
            ("NOTIFYs heard", f"{self.notifications}", ""),
        ]
        if self.outbox is not None:
            rows += e2e_outbox.table_rows(self.outbox)
        width = max(len(label) for label, _, _ in rows)
        value_width = max(len(value) for _, value, _ in rows)
        lines = [
            f"{label.ljust(width)}  {value.rjust(value_width)}  {note}".rstrip()
            for label, value, note in rows
        ]
        lines.append("faults: " + ", ".join(_describe(window) for window in self.windows))
        return "\n".join(lines)


def convergence_bound(poll_interval: int, longest_sweep: float) -> float:
    """The promise is one poll interval plus one sweep after a training finishes.

    The worker schedules sweeps every interval and skips a run while one is still going,
    so a row checked just before it finished waits one interval, plus one more when that
    sweep overran, plus the sweep that repairs it; a failed check is retried within one
    more interval. Hence three intervals plus the longest sweep the workers logged (at
    least five seconds): generous, yet a training the poller forgot is far past it.
    """
    return 3 * poll_interval + max(5.0, longest_sweep)


def analyze(evidence: Evidence) -> Report:
    """Judge a run: numbers and broken promises."""
    report = Report(trainings=len(evidence.ids), windows=list(evidence.windows))
    report.longest_sweep = max(evidence.sweep_seconds, default=0.0)
    report.bound_seconds = convergence_bound(evidence.poll_interval, report.longest_sweep)
    _judge_deliveries(evidence, report)
    _judge_convergence(evidence, report)
    _judge_order(evidence, report)
    _judge_fetches(evidence, report)
    _judge_leases(evidence, report)
    counts = evidence.api_requests
    report.api_requests = int(counts.get("total", 0))
    report.api_errors = sum(
        number
        for code, number in counts.get("by_status", {}).items()
        if code == "429" or code.startswith("5")
    )
    report.notifications = len(evidence.notifications)
    report.by_fault = dict(counts.get("by_fault", {}))
    report.aborted = sum(truth == ReplicateStatus.ABORTED for truth in evidence.truth.values())
    report.null_logs = len(evidence.null_logs)
    report.starting_webhooks = sum(
        delivery["event"] == "start" and delivery["status"] == ReplicateStatus.STARTING
        for delivery in evidence.deliveries
        if not delivery["dropped"]
    )
    # Every training of the run exists at Replicate: none may ask a person to look.
    report.flagged_attention = list(evidence.attention_flags)
    if evidence.platform_receipts is not None:
        report.outbox = e2e_outbox.judge_outbox(
            evidence.transitions, evidence.platform_receipts, evidence.outbox_rows
        )
    return report


def _judge_deliveries(evidence: Evidence, report: Report) -> None:
    ours = set(evidence.ids)
    messages = set()
    accepted: set[str] = set()
    for delivery in evidence.deliveries:
        if delivery["training_id"] not in ours:
            continue
        messages.add(delivery["webhook_id"])
        if delivery["dropped"]:
            report.dropped += 1
            continue
        report.attempts += 1
        report.duplicated += bool(delivery["duplicate"])
        report.delayed += bool(delivery["delayed"]) and delivery["attempt"] == 1
        report.reordered += bool(delivery["reordered"]) and delivery["attempt"] == 1
        code = delivery["response_status"]
        if code is None:
            report.unanswered += 1
        elif 200 <= code < 300:
            report.answered_2xx += 1
            accepted.add(delivery["webhook_id"])
            if delivery["webhook_id"] not in evidence.inbox:
                report.lost_events.append(
                    f"{delivery['webhook_id']} ({delivery['training_id']} {delivery['status']})"
                    " answered 2xx but not in the inbox"
                )
        elif code >= 500:
            report.answered_5xx += 1
            at = datetime.fromisoformat(delivery["at"]).timestamp()
            if code != 503 or not _in_database_window(at, evidence.windows):
                report.bad_5xx.append(f"{code} for {delivery['webhook_id']} at {delivery['at']}")
    report.messages = len(messages)
    for webhook_id, outcome in evidence.inbox.items():
        if outcome not in ("received", "pending", "failed"):
            continue
        if webhook_id in accepted:
            report.unfinished_events.append(f"{webhook_id} answered 2xx but left {outcome}")
        else:
            # Stored, then the database went away before it was applied: the answer was
            # 503, so the sender's retry (terminal events) or the poller must cover it.
            report.stranded_events.append(f"{webhook_id} left {outcome} after a non-2xx answer")


def _in_database_window(at: float, windows: list[Window]) -> bool:
    return any(
        window.kind in DATABASE_WINDOWS
        and window.started <= at <= window.ended + DATABASE_GRACE_SECONDS
        for window in windows
    )


def _judge_convergence(evidence: Evidence, report: Report) -> None:
    terminal_at: dict[str, dict[str, Any]] = {}
    for transition in evidence.transitions:
        if transition["outcome"] == "applied" and transition["to_training_status"] != "training":
            terminal_at.setdefault(transition["training_id"], transition)
    for training_id in evidence.ids:
        true_status = evidence.truth.get(training_id)
        want = status.app_status_for(true_status) if true_status else None
        have = evidence.rows.get(training_id, (None, None))[0]
        if true_status not in TERMINAL_STATUSES or have != want:
            report.not_converged.append(f"{training_id}: truth {true_status}, row {have}")
            continue
        transition = terminal_at.get(training_id)
        if transition is None:
            report.not_converged.append(f"{training_id}: no transition to {want} recorded")
            continue
        source = transition["source"]
        report.by_webhook += source == "webhook"
        report.by_poller += source == "poll"
        reference = max(
            evidence.finished_at.get(training_id) or 0.0, evidence.tracked_at.get(training_id, 0.0)
        )
        reference = _after_outages(reference, report.bound_seconds, evidence.windows)
        lag = max(0.0, float(transition["created_at"]) - reference)
        report.lags.append(lag)
        if source == "poll":
            report.poller_lags.append(lag)
        if lag > report.bound_seconds:
            report.late.append(f"{training_id} converged {lag:.1f} s after finishing ({source})")


def _after_outages(reference: float, bound: float, windows: list[Window]) -> float:
    """Move the clock's start past every outage that overlaps the time allowed to converge:
    nothing can be written while the database is down, and a killed worker's claims wait
    for their leases to expire."""
    for window in sorted(windows, key=lambda window: window.started):
        if window.started <= reference + bound and window.ended >= reference:
            reference = max(reference, window.ended)
    return reference


def _judge_order(evidence: Evidence, report: Report) -> None:
    ours = set(evidence.ids)
    last_applied: dict[str, str | None] = {}
    for transition in evidence.transitions:
        training_id = transition["training_id"]
        if training_id not in ours or transition["outcome"] != "applied":
            continue
        before, after = transition["from_replicate_status"], transition["to_replicate_status"]
        if before in TERMINAL_STATUSES or lifecycle_position(after) <= lifecycle_position(before):
            report.regressions.append(f"{training_id}: transition {before} -> {after}")
        if training_id in last_applied and last_applied[training_id] != before:
            report.regressions.append(
                f"{training_id}: transition from {before} but the row was at"
                f" {last_applied[training_id]}"
            )
        last_applied[training_id] = after
    for training_id, (_, replicate_status) in evidence.rows.items():
        if training_id in last_applied and last_applied[training_id] != replicate_status:
            report.regressions.append(
                f"{training_id}: row at {replicate_status}, last transition to"
                f" {last_applied[training_id]}"
            )
    heard: dict[str, str] = {}
    for note in evidence.notifications:
        training_id, now = note["id"], note["replicate_status"]
        previous = heard.get(training_id)
        if previous is not None and (
            previous in TERMINAL_STATUSES or lifecycle_position(now) <= lifecycle_position(previous)
        ):
            report.regressions.append(f"{training_id}: NOTIFY {previous} then {now}")
        heard[training_id] = now


def _judge_fetches(evidence: Evidence, report: Report) -> None:
    by_training: dict[str, list[Fetch]] = defaultdict(list)
    for fetch in evidence.fetches:
        if fetch.method == "GET" and fetch.training_id:
            by_training[fetch.training_id].append(fetch)
    for training_id, fetches in by_training.items():
        report.fetches_checked += len(fetches)
        fetches.sort(key=lambda fetch: fetch.started)
        for index, first in enumerate(fetches):
            for second in fetches[index + 1 :]:
                if second.started >= first.ended:
                    break
                if second.process != first.process:
                    report.double_fetches.append(
                        f"{training_id} by {first.process} and {second.process}"
                        f" at {first.started:.3f}"
                    )


def _judge_leases(evidence: Evidence, report: Report) -> None:
    """A lease taken over while its sweep still runs means two workers hold one training.

    Each sweep has its own owner name. A sweep that still claims or releases anything
    after another took one of its rows had not finished that row: its lease ran out
    under it. A killed worker's or a failed sweep's rows are taken over legitimately:
    such a sweep does nothing afterwards.
    """
    last_active: dict[str, float] = {}
    for change in evidence.leases:
        if change.new_owner is not None:
            last_active[change.new_owner] = change.at
        if change.old_owner is not None and change.new_owner is None:
            last_active[change.old_owner] = change.at
    for change in evidence.leases:
        report.claims += change.new_owner is not None
        if change.old_owner is None or change.new_owner is None:
            continue
        report.takeovers += 1
        if last_active.get(change.old_owner, 0.0) > change.at:
            report.double_claims.append(
                f"{change.training_id} taken from {change.old_owner} by {change.new_owner}"
            )


def _median_max(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} s / {max(values):.2f} s"


def _describe(window: Window) -> str:
    return f"{window.kind} ({window.ended - window.started:.1f} s)"
