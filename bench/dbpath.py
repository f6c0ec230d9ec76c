"""The database path: `service.apply_update` and `inbox.receive_delivery` calls per second
against pgbench running the very same SQL with the same number of clients.

The pgbench script is not written by hand: one call of each path is recorded (the SQL the
driver actually sent), and its training id and webhook-id become pgbench variables. So
when db.py changes, the yardstick changes with it. Every call on both sides is a real
state change: each one moves a fresh `training` row to `processing`.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from bench.common import Figure, log, not_measured, query_one, track_many, which
from bench.loadgen import training_payload
from webhook_sync import db, inbox, logs, service
from webhook_sync.training import parse_training

SECTION = "database path"
CLIENTS = 4
SECONDS = 5
# Enough fresh rows that no client runs out within SECONDS, on either side.
PYTHON_ROWS_PER_CLIENT = 15_000
PGBENCH_ROWS = 300_000


def _client_setup() -> None:
    """Log as the real processes do (one line per update), into /dev/null."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the client process
    logs.configure()


def _training(training_id: str) -> Any:
    return parse_training(json.loads(training_payload(training_id, "processing")))


def _apply_one(conn: db.Connection, training_id: str) -> None:
    """apply_update of a fresh report, in its own transaction as the sweep calls it."""
    with conn:
        service.apply_update(conn, _training(training_id), "poll")


def _receive_one(conn: db.Connection, training_id: str) -> None:
    """receive_delivery of a fresh delivery, as the web process calls it."""
    payload = json.loads(training_payload(training_id, "processing"))
    inbox.receive_delivery(conn, webhook_id=f"msg_{training_id}", payload=payload, signed_at=None)


CALLS: dict[str, Callable[[db.Connection, str], None]] = {
    "apply": _apply_one,
    "receive": _receive_one,
}


def _client(args: tuple[str, str, list[str], float, float]) -> int:
    """One client process: one call per fresh row until the time is up; returns the count."""
    kind, url, ids, seconds, start_at = args
    call = CALLS[kind]
    _client_setup()
    conn = db.connect(url, f"webhook-sync bench {kind}")
    calls = 0
    while time.time() < start_at:
        time.sleep(0.001)
    deadline = start_at + seconds
    for training_id in ids:
        if time.time() >= deadline:
            break
        call(conn, training_id)
        calls += 1
    conn.close()
    return calls


def _run_clients(kind: str, url: str, prefix: str) -> float:
    """Calls per second of CLIENTS processes making `kind` calls on fresh rows for SECONDS."""
    ids = [f"{prefix}{n:07d}" for n in range(CLIENTS * PYTHON_ROWS_PER_CLIENT)]
    track_many(url, ids)
    start_at = time.time() + 1.0
    jobs = [(kind, url, ids[index::CLIENTS], SECONDS, start_at) for index in range(CLIENTS)]
    with multiprocessing.get_context("fork").Pool(CLIENTS) as pool:
        calls = sum(pool.map(_client, jobs))
    if calls >= len(ids):
        log(f"{prefix}: clients ran out of rows; the rate is a lower bound")
    return calls / SECONDS


# --- recording the SQL one call sends --------------------------------------------------


class _Recorder:
    """Collects the statements recording cursors execute."""

    statements: ClassVar[list[str]] = []


class _RecordingCursor(psycopg2.extensions.cursor):
    def execute(self, query: Any, vars: Any = None) -> Any:
        result = super().execute(query, vars)
        _Recorder.statements.append(self.query.decode())
        return result


class _RecordingDictCursor(psycopg2.extras.RealDictCursor):
    def execute(self, query: Any, vars: Any = None) -> Any:
        result = super().execute(query, vars)
        _Recorder.statements.append(self.query.decode())
        return result


@contextlib.contextmanager
def recording(conn: db.Connection) -> Iterator[list[str]]:
    """Record every statement `conn` executes meanwhile (bench-only instrumentation)."""
    _Recorder.statements = []
    real_dict_cursor = psycopg2.extras.RealDictCursor
    conn.cursor_factory = _RecordingCursor
    # db.py asks for RealDictCursor by attribute at call time; point it at the recorder.
    psycopg2.extras.RealDictCursor = _RecordingDictCursor  # type: ignore[misc]
    try:
        yield _Recorder.statements
    finally:
        psycopg2.extras.RealDictCursor = real_dict_cursor  # type: ignore[misc]
        conn.cursor_factory = psycopg2.extensions.cursor


