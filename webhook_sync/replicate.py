"""The Replicate HTTP client: one session, timeouts, GET retries and a shared rate limit.

Only GETs are retried (on connection errors, timeouts, 429 and 5xx): a retried POST could
create a second training. Every request, retries included, first takes a token from one
bucket shared by all threads, so a sweep's thread pool stays under REPLICATE_MAX_RPS; a
client built `from_config` with a database takes them from the bucket every process of the
token shares (`budget.SharedBudget`).
Errors become `errors.Replicate*Error` naming the status code and Replicate's `detail`;
the token never appears in a message.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import requests
import requests.adapters

from webhook_sync import budget, errors, signing
from webhook_sync.config import DEFAULT_API_BASE_URL, Config
from webhook_sync.logs import log_event

USER_AGENT = "webhook-sync/0.1 (+requests)"
# Replicate's documented 429 body says the limit "resets in ~30s"; without Retry-After we
# wait a fraction of that and let the next attempt (or the next sweep) find out.
DEFAULT_THROTTLE_WAIT = 10.0
_DETAIL_CHARS = 300
_HEADER_CHARS = 60


class Limiter(Protocol):
    """What paces the client's requests: a RateLimiter, or the shared budget."""

    def acquire(self, stop: threading.Event | None = None) -> bool: ...


