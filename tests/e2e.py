"""The end-to-end convergence run shared by `tests/test_e2e.py` and `make chaos`.

`Cluster` starts the real processes from the Procfile commands (gunicorn `web`, two
`worker`s, the simulator from its CLI) against one PostgreSQL database, on free ports,
and stops them by their own process ids. `run_scenario` creates trainings with webhooks
pointed at `web`, injects the faults while they run (webhook drops, duplicates, delays,
reorders; API 5xx/429/latency; a worker SIGKILLed mid-sweep and restarted; database
connections cut; optionally the PostgreSQL server restarted; `web` restarted) and the
real Replicate shapes clients rarely meet (aborted trainings, `logs: null`, `start`
webhooks saying `starting`, a gateway's HTML 502, 404s just after create), waits for the
database to converge and returns the `Evidence` that `e2e_report` judges.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2
import requests

from tests.e2e_outbox import NOTIFY_SECRET, PlatformFaults, PlatformReceiver, pids_of_client_ports
from tests.e2e_report import Evidence, LeaseChange, Window
from tests.e2e_support import (
    ManagedProcess,
    NotifyCollector,
    RecordingProxy,
    admin_execute,
)
from tests.local_postgres import LocalPostgres
from tests.support import REPO, VENV_BIN, database_name, database_url_for, free_port, wait_until
from webhook_sync import db, service, status, sweep

WEBHOOK_PATH = "/webhooks/replicate"
# The worker's summary line per sweep (LOG_FORMAT=kv): `… info sweep due=… duration=1.2 …`.
SWEEP_LINE = re.compile(r" sweep due=.* duration=([0-9.]+)")
# The worker's line when it asks a person to look at a training.
ATTENTION_LINE = re.compile(r" training_needs_attention training_id=(\S+)")
SIM_TOKEN = "r8_e2e_simulator_token_0123456789abcdef"
# The webhook secret shared by the simulator (signing) and `web` (verifying).
SIM_SECRET = "whsec_ZTJlLXNpbXVsYXRvci13ZWJob29rLXNlY3JldA=="

DEFAULT_FAULTS: dict[str, Any] = {
    "drop_rate": 0.25,
    "duplicate_rate": 0.2,
    "delay_rate": 0.2,
    "delay_seconds": 2.0,
    "reorder_rate": 0.3,
    "error_rate": 0.1,
    "gateway_error_rate": 0.05,
    "throttle_rate": 0.05,
    "latency_ms": 5,
    # Replicate's lag after a create, long enough for several sweeps to meet the 404.
    "new_training_404_rate": 0.2,
    "new_training_404_seconds": 6.0,
    # The run polls far more often than production; Replicate's own read limit would
    # only slow it down, and injected 429s (throttle_rate) stand in for it.
    "read_rpm": 0,
    "create_rpm": 0,
}


# Test instrumentation on the run's own database (not a migration): every change of a
# row's lease owner, with the database clock, so that overlapping claims can be judged.
LEASE_LOG_SQL = """
CREATE TABLE IF NOT EXISTS e2e_lease_log (
    seq bigserial PRIMARY KEY,
    training_id text NOT NULL,
    old_owner text,
    new_owner text,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION e2e_log_lease() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    INSERT INTO e2e_lease_log (training_id, old_owner, new_owner)
    VALUES (NEW.id, OLD.lease_owner, NEW.lease_owner);
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS e2e_lease_log ON webhook_sync.trainings;
CREATE TRIGGER e2e_lease_log AFTER UPDATE OF lease_owner ON webhook_sync.trainings
    FOR EACH ROW WHEN (OLD.lease_owner IS DISTINCT FROM NEW.lease_owner)
    EXECUTE FUNCTION e2e_log_lease();
"""


@dataclass(frozen=True)
class Scenario:
    """How big the run is and which faults it injects."""

    trainings: int = 300
    finish_in: tuple[float, float] = (3.0, 18.0)
    fail_rate: float = 0.15
    # Real shapes of the trainings themselves (the simulator's lifecycle variants).
    abort_rate: float = 0.05
    null_logs_rate: float = 0.2
    starting_webhook_rate: float = 0.5
    # A wave created with a long lag after create (`lagging_faults`; it decides at
    # creation), finishing when the lag ends: sweeps meet its 404s by id, several in a
    # row, which must not flag a training for a person. At most LIST_WALK_THRESHOLD, it
    # is fetched by id whatever the timing (a sweep walks the list only above that), and
    # the run waits for that before the next wave: the double-fetch judgement then always
    # has fetches by id to judge, even when, under load, the list walk meets the rest.
    lagging_trainings: int = sweep.LIST_WALK_THRESHOLD
    lagging_finish_in: tuple[float, float] = (12.0, 16.0)
    lagging_faults: dict[str, Any] = field(
        default_factory=lambda: {"new_training_404_rate": 1.0, "new_training_404_seconds": 12.0}
    )
    cancels: int = 10
    poll_interval: int = 2
    lease_seconds: int = 4
    poll_concurrency: int = 8
    # A sweep claims lease × max_rps / 2 rows and does not renew its leases, so the rate
    # must be one the sweep really reaches, or leases run out under it (see e2e_report).
    max_rps: int = 100
    web_concurrency: int = 2
    faults: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_FAULTS))
    kill_worker: bool = True
    cut_connections: bool = True
    restart_web: bool = True
    restart_postgres: bool = False
    postgres_down_seconds: float = 2.0
    seed: int = 20261128
    log_level: str = "INFO"
    converge_timeout: float = 90.0
    # The outbox: the platform's receiver (down at first, 500s, slow answers) and a worker
    # SIGKILLed while one of its notifications is in flight.
    notify: bool = True
    platform_down_seconds: float = 8.0
    platform_faults: PlatformFaults = field(default_factory=PlatformFaults)
    notify_lease_seconds: int = 15
    # The run's retries double to this, not to an hour, so that its length stays bounded
    # (a row 500'd several times in a row would otherwise wait minutes).
    notify_max_retry_seconds: int = 8
    # The platform is slow to one delivery in ten: more in flight keeps the drain short.
    notify_concurrency: int = 16
    notify_timeout: float = 90.0


class Cluster:
    """The real processes of one run: simulator, web, workers; each stopped by its pid."""

    def __init__(
        self,
        database_url: str,
        scenario: Scenario,
        log_dir: Path,
        extra_env: dict[str, str] | None = None,
        sim_token: str = SIM_TOKEN,
        sim_secret: str = SIM_SECRET,
    ) -> None:
        self.database_url = database_url
        self.sim_token = sim_token
        self.sim_secret = sim_secret
        self.scenario = scenario
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.processes: list[ManagedProcess] = []
        self.proxies: list[RecordingProxy] = []
        self.workers: dict[str, tuple[ManagedProcess, RecordingProxy]] = {}
        self.web: ManagedProcess | None = None
        self.sim_port = free_port()
        self.web_port = free_port()
        self._starts = 0
        self._procfile = _read_procfile(REPO / "Procfile")
        self.platform = (
            PlatformReceiver(database_url, scenario.platform_faults) if scenario.notify else None
        )

    @property
    def sim_url(self) -> str:
        """The simulator's base URL (admin routes under /_admin, the API under /v1)."""
        return f"http://127.0.0.1:{self.sim_port}"

    @property
    def web_url(self) -> str:
        """The web process's base URL."""
        return f"http://127.0.0.1:{self.web_port}"

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment every process gets: the venv first on PATH, our settings."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("REPLICATE_", "DATABASE_URL", "POLL_", "WEB_"))
        }
        env["PATH"] = str(VENV_BIN) + os.pathsep + env.get("PATH", "")
        env.update(
            DATABASE_URL=self.database_url,
            REPLICATE_API_TOKEN=self.sim_token,
            REPLICATE_WEBHOOK_SECRET=self.sim_secret,
            REPLICATE_API_BASE_URL=self.sim_url + "/v1",
            REPLICATE_MAX_RPS=str(self.scenario.max_rps),
            POLL_INTERVAL_SECONDS=str(self.scenario.poll_interval),
            POLL_LEASE_SECONDS=str(self.scenario.lease_seconds),
            POLL_CONCURRENCY=str(self.scenario.poll_concurrency),
            WEB_CONCURRENCY=str(self.scenario.web_concurrency),
            PORT=str(self.web_port),
            LOG_LEVEL=self.scenario.log_level,
            LOG_FORMAT="kv",
            PYTHONUNBUFFERED="1",
        )
        if self.platform is not None:
            env.update(
                NOTIFY_URLS=self.platform.url,
                NOTIFY_SECRET=NOTIFY_SECRET,
                NOTIFY_LEASE_SECONDS=str(self.scenario.notify_lease_seconds),
                NOTIFY_MAX_RETRY_SECONDS=str(self.scenario.notify_max_retry_seconds),
                NOTIFY_CONCURRENCY=str(self.scenario.notify_concurrency),
            )
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        process = ManagedProcess(name, argv, env, self.log_dir)
        self.processes.append(process)
        return process.start()

    # -- starting ------------------------------------------------------------------------

    def start(self, workers: int = 2) -> Cluster:
        """Start the simulator, web and `workers` worker processes; return once they run."""
        # Workers first: under load one takes seconds to boot, and the run must not start
        # before they poll. Until trainings are tracked a sweep makes no API call.
        started = [self.start_worker(f"worker-{number}") for number in range(1, workers + 1)]
        self.start_simulator()
        self.start_web()
        wait_until(
            lambda: all("worker_started" in worker.output() for worker in started),
            timeout=60,
            message="the workers",
        )
        return self

    def start_simulator(self) -> None:
        """The simulator from its CLI, with our token, secret and seed; faults set after."""
        argv = [
            str(VENV_BIN / "webhook-sync"),
            "simulator",
            "--port",
            str(self.sim_port),
            "--token",
            self.sim_token,
            "--secret",
            self.sim_secret,
            "--seed",
            str(self.scenario.seed),
        ]
        self._spawn("simulator", argv, self.env())
        wait_until(lambda: _answers(self.sim_url + "/_admin"), timeout=30, message="the simulator")
        # Short lifecycles and a short retry schedule live in the simulator's settings.
        self.sim_post("/_admin/faults", self.scenario.faults)

    def start_web(self) -> None:
        """gunicorn from the Procfile's `web` line, on 127.0.0.1 with no control socket."""
        argv = [
            *self._procfile["web"],
            "--bind",
            f"127.0.0.1:{self.web_port}",
            "--no-control-socket",
        ]
        self._starts += 1
        self.web = self._spawn(f"web-{self._starts}", argv, self.env())
        web = self.web
        wait_until(
            lambda: _answers(self.web_url + "/healthz") or _exited(web),
            timeout=30,
            message="the web process",
        )
        assert web.running(), f"web exited:\n{web.output()[-3000:]}"

    def start_worker(self, name: str) -> ManagedProcess:
        """A `worker` from the Procfile, its API calls through a proxy that records them."""
        proxy = RecordingProxy(name, self.sim_url).start()
        self.proxies.append(proxy)
        process = self._spawn(
            name, self._procfile["worker"], self.env(REPLICATE_API_BASE_URL=proxy.api_base_url)
        )
        self.workers[name] = (process, proxy)
        return process

    def stop(self) -> None:
        """Stop every process we started (by pid) and every proxy."""
        for process in reversed(self.processes):
            process.stop()
        for proxy in self.proxies:
            proxy.stop()
        if self.platform is not None:
            self.platform.down()
            self.platform.write_log(self.log_dir / "platform-receipts.jsonl")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- the simulator -------------------------------------------------------------------

    def sim_get(self, path: str) -> Any:
        """GET an admin or API route of the simulator and return its JSON."""
        response = requests.get(
            self.sim_url + path, headers={"Authorization": f"Bearer {self.sim_token}"}, timeout=60
        )
        response.raise_for_status()
        return response.json()

    def sim_post(self, path: str, body: dict[str, Any]) -> Any:
        """POST JSON to an admin route of the simulator and return its JSON."""
        response = requests.post(self.sim_url + path, json=body, timeout=60)
        response.raise_for_status()
        return response.json()

    # -- the faults ----------------------------------------------------------------------

    def kill_worker_mid_sweep(self, name: str) -> float:
        """SIGKILL worker `name` while one of its fetches is in flight; return when."""
        process, proxy = self.workers[name]
        wait_until(lambda: proxy.in_flight > 0, timeout=30, interval=0.001, message="a sweep")
        process.kill()
        return time.time()

    def kill_worker_mid_delivery(self) -> tuple[str, float]:
        """SIGKILL whichever worker has a notification in flight at the platform; return its
        name and when."""
        assert self.platform is not None
        platform = self.platform

        def sender() -> str | None:
            ports = platform.in_flight_ports()
            if not ports:
                return None
            pids = pids_of_client_ports(ports)
            for name, (process, _proxy) in self.workers.items():
                if process.running() and process.pid in pids:
                    return name
            return None

        name = wait_until(sender, timeout=60, interval=0.005, message="a notification in flight")
        self.workers[name][0].kill()
        return name, time.time()

    def restart_web(self) -> Window:
        """Stop gunicorn gracefully (SIGTERM to its master) and start it again."""
        assert self.web is not None
        started = time.time()
        self.web.stop()
        self.start_web()
        return Window("web restart", started, time.time())


