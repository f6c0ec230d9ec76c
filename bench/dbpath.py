"""The database path: `service.apply_update` and `inbox.receive_delivery` calls per second
against pgbench running the very same SQL with the same number of clients.

The pgbench script is not written by hand: one call of each path is recorded (the SQL the
driver actually sent), and its training id and webhook-id become pgbench variables. So
when db.py changes, the yardstick changes with it. Every call on both sides is a real
state change: each one moves a fresh `training` row to `processing`.
"""

from __future__ import annotations

import contextlib
import functools
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

import psycopg2.extensions

from bench import reference_apps
from bench.common import Figure, log, not_measured, query_one, track_many, which
from bench.loadgen import training_payload
from webhook_sync import db, inbox, logs, service
from webhook_sync.dev import embedded_postgres
from webhook_sync.training import parse_training

SECTION = "database path"
CLIENTS = 4
_NOTIFY = re.compile(r"SELECT pg_notify\(.*?\)::text\)", re.DOTALL)
SECONDS = 3
# Enough fresh rows that no client runs out within SECONDS, on either side.
PYTHON_ROWS_PER_CLIENT = 15_000
# Per pgbench run, each in its own id range: the minimal UPDATE reaches 8,000/s here, and
# random ids must rarely hit a row an earlier transaction of the same run already moved.
PGBENCH_ROWS = 150_000
ROUNDS = 3
# Issue 17: the delivery's SQL at half the pace of the minimal reference's one UPDATE.
PGBENCH_TARGET = 0.5


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


_PREPARE = re.compile(r"PREPARE (\w+) \((.*?)\) AS (.*)", re.DOTALL)
_EXECUTE = re.compile(r"EXECUTE (\w+) \(")


class _Recorder:
    """Collects the statements recording cursors execute. A server-side prepared statement
    is recorded as the statement it runs (its PREPAREd text, with the EXECUTE's values in
    place of $1, $2, …), since pgbench prepares a script's statements itself (-M prepared);
    the PREPARE, sent once per connection, is not part of a call."""

    statements: ClassVar[list[str]] = []
    prepared: ClassVar[dict[str, tuple[list[str], str]]] = {}
    # Whether a statement ran inside a transaction (psycopg2 sent BEGIN before it itself).
    in_transaction: ClassVar[bool] = False

    @classmethod
    def record(cls, cursor: psycopg2.extensions.cursor, vars: Any) -> None:
        sent = cursor.query.decode()
        cls.in_transaction = cls.in_transaction or not cursor.connection.autocommit
        prepare = _PREPARE.match(sent)
        if prepare:
            name, types, body = prepare.groups()
            cls.prepared[name] = ([t.strip() for t in types.split(",")], body)
            return
        execute = _EXECUTE.match(sent)
        if execute:
            types, body = cls.prepared[execute.group(1)]
            values = [cursor.mogrify("%s", (value,)).decode() for value in vars]
            # Highest numbers first, so that $1 does not replace the start of $10.
            for number in range(len(values), 0, -1):
                body = body.replace(f"${number}", f"({values[number - 1]})::{types[number - 1]}")
            sent = body
        cls.statements.append(sent)


@functools.cache
def _recording(base: type[psycopg2.extensions.cursor]) -> type[psycopg2.extensions.cursor]:
    """`base` (a plain cursor, a dict cursor) recording what it executes."""

    class Recording(base):  # type: ignore[misc, valid-type]
        def execute(self, query: Any, vars: Any = None) -> Any:
            result = super().execute(query, vars)
            _Recorder.record(self, vars)
            return result

    return Recording


@contextlib.contextmanager
def recording(conn: db.Connection) -> Iterator[list[str]]:
    """Record every statement `conn` executes meanwhile, through any cursor it opens
    (bench-only instrumentation)."""
    _Recorder.statements = []
    _Recorder.in_transaction = False
    if not conn.prepared:
        _Recorder.prepared = {}
    cursor = conn.cursor

    def recording_cursor(*args: Any, cursor_factory: Any = None, **kwargs: Any) -> Any:
        base = cursor_factory or conn.cursor_factory or psycopg2.extensions.cursor
        return cursor(*args, cursor_factory=_recording(base), **kwargs)

    conn.cursor = recording_cursor  # type: ignore[method-assign]
    try:
        yield _Recorder.statements
    finally:
        del conn.cursor


