"""A tiny real HTTP server for tests that records each webhook it receives."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.support import wait_until


@dataclass(frozen=True)
class Received:
    """One request as it arrived: path, headers (lowercased names) and the raw body."""

    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


class WebhookReceiver:
    """Listens on a free 127.0.0.1 port; answers from `statuses` in turn, then `default`.

    `respond`, if given, decides the status of each request instead.
    """

    def __init__(
        self,
        statuses: Iterable[int] = (),
        default: int = 200,
        respond: Callable[[Received], int] | None = None,
    ) -> None:
        self.received: list[Received] = []
        self._statuses = deque(statuses)
        self._default = default
        self._respond = respond
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The URL to send webhooks to."""
        return f"http://127.0.0.1:{self._server.server_port}/webhooks/replicate"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least `count` requests arrived; return all of them."""
        wait_until(lambda: len(self.received) >= count, timeout, message=f"{count} webhooks")
        with self._lock:
            return list(self.received)

    def close(self) -> None:
        """Stop listening."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> int:
        with self._lock:
            status = self._statuses.popleft() if self._statuses else self._default
        if self._respond is not None:
            status = self._respond(Received(path, headers, body, 0))
        with self._lock:
            self.received.append(Received(path, headers, body, status))
        return status

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                headers = {name.lower(): value for name, value in self.headers.items()}
                status = receiver._answer(self.path, headers, body)
                payload = b'{"ok":true}' if status < 300 else b'{"error":"refused"}'
                self.send_response(status)
                if 300 <= status < 400:
                    # Back to itself: a client that follows redirects would be seen here.
                    self.send_header("Location", self.path)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                """Keep test output quiet."""

        return Handler
