"""`make run`'s runner: embedded PostgreSQL, the simulator, web and worker, stopped by Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support import REPO, free_port, wait_until
from tests.web_support import sign_headers
from webhook_sync.dev.simulator import DEFAULT_TOKEN, DEV_SECRET, generate_secret

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# What `make demo` runs to find `make run`'s embedded PostgreSQL when DATABASE_URL is unset.
DEMO_ATTACH = """
import os
from webhook_sync.dev import demo
with demo.database_url(os.environ) as url:
    print(url)
"""


@dataclass
class Runner:
    """A started `python -m webhook_sync.dev.run` and where its processes listen."""

    process: subprocess.Popen[bytes]
    folder: Path
    port: int
    simulator_port: int

    def stop(self) -> int:
        """Ctrl-C the whole process group, as a terminal would; return the exit code."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=40)

    def log_lines(self) -> list[str]:
        """What the runner and its processes printed so far."""
        return (self.folder / "run.log").read_text(errors="replace").splitlines()


def answer(url: str, headers: dict[str, str] | None = None) -> tuple[requests.Response] | None:
    """A 1-tuple with the response (a Response with an error status is falsy), or None."""
    try:
        return (requests.get(url, headers=headers, timeout=1),)
    except (requests.ConnectionError, requests.Timeout):
        # Not listening yet, or accepted by the master while a worker still boots.
        return None


@contextmanager
def started_runner(folder: Path, **settings: str) -> Iterator[Runner]:
    """Start the runner in `folder` with nothing configured but `settings`; wait until
    web and the simulator answer; at the end stop it as Ctrl-C does (honcho then stops
    its processes and the runner its PostgreSQL), SIGKILL only if that hangs."""
    shutil.copy(REPO / "Procfile", folder / "Procfile")
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
    env.update(settings)
    with (folder / "run.log").open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "webhook_sync.dev.run"],
            cwd=folder,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    runner = Runner(process, folder, port, simulator_port)
    try:
        wait_until(lambda: answer(f"http://127.0.0.1:{port}/readyz"), timeout=60, interval=0.2)
        wait_until(lambda: answer(f"http://127.0.0.1:{simulator_port}/_admin"), timeout=30)
        yield runner
    finally:
        if process.poll() is None:
            try:
                runner.stop()
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def descendants(pid: int) -> list[int]:
    """Every process started under `pid`, found through the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # the process ended meanwhile
        # The command name is in parentheses and may hold spaces: the parent id follows it.
        parent = int(text.rpartition(")")[2].split()[1])
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def command_lines(pids: list[int]) -> list[str]:
    """The command lines of these processes as `ps` shows them (arguments joined)."""
    lines = []
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        lines.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return lines


def signed_delivery(url: str, secret: str) -> requests.Response:
    """POST a `processing` webhook for an untracked training, signed with `secret`."""
    body = json.dumps({"id": "devrunsecretcheck000000000", "status": "processing"}).encode()
    headers = sign_headers(body, secret=secret, webhook_id="msg_devrun")
    return requests.post(url, data=body, headers=headers, timeout=10)


def test_run_starts_everything_keeps_secrets_out_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """With nothing configured but a webhook secret, it starts PostgreSQL, migrates, serves
    ready, stops cleanly on Ctrl-C; without XDG_RUNTIME_DIR neither it nor `make demo`
    attaching to its PostgreSQL prints platformdirs' RuntimeDirWarning. The configured
    secret is set aside: no command line, file or simulator answer holds it or any
    credential; web and simulator agree on the dev secret via the environment. (One runner
    for both: each start initialises a PostgreSQL of its own.)"""
    configured = generate_secret()

    with started_runner(tmp_path, REPLICATE_WEBHOOK_SECRET=configured) as runner:
        ready = answer(f"http://127.0.0.1:{runner.port}/readyz")
        simulator = answer(f"http://127.0.0.1:{runner.simulator_port}/v1/trainings")
        commands = command_lines(descendants(runner.process.pid))
        served = answer(
            f"http://127.0.0.1:{runner.simulator_port}/v1/webhooks/default/secret",
            headers={"Authorization": f"Bearer {DEFAULT_TOKEN}"},
        )
        delivery = signed_delivery(f"http://127.0.0.1:{runner.port}/webhooks/replicate", DEV_SECRET)
        env = {key: value for key, value in os.environ.items() if key != "XDG_RUNTIME_DIR"}
        demo = subprocess.run(
            [sys.executable, "-c", DEMO_ATTACH],
            cwd=tmp_path,
            env={key: value for key, value in env.items() if key != "DATABASE_URL"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        exit_code = runner.stop()
    lines = runner.log_lines()
    data = [path for path in (tmp_path / ".data").glob("*") if path.is_file()]
    files = "\n".join(path.read_text(errors="replace") for path in data)

    assert ready is not None and ready[0].status_code == 200
    assert "embedded_postgresql" in lines[0]
    assert (tmp_path / ".data" / "pg").is_dir()
    assert any("local_simulator" in line for line in lines[:3])
    assert simulator is not None and simulator[0].status_code == 401  # it wants the token
    assert exit_code == 0
    assert [line for line in lines if "XDG_RUNTIME_DIR" in line] == []
    assert (demo.returncode, demo.stderr) == (0, "")
    assert demo.stdout.startswith("postgresql://")
    assert any("webhook-sync simulator" in line for line in commands), commands
    assert any("gunicorn" in line for line in commands), commands
    assert [line for line in commands if "whsec_" in line or "--token" in line] == []
    assert "simulator:" in (tmp_path / ".data" / "Procfile.run").read_text()
    assert "whsec_" not in files
    assert served is not None and served[0].json() == {"key": DEV_SECRET}
    assert delivery.status_code == 200, delivery.text
    assert configured not in "\n".join(lines)
