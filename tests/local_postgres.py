"""A PostgreSQL server of the tests' own, from pgserver's bundled binaries, on 127.0.0.1.

The suite uses it when TEST_DATABASE_URL is unset, and `make chaos` to restart a server
on purpose. It listens on TCP like a production server, so URLs carry a host and port.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psycopg2

from tests.support import free_port, wait_until


class LocalPostgres:
    """A PostgreSQL server of our own (pgserver's binaries) on 127.0.0.1 that we may restart.

    Never the machine's shared server: its data lives in a temporary folder and it is
    stopped (and the folder removed) by `stop`.
    """

    SYSTEM_USER = "pgserver"  # PostgreSQL refuses to run as root; pgserver creates this user

    def __init__(self) -> None:
        from pgserver import _commands  # the dev extra's bundled PostgreSQL

        self._commands = _commands
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
        if not (self.pgdata / "PG_VERSION").exists():
            self.pgdata.mkdir()
            if self.user is not None:
                shutil.chown(self.pgdata, self.user, self.user)
            self._commands.initdb(
                ["--auth=trust", "--encoding=utf8", "-U", "postgres"],
                pgdata=self.pgdata,
                user=self.user,
            )
        self._pg_ctl("start")
        return self

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
        args = ["-w", *options]
        if action == "start":
            args += [
                "-o",
                f"-h 127.0.0.1 -p {self.port} -k {self.folder} -c max_connections=200",
                "-l",
                str(self.folder / "server.log"),
            ]
        self._commands.pg_ctl([*args, action], pgdata=self.pgdata, user=self.user, timeout=60)
        if action == "start":
            wait_until(self._accepts, timeout=30, message="the PostgreSQL server to accept")

    def _accepts(self) -> bool:
        try:
            psycopg2.connect(self.admin_url, connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True