class RateLimiter:
    """A token bucket shared by every thread of the process; `acquire` blocks for a token."""

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate)
        self._bucket = budget.TokenBucket(rate, self.capacity, clock())
        self._clock = clock
        self._lock = threading.Lock()

    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Take one token, waiting as long as needed; False when `stop` was set meanwhile."""
        return budget.wait_for_token(self._lock, lambda: self._bucket.take(self._clock()), stop)


class ReplicateClient:
    """Replicate's HTTP API for trainings, safe to share between threads."""

    def __init__(
        self,
        token: str,
        base_url: str = DEFAULT_API_BASE_URL,
        *,
        max_rps: float = 40.0,
        connect_timeout: float = 3.05,
        read_timeout: float = 10.0,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_cap: float = 8.0,
        retry_after_cap: float = 30.0,
        throttle_wait: float = DEFAULT_THROTTLE_WAIT,
        pool_size: int = 16,
        stop: threading.Event | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        if not token:
            raise errors.ConfigError("REPLICATE_API_TOKEN is not set")
        self.base_url = base_url.rstrip("/")
        self.timeout = (connect_timeout, read_timeout)
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.retry_after_cap = retry_after_cap
        self.throttle_wait = throttle_wait
        self.limiter = limiter or RateLimiter(max_rps)
        # A limiter the client made for itself (the shared budget's connection) closes with it.
        self.owns_limiter = False
        self.stop = stop
        self._calls = 0
        self._calls_lock = threading.Lock()
        self.session = requests.Session()
        self.session.headers.update(
            {
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": USER_AGENT,
            }
        )
        # One pooled connection per worker thread; requests' default pool holds 10.
        adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=pool_size)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> ReplicateClient:
        """A client for the configured token, base URL and rate (the shared budget when
        DATABASE_URL is set); ConfigError without a token."""
        options: dict[str, Any] = {
            "max_rps": config.max_rps,
            "pool_size": max(16, config.poll_concurrency * 2),
        }
        options.update(overrides)
        shared = "limiter" not in options and config.database_url and config.api_token
        if shared:
            options["limiter"] = budget.SharedBudget.from_config(config, rate=options["max_rps"])
        client = cls(config.require_api_token(), config.api_base_url, **options)
        client.owns_limiter = bool(shared)
        return client

    def __repr__(self) -> str:
        return f"ReplicateClient(base_url={self.base_url!r})"

    @property
    def request_count(self) -> int:
        """HTTP requests sent so far, retries included."""
        with self._calls_lock:
            return self._calls

    def close(self) -> None:
        """Close the pooled connections (and the shared budget's)."""
        self.session.close()
        if self.owns_limiter and isinstance(self.limiter, budget.SharedBudget):
            self.limiter.close()

    # --- the API -----------------------------------------------------------------------

    def get_training(self, training_id: str) -> dict[str, Any]:
        """GET /trainings/{id}, built here because `urls.get` on create points at /predictions/."""
        return self._request("GET", f"/trainings/{quote(training_id, safe='')}")

    def list_training_pages(self) -> Iterator[list[dict[str, Any]]]:
        """The account's trainings a page (100) at a time, newest first, following `next`."""
        path: str | None = "/trainings"
        while path:
            page = self._request("GET", path)
            results = page.get("results")
            if not isinstance(results, list):
                raise errors.ReplicateError("GET /trainings returned no `results` list")
            yield [item for item in results if isinstance(item, dict)]
            path = _next_path(page.get("next"))

    def get_webhook_secret(self) -> str:
        """The account's webhook signing secret (`whsec_…`); callers cache it."""
        key = self._request("GET", "/webhooks/default/secret").get("key")
        if not isinstance(key, str) or not key:
            raise errors.ReplicateError("GET /webhooks/default/secret returned no `key`")
        return key

    # --- one request, with retries for GET ---------------------------------------------

    def _request(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        attempts = self.max_attempts if method == "GET" else 1
        what = f"{method} {path.split('?', 1)[0]}"
        for attempt in range(1, attempts + 1):
            stopping = self.stop is not None and self.stop.is_set()
            if stopping or not self.limiter.acquire(self.stop):
                raise errors.ReplicateUnavailableError(f"{what}: stopped before sending")
            self._count()
            try:
                response = self.session.request(
                    method, self.base_url + path, json=json, timeout=self.timeout
                )
            except requests.RequestException as exc:
                failure: errors.ReplicateError = errors.ReplicateUnavailableError(
                    f"{what}: cannot reach Replicate ({type(exc).__name__})"
                )
                wait = self._backoff(attempt)
                cause: BaseException = exc
            else:
                if response.status_code < 300:
                    return _json_object(response, what)
                failure = _error_for(response, what)
                if not isinstance(failure, errors.ReplicateUnavailableError):
                    raise failure
                wait = self._wait_after(response, attempt)
                cause = failure
            if attempt == attempts:
                raise failure from cause
            log_event(
                "replicate_retry",
                logging.DEBUG,
                request=what,
                status=failure.status_code,
                attempt=attempt,
                wait=round(wait, 3),
            )
            if self.stop is not None and self.stop.wait(wait):
                raise errors.ReplicateUnavailableError(f"{what}: stopped while retrying")
            if self.stop is None:
                time.sleep(wait)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _count(self) -> None:
        with self._calls_lock:
            self._calls += 1

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter, so threads that failed together retry apart."""
        ceiling = min(self.backoff_cap, self.backoff_base * 2 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)

    def _wait_after(self, response: requests.Response, attempt: int) -> float:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if retry_after is not None:
            return min(retry_after, self.retry_after_cap) + random.uniform(0, 0.1)
        if response.status_code == 429:
            return max(self.throttle_wait, self._backoff(attempt))
        return self._backoff(attempt)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if unusable."""
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _error_for(response: requests.Response, what: str) -> errors.ReplicateError:
    """Our exception for an error response, naming the status and Replicate's `detail`."""
    code = response.status_code
    message = f"Replicate answered {code} to {what}: {_detail(response)}"
    if code in (401, 403):
        return errors.ReplicateAuthError(
            f"Replicate refused REPLICATE_API_TOKEN ({code} to {what}: {_detail(response)});"
            " check the token",
            status_code=code,
        )
    if code == 404:
        return errors.ReplicateNotFoundError(message, status_code=code)
    if code == 429 or code >= 500:
        return errors.ReplicateUnavailableError(message, status_code=code)
    return errors.ReplicateError(message, status_code=code)


def _detail(response: requests.Response) -> str:
    """Replicate's problem+json `detail` (or `title`); any other body (a gateway's HTML
    page, plain text) is named by the reason and its type, never quoted into our logs."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        for key in ("detail", "title", "error"):
            if isinstance(body.get(key), str) and body[key]:
                return body[key][:_DETAIL_CHARS]
    reason = (response.reason or "no reason")[:_HEADER_CHARS]
    if not response.content:
        return f"{reason} (no body)"
    kind = response.headers.get("Content-Type", "").partition(";")[0].strip()[:_HEADER_CHARS]
    return f"{reason} (a {kind or 'untyped'} body of {len(response.content)} bytes, not JSON)"


def _json_object(response: requests.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError as exc:
        raise errors.ReplicateError(
            f"{what} returned {response.status_code} without JSON", status_code=response.status_code
        ) from exc
    if not isinstance(body, dict):
        raise errors.ReplicateError(f"{what} returned JSON that is not an object")
    return body


def _next_path(next_url: Any) -> str | None:
    """The path for a `next` cursor URL, always against our base URL so the token never
    travels to another host."""
    if not isinstance(next_url, str) or not next_url:
        return None
    query = urlsplit(next_url).query
    # A `next` without a cursor would fetch the first page again, forever.
    return f"/trainings?{query}" if query else None


def fetch_webhook_secret(config: Config, *, max_attempts: int = 2) -> str:
    """The account's signing secret (GET /webhooks/default/secret with REPLICATE_API_TOKEN),
    checked like a configured one; ReplicateError when it cannot be had. The web process
    and `replay --verify` both use it when REPLICATE_WEBHOOK_SECRET is unset."""
    client = ReplicateClient.from_config(config, max_attempts=max_attempts, read_timeout=5.0)
    try:
        secret = client.get_webhook_secret()
    finally:
        client.close()
    try:
        signing.decode_secret(secret)
    except ValueError as exc:
        raise errors.ReplicateError(f"the account's signing secret from Replicate {exc}") from None
    return secret