def record_sql(url: str) -> tuple[list[str], list[str]]:
    """The statements of one apply_update (own transaction) and one receive_delivery."""
    track_many(url, ["rec_apply_000001", "rec_recv_000001"])
    conn = db.connect(url, "webhook-sync bench record")
    try:
        with recording(conn) as statements, conn:
            service.apply_update(conn, _training("rec_apply_000001"), "poll")
        apply_sql = ["BEGIN", *statements, "COMMIT"]
        payload = json.loads(training_payload("rec_recv_000001", "processing"))
        with recording(conn) as statements:
            inbox.receive_delivery(
                conn, webhook_id="msg_rec_recv_000001", payload=payload, signed_at=None
            )
        receive_sql = list(statements)
        if _Recorder.in_transaction:
            receive_sql = ["BEGIN", *receive_sql, "COMMIT"]
    finally:
        conn.close()
    return apply_sql, receive_sql


def pgbench_script(statements: list[str], training_id: str, webhook_id: str, case: int) -> str:
    """Turn recorded statements into a pgbench script over fresh random rows of its own
    range (`case`), so no case finds rows another one already moved."""
    first = case * PGBENCH_ROWS + 1
    lines = [
        f"\\set n random({first}, {first + PGBENCH_ROWS - 1})",
        "\\set w random(1, 2000000000)",
    ]
    for statement in statements:
        text = statement.replace(f"'{training_id}'", "('pgb' || lpad(:n::text, 7, '0'))")
        text = text.replace(f"'{webhook_id}'", "('msg_pgb_' || :w)")
        # pgbench ends a command at a semicolon outside quotes; ours are single statements.
        lines.append(re.sub(r"\s+", " ", text).strip().rstrip(";") + ";")
    return "\n".join(lines) + "\n"


def find_pgbench() -> str | None:
    """pgbench from the machine's PostgreSQL, else the one pgserver bundles."""
    found = which("pgbench")
    if found:
        return found
    with contextlib.suppress(ImportError):
        pgserver = embedded_postgres.load_pgserver()
        bundled = Path(pgserver.__file__).parent / "pginstall" / "bin" / "pgbench"
        if bundled.exists():
            return str(bundled)
    return None


