"""Pieces the end-to-end runs are built from: a managed real process, a recording proxy
in front of the simulator (one per worker process, so every fetch is attributed to the
process that made it, with its start and end time), a LISTEN connection that keeps every
`NOTIFY training_status`, and a PostgreSQL server of our own that may be restarted.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extensions
import requests

TRAINING_PATH_PREFIX = "/v1/trainings/"


def admin_execute(admin_url: str, *statements: str) -> None:
    """Run statements outside a transaction (CREATE/DROP DATABASE cannot run in one)."""
    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)
    finally:
        conn.close()


class ManagedProcess:
    """One real process started from a command line; its output goes to a file.

    It is stopped by its own process id only (SIGTERM, then SIGKILL at a deadline).
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id (only while started)."""
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> ManagedProcess:
        """Start the process with stdout and stderr appended to its log file."""
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=os.getcwd()
        )
        return self

    def running(self) -> bool:
        """True while the process has not exited."""
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL; return the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self._closed()

    def kill(self) -> int | None:
        """SIGKILL, as a crash or an out-of-memory kill would."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)
        return self._closed()

    def _closed(self) -> int | None:
        if self._log is not None:
            self._log.close()
            self._log = None
        assert self.popen is not None
        return self.popen.returncode

    def output(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass(frozen=True)
class Fetch:
    """One API request a worker process made, as the proxy saw it."""

    process: str
    method: str
    path: str
    training_id: str | None
    started: float
    ended: float
    status: int | None


class _QuietServer(ThreadingHTTPServer):
    """A threaded server that does not print the broken pipe of a client we SIGKILLed."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore a client gone mid-answer (that is the point of killing it); print the rest."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class RecordingProxy:
    """An HTTP proxy to the simulator that records every request of one worker process."""

    def __init__(self, label: str, target: str) -> None:
        self.label = label
        self.target = target.rstrip("/")
        self.fetches: list[Fetch] = []
        self.in_flight = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self.server = _QuietServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self._thread = threading.Thread(
            target=self.server.serve_forever, name=f"proxy-{label}", daemon=True
        )

    @property
    def api_base_url(self) -> str:
        """What the worker uses as REPLICATE_API_BASE_URL."""
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self) -> RecordingProxy:
        """Serve on a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request on to the simulator and record it; a 502 if that fails."""
        training_id = None
        if path.startswith(TRAINING_PATH_PREFIX):
            rest = urlsplit(path).path[len(TRAINING_PATH_PREFIX) :]
            training_id = rest.split("/")[0] or None
        with self._lock:
            self.in_flight += 1
        started = time.time()
        status: int | None = None
        try:
            response = self._session().request(
                method, self.target + path, headers=headers, data=body, timeout=30
            )
            status = response.status_code
            kept = [
                (key, value)
                for key, value in response.headers.items()
                if key.lower() in ("content-type", "retry-after")
            ]
            return status, kept, response.content
        except requests.RequestException:
            return 502, [("Content-Type", "application/json")], b'{"detail":"proxy"}'
        finally:
            fetch = Fetch(self.label, method, path, training_id, started, time.time(), status)
            with self._lock:
                self.in_flight -= 1
                self.fetches.append(fetch)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {
                    key: value
                    for key, value in self.headers.items()
                    if key.lower() in ("authorization", "content-type", "user-agent")
                }
                status, kept, content = proxy.forward(self.command, self.path, headers, body)
                self.send_response(status)
                for key, value in kept:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = _relay
            do_POST = _relay

            def log_message(self, format: str, *args: Any) -> None:
                """Log nothing per request."""

        return Handler


class NotifyCollector:
    """Keeps every `NOTIFY training_status` payload, reconnecting when the connection is cut."""

    def __init__(self, database_url: str, channel: str = "training_status") -> None:
        self.database_url = database_url
        self.channel = channel
        self.notifications: list[dict[str, Any]] = []
        self.reconnects = 0
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-collector", daemon=True)

    def start(self) -> NotifyCollector:
        """Start listening; returns once the first LISTEN is in place."""
        self._thread.start()
        if not self._listening.wait(15):
            raise AssertionError("could not LISTEN on the test database")
        return self

    def stop(self) -> None:
        """Stop the listening thread."""
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = psycopg2.connect(self.database_url, application_name="e2e notify collector")
            except psycopg2.OperationalError:
                self._stop.wait(0.2)  # the server is restarting: try again shortly
                continue
            try:
                conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
                with conn.cursor() as cur:
                    cur.execute(f"LISTEN {self.channel}")
                self._listening.set()
                while not self._stop.is_set():
                    if select.select([conn], [], [], 0.2)[0]:
                        conn.poll()
                        while conn.notifies:
                            note = conn.notifies.pop(0)
                            payload = json.loads(note.payload)
                            payload["received_at"] = time.time()
                            self.notifications.append(payload)
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                self.reconnects += 1
            finally:
                conn.close()
