"""The outbox: the lag from a status change's commit to the platform's 2xx, and how many
notifications per second one worker process (the Procfile's) delivers, against a healthy
local receiver that answers 200 at once."""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.common import VENV_BIN, Figure, Process, free_port, log, wait_until
from webhook_sync import db, outbox, service
from webhook_sync.config import NOTIFY_EVENT_TYPES
from webhook_sync.training import parse_training

SECTION = "notify"
NOTIFY_SECRET = "whsec_YmVuY2gtbm90aWZ5LXNpZ25pbmcta2V5"
LAG_CHANGES = 300
LAG_RATE_PER_SECOND = 30.0
BURST = 3000
LAG_P50_TARGET_SECONDS = 1.0


class _Receiver:
    """Answers 200 to every POST and remembers when each training's notification came."""

    def __init__(self) -> None:
        self.answered: dict[str, float] = {}
        self.count = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                training_id = json.loads(body)["training"]["id"]
                with receiver._lock:
                    receiver.answered.setdefault(training_id, time.time())
                    receiver.count += 1

            def log_message(self, format: str, *args: object) -> None:
                """Quiet."""

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        """The endpoint for NOTIFY_URLS."""
        return f"http://127.0.0.1:{self.server.server_port}/hooks"

    def close(self) -> None:
        """Stop listening."""
        self.server.shutdown()
        self.server.server_close()


def _finish(conn: db.Connection, training_id: str) -> None:
    """Track a training and complete it in one transaction: one notification, and a row
    the worker's sweep never polls."""
    with conn:
        service.track_training(conn, training_id, "bench")
        service.apply_update(
            conn, parse_training({"id": training_id, "status": "succeeded"}), "webhook"
        )


def _start_worker(database_url: str, receiver: _Receiver, log_path: Path) -> Process:
    env = {
        "PATH": str(VENV_BIN),
        "DATABASE_URL": database_url,
        "REPLICATE_API_TOKEN": "r8_bench_token_not_used_0123456789",
        "REPLICATE_API_BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        "NOTIFY_URLS": receiver.url,
        "NOTIFY_SECRET": NOTIFY_SECRET,
        "LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    process = Process([str(VENV_BIN / "webhook-sync"), "worker"], env, log_path)
    wait_until(lambda: _notifier_listening(database_url), timeout=60, what="the notifier")
    return process


def _notifier_listening(database_url: str) -> bool:
    """The notifier holds its two connections (one LISTENing): changes from now on wake it."""
    conn = db.connect(database_url, "webhook-sync bench")
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'webhook-sync notifier' AND state = 'idle'"
            )
            return cur.fetchone()[0] >= 2
    finally:
        conn.close()


def measure(database_url: str) -> list[Figure]:
    """Lag p50/p99 under a paced load, then one worker's rate on a queued burst."""
    receiver = _Receiver()
    conn = db.connect(database_url, "webhook-sync bench")
    folder = Path(tempfile.mkdtemp(prefix="webhook-sync-bench-notify-"))
    try:
        with conn:
            outbox.sync_endpoints(conn, (receiver.url,), NOTIFY_EVENT_TYPES)
        worker = _start_worker(database_url, receiver, folder / "worker-1.log")
        committed: dict[str, float] = {}
        try:
            log(f"notify: {LAG_CHANGES} status changes at {LAG_RATE_PER_SECOND:g}/s")
            for number in range(LAG_CHANGES):
                training_id = f"lag{number:05d}"
                _finish(conn, training_id)
                committed[training_id] = time.time()
                # Pacing the load generator, not waiting for a condition.
                time.sleep(1 / LAG_RATE_PER_SECOND)
            wait_until(lambda: receiver.count >= LAG_CHANGES, timeout=60, what="lag deliveries")
        finally:
            worker.stop()
        lags = sorted(receiver.answered[t] - committed[t] for t in committed)
        log(f"notify: queueing {BURST} with the worker stopped")
        for number in range(BURST):
            _finish(conn, f"burst{number:05d}")
        first_count = receiver.count
        worker = _start_worker(database_url, receiver, folder / "worker-2.log")
        try:
            wait_until(
                lambda: receiver.count > first_count, timeout=60, what="the first burst delivery"
            )
            began = time.monotonic()
            wait_until(lambda: receiver.count >= first_count + BURST, timeout=300, what="the burst")
            elapsed = time.monotonic() - began
        finally:
            worker.stop()
    finally:
        conn.close()
        receiver.close()
        shutil.rmtree(folder, ignore_errors=True)
    p50 = statistics.median(lags)
    p99 = lags[int(len(lags) * 0.99) - 1]
    rate = (BURST - 1) / elapsed if elapsed > 0 else None
    return [
        Figure(
            SECTION,
            "lag, commit to 2xx, p50",
            p50,
            "s",
            target=f"<= {LAG_P50_TARGET_SECONDS:g} s",
            better="lower",
            met=p50 <= LAG_P50_TARGET_SECONDS,
            note=f"p99 {p99 * 1000:.0f} ms, max {lags[-1] * 1000:.0f} ms; {LAG_CHANGES}"
            f" changes at {LAG_RATE_PER_SECOND:g}/s, healthy local receiver, one worker",
        ),
        Figure(SECTION, "lag, commit to 2xx, p99", p99, "s", better="lower"),
        Figure(
            SECTION,
            "notifications per second, one worker",
            rate,
            "/s",
            note=f"{BURST} queued while the worker was stopped, first to last delivery;"
            " NOTIFY_CONCURRENCY 8",
        ),
    ]