@dataclass
class Trainings:
    """What the run created: ids, and when each was tracked in the database."""

    ids: list[str]
    tracked_at: dict[str, float]
    canceled: list[str]

    def add(self, more: Trainings) -> None:
        """Add a later wave (in place, so that views of `ids` see it)."""
        self.ids.extend(more.ids)
        self.tracked_at.update(more.tracked_at)
        self.canceled.extend(more.canceled)


def create_and_track(
    cluster: Cluster,
    conn: db.Connection,
    count: int,
    finish_in: tuple[float, float],
    cancels: int = 0,
    abort_rate: float | None = None,
) -> Trainings:
    """Create trainings in the simulator (webhooks to web), track them as a host would,
    and cancel the first `cancels` of them."""
    scenario = cluster.scenario
    created = cluster.sim_post(
        "/_admin/trainings",
        {
            "count": count,
            "created_ago": [0.0, 1.0],
            "finish_in": list(finish_in),
            "status": "starting",
            "fail_rate": scenario.fail_rate,
            "abort_rate": scenario.abort_rate if abort_rate is None else abort_rate,
            "null_logs_rate": scenario.null_logs_rate,
            "starting_webhook_rate": scenario.starting_webhook_rate,
            "webhook": cluster.web_url + WEBHOOK_PATH,
            "webhook_events_filter": ["start", "logs", "completed"],
        },
    )
    ids: list[str] = created["ids"]
    tracked_at: dict[str, float] = {}
    for offset in range(0, len(ids), 200):
        batch = ids[offset : offset + 200]
        with conn:
            for training_id in batch:
                service.track_training(conn, training_id, f"user-{training_id[:6]}")
        now = time.time()
        tracked_at.update(dict.fromkeys(batch, now))
    canceled = ids[:cancels]
    for training_id in canceled:
        requests.post(
            f"{cluster.sim_url}/v1/trainings/{training_id}/cancel",
            headers={"Authorization": f"Bearer {cluster.sim_token}"},
            timeout=30,
        )
    return Trainings(ids, tracked_at, canceled)


