"""Fetching trainings from Replicate for the sweep and `sync`: GETs by id on a bounded
thread pool, yielded as each completes (claimed in batches as the pool drains, for the
sweep), and the check that an object is the one asked for.

The contract of `fetch_all` and `fetch_claimed`: each GET is yielded once as
(id, object, None) or (id, None, error), the error a ReplicateError or a CancelledError
(a GET a stop cancelled before it was sent); a 401/403 is never yielded but raised as
ReplicateAuthError at once, the GETs not yet started cancelled, since no other GET can
succeed with that token. Only `fetch_claimed` with `tick_seconds` also yields
(None, None, None) ticks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from typing import Any, cast

from webhook_sync import errors
from webhook_sync.replicate import ReplicateClient
from webhook_sync.training import Training, parse_training

# Rounds of the pool kept queued ahead: the consumer claims and applies on one thread, and
# the pool must not run dry while it commits a batch of results (measured: with one round
# ahead, 1,000 GETs at 100 ms on 8 threads took 19.5 s; with four, 12.9 s, against 14.4 s
# when everything was queued at once).
QUEUED_ROUNDS = 4

# Why a GET yielded no object: Replicate's answer (after the client's retries), or a stop
# that came while it waited in the queue.
FetchError = errors.ReplicateError | CancelledError


def parse_training_created(obj: Any) -> Any:
    """Replicate's `created_at` of a listed object, or None."""
    try:
        return parse_training(obj).created_at
    except errors.InvalidTrainingError:
        return None


def parse_for(training_id: str, obj: Any) -> Training:
    """Parse a fetched object and check that it is the training we asked for."""
    training = parse_training(obj)
    if training.id != training_id:
        raise errors.InvalidTrainingError(
            f"asked Replicate for {training_id}, got an object for {training.id}"
        )
    return training


def fetch_all(
    client: ReplicateClient,
    training_ids: Iterable[str],
    concurrency: int,
    stop: threading.Event | None,
) -> Generator[tuple[str, Any, FetchError | None], None, None]:
    """GET each training on a bounded thread pool, yielding (id, object, None) or
    (id, None, error) as each completes; raises ReplicateAuthError on a 401/403 (the GETs
    not yet started cancelled, as on `stop`). Close it (contextlib.closing) when leaving
    early: the GETs queued are then cancelled too."""
    batches = [list(training_ids)]
    fetched = fetch_claimed(client, lambda: batches.pop() if batches else [], concurrency, stop)
    # Without tick_seconds the pool's wait returns only with a finished GET: no tick, so
    # every id is a str.
    return cast(Generator[tuple[str, Any, FetchError | None], None, None], fetched)


def fetch_claimed(
    client: ReplicateClient,
    claim: Callable[[], Sequence[str]],
    concurrency: int,
    stop: threading.Event | None,
    tick_seconds: float | None = None,
) -> Generator[tuple[str | None, Any, FetchError | None], None, None]:
    """GET the trainings `claim` hands out on a bounded thread pool, yielding (id, object,
    None) or (id, None, error) as each completes, and (None, None, None) whenever
    `tick_seconds` pass without one. `claim` is called in the consumer's thread whenever
    QUEUED_ROUNDS rounds of the pool or fewer are left queued, until it hands out
    nothing, so the threads never wait for the next claim. On `stop` the GETs not yet
    started are cancelled and nothing more is claimed; on a 401/403 too, and
    ReplicateAuthError is raised."""
    workers = max(1, concurrency)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sweep")
    futures: dict[Future[dict[str, Any]], str] = {}
    claiming = True
    cancelled = False
    try:
        while True:
            if claiming and not cancelled and len(futures) <= workers * QUEUED_ROUNDS:
                ids = claim()
                claiming = bool(ids)
                for training_id in ids:
                    futures[pool.submit(get_unless_stopped, client, training_id, stop)] = (
                        training_id
                    )
            if not futures:
                return
            done, _ = wait(futures, timeout=tick_seconds, return_when=FIRST_COMPLETED)
            if not done:
                yield None, None, None
            for future in done:
                training_id = futures.pop(future)
                if not cancelled and stop is not None and stop.is_set():
                    cancelled = cancel_all(futures)
                try:
                    yield training_id, future.result(), None
                except CancelledError as exc:
                    yield training_id, None, exc
                except errors.ReplicateAuthError:
                    # The finally below cancels the GETs not yet started.
                    raise
                except errors.ReplicateError as exc:
                    yield training_id, None, exc
    finally:
        # A 401, or a consumer that stops early, must not leave queued GETs running.
        pool.shutdown(wait=True, cancel_futures=True)


def get_unless_stopped(
    client: ReplicateClient, training_id: str, stop: threading.Event | None
) -> dict[str, Any]:
    """GET one training, unless a stop came while the GET waited in the queue."""
    if stop is not None and stop.is_set():
        raise CancelledError
    return client.get_training(training_id)


def cancel_all(futures: Iterable[Future[Any]]) -> bool:
    for future in futures:
        future.cancel()
    return True
