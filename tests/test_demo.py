"""`webhook-sync demo` against a real simulator, the real web app and a real database."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from werkzeug.serving import make_server

from webhook_sync import web
from webhook_sync.config import Config
from webhook_sync.dev import demo
from webhook_sync.dev.simulator import (
    Faults,
    Lifecycle,
    Simulator,
    SimulatorServer,
    start_in_thread,
)

SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"


@pytest.fixture()
def simulator() -> Iterator[SimulatorServer]:
    """A fast simulator that already drops a quarter of its webhooks."""
    sim = Simulator(
        secret=SECRET,
        seed=11,
        lifecycle=Lifecycle(start_seconds=0.1, train_seconds=0.3, jitter=0),
        faults=Faults(drop_rate=0.25),
    )
    with start_in_thread(sim) as server:
        yield server


@pytest.fixture()
def webhook_url(database_url: str) -> Iterator[str]:
    """The service's real web app on a free port, verifying with SECRET."""
    app = web.create_app(Config(database_url=database_url, webhook_secrets=(SECRET,)))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/webhooks/replicate"
    server.shutdown()
    thread.join()


def test_demo_watches_trainings_reach_their_final_status(
    simulator: SimulatorServer, webhook_url: str, database_url: str
):
    """Without drops every row gets its final status by webhook; the drop rate is restored."""
    lines: list[str] = []

    converged = demo.run_demo(
        environ={"REPLICATE_API_BASE_URL": simulator.api_base_url, "DATABASE_URL": database_url},
        webhook_url=webhook_url,
        count=3,
        drop_rate=0.0,
        finish_in=(0.2, 0.6),
        timeout=60,
        user_id="demo-test",
        echo=lines.append,
    )

    assert converged, "\n".join(lines)
    assert "0 of 3 reached their final status through the poller" in lines
    assert sum(" webhook" in line and "delivered" in line for line in lines[-5:]) == 3
    assert simulator.simulator.faults.drop_rate == 0.25


def test_demo_without_a_simulator_says_so():
    """With nothing at REPLICATE_API_BASE_URL the demo fails with a short cause."""
    with pytest.raises(demo.DemoError, match="no local simulator"):
        demo.run_demo(
            environ={"REPLICATE_API_BASE_URL": "http://127.0.0.1:9/v1"},
            webhook_url="http://127.0.0.1:9/webhooks/replicate",
            count=1,
            drop_rate=0.5,
            finish_in=(1, 2),
            timeout=1,
            user_id="nobody",
            echo=lambda line: None,
        )