def record_sql(url: str) -> tuple[list[str], list[str]]:
    """The statements of one apply_update (own transaction) and one receive_delivery."""
    track_many(url, ["rec_apply_000001", "rec_recv_000001"])
    conn = db.connect(url, "webhook-sync bench record")
    try:
        with recording(conn) as statements, conn:
            service.apply_update(conn, _training("rec_apply_000001"), "poll")
        apply_sql = ["BEGIN", *statements, "COMMIT"]
        payload = json.loads(training_payload("rec_recv_000001", "processing"))
        autocommit = conn.autocommit
        with recording(conn) as statements:
            inbox.receive_delivery(
                conn, webhook_id="msg_rec_recv_000001", payload=payload, signed_at=None
            )
        receive_sql = list(statements)
        if not conn.autocommit and not autocommit:
            receive_sql = ["BEGIN", *receive_sql, "COMMIT"]
    finally:
        conn.close()
    return apply_sql, receive_sql


def pgbench_script(statements: list[str], training_id: str, webhook_id: str) -> str:
    """Turn recorded statements into a pgbench script over fresh random rows."""
    lines = [f"\\set n random(1, {PGBENCH_ROWS})", "\\set w random(1, 2000000000)"]
    for statement in statements:
        text = statement.replace(f"'{training_id}'", "('pgb' || lpad(:n::text, 7, '0'))")
        text = text.replace(f"'{webhook_id}'", "('msg_pgb_' || :w)")
        # pgbench ends a command at a semicolon outside quotes; ours are single statements.
        lines.append(re.sub(r"\s+", " ", text).strip().rstrip(";") + ";")
    return "\n".join(lines) + "\n"


def run_pgbench(url: str, script: str) -> float | None:
    """Transactions per second pgbench reaches with that script, CLIENTS clients."""
    pgbench = which("pgbench")
    if pgbench is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as handle:
        handle.write(script)
    try:
        argv = [
            pgbench,
            "-n",
            "-M",
            "simple",  # as psycopg2 sends them: text with the values inline
            "-c",
            str(CLIENTS),
            "-j",
            "2",
            "-T",
            str(SECONDS),
            "-f",
            handle.name,
            url,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=SECONDS + 60)
    finally:
        Path(handle.name).unlink()
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", done.stdout)
    if not match:
        log(f"pgbench failed: {done.stdout[-400:]} {done.stderr[-400:]}")
        return None
    return float(match.group(1))


def measure(url: str) -> list[Figure]:
    """Run both sides of the database path and return its figures."""
    figures = []
    log("database path: recording the SQL of one call of each path")
    apply_sql, receive_sql = record_sql(url)
    log("database path: pgbench rows")
    track_many(url, [f"pgb{n:07d}" for n in range(1, PGBENCH_ROWS + 1)])
    # Fresh statistics after the bulk insert, so both sides get the same plans.
    query_one(url, "ANALYZE trainings; SELECT 1")
    cases = [
        (
            "apply_update / s",
            "apply",
            "apy",
            apply_sql,
            "rec_apply_000001",
            "no webhook id",
            len(apply_sql),
        ),
        (
            "receive_delivery / s",
            "receive",
            "rcv",
            receive_sql,
            "rec_recv_000001",
            "msg_rec_recv_000001",
            len(receive_sql),
        ),
    ]
    for name, kind, prefix, statements, training_id, webhook_id, round_trips in cases:
        log(f"database path: {name} with {CLIENTS} Python clients for {SECONDS} s")
        python_rate = _run_clients(kind, url, prefix)
        script = pgbench_script(statements, training_id, webhook_id)
        log(f"database path: pgbench, the same {round_trips} statements, {CLIENTS} clients")
        before = query_one(url, "SELECT count(*) FROM training_transitions")
        pg_rate = run_pgbench(url, script)
        if pg_rate is None:
            figures.append(not_measured(SECTION, name, "pgbench is not available or failed"))
            continue
        changed = query_one(url, "SELECT count(*) FROM training_transitions") - before
        figures.append(
            Figure(
                SECTION,
                name,
                python_rate,
                "calls/s",
                reference=pg_rate,
                reference_name=f"pgbench, same SQL ({round_trips} round trips)",
                target="(ratio = cost of our Python layer)",
                note=f"{CLIENTS} clients; pgbench changed {changed} rows in "
                f"{int(pg_rate * SECONDS)} transactions",
            )
        )
    return figures
