"""A deploy as Heroku's Python buildpack makes it: the pushed files, a clean virtual
environment, `pip install -r requirements.txt` and nothing else (no dev extra), then the
Procfile's `release`, `web` and `worker` lines as written, with only the settings a
Heroku app has: DATABASE_URL (postgres://), PORT and the Replicate ones.

The virtual environment is cached in .venv-deploy-cache/, keyed by the hash of
requirements.txt and the Python version, so only the first run downloads from PyPI. Every
run still does the install, as a cached Heroku build does, which reinstalls the project
itself from the files of this run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support import REPO, free_port, procfile, wait_until
from tests.test_web import fetch_row, track
from tests.web_support import WEBHOOK_PATH, signed_delivery, training_payload
from webhook_sync.dev.simulator import (
    DEFAULT_TOKEN,
    BulkPlan,
    Simulator,
    SimulatorServer,
    start_in_thread,
)

# Builds a venv from requirements.txt with pip: minutes on a busy machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

VENV_CACHE = REPO / ".venv-deploy-cache"
# Heroku sends SIGTERM to every process of a dyno and SIGKILL 30 seconds later.
STOP_BUDGET_SECONDS = 30.0


def deploy_python() -> str:
    """The interpreter .python-version names: this one, or pythonX.Y on PATH."""
    wanted = (REPO / ".python-version").read_text(encoding="utf-8").strip()
    if f"{sys.version_info.major}.{sys.version_info.minor}" == wanted:
        return sys.executable
    found = shutil.which(f"python{wanted}")
    if found is None:
        pytest.skip(f"no Python {wanted} (.python-version) to build the deploy with")
    return found


def push(destination: Path) -> Path:
    """Copy what a `git push` of this tree delivers (tracked and unignored files, as they
    are now) to `destination`, the app's directory; return it."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if not os.path.lexists(source):
            continue  # deleted in the working tree, so not in the next commit either
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    return destination


