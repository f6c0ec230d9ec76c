"""The Replicate request budget shared through PostgreSQL, on a real database."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from webhook_sync import budget, db, replicate
from webhook_sync.config import Config


def connector(database_url: str) -> Callable[[], db.Connection]:
    """A budget of its own connection, as one process of several would have."""

    def connect() -> db.Connection:
        conn = db.connect(database_url, "test budget")
        conn.autocommit = True
        return conn

    return connect


def test_a_new_bucket_starts_full_and_is_spent_by_one_statement(conn: db.Connection) -> None:
    """The first take creates a full bucket; takes beyond it get only what refilled."""
    with conn:
        first = budget.take_tokens(conn, "b", rate=10, capacity=10, want=4)
        second = budget.take_tokens(conn, "b", rate=10, capacity=10, want=4)
        third = budget.take_tokens(conn, "b", rate=10, capacity=10, want=4)

    # One transaction: statement_timestamp moves a few microseconds, nothing refills.
    assert first == (4, 6.0)
    assert second[0] == 4
    assert third[0] == 2
    assert 0 <= third[1] < 1


def test_processes_sharing_a_token_together_stay_under_the_rate(database_url: str) -> None:
    """Six budgets on their own connections, each with four threads taking as fast as they
    can, are granted no more than the rate allows over the time they ran, in all."""
    rate = 50.0
    budgets = [
        budget.SharedBudget(connector(database_url), "shared", rate, slice_size=5) for _ in range(6)
    ]
    granted = [0] * 24
    stop = threading.Event()

    def spend(index: int) -> None:
        limiter = budgets[index // 4]
        while limiter.acquire(stop):
            granted[index] += 1

    threads = [threading.Thread(target=spend, args=(index,)) for index in range(24)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    elapsed = time.monotonic() - started
    for limiter in budgets:
        limiter.close()

    capacity = rate
    assert sum(granted) <= capacity + rate * elapsed
    assert sum(granted) >= rate  # not starved either
    assert all(limiter.statements < sum(granted) for limiter in budgets)


def test_two_tokens_have_two_buckets(database_url: str) -> None:
    """Budgets are per API token, named by a hash of it that does not contain it."""
    token = "r8_secret_token_value"
    name = budget.budget_name(token)
    one = budget.SharedBudget(connector(database_url), name, 5.0, slice_size=5)
    other = budget.SharedBudget(connector(database_url), budget.budget_name("r8_other"), 5.0)

    assert all(one.acquire() for _ in range(5))
    assert other.acquire()
    one.close()
    other.close()
    conn = db.connect(database_url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM webhook_sync.replicate_budgets ORDER BY name")
        names = [row[0] for row in cur.fetchall()]
    conn.close()

    assert len(names) == 2
    assert name in names
    assert not any(token in stored for stored in names)


def test_an_unmigrated_database_falls_back_to_a_local_bucket(
    empty_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the table (migrate not run yet) requests are still paced, by the process
    alone, and the log says so once."""
    limiter = budget.SharedBudget(connector(empty_database_url), "x", 100.0)
    stop = threading.Event()

    taken = [limiter.acquire(stop) for _ in range(20)]
    limiter.close()

    assert all(taken)
    assert [r.getMessage() for r in caplog.records].count("replicate_budget_local") == 1


def test_the_client_from_config_uses_the_shared_budget(database_url: str) -> None:
    """With DATABASE_URL set, the configured client takes its tokens from the database;
    closing the client closes the budget's connection."""
    config = Config(database_url=database_url, api_token="r8_t", max_rps=7.0)

    client = replicate.ReplicateClient.from_config(config)
    limiter = client.limiter
    taken = limiter.acquire()
    client.close()

    assert isinstance(limiter, budget.SharedBudget)
    assert taken
    assert (limiter.rate, limiter.name) == (7.0, budget.budget_name("r8_t"))
    assert limiter._conn is None
    assert not isinstance(replicate.ReplicateClient("r8_t").limiter, budget.SharedBudget)
