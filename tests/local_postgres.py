"""A PostgreSQL server of the tests' own, from pgserver's bundled binaries, on 127.0.0.1.

The suite uses it when TEST_DATABASE_URL is unset, and `make chaos` to restart a server
on purpose. It listens on TCP like a production server, so URLs carry a host and port.

As root the server runs as the `pgserver` user, which must be able to reach the binaries.
pgserver's own `get_server` makes them reachable by adding read and search permission for
everyone to every folder above its package (up to `/`), which would open a clone under
`/root`, or any private folder, to every user. Instead the server runs from a copy of
the binaries in its own temporary folder, and the clone stays as private as it was.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg2

from tests.support import free_port, wait_until
from webhook_sync.dev import embedded_postgres


class LocalPostgres:
    """A PostgreSQL server of our own (pgserver's binaries) on 127.0.0.1 that we may restart;
    with `passwords`, roles other than the superuser log in with their password.

    Never the machine's shared server: its data lives in a temporary folder and it is
    stopped (and the folder removed) by `stop`.
    """

    SYSTEM_USER = "pgserver"  # PostgreSQL refuses to run as root; pgserver creates this user

    def __init__(self, *, passwords: bool = False) -> None:
        self.passwords = passwords
        pgserver = embedded_postgres.load_pgserver()  # the dev extra's bundled PostgreSQL
        self.bin = pgserver._commands.POSTGRES_BIN_PATH
        self.folder = Path(tempfile.mkdtemp(prefix="webhook-sync-chaos-pg-"))
        self.pgdata = self.folder / "data"
        self.port = free_port()
        self.user = self.SYSTEM_USER if os.geteuid() == 0 else None

    @property
    def admin_url(self) -> str:
        """A superuser URL to the `postgres` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> LocalPostgres:
        """Initialise the data folder (first time) and start the server; waits until ready."""
        if self.user is not None:
            from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

            ensure_user_exists(self.user)
            ensure_prefix_permissions(self.folder)
            shutil.chown(self.folder, self.user, self.user)
            if not self.bin.is_relative_to(self.folder):
                self.bin = self._copy_binaries()
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir()
            if self.user is not None:
                shutil.chown(self.pgdata, self.user, self.user)
            options = ["--auth=trust", "--encoding=utf8", "-U", "postgres"]
            self._run("initdb", "-D", str(self.pgdata), *options)
            if self.passwords:
                self._require_passwords()
        self._pg_ctl("start")
        return self

    def _require_passwords(self) -> None:
        """Every role but the superuser (`admin_url`) must give its password over TCP, so a
        wrong one fails as it does on a real server (pg_hba.conf: the first match wins)."""
        hba = self.pgdata / "pg_hba.conf"
        rules = "host all postgres 127.0.0.1/32 trust\nhost all all all scram-sha-256\n"
        with hba.open("r+", encoding="utf-8") as file:  # in place: the server's user owns it
            existing = file.read()
            file.seek(0)
            file.write(rules + existing)

    def _copy_binaries(self) -> Path:
        """Copy pgserver's PostgreSQL into our folder, owned by the server's user; return
        the copy's bin folder. The layout is kept: the binaries find their libraries at
        `$ORIGIN/../../../pgserver.libs` and their share files relative to bin."""
        install = self.bin.parent  # site-packages/pgserver/pginstall
        copy = self.folder / "pgserver" / install.name
        shutil.copytree(install, copy, symlinks=True, ignore=shutil.ignore_patterns("include"))
        libs = install.parent.parent / "pgserver.libs"
        if libs.is_dir():
            shutil.copytree(libs, self.folder / libs.name, symlinks=True)
        owner = pwd.getpwnam(self.user)
        for root, folders, files in os.walk(self.folder):
            for name in (*folders, *files):
                os.chown(Path(root) / name, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
        return copy / self.bin.name

    def crash(self) -> None:
        """Stop the server abruptly, as a crash would (`start` brings it back)."""
        self._pg_ctl("stop", "-m", "immediate")

    def stop(self) -> None:
        """Stop the server and remove its data."""
        try:
            if (self.pgdata / "postmaster.pid").exists():
                self._pg_ctl("stop", "-m", "fast")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _pg_ctl(self, action: str, *options: str) -> None:
        args = ["-D", str(self.pgdata), "-w", *options]
        if action == "start":
            args += [
                "-o",
                f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c max_connections=200",
                "-l",
                str(self.folder / "server.log"),
            ]
        self._run("pg_ctl", *args, action)
        if action == "start":
            wait_until(self._accepts, timeout=30, message="the PostgreSQL server to accept")

    def _run(self, tool: str, *args: str) -> None:
        """Run one of the PostgreSQL tools as the server's user; raise with its output if it
        fails. Output goes to a file, not a pipe: the server pg_ctl starts would hold a pipe
        open and the call would never return."""
        with tempfile.TemporaryFile() as output:
            result = subprocess.run(
                [str(self.bin / tool), *args],
                stdout=output,
                stderr=subprocess.STDOUT,
                user=self.user,
                timeout=60,
                check=False,
            )
            if result.returncode != 0:
                output.seek(0)
                text = output.read().decode(errors="replace")
                raise RuntimeError(f"{tool} exited with {result.returncode}:\n{text}")

    def _accepts(self) -> bool:
        try:
            psycopg2.connect(self.admin_url, connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True