def build(app: Path) -> Path:
    """The buildpack's install: a virtual environment (new when requirements.txt or the
    Python changed, else the cached one) and `pip install -r requirements.txt` in the
    app's directory; return the environment's bin folder."""
    python = deploy_python()
    version = subprocess.run(
        [python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True, check=True
    ).stdout
    key = hashlib.sha256((app / "requirements.txt").read_bytes() + version.encode()).hexdigest()
    venv = VENV_CACHE / key[:16]
    complete = venv / ".complete"
    if not complete.exists():
        shutil.rmtree(VENV_CACHE, ignore_errors=True)  # older keys, or a build cut short
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-r", "requirements.txt"],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    complete.touch()
    return venv / "bin"


class Dyno:
    """One Procfile line run as Heroku runs it (`bash -c`), in a process group of its own,
    so that SIGTERM reaches every process of it, as it does in a dyno."""

    def __init__(self, name: str, bin_dir: Path, app: Path, env: dict[str, str]) -> None:
        self.log_path = app / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [shutil.which("bash") or "/bin/bash", "-c", procfile()[name]],
                cwd=app,
                env={"PATH": f"{bin_dir}{os.pathsep}/usr/local/bin:/usr/bin:/bin", **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        """Everything the processes printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        """True while the process has not exited; fails with its output when it exited."""
        if self.process.poll() is not None:
            raise AssertionError(f"exited with {self.process.returncode}:\n{self.output()}")
        return True

    def terminate(self) -> float:
        """Send SIGTERM to the group now; return the time it was sent."""
        os.killpg(self.process.pid, signal.SIGTERM)
        return time.monotonic()

    def wait_stopped(self, since: float) -> tuple[int, float]:
        """Wait until every process of the group is gone (SIGKILL at Heroku's deadline);
        return the exit code and the seconds since `since`."""
        try:
            code = self.process.wait(
                timeout=max(0.0, since + STOP_BUDGET_SECONDS - time.monotonic())
            )
            wait_until(
                lambda: not self._group_alive(),
                timeout=max(0.0, since + STOP_BUDGET_SECONDS - time.monotonic()),
                message="the whole process group to exit",
            )
        except (subprocess.TimeoutExpired, AssertionError):
            self.kill()
            raise
        return code, time.monotonic() - since

    def kill(self) -> None:
        """SIGKILL whatever is left of the group (the safety net when a test fails)."""
        if self._group_alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True


@pytest.fixture()
def simulator() -> Iterator[SimulatorServer]:
    """The project's Replicate simulator over HTTP, with its own signing secret."""
    with start_in_thread(Simulator(seed=16)) as server:
        yield server


def test_buildpack_like_deploy_serves_syncs_and_stops(
    empty_database_url: str, simulator: SimulatorServer, tmp_path: Path
) -> None:
    """From `pip install -r requirements.txt` alone: the release migrates, /readyz is 200,
    a signed delivery is applied, the worker's first sweep repairs a training from the
    simulator, and SIGTERM stops both processes, cleanly, within Heroku's 30 s."""
    app = push(tmp_path / "app")
    bin_dir = build(app)
    sim = simulator.simulator
    finished, running = (
        sim.create_many(BulkPlan(count=1, finish_in=finish_in, fail_rate=0.0))[0]
        for finish_in in ((0.0, 0.0), (3600.0, 3600.0))
    )
    port = free_port()
    env = {
        "DATABASE_URL": "postgres://" + empty_database_url.split("://", 1)[1],
        "PORT": str(port),
        "REPLICATE_API_BASE_URL": simulator.api_base_url,
        "REPLICATE_API_TOKEN": DEFAULT_TOKEN,
        "REPLICATE_WEBHOOK_SECRET": sim.secret,
    }

    release = Dyno("release", bin_dir, app, env)
    dynos = [release]
    try:
        release_code = release.process.wait(timeout=120)
        for training_id in (finished, running):
            track(empty_database_url, training_id)
        web, worker = Dyno("web", bin_dir, app, env), Dyno("worker", bin_dir, app, env)
        dynos += [web, worker]
        base_url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: web.alive() and worker.alive() and ready(base_url),
            timeout=60,
            interval=0.2,
            message="/readyz to answer 200",
        )
        body, headers = signed_delivery(training_payload(running, "succeeded"), secret=sim.secret)
        delivery = requests.post(base_url + WEBHOOK_PATH, data=body, headers=headers, timeout=30)
        repaired = wait_until(
            lambda: polled(empty_database_url, finished), timeout=60, message="the first sweep"
        )
        delivered = fetch_row(empty_database_url, running)
        sent = [web.terminate(), worker.terminate()]
        (web_code, web_seconds), (worker_code, worker_seconds) = (
            dyno.wait_stopped(since) for dyno, since in zip((web, worker), sent, strict=True)
        )
    finally:
        for dyno in dynos:
            dyno.kill()
    outputs = {"release": release.output(), "web": web.output(), "worker": worker.output()}

    assert release_code == 0, outputs["release"]
    assert "migration_applied name=0001_trainings.sql" in outputs["release"]
    assert delivery.status_code == 200, delivery.text
    assert delivery.json() == {"result": "applied", "training_id": running}
    assert delivered is not None
    assert (delivered["training_status"], delivered["updated_by"]) == ("completed", "webhook")
    assert repaired["training_status"] == "completed"
    assert "sweep due=" in outputs["worker"]
    assert (web_code, worker_code) == (0, 0), outputs
    assert web_seconds < STOP_BUDGET_SECONDS
    assert worker_seconds < STOP_BUDGET_SECONDS
    assert [name for name, text in outputs.items() if "Traceback" in text] == []


def ready(base_url: str) -> bool:
    """True once /readyz answers 200."""
    try:
        return requests.get(base_url + "/readyz", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def polled(database_url: str, training_id: str) -> dict | None:
    """The row once the poller has brought it to its final status, else None."""
    row = fetch_row(database_url, training_id)
    if row and row["updated_by"] == "poll" and row["training_status"] != "training":
        return row
    return None