def run_scenario(
    cluster: Cluster,
    admin_url: str,
    postgres: LocalPostgres | None = None,
    progress: Any = None,
) -> Evidence:
    """Run the scenario on a started cluster: create, inject faults, converge, collect."""
    scenario = cluster.scenario
    say = progress or (lambda message: None)
    dbname = database_name(cluster.database_url)
    windows: list[Window] = []
    admin_execute(_as_superuser(cluster.database_url, admin_url), LEASE_LOG_SQL)
    collector = NotifyCollector(cluster.database_url).start()
    try:
        started = time.time()
        conn = db.connect(cluster.database_url, "e2e harness")
        try:
            trainings = Trainings([], {}, [])
            if scenario.lagging_trainings:
                # First, so that its lag runs while the sweeps meet it from the start;
                # none aborts: an abort would end a training before its lag does.
                usual = {key: scenario.faults.get(key, 0) for key in scenario.lagging_faults}
                cluster.sim_post("/_admin/faults", scenario.lagging_faults)
                trainings.add(
                    create_and_track(
                        cluster,
                        conn,
                        scenario.lagging_trainings,
                        scenario.lagging_finish_in,
                        abort_rate=0,
                    )
                )
                cluster.sim_post("/_admin/faults", usual)
                if scenario.lagging_trainings <= sweep.LIST_WALK_THRESHOLD:
                    wait_until(
                        lambda: _fetched_by_id(cluster, trainings.ids),
                        timeout=60,
                        message="a worker to fetch the lagging wave by id",
                    )
            trainings.add(
                create_and_track(
                    cluster, conn, scenario.trainings, scenario.finish_in, scenario.cancels
                )
            )
        finally:
            conn.close()
        say(f"created and tracked {len(trainings.ids)} trainings")
        ids = trainings.ids

        def converged_share() -> float:
            return _count_finished(cluster.database_url, ids) / len(ids)

        if scenario.kill_worker:
            killed_at = cluster.kill_worker_mid_sweep("worker-1")
            # Its leases hold until they expire: that is the window its trainings wait.
            windows.append(Window("worker SIGKILL", killed_at, killed_at + scenario.lease_seconds))
            cluster.start_worker("worker-1-restarted")
            say("SIGKILLed worker-1 mid-sweep and started a new worker")
        if cluster.platform is not None:
            # Down from the start: the first notifications meet refused connections.
            wait_until(
                lambda: time.time() >= started + scenario.platform_down_seconds,
                timeout=scenario.platform_down_seconds + 5,
                message="the platform's outage",
            )
            cluster.platform.up()
            say(f"the platform's receiver came up after {scenario.platform_down_seconds:.0f} s")
            name, killed_at = cluster.kill_worker_mid_delivery()
            windows.append(Window("worker SIGKILL", killed_at, killed_at + scenario.lease_seconds))
            cluster.start_worker(f"{name}-restarted")
            say(f"SIGKILLed {name} mid-delivery and started a new worker")
        if scenario.cut_connections:
            wait_until(lambda: converged_share() >= 0.15, timeout=60, message="15% converged")
            windows.append(_terminate_connections(admin_url, dbname))
            say("cut every database connection with pg_terminate_backend")
        if scenario.restart_web:
            wait_until(lambda: converged_share() >= 0.3, timeout=60, message="30% converged")
            windows.append(cluster.restart_web())
            say("restarted web")
        if scenario.restart_postgres and postgres is not None:
            wait_until(lambda: converged_share() >= 0.5, timeout=60, message="50% converged")
            windows.append(_restart_postgres(postgres, scenario.postgres_down_seconds))
            say(f"restarted PostgreSQL (down {scenario.postgres_down_seconds:.0f} s)")
        truth = _wait_for_convergence(cluster, ids, scenario.converge_timeout)
        say(f"converged after {time.time() - started:.1f} s")
        if cluster.platform is not None:
            _wait_for_outbox(cluster.database_url, scenario.notify_timeout)
            say(f"outbox drained after {time.time() - started:.1f} s")
        return _collect(cluster, admin_url, trainings, truth, windows, collector)
    finally:
        collector.stop()


