"""A small pool of database connections per process, opened on first use (after the fork)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg2
import psycopg2.extensions
import psycopg2.pool

from webhook_sync import config, db, errors
from webhook_sync.host_binding import HostBinding

# How long a request may wait for a free connection before it is answered 503.
DEFAULT_ACQUIRE_TIMEOUT = 1.0
_BROKEN = db.CONNECTION_LOST_ERRORS
_LOST = psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN


class ConnectionPool:
    """Hands out at most `size` connections, reusing them; broken ones are discarded.

    The psycopg2 pool is created lazily in the process that first uses it, so a pool built
    before gunicorn forks never shares a socket between workers. Waiting for a connection
    is bounded: when all are busy for `acquire_timeout` seconds, DatabaseUnavailableError.
    """

    def __init__(
        self,
        url: str,
        *,
        size: int,
        application_name: str = "webhook-sync",
        statement_timeout_ms: int = 10_000,
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
        schema: str = config.DEFAULT_DATABASE_SCHEMA,
        host: HostBinding | None = None,
    ) -> None:
        self._params = db.connection_params(url, application_name, statement_timeout_ms)
        self._params["connection_factory"] = db.connection_factory(schema, host)
        self.size = size
        self.acquire_timeout = acquire_timeout
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._pool: psycopg2.pool.ThreadedConnectionPool | None = None
        self._slots = threading.BoundedSemaphore(size)

    def _current(self) -> tuple[psycopg2.pool.ThreadedConnectionPool, threading.BoundedSemaphore]:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # A pool inherited through fork is dropped, not closed: closing would end
                # the parent's sessions on the shared sockets.
                pool = psycopg2.pool.ThreadedConnectionPool(0, self.size, **self._params)
                # minconn is how many idle connections putconn keeps; starting from 0 and
                # raising it afterwards opens connections only when they are first needed.
                pool.minconn = self.size
                self._pool, self._pid = pool, os.getpid()
                self._slots = threading.BoundedSemaphore(self.size)
            return self._pool, self._slots

    @contextmanager
    def connection(self) -> Iterator[db.Connection]:
        """Borrow a connection (the caller owns its transaction); DatabaseUnavailableError
        when none is free in time or none can be opened."""
        pool, slots = self._current()
        if not slots.acquire(timeout=self.acquire_timeout):
            raise errors.DatabaseUnavailableError("all database connections are busy")
        try:
            try:
                conn = pool.getconn()
            except psycopg2.Error as exc:
                raise db.connect_error(exc, self._params["dsn"]) from exc
            broken = False
            try:
                yield conn
            except _BROKEN:
                broken = True
                raise
            finally:
                # A connection whose server went away is closed instead of being reused.
                broken = broken or bool(conn.closed) or conn.info.transaction_status == _LOST
                if not broken and conn.autocommit:
                    # The next borrower gets psycopg2's default, whatever this one chose.
                    conn.autocommit = False
                pool.putconn(conn, close=broken)
        finally:
            slots.release()

    def close(self) -> None:
        """Close every connection of this process's pool."""
        with self._lock:
            if self._pool is not None and self._pid == os.getpid() and not self._pool.closed:
                self._pool.closeall()
            self._pool = None
