"""The Replicate request budget shared through PostgreSQL: one token bucket per API token
in `replicate_budgets`, refilled by the database clock and spent by one statement, so that
every process using the token (N web, M workers, the CLI) together stays under
REPLICATE_MAX_RPS, which is the account's limit, not a process's.

A process takes a small slice of tokens at a time (a few per statement, not one per
request) and hands them to its threads; a slice not spent within SLICE_TTL_SECONDS is
dropped, so no process hoards tokens for a later burst. Over any window of T seconds the
bucket grants at most `rate × T + capacity` tokens in all, whoever asks. When the database
cannot be asked (not migrated yet, unreachable), the process falls back to a bucket of its
own at the full rate for FALLBACK_SECONDS and says so once in the log: a worker that cannot
reach the database cannot apply what it fetches anyway.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable

import psycopg2

from webhook_sync import db, errors
from webhook_sync.config import Config
from webhook_sync.logs import log_event

# A slice granted and not spent within this long is dropped (a process must not save up).
SLICE_TTL_SECONDS = 1.0
# After the database failed to answer, the local bucket paces requests this long.
FALLBACK_SECONDS = 5.0
# One statement hands out about this share of a second's budget at most.
SLICE_SHARE = 0.1

# The bucket refilled to `now` (statement_timestamp, never moving updated_at backwards:
# a statement that waited for the row lock refills nothing twice), then spent by up to
# %(want)s whole tokens; `last_grant` says how many this statement took.
_AVAILABLE = (
    "LEAST(%(capacity)s::double precision, b.tokens + %(rate)s::double precision"
    " * GREATEST(0, EXTRACT(EPOCH FROM statement_timestamp() - b.updated_at))::double precision)"
)
_TAKE_TOKENS = (
    "INSERT INTO {schema}.replicate_budgets AS b (name, tokens, last_grant, updated_at)"
    " VALUES (%(name)s, %(capacity)s - %(first)s, %(first)s, statement_timestamp())"
    " ON CONFLICT (name) DO UPDATE SET"
    f" last_grant = LEAST(%(want)s, floor({_AVAILABLE}))::integer,"
    f" tokens = {_AVAILABLE} - LEAST(%(want)s, floor({_AVAILABLE})),"
    " updated_at = GREATEST(b.updated_at, statement_timestamp())"
    " RETURNING last_grant, tokens"
)


def budget_name(token: str) -> str:
    """The bucket's name for an API token: a hash, so the token is never stored."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:32]


def take_tokens(
    conn: db.Connection, name: str, *, rate: float, capacity: float, want: int
) -> tuple[int, float]:
    """Spend up to `want` tokens of the bucket `name` (created full on first use) in one
    statement; return (tokens granted, tokens left). The caller owns the transaction."""
    first = int(min(want, capacity))
    with conn.cursor() as cur:
        cur.execute(
            db.render(conn, _TAKE_TOKENS),
            {"name": name, "rate": rate, "capacity": capacity, "want": want, "first": first},
        )
        granted, left = cur.fetchone()
    return int(granted), float(left)


class SharedBudget:
    """A rate limiter for ReplicateClient whose tokens come from the shared bucket; safe to
    share between threads; opens its own connection (autocommit) on first use."""

    def __init__(
        self,
        connect: Callable[[], db.Connection],
        name: str,
        rate: float,
        *,
        slice_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self.name = name
        self.rate = rate
        # One second's worth, as the local bucket: a sweep starts at full speed.
        self.capacity = max(1.0, rate)
        self.slice_size = max(1, min(int(self.capacity), slice_size or int(rate * SLICE_SHARE)))
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: db.Connection | None = None
        self._held = 0
        self._held_at = 0.0
        self._fallback: TokenBucket | None = None
        self._fallback_until = 0.0
        self.statements = 0

    @classmethod
    def from_config(cls, config: Config, rate: float | None = None) -> SharedBudget:
        """The budget of the configured token, at REPLICATE_MAX_RPS (or `rate`), in our
        schema."""
        url = config.require_database_url()
        token = config.require_api_token()

        def connect() -> db.Connection:
            conn = db.connect(
                url,
                "webhook-sync budget",
                config.statement_timeout_ms,
                schema=config.database_schema,
            )
            conn.autocommit = True
            return conn

        return cls(connect, budget_name(token), rate or config.max_rps)

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Take one request's token, waiting as long as needed; False when `stop` was set."""
        if stop is not None and stop.is_set():
            return False
        return wait_for_token(self._lock, self._take_one, stop)

    def close(self) -> None:
        """Close the budget's connection; a slice still held is dropped."""
        with self._lock:
            self._held = 0
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _take_one(self) -> float:
        """Spend a held token, else ask the bucket for a slice; 0 when a token was taken,
        else how long to wait before asking again. Called with the lock held."""
        now = self._clock()
        if self._held and now - self._held_at > SLICE_TTL_SECONDS:
            self._held = 0
        if self._held:
            self._held -= 1
            return 0.0
        if now < self._fallback_until and self._fallback is not None:
            return self._fallback.take(now)
        try:
            granted, left = self._ask()
        except (errors.DatabaseUnavailableError, psycopg2.Error) as exc:
            return self._start_fallback(now, exc).take(now)
        if self._fallback is not None:
            log_event("replicate_budget_shared_again", budget=self.name[:15])
            self._fallback = None
        if granted:
            self._held, self._held_at = granted - 1, now
            return 0.0
        # Ask again when a whole slice has refilled (a slice per statement, not a token),
        # a little apart from the other processes that wait too.
        missing = max(1.0, self.slice_size - left)
        return missing / self.rate * random.uniform(1.0, 1.2)

    def _ask(self) -> tuple[int, float]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        try:
            self.statements += 1
            return take_tokens(
                self._conn, self.name, rate=self.rate, capacity=self.capacity, want=self.slice_size
            )
        except psycopg2.Error:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise

    def _start_fallback(self, now: float, exc: BaseException) -> TokenBucket:
        if self._fallback is None:
            log_event(
                "replicate_budget_local",
                logging.WARNING,
                budget=self.name[:15],
                error=db.first_line(exc),
                seconds=FALLBACK_SECONDS,
            )
            self._fallback = TokenBucket(self.rate, self.capacity, now)
        self._fallback_until = now + FALLBACK_SECONDS
        return self._fallback


class TokenBucket:
    """A token bucket of this process alone (not thread-safe: the caller holds a lock):
    the client's own RateLimiter, and the shared budget's fallback."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def take(self, now: float) -> float:
        """Spend a token if one has refilled by `now`: 0, else the seconds until one has."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


def wait_for_token(
    lock: threading.Lock, take: Callable[[], float], stop: threading.Event | None
) -> bool:
    """Call `take` under `lock` until it grants a token (0), sleeping outside the lock for
    as long as it says in between; False when `stop` was set meanwhile."""
    while True:
        with lock:
            wait = take()
        if wait <= 0:
            return True
        if stop is not None:
            if stop.wait(wait):
                return False
        else:
            time.sleep(wait)