def _fetched_by_id(cluster: Cluster, ids: list[str]) -> bool:
    """True once a worker sent `GET /trainings/{id}` for one of `ids`."""
    wanted = set(ids)
    return any(
        fetch.method == "GET" and fetch.training_id in wanted
        for proxy in cluster.proxies
        for fetch in list(proxy.fetches)  # a copy: the proxy's threads append meanwhile
    )


def _wait_for_convergence(cluster: Cluster, ids: list[str], timeout: float) -> dict[str, str]:
    """Wait until every training finished at the simulator and the database agrees."""
    wanted = set(ids)

    def agreed() -> dict[str, str] | None:
        truth = cluster.sim_get("/_admin/trainings")["trainings"]
        if any(not status.is_terminal(truth[training_id]) for training_id in wanted):
            return None
        stored = _training_statuses(cluster.database_url, ids)
        for training_id in wanted:
            if stored.get(training_id) != status.app_status_for(truth[training_id]):
                return None
        return truth

    try:
        return wait_until(agreed, timeout=timeout, interval=0.25, message="convergence")
    except AssertionError:
        # Judge what we have: the report names every training that did not converge.
        return cluster.sim_get("/_admin/trainings")["trainings"]


def _wait_for_outbox(database_url: str, timeout: float) -> None:
    """Wait until no notification is pending (judged as it is when the time is up)."""

    def drained() -> bool:
        try:
            conn = psycopg2.connect(database_url, application_name="e2e harness")
        except psycopg2.OperationalError:
            return False
        try:
            with conn, conn.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM webhook_sync.notifications WHERE status = 'pending'"
                )
                return cur.fetchone()[0] == 0
        finally:
            conn.close()

    # At the deadline the report names every change not delivered.
    with contextlib.suppress(AssertionError):
        wait_until(drained, timeout=timeout, interval=0.25, message="the outbox")


