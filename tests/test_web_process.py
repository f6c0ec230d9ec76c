"""The Procfile `web` command as a real gunicorn process on a free port, over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from tests.support import REPO, VENV_BIN, free_port, procfile, wait_until
from tests.test_web import TRAINING_ID, fetch_row, post_headers_only, track
from tests.web_support import SECRET, WEBHOOK_PATH, signed_delivery, training_payload

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]
MAX_BODY = 1024 * 1024
# The tests' gunicorn waits this long for its workers to stop, and must stop within half of
# it: a worker that missed the SIGTERM is then a failure, not a stop that took 20 s.
GRACEFUL_TIMEOUT = 60
STOP_BOUND = GRACEFUL_TIMEOUT / 2


def procfile_command(name: str) -> list[str]:
    """The command line of one Procfile process type, as written."""
    command = procfile().get(name)
    assert command is not None, f"no {name}: line in the Procfile"
    return shlex.split(command)


def web_env(**settings: str) -> dict[str, str]:
    """The environment of a web process: ours, with the venv first on PATH and no leftovers."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PROMETHEUS_MULTIPROC_DIR", "REPLICATE_WEBHOOK_SECRET", "DATABASE_URL"}
        and not key.startswith("REPLICATE_API")
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    # Overrides only the config file's graceful_timeout (test_gunicorn_settings_fit_heroku
    # reads the config itself): a stop that waits it out fails the test (see STOP_BOUND).
    env["GUNICORN_CMD_ARGS"] = f"--graceful-timeout {GRACEFUL_TIMEOUT}"
    env.update(settings)
    return env


@dataclass
class WebProcess:
    """A running gunicorn started from the Procfile."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def output(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@pytest.fixture()
def web_process(database_url: str, tmp_path: Path) -> Iterator[WebProcess]:
    """`web:` from the Procfile with two workers, ready on a free port; stopped by its pid."""
    env = web_env(
        DATABASE_URL=database_url,
        PORT=str(free_port()),
        REPLICATE_WEBHOOK_SECRET=SECRET,
        WEB_CONCURRENCY="2",
        DB_POOL_MAX="2",
        MAX_WEBHOOK_BYTES=str(MAX_BODY),
    )
    with running_web(env, tmp_path) as web:
        yield web


@contextlib.contextmanager
def running_web(env: dict[str, str], folder: Path) -> Iterator[WebProcess]:
    """The Procfile's web command with `env`, once /healthz answers; stopped by its pid,
    and the test fails when it does not stop within STOP_BOUND."""
    web = start_web(env, folder)
    try:
        wait_until(lambda: is_up(web), timeout=30, message="gunicorn to answer /healthz")
        yield web
    finally:
        stop_web(web)


def start_web(env: dict[str, str], folder: Path) -> WebProcess:
    """Start the Procfile's web command with `env`, its output in `folder`/web.log."""
    log_path = folder / "web.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            procfile_command("web"), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
    return WebProcess(process, f"http://127.0.0.1:{env['PORT']}", log_path)


def stop_web(web: WebProcess) -> None:
    """SIGTERM gunicorn by its pid; kill it and fail when it is still running after
    STOP_BOUND (a worker that never heard the signal holds it for GRACEFUL_TIMEOUT)."""
    web.process.terminate()
    try:
        web.process.wait(timeout=STOP_BOUND)
    except subprocess.TimeoutExpired:
        web.process.kill()
        web.process.wait()
        raise AssertionError(
            f"gunicorn still running {STOP_BOUND} s after SIGTERM:\n{web.output()}"
        ) from None


def is_up(web: WebProcess) -> bool:
    """True once /healthz answers; fails fast with the output when the process died."""
    if web.process.poll() is not None:
        raise AssertionError(f"gunicorn exited with {web.process.returncode}:\n{web.output()}")
    try:
        return requests.get(web.base_url + "/healthz", timeout=2).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        # Not listening yet, or a worker still booting on a busy machine.
        return False


def test_signed_delivery_to_gunicorn_updates_the_row(
    web_process: WebProcess, database_url: str
) -> None:
    """Over real HTTP to the Procfile's gunicorn, the row is updated before the answer, and
    the request leaves one log line, stamped in UTC with its offset."""
    track(database_url)
    body, headers = signed_delivery(training_payload(TRAINING_ID, "succeeded"))

    with requests.Session() as session:
        response = session.post(
            web_process.base_url + WEBHOOK_PATH, data=body, headers=headers, timeout=30
        )
        # The same kept-alive connection, so the same worker: by the time this is answered,
        # anything the worker logs after the delivery's answer (an access line) is written.
        session.get(web_process.base_url + "/healthz", timeout=30)
    line = wait_until(
        lambda: re.search(r"^.* webhook_delivery .*$", web_process.output(), re.MULTILINE),
        message="the delivery's log line",
    )

    assert response.status_code == 200
    assert response.json() == {"result": "applied", "training_id": TRAINING_ID}
    assert fetch_row(database_url)["training_status"] == "completed"
    assert re.match(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 info webhook_delivery .*result=applied",
        line.group(0),
    )
    assert not re.search(r'"(POST|GET) /\S* HTTP/1\.1"', web_process.output())


