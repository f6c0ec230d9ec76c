"""The local Replicate simulator: trainings API, signed webhooks and faults, all in memory.

Programmatic use (tests, benchmarks, demos)::

    from webhook_sync.dev.simulator import BulkPlan, Lifecycle, Simulator, start_in_thread

    sim = Simulator(seed=1, lifecycle=Lifecycle(start_seconds=0.1, train_seconds=0.5))
    with start_in_thread(sim) as server:       # a real threaded WSGI server on a free port
        server.api_base_url                    # http://127.0.0.1:PORT/v1, token sim.tokens[0]
        sim.set_faults(drop_rate=1.0)          # or POST /_admin/faults
        ids = sim.create_many(BulkPlan(count=10_000, webhook=url))

Statuses advance with the wall clock and are evaluated when read; a scheduler thread
sends each webhook when it falls due. The pieces: `settings` and
`state` (pure), `webhooks` (the sender), `engine` (the
`Simulator` class) and `app` (the HTTP routes, admin routes documented there).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from webhook_sync.dev.simulator import app as simulator_app
from webhook_sync.dev.simulator.engine import (
    DEFAULT_TOKEN,
    DEV_SECRET,
    Simulator,
    generate_secret,
)
from webhook_sync.dev.simulator.settings import (
    BulkPlan,
    Faults,
    Lifecycle,
    SimulatorError,
)

__all__ = [
    "DEFAULT_TOKEN",
    "DEV_SECRET",
    "BulkPlan",
    "Faults",
    "Lifecycle",
    "Simulator",
    "SimulatorError",
    "SimulatorServer",
    "generate_secret",
    "run",
    "serve_forever",
    "start_in_thread",
]


class _QuietHandler(WSGIRequestHandler):
    """Werkzeug's handler without a log line per request (pollers make thousands)."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Log nothing for a request that was answered."""


@dataclass
class SimulatorServer:
    """A simulator served over HTTP on a background thread; `shutdown()` stops both."""

    simulator: Simulator
    url: str
    server: BaseWSGIServer = field(repr=False)
    thread: threading.Thread = field(repr=False)

    @property
    def api_base_url(self) -> str:
        """What clients use as REPLICATE_API_BASE_URL: `http://127.0.0.1:PORT/v1`."""
        return self.url + "/v1"

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        return self.server.server_port

    def shutdown(self) -> None:
        """Stop serving, wait for the server thread, and stop the webhook sender."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
        self.simulator.stop()

    def __enter__(self) -> SimulatorServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


def make_wsgi_server(simulator: Simulator, host: str, port: int) -> BaseWSGIServer:
    """A threaded werkzeug server for the simulator's app (port 0 picks a free one)."""
    return make_server(
        host,
        port,
        simulator_app.create_app(simulator),
        threaded=True,
        request_handler=_QuietHandler,
    )


def start_in_thread(
    simulator: Simulator, host: str = "127.0.0.1", port: int = 0
) -> SimulatorServer:
    """Start the simulator and serve it on a background thread; return where it listens."""
    server = make_wsgi_server(simulator, host, port)
    simulator.start()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="sim-http", daemon=True
    )
    thread.start()
    return SimulatorServer(simulator, f"http://{host}:{server.server_port}", server, thread)


def serve_forever(
    simulator: Simulator, host: str, port: int, on_ready: Callable[[str], None]
) -> None:
    """Serve in the foreground until Ctrl-C or SIGTERM; `on_ready(url)` runs once it listens.

    Call it from the main thread: it installs a SIGTERM handler there.
    """
    server = make_wsgi_server(simulator, host, port)
    # honcho and process managers stop with SIGTERM: end as cleanly as on Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    simulator.start()
    on_ready(f"http://{host}:{server.server_port}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.server_close()
        simulator.stop()


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run(
    *,
    host: str,
    port: int,
    seed: int | None,
    secret: str | None,
    tokens: Iterable[str],
    lifecycle: Mapping[str, Any],
    faults: Mapping[str, Any],
    retry_window_seconds: float,
    environ: Mapping[str, str],
    echo: Callable[[str], None],
) -> None:
    """Build a simulator from CLI settings and serve it until Ctrl-C, announcing it via `echo`.

    The secret is `secret` (given explicitly), else the published `DEV_SECRET`. It is
    never taken from REPLICATE_WEBHOOK_SECRET: the simulator serves its secret to anyone
    holding the published default token, and a secret from the environment might be
    real. Both kinds are development secrets, so the banner prints the secret.
    """
    sim = Simulator(
        secret=secret or DEV_SECRET,
        tokens=tuple(tokens) or (DEFAULT_TOKEN,),
        seed=seed,
        lifecycle=Lifecycle().updated(lifecycle),
        faults=Faults().updated(faults),
        retry_window_seconds=retry_window_seconds,
    )

    def announce(url: str) -> None:
        echo(f"Replicate simulator listening on {url} (Ctrl-C stops it)")
        echo(f"  REPLICATE_API_BASE_URL={url}/v1")
        echo(f"  REPLICATE_API_TOKEN={sim.tokens[0]}")
        echo(f"  REPLICATE_WEBHOOK_SECRET={sim.secret}  # a development secret: fine to print")
        configured = environ.get("REPLICATE_WEBHOOK_SECRET", "").split()
        if configured and configured[0] != sim.secret:
            # Say so, without the value: a service verifying with it would refuse our webhooks.
            echo("  note: REPLICATE_WEBHOOK_SECRET from the environment is not used (dev only)")
        echo(f"  seed={sim.seed}  admin: {url}/_admin  faults: {url}/_admin/faults")

    serve_forever(sim, host, port, announce)