def _count_finished(database_url: str, ids: list[str]) -> int:
    return sum(1 for value in _training_statuses(database_url, ids).values() if value != "training")


def _training_statuses(database_url: str, ids: list[str]) -> dict[str, str]:
    """Each training's app status; a fresh connection each time, as ours get cut on purpose."""
    try:
        conn = psycopg2.connect(database_url, application_name="e2e harness", connect_timeout=5)
    except psycopg2.OperationalError:
        return {}  # the server is restarting; the next poll tries again
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT id, training_status FROM webhook_sync.trainings WHERE id = ANY(%(ids)s)",
                {"ids": ids},
            )
            return dict(cur.fetchall())
    except (psycopg2.OperationalError, psycopg2.InterfaceError):
        return {}
    finally:
        conn.close()


def _as_superuser(database_url: str, admin_url: str) -> str:
    """The run's database reached with the admin URL's credentials (the run may use a
    role that cannot create triggers)."""
    return database_url_for(admin_url, database_name(database_url))


def _terminate_connections(admin_url: str, dbname: str) -> Window:
    """pg_terminate_backend every connection to the test database (and only to it)."""
    started = time.time()
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %(dbname)s AND pid <> pg_backend_pid()",
                {"dbname": dbname},
            )
    finally:
        admin.close()
    return Window("connections cut", started, time.time())


