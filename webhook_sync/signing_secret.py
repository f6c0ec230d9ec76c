"""The web process's signing secrets: the configured ones, or the account's secret fetched
from Replicate by one background thread per worker, started when the worker boots.

Fetching from a request would let unsigned traffic drive calls to Replicate (each POST
one GET while the fetch fails) and hold a thread on Replicate's answer. Instead the thread
fetches at boot and, while Replicate refuses or fails, retries with a doubling delay
capped at MAX_RETRY_SECONDS; a delivery that arrives meanwhile is answered 503 at once
from that remembered failure (Replicate retries it), and no request ever fetches.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable, Sequence

from webhook_sync import errors, signing
from webhook_sync.config import Config
from webhook_sync.logs import log_event

FIRST_RETRY_SECONDS = 1.0
MAX_RETRY_SECONDS = 30.0
NO_SIGNING_SETTINGS_MESSAGE = (
    "the web process needs REPLICATE_WEBHOOK_SECRET (one or more whsec_… secrets) or"
    " REPLICATE_API_TOKEN (to fetch the account's signing secret from Replicate);"
    " unsigned deliveries are never accepted"
)


def check_settings(config: Config) -> None:
    """Raise ConfigError unless the settings hold a secret, or a token to fetch one with."""
    if not config.webhook_secrets and not config.api_token:
        raise errors.ConfigError(NO_SIGNING_SETTINGS_MESSAGE)


class SigningSecret:
    """Hands out the verifier; with no configured secret, `start` fetches the account's."""

    def __init__(self, secrets: Sequence[str], fetch: Callable[[], str]) -> None:
        self._verifier = signing.Verifier(secrets) if secrets else None
        self._fetch = fetch
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fetcher_pid: int | None = None
        self._failure = "not fetched yet"

    def start(self) -> None:
        """Start fetching the account's secret in the background, once per process (a fork
        does not inherit the thread, so a forked worker starts its own)."""
        if self._verifier is not None:
            return
        with self._lock:
            if self._fetcher_pid == os.getpid() or self._stop.is_set():
                return
            self._fetcher_pid = os.getpid()
        threading.Thread(target=self._fetch_until_done, name="signing-secret", daemon=True).start()

    def verifier(self) -> signing.Verifier:
        """The verifier; ReplicateUnavailableError while the account's secret is not known
        (the last failure, without asking Replicate again)."""
        verifier = self._verifier
        if verifier is None:
            self.start()
            raise errors.ReplicateUnavailableError(
                f"the account's signing secret is not available yet: {self._failure}"
            )
        return verifier

    def close(self) -> None:
        """Stop retrying (the app is shutting down)."""
        self._stop.set()

    def _fetch_until_done(self) -> None:
        delay = FIRST_RETRY_SECONDS
        attempt = 1
        while not self._stop.is_set():
            try:
                self._verifier = signing.Verifier([self._fetch()])
            except (errors.ReplicateError, errors.ConfigError) as exc:
                self._failure = str(exc)
                log_event(
                    "webhook_secret_fetch_failed",
                    logging.WARNING,
                    attempt=attempt,
                    retry_in=round(delay, 1),
                    error=str(exc),
                )
            else:
                log_event("webhook_secret_fetched", attempt=attempt)
                return
            # Jitter keeps the workers of a fleet from asking in step.
            self._stop.wait(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, MAX_RETRY_SECONDS)
            attempt += 1
