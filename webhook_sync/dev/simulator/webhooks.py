"""The simulator's webhook sender: signed deliveries, terminal retries, and delivery faults.

A `Scheduler` thread runs callables at wall-clock times on a small thread pool, so one
slow receiver never holds up the others. `WebhookSender` signs each attempt per Standard
Webhooks, retries only the terminal event (for about a minute, like Replicate), and drops,
duplicates, delays or reorders messages at the shares the faults ask for.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import requests
import standardwebhooks

from webhook_sync import logs
from webhook_sync.dev.simulator import settings, state

DELIVERY_LOG_SIZE = 200_000
DUPLICATE_GAP_SECONDS = 0.05


class Scheduler:
    """Runs callables at wall-clock times: one timer thread, a pool of workers."""

    def __init__(self, workers: int = 16, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self._wakeup = threading.Condition()
        self._running = False
        self._running_calls = 0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sim-webhook")
        self._thread = threading.Thread(target=self._run, name="sim-scheduler", daemon=True)

    def start(self) -> None:
        """Start the timer thread."""
        self._running = True
        self._thread.start()

    def stop(self) -> None:
        """Stop the timer thread and drop what is still queued; running calls finish."""
        with self._wakeup:
            self._running = False
            self._heap.clear()
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def call_at(self, when: float, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the pool at wall-clock time `when` (seconds since the epoch)."""
        with self._wakeup:
            heapq.heappush(self._heap, (when, next(self._order), fn, args))
            self._wakeup.notify()

    def call_many(self, calls: list[tuple[float, Callable[..., Any], tuple[Any, ...]]]) -> None:
        """Schedule many calls at once (one heapify instead of one push each)."""
        with self._wakeup:
            self._heap.extend((when, next(self._order), fn, args) for when, fn, args in calls)
            heapq.heapify(self._heap)
            self._wakeup.notify()

    def pending(self) -> int:
        """How many calls wait for their time or are running (0 means all is quiet)."""
        with self._wakeup:
            return len(self._heap) + self._running_calls

    def _run(self) -> None:
        while True:
            with self._wakeup:
                if not self._running:
                    return
                if not self._heap:
                    self._wakeup.wait()
                    continue
                delay = self._heap[0][0] - self._clock()
                if delay > 0:
                    self._wakeup.wait(delay)
                    continue
                _, _, fn, args = heapq.heappop(self._heap)
                # Counted until it returns, so a retry it schedules is never missed by pending().
                self._running_calls += 1
            try:
                self._pool.submit(self._call, fn, args)
            except RuntimeError:
                return  # the pool was shut down under us: we are stopping

    def _call(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        # A worker thread is a process edge: an error is logged, never lost silently.
        try:
            fn(*args)
        except Exception as exc:
            logs.log_event("simulator_task_failed", error=repr(exc)[:200])
        finally:
            with self._wakeup:
                self._running_calls -= 1


@dataclass
class Message:
    """One webhook message: the same id and body on every attempt."""

    webhook_id: str
    training_id: str
    event: str
    status: str
    url: str
    body: str
    terminal: bool
    release_after: bool = False
    first_attempt_at: float | None = None
    duplicate: bool = False
    delayed: bool = False
    reordered: bool = False


@dataclass(frozen=True)
class Delivery:
    """One attempt (or one dropped message) as the admin endpoint reports it."""

    webhook_id: str
    training_id: str
    event: str
    status: str
    attempt: int
    response_status: int | None
    error: str | None
    dropped: bool
    duplicate: bool
    delayed: bool
    reordered: bool
    at: str


class WebhookSender:
    """Signs and sends webhook messages, with Replicate's retry rule and optional faults."""

    def __init__(
        self,
        scheduler: Scheduler,
        secret: str,
        faults: Callable[[], settings.Faults],
        *,
        seed: int = 0,
        retry_window_seconds: float = 60.0,
        retry_base_seconds: float = 1.0,
        timeout_seconds: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._scheduler = scheduler
        self._signer = standardwebhooks.Webhook(secret)
        self._faults = faults
        self._seed = seed
        self._retry_window = retry_window_seconds
        self._retry_base = retry_base_seconds
        self._timeout = timeout_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, list[Message]] = {}
        self._log: deque[Delivery] = deque(maxlen=DELIVERY_LOG_SIZE)
        self._local = threading.local()

    def send(self, message: Message) -> None:
        """Deliver a message, dropping, delaying, duplicating or holding it back as faults say.

        A message with `release_after` (the training's last one) releases the messages
        held back for reordering once its first attempt is done, so they arrive late.
        """
        faults = self._faults()
        rng = random.Random(f"{self._seed}/{message.webhook_id}")
        dropped, duplicate, delayed, reordered = (
            rng.random() < share
            for share in (
                faults.drop_rate,
                faults.duplicate_rate,
                faults.delay_rate,
                faults.reorder_rate,
            )
        )
        if dropped:
            self._record(message, 0, None, None, dropped=True)
            if message.release_after:
                self.release_held(message.training_id)
            return
        if reordered and not message.terminal and not message.release_after:
            message.reordered = True
            with self._lock:
                self._held.setdefault(message.training_id, []).append(message)
            return
        message.duplicate = duplicate
        message.delayed = delayed
        when = self._clock() + (faults.delay_seconds if delayed else 0.0)
        self._scheduler.call_at(when, self._attempt, message, 1)

    def release_held(self, training_id: str) -> None:
        """Send now the messages held back for this training (they arrive out of order)."""
        with self._lock:
            held = self._held.pop(training_id, [])
        for message in held:
            self._scheduler.call_at(self._clock(), self._attempt, message, 1)

    def deliveries(self) -> list[dict[str, Any]]:
        """Every attempt and dropped message so far, oldest first."""
        with self._lock:
            return [asdict(delivery) for delivery in self._log]

    def _attempt(self, message: Message, attempt: int, duplicate_copy: bool = False) -> None:
        now = self._clock()
        if message.first_attempt_at is None:
            message.first_attempt_at = now
        timestamp = datetime.fromtimestamp(now, tz=UTC)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "webhook-sync-simulator",
            "webhook-id": message.webhook_id,
            "webhook-timestamp": str(int(now)),
            "webhook-signature": self._signer.sign(message.webhook_id, timestamp, message.body),
        }
        status_code: int | None = None
        error: str | None = None
        started = time.monotonic()
        try:
            response = self._session().post(
                message.url,
                data=message.body.encode(),
                headers=headers,
                timeout=self._timeout,
                # Replicate does not follow redirects: a 3xx is a failed delivery.
                allow_redirects=False,
            )
            status_code = response.status_code
        except requests.RequestException as exc:
            error = type(exc).__name__
        self._record(message, attempt, status_code, error, duplicate=duplicate_copy)
        logs.log_event(
            "simulator_webhook_sent",
            training_id=message.training_id,
            webhook_id=message.webhook_id,
            webhook_event=message.event,
            status=message.status,
            attempt=attempt,
            response_status=status_code,
            error=error,
            ms=round((time.monotonic() - started) * 1000),
        )
        if duplicate_copy:
            return
        ok = status_code is not None and 200 <= status_code < 300
        if not ok and message.terminal:
            self._schedule_retry(message, attempt, now)
        if attempt == 1:
            if message.duplicate:
                self._scheduler.call_at(
                    now + DUPLICATE_GAP_SECONDS, self._attempt, message, 1, True
                )
            if message.release_after:
                self.release_held(message.training_id)

    def _schedule_retry(self, message: Message, attempt: int, now: float) -> None:
        assert message.first_attempt_at is not None
        last_at = message.first_attempt_at + self._retry_window
        next_at = now + self._retry_base * 2 ** (attempt - 1)
        if next_at > last_at:
            # Replicate's final retry comes about a minute after the first attempt.
            if now >= last_at - self._retry_base / 2:
                return
            next_at = last_at
        self._scheduler.call_at(next_at, self._attempt, message, attempt + 1)

    def _record(
        self,
        message: Message,
        attempt: int,
        status_code: int | None,
        error: str | None,
        *,
        dropped: bool = False,
        duplicate: bool = False,
    ) -> None:
        delivery = Delivery(
            webhook_id=message.webhook_id,
            training_id=message.training_id,
            event=message.event,
            status=message.status,
            attempt=attempt,
            response_status=status_code,
            error=error,
            dropped=dropped,
            duplicate=duplicate,
            delayed=message.delayed,
            reordered=message.reordered,
            at=state.format_time(round(self._clock() * 1_000_000), 6),
        )
        with self._lock:
            self._log.append(delivery)

    def _session(self) -> requests.Session:
        # requests.Session is not documented as thread-safe, so each worker keeps its own.
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session