def _restart_postgres(postgres: LocalPostgres, down_seconds: float) -> Window:
    """Stop our own PostgreSQL server abruptly, keep it down, start it again."""
    started = time.time()
    postgres.crash()
    # The outage itself lasts this long on purpose; this is not waiting for a condition.
    time.sleep(down_seconds)
    postgres.start()
    return Window("postgres restart", started, time.time())


def _collect(
    cluster: Cluster,
    admin_url: str,
    trainings: Trainings,
    truth: dict[str, str],
    windows: list[Window],
    collector: NotifyCollector,
) -> Evidence:
    ids = trainings.ids
    session = requests.Session()
    finished_at: dict[str, float | None] = {}
    null_logs = []
    for training_id in ids:
        record = session.get(f"{cluster.sim_url}/_admin/trainings/{training_id}", timeout=30)
        finished_at[training_id] = _finished_at(record.json())
        if record.json()["null_logs"]:
            null_logs.append(training_id)
    # Deliveries before the inbox: one answered 2xx after this snapshot is not judged.
    deliveries = cluster.sim_get("/_admin/deliveries")["deliveries"]
    conn = db.connect(cluster.database_url, "e2e harness")
    try:
        transitions, inbox, rows = _select_records(conn)
    finally:
        conn.close()
    superuser = db.connect(_as_superuser(cluster.database_url, admin_url), "e2e harness")
    try:
        with superuser, superuser.cursor() as cur:
            cur.execute(
                "SELECT training_id, old_owner, new_owner, extract(epoch FROM at)"
                " FROM e2e_lease_log ORDER BY seq"
            )
            leases = [
                LeaseChange(training_id, old, new, float(at))
                for training_id, old, new, at in cur.fetchall()
            ]
    finally:
        superuser.close()
    fetches = [fetch for proxy in cluster.proxies for fetch in proxy.fetches]
    outbox_rows = _select_outbox(cluster.database_url) if cluster.platform is not None else []
    return Evidence(
        poll_interval=cluster.scenario.poll_interval,
        ids=ids,
        truth={training_id: truth[training_id] for training_id in ids},
        finished_at=finished_at,
        tracked_at=trainings.tracked_at,
        canceled=trainings.canceled,
        deliveries=deliveries,
        api_requests=cluster.sim_get("/_admin/requests"),
        transitions=transitions,
        inbox=inbox,
        rows=rows,
        notifications=list(collector.notifications),
        fetches=fetches,
        windows=windows,
        leases=leases,
        sweep_seconds=_sweep_durations(cluster),
        null_logs=null_logs,
        attention_flags=_worker_lines(cluster, ATTENTION_LINE),
        platform_receipts=None if cluster.platform is None else list(cluster.platform.receipts),
        outbox_rows=outbox_rows,
    )


