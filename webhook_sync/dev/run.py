"""`make run`: every Procfile process in the foreground, with local stand-ins when unconfigured.

With DATABASE_URL unset it starts an embedded PostgreSQL (pgserver) with its data under
`.data/pg`, so state survives restarts. With REPLICATE_API_TOKEN unset it also starts the
local Replicate simulator and points the service at it. It migrates, then hands the
processes to honcho, which interleaves their logs and stops them all on Ctrl-C.

Secrets: against the simulator the run uses development credentials only (the
simulator's published token and secret; a configured REPLICATE_WEBHOOK_SECRET is set
aside, because the simulator would serve it to anyone holding the published token). Any
credential reaches the child processes through their environment, never a command line
(visible in `ps`) nor the generated `.data/Procfile.run`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from webhook_sync import db, logs, migrations
from webhook_sync.config import Config
from webhook_sync.dev import embedded_postgres
from webhook_sync.dev.simulator import DEFAULT_TOKEN, DEV_SECRET
from webhook_sync.logs import log_event

REPO = Path.cwd()
DATA_DIR = REPO / ".data"


def procfile_lines(procfile: Path) -> list[str]:
    """The long-running processes of the Procfile (web, worker); `release` runs before them."""
    lines = []
    for line in procfile.read_text().splitlines():
        name, _, command = line.partition(":")
        if command.strip() and not line.lstrip().startswith("#") and name.strip() != "release":
            lines.append(f"{name.strip()}: {command.strip()}")
    return lines


def main() -> int:
    """Start the embedded database and simulator when needed, migrate, run the Procfile."""
    logs.configure(os.environ.get("LOG_LEVEL", "INFO").upper(), "kv")
    env = dict(os.environ)
    DATA_DIR.mkdir(exist_ok=True)
    server = None
    if not env.get("DATABASE_URL"):
        pgserver = embedded_postgres.load_pgserver()  # a real PostgreSQL, from pip (dev extra)
        server = pgserver.get_server(DATA_DIR / "pg", cleanup_mode="stop")
        env["DATABASE_URL"] = server.get_uri()
        log_event(
            "embedded_postgresql",
            data_dir=str(DATA_DIR / "pg"),
            note="DATABASE_URL is unset; data survives restarts",
        )
    lines = procfile_lines(REPO / "Procfile")
    simulator_port = env.get("SIMULATOR_PORT", "8090")
    if not env.get("REPLICATE_API_TOKEN"):
        set_aside = bool(env.get("REPLICATE_WEBHOOK_SECRET", "").strip())
        # The simulator's own defaults; web and worker get them in their environment.
        env.update(
            REPLICATE_API_TOKEN=DEFAULT_TOKEN,
            REPLICATE_API_BASE_URL=f"http://127.0.0.1:{simulator_port}/v1",
            REPLICATE_WEBHOOK_SECRET=DEV_SECRET,
        )
        lines.append(f"simulator: webhook-sync simulator --port {simulator_port}")
        log_event(
            "local_simulator",
            api_base_url=env["REPLICATE_API_BASE_URL"],
            note="REPLICATE_API_TOKEN is unset; `make demo` creates trainings in it",
            configured_secret_set_aside=set_aside,
        )
    try:
        schema = Config.from_env(env).database_schema
        conn = db.connect(env["DATABASE_URL"], "webhook-sync release", schema=schema)
        try:
            migrations.migrate(conn)
        finally:
            conn.close()
        run_procfile = DATA_DIR / "Procfile.run"
        run_procfile.write_text("\n".join(lines) + "\n")
        honcho = shutil.which("honcho", path=str(Path(sys.executable).parent)) or "honcho"
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        port = env.get("PORT", "8000")
        runner = subprocess.Popen(
            [honcho, "-f", str(run_procfile), "-d", str(REPO), "start", "-p", port], env=env
        )
        interrupted = False
        while True:
            try:
                exit_code = runner.wait()
            except KeyboardInterrupt:
                # Ctrl-C reaches honcho too; let it stop the processes before the database.
                interrupted = True
                continue
            # honcho answers Ctrl-C with 130; for `make run` that is the normal way to stop.
            return 0 if interrupted and exit_code == 130 else exit_code
    finally:
        if server is not None:
            server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
