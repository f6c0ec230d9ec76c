"""Shared machinery for the benchmarks: the throwaway database, processes, ports and memory."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg2
from psycopg2 import sql

from webhook_sync import db, migrations
from webhook_sync.dev import embedded_postgres

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# The machine PostgreSQL every development box here runs; tried when nothing is configured.
MACHINE_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
BENCH_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WEBHOOK_PATH = "/webhooks/replicate"


@dataclass
class Figure:
    """One row of the report: a measured value beside its reference and target."""

    section: str
    name: str
    value: float | None
    unit: str
    reference: float | None = None
    reference_name: str = ""
    target: str = ""
    note: str = ""
    # "higher" when more is better, "lower" when less is; decides the ratio's sense.
    better: str = "higher"
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        """The value divided by its reference (None when either is missing)."""
        if self.value is None or not self.reference:
            return None
        return self.value / self.reference

    def ratio_at_least(self, share: float) -> bool:
        """Whether the ratio reaches `share` (a higher-is-better target); False without one."""
        return self.ratio is not None and self.ratio >= share


def throttled_figure(section: str, name: str, throttled: int, note: str) -> Figure:
    """The 429s Replicate's rate limit answered during a run: the target is none."""
    return Figure(
        section,
        name,
        float(throttled),
        "responses",
        target="0",
        better="lower",
        met=throttled == 0,
        note=note,
    )


def not_measured(section: str, name: str, reason: str, target: str = "") -> Figure:
    """A figure that could not be measured, saying why (on one line) instead of a number."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    # A traceback's last line names the cause; the table keeps one line per note.
    why = lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return Figure(section, name, None, "", target=target, note=f"not measured: {why[:400]}")


def log(message: str) -> None:
    """Progress on stderr, so the table on stdout stays clean."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_until(
    condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll `condition` until truthy; raise TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:port."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def url_for_database(url: str, dbname: str) -> str:
    """The same server URL pointing at another database."""
    return urlunsplit(urlsplit(url)._replace(path="/" + dbname))


def _answers(url: str) -> bool:
    try:
        psycopg2.connect(url, connect_timeout=2).close()
    except psycopg2.Error:
        return False
    return True


@contextlib.contextmanager
def admin_url() -> Iterator[str]:
    """A server where we may create databases: configured, the machine's, or an embedded one."""
    for name in ("TEST_DATABASE_URL", "DATABASE_URL"):
        configured = os.environ.get(name)
        if configured and _answers(configured):
            yield configured
            return
    if _answers(MACHINE_ADMIN_URL):
        yield MACHINE_ADMIN_URL
        return
    pgserver = embedded_postgres.load_pgserver()  # only when no server answers
    with tempfile.TemporaryDirectory(prefix="webhook-sync-bench-pg-") as folder:
        server = pgserver.get_server(folder, cleanup_mode="stop")
        try:
            yield server.get_uri()
        finally:
            server.cleanup()


def _admin_execute(url: str, statement: str) -> None:
    conn = psycopg2.connect(url)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
    finally:
        conn.close()


@contextlib.contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    """A freshly migrated database of our own on that server, dropped afterwards."""
    name = f"wsbench_{uuid.uuid4().hex[:12]}"
    _admin_execute(server_url, f'CREATE DATABASE "{name}"')
    url = url_for_database(server_url, name)
    try:
        conn = db.connect(url, "webhook-sync bench")
        try:
            migrations.migrate(conn)
        finally:
            conn.close()
        yield url
    finally:
        _admin_execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the processes started inside, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def track_many(
    url: str, ids: Sequence[str], user_id: str = "bench", schema: str = "webhook_sync"
) -> None:
    """Insert rows in the `training` state the way `track` does, in one statement (setup only)."""
    conn = db.connect(url, "webhook-sync bench setup")
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {}.trainings (id, user_id, training_status, updated_by)"
                    " SELECT unnest(%(ids)s::text[]), %(user_id)s, 'training', 'track'"
                ).format(sql.Identifier(schema)),
                {"ids": list(ids), "user_id": user_id},
            )
    finally:
        conn.close()


def query_one(url: str, sql: str, params: dict[str, Any] | None = None) -> Any:
    """The first column of the first row of one query (for checks after a run)."""
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params or {})
            return cur.fetchone()[0]
    finally:
        conn.close()


class Process:
    """A child process in its own process group, stopped by its own id."""

    def __init__(
        self, argv: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path = REPO
    ) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.popen = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def tail(self, lines: int = 15) -> str:
        """The last lines of its output, for error messages."""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`; only this process and its own group."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()


def children(pid: int) -> list[int]:
    """Direct child process ids of `pid` (a gunicorn master's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            # The command name may hold spaces; the fields after its closing paren do not.
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == pid:
                found.append(int(entry.name))
    return sorted(found)


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """Resident memory of a process in MiB (VmHWM for its peak), None when it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


def cpu_model() -> str:
    """The CPU model name as /proc/cpuinfo gives it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def git_commit() -> str:
    """The commit measured; `+dirty (files)` when the code in the working tree differs."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        # Untracked modules count too: they are measured when they are imported.
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "webhook_sync", "sql", "bench", "setup.cfg"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = [line[3:] for line in status.splitlines() if not line.endswith("bench/RESULTS.md")]
    if not dirty:
        return commit
    shown = ", ".join(dirty[:6]) + (f" and {len(dirty) - 6} more" if len(dirty) > 6 else "")
    return f"{commit}+dirty ({shown})"


def profile(pid: int, label: str, workdir: Path, seconds: float | None = None) -> Process | None:
    """With BENCH_PROFILE=DIR and py-spy installed, sample `pid` from outside (the measured
    process is unchanged) into DIR/<label>-<pid>.folded; None otherwise."""
    profile_dir = os.environ.get("BENCH_PROFILE")
    spy = which("py-spy")
    if not profile_dir or not spy:
        return None
    folded = Path(profile_dir) / f"{label}-{pid}.folded"
    argv = [spy, "record", "-p", str(pid), "-r", "100", "-f", "raw", "-o", str(folded)]
    if seconds is not None:
        argv += ["-d", str(max(1, round(seconds)))]
    return Process(argv, dict(os.environ), workdir / f"py-spy-{label}-{pid}.log")


def which(name: str) -> str | None:
    """A program on PATH or beside this Python."""
    return shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
