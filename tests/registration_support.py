"""Helpers for the registration tests: a simulator whose webhooks never arrive, a fast
client for it, and trainings created the way a platform creates them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import requests

from webhook_sync import replicate
from webhook_sync.dev.simulator import (
    Faults,
    Lifecycle,
    Simulator,
    SimulatorServer,
    start_in_thread,
)


@contextmanager
def silent_simulator(seed: int, train_seconds: float) -> Iterator[SimulatorServer]:
    """The simulator on a free port, every webhook dropped, no failures, trainings that
    start at once and train for `train_seconds`."""
    simulator = Simulator(
        seed=seed,
        faults=Faults(read_rpm=1_000_000, drop_rate=1.0),
        lifecycle=Lifecycle(start_seconds=0.1, train_seconds=train_seconds, fail_rate=0.0),
    )
    with start_in_thread(simulator) as server:
        yield server


def client_for(server: SimulatorServer) -> replicate.ReplicateClient:
    """A fast client for the simulator, with its token."""
    return replicate.ReplicateClient(
        server.simulator.tokens[0], server.api_base_url, max_rps=1000, backoff_base=0.001
    )


def create_training(
    server: SimulatorServer, webhook: str | None, destination: str = "acme/lora"
) -> str:
    """Create one training at the simulator, as a platform does; return its id."""
    body: dict[str, object] = {"destination": destination, "input": {"steps": 1}}
    if webhook:
        body["webhook"] = webhook
    answer = requests.post(
        f"{server.api_base_url}/models/acme/trainer/versions/{'v' * 64}/trainings",
        json=body,
        headers={"Authorization": f"Bearer {server.simulator.tokens[0]}"},
        timeout=10,
    )
    answer.raise_for_status()
    return answer.json()["id"]
