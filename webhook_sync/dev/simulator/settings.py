"""The simulator's settings, pure: faults, lifecycle, bulk-creation plans, rate limits.

Each settings object is frozen and validated as a whole, so an admin request that names
one bad field changes nothing and hears about every problem at once.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from webhook_sync import config, errors

EVENTS = ("start", "output", "logs", "completed")


class SimulatorError(errors.WebhookSyncError):
    """The simulator was given an invalid setting or request."""

    def __init__(self, message: str | None = None, *, status_code: int = 400) -> None:
        super().__init__(message)
        self.status_code = status_code


def _share(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


def _non_negative(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


_RULES = {
    "share": (_share, "a number from 0 to 1"),
    "seconds": (_non_negative, "a number >= 0"),
    "whole": (_whole, "a whole number >= 0 (0 = no limit)"),
    "flag": (lambda value: isinstance(value, bool), "true or false"),
}


def _setting(default: Any, rule: str) -> Any:
    return field(default=default, metadata={"rule": rule})


class _Settings:
    """Frozen settings whose partial updates are validated as a whole (rules in field metadata)."""

    def updated(self, changes: Mapping[str, Any]) -> Any:
        """Return a copy with `changes` applied; raise SimulatorError naming every bad key."""
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        return _updated(self, changes, {item.name: item.metadata["rule"] for item in fields})

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Faults(_Settings):
    """What goes wrong on purpose: webhook shares in [0, 1], API latency, errors and limits.

    Besides injected faults, some real Replicate answers that clients rarely meet:
    `gateway_error_rate` (a 502 HTML page from the gateway in front of the API, not
    JSON), `new_training_404_rate` of the trainings created while it is set, which GET
    answers 404 (and the list leaves out) for `new_training_404_seconds` after their
    creation, Replicate's own lag, and
    `unauthenticated_title` (a 401 body with `"title": "Unauthenticated"`, as Replicate's).
    """

    drop_rate: float = _setting(0.0, "share")
    duplicate_rate: float = _setting(0.0, "share")
    delay_rate: float = _setting(0.0, "share")
    delay_seconds: float = _setting(3.0, "seconds")
    reorder_rate: float = _setting(0.0, "share")
    latency_ms: int = _setting(0, "whole")
    error_rate: float = _setting(0.0, "share")
    gateway_error_rate: float = _setting(0.0, "share")
    throttle_rate: float = _setting(0.0, "share")
    throttle_retry_after: bool = _setting(True, "flag")
    read_rpm: int = _setting(3000, "whole")
    create_rpm: int = _setting(600, "whole")
    new_training_404_rate: float = _setting(0.0, "share")
    new_training_404_seconds: float = _setting(2.0, "seconds")
    unauthenticated_title: bool = _setting(True, "flag")


@dataclass(frozen=True)
class Lifecycle(_Settings):
    """How long trainings take and how they end (durations in seconds, shares in [0, 1]).

    `abort_rate` of trainings end `aborted` when they would have started running;
    `null_logs_rate` of trainings show `logs: null`; `starting_webhook_rate` of trainings
    send their `start` webhook on creation, saying `starting`, instead of when processing
    begins, saying `processing`. Replicate does each of these.
    """

    start_seconds: float = _setting(2.0, "seconds")
    train_seconds: float = _setting(20.0, "seconds")
    fail_rate: float = _setting(0.1, "share")
    jitter: float = _setting(0.2, "share")
    abort_rate: float = _setting(0.0, "share")
    null_logs_rate: float = _setting(0.0, "share")
    starting_webhook_rate: float = _setting(0.0, "share")


def check_secret(secret: str) -> None:
    """Raise SimulatorError unless `secret` is a usable `whsec_<base64>` signing secret."""
    try:
        usable = secret.startswith("whsec_") and bool(base64.b64decode(secret[6:] + "=="))
    except ValueError:  # binascii.Error: the base64 is broken
        usable = False
    if not usable:
        raise SimulatorError("the webhook secret must look like whsec_<base64>")


def configured_secret(environ: Mapping[str, str]) -> str | None:
    """The first secret of REPLICATE_WEBHOOK_SECRET (None if unset), so both sides agree."""
    raw = environ.get("REPLICATE_WEBHOOK_SECRET", "").strip()
    if not raw:
        return None
    try:
        return config.parse_secrets(raw)[0]
    except ValueError as exc:
        raise SimulatorError(f"REPLICATE_WEBHOOK_SECRET: {exc}") from exc


def _updated(current: Any, changes: Mapping[str, Any], rules: Mapping[str, str]) -> Any:
    problems = []
    for key, value in changes.items():
        if key not in rules:
            problems.append(f"unknown setting {key!r} (known: {', '.join(rules)})")
            continue
        check, expected = _RULES[rules[key]]
        if not check(value):
            problems.append(f"{key} must be {expected}, got {value!r}")
    if problems:
        raise SimulatorError("; ".join(problems))
    return dataclasses.replace(current, **changes)


# A training id given to a bulk plan: what a URL path segment carries as it is.
_TRAINING_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class BulkPlan:
    """What `plan_bulk` creates: `count` trainings created `created_ago` seconds back
    (a (min, max) range) and ending `finish_in` seconds from now (a (min, max) range);
    with `ids`, one training for each of those ids (count may then be left out)."""

    count: int = 0
    created_ago: tuple[float, float] = (60.0, 3600.0)
    finish_in: tuple[float, float] = (0.0, 60.0)
    status: str = "processing"
    fail_rate: float = 0.0
    # As in Lifecycle; aborting needs a training that has not started (status `starting`).
    abort_rate: float = 0.0
    null_logs_rate: float = 0.0
    starting_webhook_rate: float = 0.0
    webhook: str | None = None
    events: tuple[str, ...] = ("start", "completed")
    model: str = "sim-owner/sim-trainer"
    version: str = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
    destination: str = "sim-owner/sim-destination"
    # The ids to create (a platform's own record names them); empty: new random ids.
    ids: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """How many trainings the plan creates."""
        return len(self.ids) if self.ids else self.count

    def check(self) -> None:
        """Raise SimulatorError if the plan cannot be carried out."""
        problems = []
        if self.ids:
            problems += _id_problems(self.ids, self.count)
        elif not (isinstance(self.count, int) and 0 < self.count <= 1_000_000):
            problems.append("count must be a whole number from 1 to 1000000")
        for name in ("created_ago", "finish_in"):
            window = getattr(self, name)
            if not (
                len(window) == 2
                and all(_non_negative(value) for value in window)
                and window[0] <= window[1]
            ):
                problems.append(f"{name} must be [min, max] with 0 <= min <= max")
        if self.status not in ("starting", "processing"):
            problems.append("status must be starting or processing")
        for name in ("fail_rate", "abort_rate", "null_logs_rate", "starting_webhook_rate"):
            if not _share(getattr(self, name)):
                problems.append(f"{name} must be a number from 0 to 1")
        if unknown := set(self.events) - set(EVENTS):
            problems.append(f"unknown webhook events {sorted(unknown)}")
        if "/" not in self.destination:
            problems.append("destination must be owner/name")
        if problems:
            raise SimulatorError("; ".join(problems))


def _id_problems(ids: tuple[str, ...], count: Any) -> list[str]:
    """What is wrong with a plan's `ids` (and a `count` given beside them)."""
    problems = []
    if len(ids) > 1_000_000:
        problems.append("ids must hold at most 1000000 ids")
    if not all(isinstance(item, str) and _TRAINING_ID.fullmatch(item) for item in ids):
        problems.append("ids must be 1 to 64 letters, digits, '_' or '-' each")
    elif len(set(ids)) < len(ids):
        problems.append("ids must not repeat an id")
    if count not in (0, len(ids)):
        problems.append("count must be left out with ids, or equal their number")
    return problems


class TokenBucket:
    """A requests-per-minute limit that allows short bursts (`burst_seconds` worth of tokens)."""

    def __init__(self, per_minute: int, burst_seconds: float = 10.0) -> None:
        self.per_minute = per_minute
        self.capacity = max(1.0, per_minute * burst_seconds / 60)
        self.tokens = self.capacity
        self.updated_at: float | None = None

    def take(self, now: float) -> float:
        """Spend one token: 0.0 if allowed, else the seconds until one is available."""
        if self.per_minute <= 0:
            return 0.0
        rate = self.per_minute / 60
        if self.updated_at is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated_at) * rate)
        self.updated_at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / rate