def run_pgbench(url: str, script: str, protocol: str = "simple") -> float | None:
    """Transactions per second pgbench reaches with that script, CLIENTS clients; the
    simple protocol is how psycopg2 sends statements (text, values inline, planned each
    time), `prepared` plans each statement once per connection."""
    pgbench = find_pgbench()
    if pgbench is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as handle:
        handle.write(script)
    try:
        argv = [
            pgbench,
            "-n",
            "-M",
            protocol,
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


def _pgbench_case(
    url: str,
    statements: list[str],
    training_id: str,
    webhook_id: str,
    case: int,
    protocol: str = "simple",
) -> tuple[float | None, int]:
    """pgbench's rate for the statements, and how many of its rows really moved."""
    first = case * PGBENCH_ROWS + 1
    moved_sql = (
        "SELECT count(*) FROM webhook_sync.trainings WHERE replicate_status = 'processing'"
        f" AND id BETWEEN 'pgb{first:07d}' AND 'pgb{first + PGBENCH_ROWS - 1:07d}'"
    )
    script = pgbench_script(statements, training_id, webhook_id, case)
    rate = run_pgbench(url, script, protocol)
    return rate, query_one(url, moved_sql)


def measure(url: str) -> list[Figure]:
    """Run both sides of the database path, and what the database alone allows, as figures."""
    log("database path: recording the SQL of one call of each path")
    apply_sql, receive_sql = record_sql(url)
    # The NOTIFY takes a cluster-wide lock at commit, so notifying transactions commit
    # one at a time; the same statements without it show what that costs.
    silent_sql = [_NOTIFY.sub("SELECT 1", statement) for statement in receive_sql]
    minimal_sql = [
        reference_apps.GUARDED_UPDATE.replace("%(id)s", "'rec_min_000001'").replace(
            "%(status)s", "'processing'"
        )
    ]
    # pgbench runs: the two paths as shipped (server-side prepared, as db.py runs them),
    # the delivery planned per call and without its NOTIFY (what planning and the notify
    # lock cost), and the minimal reference's single guarded UPDATE as its app sends it
    # (the database's own ceiling).
    delivery = ("rec_recv_000001", "msg_rec_recv_000001")
    scripts = {
        "apply": (apply_sql, "rec_apply_000001", "-", "prepared"),
        "receive": (receive_sql, *delivery, "prepared"),
        "unprepared": (receive_sql, *delivery, "simple"),
        "silent": (silent_sql, *delivery, "prepared"),
        "minimal": (minimal_sql, "rec_min_000001", "-", "simple"),
    }
    log("database path: pgbench rows")
    # Made by the server: over a million ids would be a slow query parameter.
    query_one(
        url,
        "INSERT INTO webhook_sync.trainings (id, user_id, training_status, updated_by)"
        " SELECT 'pgb' || lpad(n::text, 7, '0'), 'bench', 'training', 'track'"
        " FROM generate_series(1, %(rows)s) AS n;"
        # Fresh statistics after the bulk insert, so both sides get the same plans.
        " ANALYZE webhook_sync.trainings; SELECT 1",
        {"rows": ROUNDS * len(scripts) * PGBENCH_ROWS},
    )
    python: dict[str, list[float]] = {"apply": [], "receive": []}
    pg: dict[str, list[float]] = {name: [] for name in scripts}
    moved: dict[str, int] = dict.fromkeys(scripts, 0)
    # Rounds interleave every measurement, so the machine's other load hurts all alike.
    for round_no in range(ROUNDS):
        for index, (name, (statements, training_id, webhook_id, protocol)) in enumerate(
            scripts.items()
        ):
            if name in python:
                log(f"database path: {name} from {CLIENTS} Python clients, round {round_no + 1}")
                python[name].append(_run_clients(name, url, f"{name[:3]}{round_no}"))
            log(f"database path: pgbench {name} ({len(statements)} statements), {CLIENTS} clients")
            case = round_no * len(scripts) + index
            rate, changed = _pgbench_case(url, statements, training_id, webhook_id, case, protocol)
            if rate is not None:
                pg[name].append(rate)
            moved[name] += changed
    if not all(pg.values()):
        return [not_measured(SECTION, "all figures", "pgbench is not available or failed")]
    best = {name: max(rates) for name, rates in pg.items()}
    figures = [
        Figure(
            SECTION,
            f"{function} / s",
            max(python[name]),
            "calls/s",
            reference=best[name],
            reference_name=f"pgbench, same SQL ({len(scripts[name][0])} round trips)",
            target="(ratio = cost of our Python layer)",
            note=f"{CLIENTS} clients each side, best of {ROUNDS} rounds of {SECONDS} s; pgbench"
            f" moved {moved[name]} rows in {int(sum(pg[name]) * SECONDS)} transactions",
        )
        for name, function in (("apply", "apply_update"), ("receive", "receive_delivery"))
    ]
    shipped = Figure(
        SECTION,
        "pgbench: delivery SQL as shipped",
        best["receive"],
        "tx/s",
        reference=best["minimal"],
        reference_name="pgbench, minimal reference SQL (1 UPDATE, 1 commit)",
        target=f">= {PGBENCH_TARGET} x minimal",
        note=f"{len(receive_sql)} round trip(s), -M prepared as db.py runs it; moved "
        f"{moved['receive']} rows; the minimal reference's UPDATE moved {moved['minimal']}",
    )
    shipped.met = shipped.ratio_at_least(PGBENCH_TARGET)
    figures += [
        shipped,
        Figure(
            SECTION,
            "pgbench: delivery SQL prepared",
            best["receive"],
            "tx/s",
            reference=best["unprepared"],
            reference_name="pgbench, same SQL planned per call (-M simple)",
            target="(what planning each call costs)",
            note=f"planned per call moved {moved['unprepared']} rows",
        ),
    ]
    if silent_sql == receive_sql:
        figures.append(
            not_measured(SECTION, "pgbench: delivery SQL without NOTIFY", "it sends no NOTIFY")
        )
    else:
        figures.append(
            Figure(
                SECTION,
                "pgbench: delivery SQL without NOTIFY",
                best["silent"],
                "tx/s",
                reference=best["receive"],
                reference_name="pgbench, delivery SQL as shipped",
                target="(what the NOTIFY's commit lock costs)",
                note=f"{len(receive_sql)} round trips as shipped; without NOTIFY moved "
                f"{moved['silent']} rows",
            )
        )
    return figures
