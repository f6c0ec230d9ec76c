"""A small Replicate stand-in over real HTTP for client, sweep and worker tests.

It serves `GET /trainings` (100 per page, newest first, cursor pagination), `GET
/trainings/{id}`, the webhook secret and cancel, checks the bearer token, counts every
request by path, and plays scripted responses (status, headers, body, delay) first.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "r8_test_token_never_logged"
PAGE_SIZE = 100


@dataclass
class Scripted:
    """One canned answer; `delay` seconds pass before it is sent."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class FakeReplicate:
    """Trainings in memory, newest first, with request counts and scripted answers."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.trainings: dict[str, dict[str, Any]] = {}
        self.counts: Counter[str] = Counter()
        self.scripts: dict[str, deque[Scripted]] = {}
        self.always: Scripted | None = None
        self.latency = 0.0
        # When set, each answer waits for a permit: a test decides how far requests get.
        self.permits: threading.Semaphore | None = None
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self._clock = datetime.now(UTC)

    @property
    def url(self) -> str:
        """The base URL, like https://api.replicate.com/v1."""
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def add(self, training_id: str, status: str = "processing", **fields: Any) -> dict[str, Any]:
        """Create a training now; each one is newer than the one before."""
        with self.lock:
            # Real time, as Replicate's creation precedes our row; strictly increasing.
            self._clock = max(datetime.now(UTC), self._clock + timedelta(microseconds=1))
            obj = {
                "id": training_id,
                "status": status,
                "created_at": self._clock.isoformat().replace("+00:00", "Z"),
                "completed_at": None,
                "output": None,
                "error": None,
                "logs": "",
                **fields,
            }
            self.trainings[training_id] = obj
            return obj

    def finish(self, training_id: str, status: str = "succeeded") -> None:
        """Move a training to a terminal status, as Replicate would."""
        with self.lock:
            obj = self.trainings[training_id]
            obj["status"] = status
            obj["completed_at"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            if status == "succeeded":
                obj["output"] = {"version": f"acme/model:{training_id}v", "weights": "https://x/w"}

    def script(self, path: str, *answers: Scripted) -> None:
        """Answer the next requests for `path` (e.g. /v1/trainings/abc) with these, in order."""
        with self.lock:
            self.scripts.setdefault(path, deque()).extend(answers)

    def count(self, prefix: str) -> int:
        """Requests whose path starts with `prefix`."""
        with self.lock:
            return sum(n for path, n in self.counts.items() if path.startswith(prefix))

    def total(self) -> int:
        """All requests served."""
        with self.lock:
            return sum(self.counts.values())

    # --- answers -----------------------------------------------------------------------

    def answer(self, method: str, raw_path: str, authorization: str | None) -> Scripted:
        """Decide the answer to one request (called from the handler threads)."""
        parts = urlsplit(raw_path)
        path = parts.path
        with self.lock:
            self.counts[path] += 1
            queued = self.scripts.get(path)
            if queued:
                return queued.popleft()
            if self.always is not None:
                return self.always
            if authorization != f"Bearer {self.token}":
                return Scripted(401, {"detail": "Invalid token.", "status": 401})
            if method == "GET" and path == "/v1/trainings":
                return Scripted(200, self._page(parts.query))
            if method == "GET" and path == "/v1/webhooks/default/secret":
                return Scripted(200, {"key": "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"})
            if path.startswith("/v1/trainings/"):
                training_id = path.removeprefix("/v1/trainings/").removesuffix("/cancel")
                obj = self.trainings.get(training_id)
                if obj is None:
                    return Scripted(404, {"detail": "Not found.", "status": 404})
                if (
                    method == "POST"
                    and path.endswith("/cancel")
                    and obj["status"]
                    not in (
                        "succeeded",
                        "failed",
                        "canceled",
                    )
                ):
                    obj["status"] = "canceled"
                return Scripted(200, dict(obj))
            return Scripted(404, {"detail": "Not found.", "status": 404})

    def _page(self, query: str) -> dict[str, Any]:
        newest_first = sorted(self.trainings.values(), key=lambda t: t["created_at"], reverse=True)
        offset = int(parse_qs(query).get("cursor", ["0"])[0])
        results = [
            {key: value for key, value in obj.items() if key != "logs"}
            for obj in newest_first[offset : offset + PAGE_SIZE]
        ]
        more = offset + PAGE_SIZE < len(newest_first)
        next_url = f"{self.url}/trainings?cursor={offset + PAGE_SIZE}" if more else None
        return {"next": next_url, "previous": None, "results": results}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._respond("GET")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._respond("POST")

    def _respond(self, method: str) -> None:
        fake = self.server.fake
        answer = fake.answer(method, self.path, self.headers.get("Authorization"))
        if fake.permits is not None:
            fake.permits.acquire(timeout=10)
        delay = max(answer.delay, fake.latency)
        if delay:
            time.sleep(delay)  # the scripted slowness itself, not a wait for a condition
        body = b"" if answer.body is None else json.dumps(answer.body).encode()
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and went away, which is what the test wanted

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeReplicate


@contextmanager
def running(fake: FakeReplicate | None = None) -> Iterator[FakeReplicate]:
    """Serve a FakeReplicate on a free port for the duration of the block."""
    fake = fake or FakeReplicate()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.fake = fake
    fake.server = server
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
