"""The outbox in the end-to-end runs: a platform's receiver under faults, and the judgement
of what it received.

`PlatformReceiver` is a real HTTP server in the harness standing for the platform's app:
it is down (not listening) for a while, answers 500 to some deliveries and is slow to
others (some past the notifier's 10 s read timeout). On every delivery it verifies the
signature with the `standardwebhooks` library and, as a platform would, reads the
database: the event's row must already be visible (committed). `judge_outbox` then
checks, from that log alone plus the transitions the funnel recorded: every applied
change delivered at least once, in order per training, none before its commit, and
duplicates only under the same `webhook-id`.
"""

from __future__ import annotations

import itertools
import json
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg2
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from webhook_sync.vocabulary import AppStatus, EventType, ReplicateStatus

NOTIFY_SECRET = "whsec_ZTJlLXBsYXRmb3JtLW5vdGlmeS1zZWNyZXQ="
# Longer than the notifier's read timeout: such an attempt fails on our side and is
# retried, although the platform may have processed it (a duplicate, same webhook-id).
TIMEOUT_SLEEP_SECONDS = 11.0


@dataclass(frozen=True)
class Receipt:
    """One delivery as the platform saw it."""

    at: float
    answered_at: float
    webhook_id: str
    event_id: str | None
    training_id: str | None
    event_type: str | None
    status: int
    verified: bool
    committed: bool | None  # None: the database could not be asked (a cut)
    fault: str


@dataclass
class PlatformFaults:
    """How badly the platform behaves."""

    error_rate: float = 0.1
    slow_rate: float = 0.1
    slow_seconds: tuple[float, float] = (0.5, 3.0)
    timeout_rate: float = 0.02
    seed: int = 1