def test_readyz_and_metrics_cover_every_worker(web_process: WebProcess, database_url: str) -> None:
    """/readyz is 200, and /metrics adds up the deliveries answered by both workers."""
    ids = [f"trainingmetrics{n}" for n in range(6)]
    for training_id in ids:
        track(database_url, training_id)
    for training_id in ids:
        body, headers = signed_delivery(training_payload(training_id, "processing"))
        # A new connection each time lets the kernel spread the requests over the workers.
        requests.post(
            web_process.base_url + WEBHOOK_PATH,
            data=body,
            headers={**headers, "Connection": "close"},
            timeout=30,
        )

    ready = requests.get(web_process.base_url + "/readyz", timeout=10)
    text = requests.get(web_process.base_url + "/metrics", timeout=10).text

    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    assert 'webhook_sync_webhook_deliveries_total{result="applied"} 6.0' in text
    assert 'webhook_sync_status_transitions_total{outcome="applied",source="webhook"} 6.0' in text


def test_forty_mib_announced_is_413_before_the_body_is_read(web_process: WebProcess) -> None:
    """gunicorn answers 413 to headers announcing 40 MiB without waiting for the body."""
    _, headers = signed_delivery(training_payload(TRAINING_ID, "succeeded"))

    answer = post_headers_only(web_process.base_url, headers, 40 * 1024 * 1024)

    assert answer.startswith(b"HTTP/1.1 413")
    assert b"MAX_WEBHOOK_BYTES" in answer


def test_body_of_exactly_max_webhook_bytes_is_accepted(
    web_process: WebProcess, database_url: str
) -> None:
    """A delivery of exactly MAX_WEBHOOK_BYTES is applied, not refused as too large."""
    track(database_url)
    empty = json.dumps(training_payload(TRAINING_ID, "succeeded", logs=""))
    payload = training_payload(TRAINING_ID, "succeeded", logs="x" * (MAX_BODY - len(empty)))
    body, headers = signed_delivery(payload)

    response = requests.post(
        web_process.base_url + WEBHOOK_PATH, data=body, headers=headers, timeout=30
    )

    assert len(body) == MAX_BODY
    assert response.json() == {"result": "applied", "training_id": TRAINING_ID}


def test_stale_delivery_is_refused_by_gunicorn_before_its_body(web_process: WebProcess) -> None:
    """A post signed an hour ago is answered 401 while its announced body is never sent."""
    _, headers = signed_delivery(
        training_payload(TRAINING_ID, "succeeded"), signed_at=datetime.now(UTC) - timedelta(hours=1)
    )

    answer = post_headers_only(web_process.base_url, headers, MAX_BODY)

    assert answer.startswith(b"HTTP/1.1 401")
    assert b"more than 5 minutes old" in answer


def test_chunked_delivery_is_accepted_by_gunicorn(
    web_process: WebProcess, database_url: str
) -> None:
    """A body sent with Transfer-Encoding: chunked is read whole and applied."""
    track(database_url)
    body, headers = signed_delivery(training_payload(TRAINING_ID, "processing"))

    response = requests.post(
        web_process.base_url + WEBHOOK_PATH,
        data=iter([body[:10], body[10:]]),
        headers=headers,
        timeout=30,
    )

    assert response.json() == {"result": "applied", "training_id": TRAINING_ID}


def test_sigterm_while_workers_boot_stops_gunicorn_at_once(
    database_url: str, tmp_path: Path
) -> None:
    """A SIGTERM that reaches workers still booting (gevent patching the standard library,
    before gunicorn gives a worker its own signal handlers) stops them: gunicorn exits well
    within its graceful_timeout, not after it, as a deploy's stop right after a start did."""
    env = web_env(
        DATABASE_URL=database_url,
        PORT=str(free_port()),
        REPLICATE_WEBHOOK_SECRET=SECRET,
        WEB_CONCURRENCY="2",
    )
    web = start_web(env, tmp_path)
    wait_until(
        lambda: web.output().count("Booting worker") == 2,
        timeout=30,
        interval=0.002,
        message="gunicorn to fork both workers",
    )

    stop_web(web)

    assert web.process.returncode == 0, web.output()
    assert "Worker graceful timeout" not in web.output()


