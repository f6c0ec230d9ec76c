"""`webhook-sync demo` (`make demo`): watch webhooks and the poller bring trainings home.

It talks to a running local simulator through its token-free admin routes: it turns on
webhook drops, creates a handful of trainings whose webhooks go to the service, tracks
them in the service's database as a host platform would, and prints each change until
every row holds its training's final status, saying whether a webhook or the poller
got it there. The simulator's faults are restored at the end, also on Ctrl-C.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from webhook_sync import db, errors, service, status
from webhook_sync.config import Config
from webhook_sync.dev import embedded_postgres

# Where `make run` (and `webhook-sync simulator` by default) serve the simulator.
DEFAULT_API_BASE_URL = "http://127.0.0.1:8090/v1"
# Where `make run` keeps its embedded PostgreSQL when DATABASE_URL is unset.
EMBEDDED_PG_DIR = Path(".data") / "pg"
POLL_SECONDS = 1.0


class DemoError(errors.WebhookSyncError):
    """The demo cannot run."""


@dataclass(frozen=True)
class Snapshot:
    """What one training looks like at one moment, from both sides."""

    truth: str
    webhook: str
    db_status: str
    updated_by: str

    def line(self, training_id: str, elapsed: float) -> str:
        """One progress line."""
        return (
            f"{elapsed:6.1f}s  {training_id}  replicate={self.truth:<10}"
            f"  completed-webhook={self.webhook:<14}  db={self.db_status} ({self.updated_by})"
        )


def simulator_url(environ: Mapping[str, str]) -> str:
    """The simulator's root URL, from REPLICATE_API_BASE_URL (default: `make run`'s)."""
    base = environ.get("REPLICATE_API_BASE_URL", "").strip() or DEFAULT_API_BASE_URL
    return base.rstrip("/").removesuffix("/v1")


@contextmanager
def database_url(environ: Mapping[str, str]) -> Iterator[str]:
    """DATABASE_URL, else the URL of `make run`'s embedded PostgreSQL while it runs."""
    configured = environ.get("DATABASE_URL", "").strip()
    if configured:
        yield configured
        return
    if not (EMBEDDED_PG_DIR / "postmaster.pid").exists():
        raise DemoError("no database: set DATABASE_URL, or start `make run` first")
    pgserver = embedded_postgres.load_pgserver()  # the dev extra's, only needed here
    # Attach to the running server without ever stopping it (cleanup_mode=None).
    server = pgserver.get_server(EMBEDDED_PG_DIR, cleanup_mode=None)
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


class SimulatorAdmin:
    """The simulator's admin routes, over HTTP."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One admin request; DemoError if the simulator does not answer as expected."""
        try:
            response = self.session.request(method, self.url + path, json=body, timeout=30)
            response.raise_for_status()
            return response.json()
        except (requests.RequestException, ValueError) as exc:
            raise DemoError(
                f"no local simulator answers at {self.url} ({type(exc).__name__}); start"
                " `make run` without REPLICATE_API_TOKEN or set REPLICATE_API_BASE_URL"
            ) from exc


def webhook_summary(deliveries: list[dict[str, Any]], training_id: str) -> str:
    """How the training's completed webhook fared: pending, dropped, delivered or failing."""
    attempts = [
        d for d in deliveries if d["training_id"] == training_id and d["event"] == "completed"
    ]
    if not attempts:
        return "pending"
    if any(d["dropped"] for d in attempts):
        return "dropped"
    if any(d["response_status"] and 200 <= d["response_status"] < 300 for d in attempts):
        return "delivered"
    last = attempts[-1]
    return f"failing ({last['response_status'] or last['error']}) x{len(attempts)}"


def run_demo(
    *,
    environ: Mapping[str, str],
    webhook_url: str,
    count: int,
    drop_rate: float,
    finish_in: tuple[float, float],
    timeout: float,
    user_id: str,
    echo: Callable[[str], None],
) -> bool:
    """Run the demo; return True if every row reached its final status before `timeout`."""
    admin = SimulatorAdmin(simulator_url(environ))
    previous_drop = admin.call("GET", "/_admin/faults")["drop_rate"]
    warn_if_service_down(webhook_url, echo)
    with database_url(environ) as url:
        conn = db.connect(url, "webhook-sync demo", schema=Config.from_env(environ).database_schema)
        try:
            admin.call("POST", "/_admin/faults", {"drop_rate": drop_rate})
            echo(f"simulator {admin.url}: dropping {drop_rate:.0%} of webhooks for this demo")
            ids = create_and_track(admin, conn, webhook_url, count, finish_in, user_id, echo)
            return watch(admin, conn, ids, timeout, echo)
        finally:
            conn.close()
            admin.call("POST", "/_admin/faults", {"drop_rate": previous_drop})
            echo(f"simulator: drop rate restored to {previous_drop:.0%}")


