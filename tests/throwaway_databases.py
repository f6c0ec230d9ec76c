"""Throwaway databases made ahead of the tests and dropped behind them, on threads of their own.

Each test still gets a database of its own, a fresh copy of a template. What moves off the
test's path is PostgreSQL's work: CREATE DATABASE copies every page of the template, and
DROP DATABASE waits for a checkpoint, together about half a second a test on a busy
machine, which the server now spends while the tests run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import uuid

from tests.e2e_support import admin_execute

# Copies made ahead per template: one is enough for the next test to find its copy ready.
AHEAD = 1
# Two threads: a copy for the next test is made while the last test's one is dropped.
THREADS = 2


class ThrowawayDatabases:
    """Fresh databases for the tests of one run on one server: `take` hands out a copy of a
    template (made ahead), `give_back` drops it (later, on a thread), `close` waits for
    every drop and raises the first that failed."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self._threads = concurrent.futures.ThreadPoolExecutor(
            max_workers=THREADS, thread_name_prefix="throwaway-databases"
        )
        self._ready: dict[str | None, collections.deque[concurrent.futures.Future[str]]] = {}
        self._drops: list[concurrent.futures.Future[None]] = []

    def take(self, template: str | None) -> str:
        """The name of a new database copied from `template` (None: an empty database),
        for the caller alone until it gives it back."""
        ready = self._ready.setdefault(template, collections.deque())
        while len(ready) < AHEAD + 1:
            ready.append(self._threads.submit(self._create, template))
        return ready.popleft().result()

    def give_back(self, name: str) -> None:
        """Drop the database `name`, whoever is still connected to it, on a thread."""
        self._drops.append(self._threads.submit(self._drop, name))

    def close(self) -> None:
        """Drop the copies made ahead and not taken, wait for every drop, and raise the
        first error a drop met."""
        try:
            for ready in self._ready.values():
                for made in ready:
                    self.give_back(made.result())
        finally:
            self._ready.clear()
            self._threads.shutdown(wait=True)  # also when a copy could not be made
        for drop in self._drops:
            drop.result()

    def _create(self, template: str | None) -> str:
        name = f"wst_{uuid.uuid4().hex[:16]}"
        copied = f' TEMPLATE "{template}"' if template is not None else ""
        admin_execute(self.admin_url, f'CREATE DATABASE "{name}"{copied}')
        return name

    def _drop(self, name: str) -> None:
        admin_execute(self.admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
