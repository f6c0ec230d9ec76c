"""`make run`'s runner: embedded PostgreSQL, the simulator, web and worker, stopped by Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.support import REPO, free_port, wait_until

# What `make demo` runs to find `make run`'s embedded PostgreSQL when DATABASE_URL is unset.
DEMO_ATTACH = """
import os
from webhook_sync.dev import demo
with demo.database_url(os.environ) as url:
    print(url)
"""


@pytest.mark.slow
def test_run_starts_everything_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """With nothing configured it starts PostgreSQL, migrates, serves ready, stops cleanly;
    without XDG_RUNTIME_DIR neither it nor `make demo` attaching to its PostgreSQL prints
    platformdirs' RuntimeDirWarning."""
    shutil.copy(REPO / "Procfile", tmp_path / "Procfile")
    port, simulator_port = free_port(), free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in {
            "DATABASE_URL",
            "REPLICATE_API_TOKEN",
            "REPLICATE_WEBHOOK_SECRET",
            "XDG_RUNTIME_DIR",
        }
    }
    env.update(PORT=str(port), SIMULATOR_PORT=str(simulator_port), WEB_CONCURRENCY="1")
    log = (tmp_path / "run.log").open("w+")
    runner = subprocess.Popen(
        [sys.executable, "-m", "webhook_sync.dev.run"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:

        def answer(url: str) -> tuple[requests.Response] | None:
            # A 1-tuple, because a Response with an error status is falsy.
            try:
                return (requests.get(url, timeout=1),)
            except requests.ConnectionError:
                return None

        (ready,) = wait_until(
            lambda: answer(f"http://127.0.0.1:{port}/readyz"), timeout=60, interval=0.2
        )
        (simulator,) = wait_until(
            lambda: answer(f"http://127.0.0.1:{simulator_port}/v1/trainings"), timeout=30
        )
        demo = subprocess.run(
            [sys.executable, "-c", DEMO_ATTACH],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        os.killpg(runner.pid, signal.SIGINT)
        exit_code = runner.wait(timeout=40)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    log.seek(0)
    lines = log.read().splitlines()

    assert ready.status_code == 200
    assert "embedded_postgresql" in lines[0]
    assert (tmp_path / ".data" / "pg").is_dir()
    assert any("local_simulator" in line for line in lines[:3])
    assert simulator.status_code == 401  # the simulator answers, and wants the token
    assert exit_code == 0
    assert [line for line in lines if "XDG_RUNTIME_DIR" in line] == []
    assert (demo.returncode, demo.stderr) == (0, "")
    assert demo.stdout.startswith("postgresql://")