def warn_if_service_down(webhook_url: str, echo: Callable[[str], None]) -> None:
    """Say so when the web process does not answer: only the poller can repair then."""
    parts = urlsplit(webhook_url)
    try:
        requests.get(f"{parts.scheme}://{parts.netloc}/healthz", timeout=5)
    except requests.RequestException:
        echo(f"warning: nothing answers at {parts.netloc}; webhooks will fail, the poller repairs")


def create_and_track(
    admin: SimulatorAdmin,
    conn: db.Connection,
    webhook_url: str,
    count: int,
    finish_in: tuple[float, float],
    user_id: str,
    echo: Callable[[str], None],
) -> list[str]:
    """Create `count` trainings in the simulator and track each in the database."""
    created = admin.call(
        "POST",
        "/_admin/trainings",
        {
            "count": count,
            "created_ago": [0, 0],
            "status": "starting",
            "finish_in": list(finish_in),
            "fail_rate": 0.3,
            "webhook": webhook_url,
            "webhook_events_filter": ["start", "completed"],
            "destination": "demo-owner/demo-lora",
        },
    )
    ids: list[str] = created["ids"]
    with conn:
        for training_id in ids:
            service.track_training(conn, training_id, user_id, "demo-owner/demo-lora")
    echo(f"created {len(ids)} trainings (webhooks to {webhook_url}), tracked for {user_id}")
    return ids


def watch(
    admin: SimulatorAdmin,
    conn: db.Connection,
    ids: list[str],
    timeout: float,
    echo: Callable[[str], None],
) -> bool:
    """Print each change until the database agrees with the simulator or `timeout` passes."""
    echo(
        "watching; the poller re-checks every POLL_INTERVAL_SECONDS (120 s by default),"
        " so a dropped webhook is repaired within that (Ctrl-C stops)"
    )
    started = time.monotonic()
    seen: dict[str, Snapshot] = {}
    while True:
        truth = admin.call("GET", "/_admin/trainings")["trainings"]
        deliveries = admin.call("GET", "/_admin/deliveries")["deliveries"]
        with conn:
            rows = {row["id"]: row for row in db.select_trainings(conn, ids)}
        elapsed = time.monotonic() - started
        for training_id in ids:
            row = rows.get(training_id, {})
            now = Snapshot(
                truth=truth[training_id],
                webhook=webhook_summary(deliveries, training_id),
                db_status=row.get("training_status") or "-",
                updated_by=row.get("updated_by") or "-",
            )
            if seen.get(training_id) != now:
                echo(now.line(training_id, elapsed))
                seen[training_id] = now
        done = all(
            status.is_terminal(seen[i].truth)
            and seen[i].db_status == status.app_status_for(seen[i].truth)
            for i in ids
        )
        if done or elapsed > timeout:
            echo_summary(ids, seen, echo)
            return done
        time.sleep(POLL_SECONDS)  # the pace of a watch loop that has its own deadline


def echo_summary(ids: list[str], seen: Mapping[str, Snapshot], echo: Callable[[str], None]) -> None:
    """A closing table: which final statuses a webhook brought and which the poller."""
    echo("")
    echo(f"{'training':<28}{'replicate':<11}{'completed webhook':<20}{'db':<11}reached by")
    for training_id in ids:
        snap = seen[training_id]
        final = snap.db_status == status.app_status_for(snap.truth)
        by = {"webhook": "webhook", "poll": "the poller"}.get(snap.updated_by, snap.updated_by)
        reached = by if final else "not yet"
        echo(f"{training_id:<28}{snap.truth:<11}{snap.webhook:<20}{snap.db_status:<11}{reached}")
    repaired = sum(1 for snap in seen.values() if snap.updated_by == "poll")
    echo(f"{repaired} of {len(ids)} reached their final status through the poller")