class PlatformReceiver:
    """The platform's webhook endpoint on a fixed free port; `down()`/`up()` stop and start
    listening (a connection then is refused, as when the app is being deployed)."""

    def __init__(self, database_url: str, faults: PlatformFaults) -> None:
        self.database_url = database_url
        self.faults = faults
        self.receipts: list[Receipt] = []
        self.in_flight: dict[int, str] = {}  # client port -> webhook-id
        self._random = random.Random(faults.seed)
        self._lock = threading.Lock()
        self._local = threading.local()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]

    @property
    def url(self) -> str:
        """The endpoint for NOTIFY_URLS."""
        return f"http://127.0.0.1:{self.port}/hooks/training"

    def up(self) -> PlatformReceiver:
        """Start listening."""
        # A deep accept queue: refused connections are the outage's fault, not a side effect
        # of the harness being busy.
        server_class = type("Server", (ThreadingHTTPServer,), {"request_queue_size": 128})
        self._server = server_class(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def down(self) -> None:
        """Stop listening (requests in flight still finish)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def in_flight_ports(self) -> set[int]:
        """The client ports of the deliveries being answered right now."""
        with self._lock:
            return set(self.in_flight)

    def _decide(self) -> tuple[str, float]:
        with self._lock:
            roll = self._random.random()
            faults = self.faults
            if roll < faults.error_rate:
                return "error", 0.0
            roll -= faults.error_rate
            if roll < faults.timeout_rate:
                return "timeout", TIMEOUT_SLEEP_SECONDS
            roll -= faults.timeout_rate
            if roll < faults.slow_rate:
                return "slow", self._random.uniform(*faults.slow_seconds)
            return "ok", 0.0

    def _committed(self, event_id: str | None) -> bool | None:
        """Whether the event's outbox row is visible to a reader now (None: cannot ask)."""
        if event_id is None:
            return False
        for _ in range(2):
            conn = getattr(self._local, "conn", None)
            try:
                if conn is None or conn.closed:
                    conn = self._local.conn = psycopg2.connect(self.database_url, connect_timeout=3)
                    conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(
                        "SELECT 1 FROM webhook_sync.notifications WHERE event_id = %(id)s LIMIT 1",
                        {"id": event_id},
                    )
                    return cur.fetchone() is not None
            except psycopg2.Error:
                self._local.conn = None
        return None

    def _receive(self, client_port: int, headers: dict[str, str], body: bytes) -> int:
        at = time.time()
        webhook_id = headers.get("webhook-id", "")
        with self._lock:
            self.in_flight[client_port] = webhook_id
        try:
            try:
                payload = Webhook(NOTIFY_SECRET).verify(body, headers)
                verified = True
            except (WebhookVerificationError, ValueError):
                payload = json.loads(body) if body.startswith(b"{") else {}
                verified = False
            committed = self._committed(payload.get("id"))
            fault, sleep = self._decide()
            if sleep:
                # The platform being slow is the fault under test here.
                time.sleep(sleep)
            status = 500 if fault == "error" else 200
        finally:
            with self._lock:
                self.in_flight.pop(client_port, None)
        training = payload.get("training") or {}
        receipt = Receipt(
            at=at,
            answered_at=time.time(),
            webhook_id=webhook_id,
            event_id=payload.get("id"),
            training_id=training.get("id"),
            event_type=payload.get("type"),
            status=status,
            verified=verified,
            committed=committed,
            fault=fault,
        )
        with self._lock:
            self.receipts.append(receipt)
        return status

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                status = receiver._receive(self.client_address[1], headers, body)
                answer = b"{}"
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass  # the notifier gave up waiting (its read timeout)

            def log_message(self, format: str, *args: object) -> None:
                """Keep the harness's output quiet."""

        return Handler

    def write_log(self, path: Path) -> None:
        """The receipts as JSON lines, for a person reading a failed run."""
        with path.open("w") as out:
            for receipt in self.receipts:
                out.write(json.dumps(receipt.__dict__) + "\n")


def pids_of_client_ports(ports: set[int]) -> set[int]:
    """The processes holding TCP connections from these local ports (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port in ports:
                inodes.add(fields[9])
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = str(fd.readlink())
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    pids.add(int(proc.name))
                    break
        except OSError:
            continue
    return pids


# --- the judgement -------------------------------------------------------------------------


def expected_events(transitions: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The events each training's applied status changes must produce, in order."""
    expected: dict[str, list[str]] = {}
    for transition in transitions:
        if transition["outcome"] != "applied":
            continue
        to_status = transition["to_training_status"]
        if to_status == AppStatus.TRAINING:
            if transition["to_replicate_status"] != ReplicateStatus.PROCESSING:
                continue
            event = EventType.PROCESSING
        else:
            event = EventType(f"training.{to_status}")
        expected.setdefault(transition["training_id"], []).append(str(event))
    return expected


@dataclass
class OutboxReport:
    """What the platform received, and the promises the outbox broke."""

    expected: int = 0
    deliveries: int = 0
    answered_500: int = 0
    slow: int = 0
    timed_out: int = 0
    duplicates: int = 0
    undelivered_rows: int = 0
    lags: list[float] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    before_commit: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    id_mismatch: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        """Every broken promise, with a few examples each."""
        found = []
        for name in ("missing", "out_of_order", "before_commit", "unverified", "id_mismatch"):
            items = getattr(self, name)
            if items:
                found.append(
                    f"notifications {name.replace('_', ' ')}: {len(items)}"
                    f" (e.g. {'; '.join(items[:5])})"
                )
        return found


def judge_outbox(
    transitions: list[dict[str, Any]],
    receipts: list[Receipt],
    queued: list[dict[str, Any]],
) -> OutboxReport:
    """Judge the platform's log against the changes the funnel applied."""
    report = OutboxReport()
    expected = expected_events(transitions)
    report.expected = sum(len(events) for events in expected.values())
    report.deliveries = len(receipts)
    report.answered_500 = sum(r.status == 500 for r in receipts)
    report.slow = sum(r.fault == "slow" for r in receipts)
    report.timed_out = sum(r.fault == "timeout" for r in receipts)
    report.undelivered_rows = sum(row["status"] != "delivered" for row in queued)
    created = {row["event_id"]: row["created_at"] for row in queued}
    by_training: dict[str, list[Receipt]] = {}
    ids_by_event: dict[tuple[str, str], set[str]] = {}
    for receipt in sorted(receipts, key=lambda r: r.at):
        if not receipt.verified:
            report.unverified.append(receipt.webhook_id)
            continue
        if receipt.committed is False:
            report.before_commit.append(receipt.webhook_id)
        if receipt.event_id != receipt.webhook_id:
            report.id_mismatch.append(f"{receipt.webhook_id} carries id {receipt.event_id}")
        key = (receipt.training_id or "", receipt.event_type or "")
        ids_by_event.setdefault(key, set()).add(receipt.webhook_id)
        by_training.setdefault(receipt.training_id or "", []).append(receipt)
    for (training_id, event_type), ids in ids_by_event.items():
        if len(ids) > 1:
            report.id_mismatch.append(f"{training_id} {event_type} under {len(ids)} webhook-ids")
    for training_id, events in expected.items():
        received = by_training.get(training_id, [])
        delivered = [r for r in received if 200 <= r.status < 300]
        got = {r.event_type for r in delivered}
        report.missing += [f"{training_id} {event}" for event in events if event not in got]
        report.duplicates += len(delivered) - len({r.webhook_id for r in delivered})
        # In order: an event is first sent only after the one before it was answered 2xx.
        first_sent = {}
        first_ok = {}
        for receipt in received:
            first_sent.setdefault(receipt.event_type, receipt.at)
            if 200 <= receipt.status < 300:
                # The earliest 2xx, whichever attempt: one the notifier gave up on (its read
                # timeout) may be answered after the retry that got through.
                first_ok[receipt.event_type] = min(
                    receipt.answered_at, first_ok.get(receipt.event_type, float("inf"))
                )
        for earlier, later in itertools.pairwise(events):
            if later in first_sent and first_sent[later] < first_ok.get(earlier, float("inf")):
                report.out_of_order.append(f"{training_id} {later} before {earlier}'s 2xx")
        for receipt in delivered:
            if receipt.event_id in created and receipt.event_id == receipt.webhook_id:
                report.lags.append(receipt.answered_at - created[receipt.event_id])
    return report


def table_rows(report: OutboxReport) -> list[tuple[str, str, str]]:
    """The outbox's lines in `make chaos`'s table."""
    lags = sorted(report.lags)
    median = f"{lags[len(lags) // 2]:.1f} s" if lags else "-"
    longest = f"{lags[-1]:.1f} s" if lags else "-"
    return [
        ("notifications expected (applied changes)", f"{report.expected}", ""),
        (
            "  deliveries / 500 / slow / past read timeout",
            f"{report.deliveries} / {report.answered_500} / {report.slow} / {report.timed_out}",
            "",
        ),
        ("  status change to 2xx median / max", f"{median} / {longest}", ""),
        ("  duplicates (same webhook-id)", f"{report.duplicates}", "allowed"),
        ("  not delivered at least once", f"{len(report.missing)}", "must be 0"),
        ("  out of order per training", f"{len(report.out_of_order)}", "must be 0"),
        ("  received before their commit", f"{len(report.before_commit)}", "must be 0"),
        (
            "  unverified / id not kept",
            f"{len(report.unverified)} / {len(report.id_mismatch)}",
            "must be 0",
        ),
    ]