def _select_outbox(database_url: str) -> list[dict[str, Any]]:
    """Every notification the funnel queued: event, training, type, state, when."""
    conn = db.connect(database_url, "e2e harness")
    try:
        with conn, db.dict_cursor(conn) as cur:
            cur.execute(
                "SELECT event_id, training_id, event_type, status,"
                " extract(epoch FROM created_at)::float8 AS created_at"
                " FROM webhook_sync.notifications ORDER BY id"
            )
            return [dict(row) for row in cur.fetchall()]
    finally:
        conn.close()


def _select_records(
    conn: db.Connection,
) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, tuple[str, str | None]]]:
    """The transition log, the inbox (webhook-id -> outcome) and every row's statuses."""
    with conn, db.dict_cursor(conn) as dict_cur, conn.cursor() as cur:
        dict_cur.execute(
            "SELECT id, training_id, source, outcome, from_replicate_status,"
            " to_replicate_status, from_training_status, to_training_status,"
            " extract(epoch FROM created_at) AS created_at"
            " FROM webhook_sync.training_transitions ORDER BY id"
        )
        transitions = [dict(row) for row in dict_cur.fetchall()]
        cur.execute("SELECT webhook_id, outcome FROM webhook_sync.webhook_events")
        inbox = dict(cur.fetchall())
        cur.execute("SELECT id, training_status, replicate_status FROM webhook_sync.trainings")
        rows = {row[0]: (row[1], row[2]) for row in cur.fetchall()}
    return transitions, inbox, rows


def _sweep_durations(cluster: Cluster) -> list[float]:
    """How long each sweep took, from the workers' one summary line per sweep."""
    return [float(value) for value in _worker_lines(cluster, SWEEP_LINE)]


def _worker_lines(cluster: Cluster, pattern: re.Pattern[str]) -> list[str]:
    """What `pattern`'s group captures in every worker's output."""
    found = []
    for process in cluster.processes:
        if process.name.startswith("worker"):
            found += pattern.findall(process.output())
    return found


def _finished_at(record: dict[str, Any]) -> float | None:
    """When the simulator's training reached its terminal status (epoch seconds)."""
    times = [record.get("canceled_at"), record.get("planned_completed_at")]
    values = [datetime.fromisoformat(value).timestamp() for value in times if value]
    return min(values) if values else None


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
    except requests.RequestException:
        return False
    return True


def _exited(process: ManagedProcess) -> bool:
    return not process.running()


def _read_procfile(path: Path) -> dict[str, list[str]]:
    """The Procfile's commands by process name, split as a shell would."""
    commands = {}
    for line in path.read_text().splitlines():
        name, _, command = line.partition(":")
        if command.strip() and not line.lstrip().startswith("#"):
            commands[name.strip()] = shlex.split(command)
    return commands


def new_log_dir(prefix: str = "webhook-sync-e2e-") -> Path:
    """A fresh folder for the processes' output."""
    return Path(tempfile.mkdtemp(prefix=prefix))
