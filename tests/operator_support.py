"""Helpers for the operator-tool tests: the published examples, the CLI with a clean
environment, and inbox events planted as the web process would have left them."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from tests.support import FIXTURES, run_cli
from webhook_sync import db

REPLICATE = FIXTURES / "replicate"


def fixture(name: str) -> dict[str, Any]:
    """A published example payload, decoded."""
    return json.loads((REPLICATE / name).read_text(encoding="utf-8"))


def cli(
    database_url: str, *args: str, input: str | None = None, **settings: str
) -> subprocess.CompletedProcess[str]:
    """Run `webhook-sync ARGS` on this test's database; settings not given are unset."""
    env = {
        "DATABASE_URL": database_url,
        "REPLICATE_WEBHOOK_SECRET": "",
        "REPLICATE_API_TOKEN": "",
        "REPLICATE_API_BASE_URL": "",
        "EVENT_RETENTION_DAYS": "",
        "LOG_FORMAT": "kv",
        **settings,
    }
    return run_cli(*args, env=env, input=input)


def store_event(
    conn: db.Connection, webhook_id: str, payload: Any, outcome: str, age: str = "1 minute"
) -> None:
    """Put an event in the inbox with this outcome (failed ones with error `boom`), received
    `age` ago."""
    training_id = payload.get("id") if isinstance(payload, dict) else None
    with conn:
        db.insert_event(
            conn, webhook_id=webhook_id, training_id=training_id, payload=payload, signed_at=None
        )
        db.update_event_outcome(conn, webhook_id, outcome, "boom" if outcome == "failed" else None)
        with conn.cursor() as cur:
            cur.execute(
                "UPDATE webhook_sync.webhook_events SET received_at = now() - %(age)s::interval"
                " WHERE webhook_id = %(id)s",
                {"age": age, "id": webhook_id},
            )


def event_ids(conn: db.Connection) -> list[str]:
    """The inbox's webhook ids, sorted."""
    with conn:
        return sorted(row["webhook_id"] for row in db.select_events(conn, limit=None))