def run_to_exit(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `command` from the repository until it exits, within a hang guard."""
    return subprocess.run(
        command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def run_web_to_exit(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], str]:
    """Run the Procfile's web command until it exits; return it and all it printed."""
    result = run_to_exit(procfile_command("web"), env)
    return result, result.stdout + result.stderr


def test_web_refuses_to_start_without_secret_or_token(database_url: str) -> None:
    """With neither REPLICATE_WEBHOOK_SECRET nor REPLICATE_API_TOKEN gunicorn exits and says so."""
    env = web_env(DATABASE_URL=database_url, PORT=str(free_port()))

    result, output = run_web_to_exit(env)

    assert result.returncode != 0
    assert "REPLICATE_WEBHOOK_SECRET" in output
    assert "REPLICATE_API_TOKEN" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("secret", "reason"),
    [
        ("whsec_!!not-base64!!", "is not valid base64"),
        ("whsec_dGVzdA$$==", "is not valid base64"),
        ("whsec_AA", "is shorter than 16 bytes"),
    ],
)
def test_web_refuses_to_start_with_an_unusable_secret(
    database_url: str, secret: str, reason: str
) -> None:
    """A REPLICATE_WEBHOOK_SECRET that is not strict base64 or decodes to under 16 bytes
    stops gunicorn's master with one line naming the secret by position, not a worker
    traceback, and never echoes the secret."""
    env = web_env(
        DATABASE_URL=database_url,
        PORT=str(free_port()),
        REPLICATE_WEBHOOK_SECRET=f"{SECRET},{secret}",
    )

    result, output = run_web_to_exit(env)

    assert result.returncode != 0
    assert f"secret #2 {reason}" in output
    assert "Traceback" not in output
    assert secret.removeprefix("whsec_") not in output


@pytest.mark.parametrize(
    ("settings", "bind", "workers"),
    [({}, "0.0.0.0:8000", 2), ({"PORT": "8123", "WEB_CONCURRENCY": "5"}, "0.0.0.0:8123", 5)],
)
def test_gunicorn_settings_fit_heroku(
    database_url: str, tmp_path: Path, settings: dict[str, str], bind: str, workers: int
) -> None:
    """The Procfile's gunicorn config binds $PORT on every interface, runs WEB_CONCURRENCY
    workers, ends requests within 25 s and stops within 20 s, writes no access log of its
    own (the app logs each delivery), and the app it serves loads no scheduler. The config
    (the master) imports neither the app nor urllib3, which gevent could then no longer make
    cooperative in the workers."""
    code = (
        "import json, sys, webhook_sync.gunicorn_conf as c\n"
        "master = sorted(m for m in ('urllib3', 'requests', 'flask') if m in sys.modules)\n"
        "import webhook_sync.web as w\n"
        "w.create_app_from_env()\n"
        "conf = {name: getattr(c, name) for name in"
        " ('bind', 'workers', 'timeout', 'graceful_timeout', 'accesslog', 'worker_class')}\n"
        "conf['master'] = master\n"
        "conf['scheduler'] = any(m.startswith('apscheduler') for m in sys.modules)\n"
        "print(json.dumps(conf))\n"
    )
    env = web_env(
        DATABASE_URL=database_url,
        REPLICATE_WEBHOOK_SECRET=SECRET,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )
    env.pop("PORT", None)
    env.pop("WEB_CONCURRENCY", None)
    env.update(settings)

    result = run_to_exit([str(VENV_BIN / "python"), "-c", code], env)
    conf = json.loads(result.stdout)

    assert result.returncode == 0, result.stderr
    assert procfile_command("web") == [
        "gunicorn",
        "--config",
        "python:webhook_sync.gunicorn_conf",
        "webhook_sync.web:create_app_from_env()",
    ]
    assert conf["bind"] == [bind]
    assert conf["workers"] == workers
    assert 0 < conf["timeout"] <= 25
    assert 0 < conf["graceful_timeout"] <= 20
    assert conf["accesslog"] is None
    assert conf["worker_class"] == "gevent"
    assert conf["master"] == []
    assert conf["scheduler"] is False


@pytest.mark.parametrize(
    ("query", "environ"),
    [("?connect_timeout=1", {}), ("", {"PGCONNECT_TIMEOUT": "1"})],
    ids=["url", "PGCONNECT_TIMEOUT"],
)
def test_cooperative_wait_gives_up_after_connect_timeout(
    database_url: str, tmp_path: Path, query: str, environ: dict[str, str]
) -> None:
    """In a gevent worker libpq connects without blocking and ignores connect_timeout (from
    the URL or from PGCONNECT_TIMEOUT), so the wait callback enforces it: a server that
    accepts the connection but never answers ends in a redacted DatabaseUnavailableError,
    not a worker greenlet held for good."""
    code = (
        "import socket, webhook_sync.gunicorn_conf as c\n"
        "from psycopg2 import extensions\n"
        "from webhook_sync import db, errors\n"
        "silent = socket.create_server(('127.0.0.1', 0))\n"
        "port = silent.getsockname()[1]\n"
        "extensions.set_wait_callback(c.wait_cooperatively)\n"
        "try:\n"
        f"    db.connect(f'postgresql://app:pw@127.0.0.1:{{port}}/app{query}')\n"
        "except errors.DatabaseUnavailableError as exc:\n"
        "    print(exc)\n"
    )
    env = web_env(DATABASE_URL=database_url, REPLICATE_WEBHOOK_SECRET=SECRET)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    env.pop("PGCONNECT_TIMEOUT", None)
    env.update(environ)

    result = run_to_exit([str(VENV_BIN / "python"), "-c", code], env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cannot connect to the database: timeout expired"
