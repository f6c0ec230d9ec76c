"""Helpers shared by the tests: database URLs, free ports, waiting for a condition."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg2.extras
from psycopg2 import sql

from webhook_sync import db

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
VENV_BIN = Path(sys.executable).parent


# Replicate's lifecycle written down here, not taken from status.py, so that the tests judge
# its order instead of restating it: nothing seen yet, starting, processing, a status not
# known yet (a later API's, placed after processing), then the terminals, all alike.
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "aborted"})
LIFECYCLE = {None: 0, "starting": 1, "processing": 2, **dict.fromkeys(TERMINAL_STATUSES, 4)}
UNKNOWN_POSITION = 3


def lifecycle_position(replicate_status: str | None) -> int:
    """Where a Replicate status stands in LIFECYCLE; later statuses are larger."""
    return LIFECYCLE.get(replicate_status, UNKNOWN_POSITION)


def procfile(path: Path = REPO / "Procfile") -> dict[str, str]:
    """The Procfile's process types and their command lines, as written."""
    processes = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        kind, _, command = line.partition(":")
        if command.strip() and not line.lstrip().startswith("#"):
            processes[kind.strip()] = command.strip()
    return processes


def database_url_for(url: str, dbname: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


def database_name(url: str) -> str:
    """The database a URL points at (its path, whatever query string follows)."""
    return urlsplit(url).path.lstrip("/")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, message: str = ""
) -> T:
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or condition}")
        time.sleep(interval)


def in_threads(count: int, work: Callable[[int], T], timeout: float = 60.0) -> list[T]:
    """Run `work(0)` … `work(count - 1)` on threads of their own at once and return their
    results in that order; the first error a thread raises is raised here, and a thread
    still running at the (generous) deadline fails the test."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=count)
    try:
        futures = [pool.submit(work, index) for index in range(count)]
        done, running = concurrent.futures.wait(
            futures, timeout, return_when=concurrent.futures.FIRST_EXCEPTION
        )
        for future in done:
            future.result()  # raises what the thread raised
        if running:
            raise AssertionError(f"{len(running)} of {count} threads still ran after {timeout}s")
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_cli(
    *args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the installed `webhook-sync` command as a real process and capture its output."""
    return subprocess.run(
        [str(VENV_BIN / "webhook-sync"), *args],
        env={**os.environ, **(env or {})},
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def select_transitions(conn: db.Connection, training_id: str) -> list[dict[str, Any]]:
    """Every recorded decision about one training in the connection's schema, oldest first."""
    query = sql.SQL("SELECT * FROM {}.training_transitions WHERE training_id = %s ORDER BY id")
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(query.format(sql.Identifier(conn.schema)), (training_id,))
        return [dict(row) for row in cur.fetchall()]
