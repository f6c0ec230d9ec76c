"""Fetching trainings from Replicate for the sweep and `sync`: GETs by id on a bounded
thread pool, yielded as each completes, and the check that an object is the one asked for."""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ThreadPoolExecutor, wait
from typing import Any

from webhook_sync import errors
from webhook_sync.replicate import ReplicateClient
from webhook_sync.training import Training, parse_training


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
    tick_seconds: float | None = None,
) -> Generator[tuple[str | None, Any, BaseException | None], None, None]:
    """GET each training on a bounded thread pool, yielding (id, object, error) as each
    completes, and (None, None, None) whenever `tick_seconds` pass without one; on a
    401/403 or `stop`, the GETs not yet started are cancelled."""
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="sweep")
    futures: dict[Future[dict[str, Any]], str] = {
        pool.submit(get_unless_stopped, client, training_id, stop): training_id
        for training_id in training_ids
    }
    waiting = set(futures)
    cancelled = False
    try:
        while waiting:
            done, waiting = wait(waiting, timeout=tick_seconds, return_when=FIRST_COMPLETED)
            if not done:
                yield None, None, None
            for future in done:
                training_id = futures[future]
                if not cancelled and stop is not None and stop.is_set():
                    cancelled = cancel_all(futures)
                try:
                    yield training_id, future.result(), None
                except CancelledError as exc:
                    yield training_id, None, exc
                except errors.ReplicateAuthError as exc:
                    cancelled = cancel_all(futures)
                    yield training_id, None, exc
                except errors.ReplicateError as exc:
                    yield training_id, None, exc
    finally:
        # A consumer that stops early (a 401) must not leave queued GETs running.
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
