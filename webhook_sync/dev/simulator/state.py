"""The simulator's pure core: training lifecycles, their JSON shapes, and pagination.

Nothing here does I/O or reads the clock: every function takes `now_us` (microseconds
since the epoch), so the lifecycle is evaluated lazily at whatever time a caller asks.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from webhook_sync.dev.simulator import settings

PAGE_SIZE = 100
# `aborted`: "terminated before it started running" (Replicate's OpenAPI, since 2025-10).
TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})
ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
WEB_URL = "https://replicate.com/p/"
US = 1_000_000
# Replicate throttles `output`/`logs` webhooks to one per 500 ms; below that we send none.
MIN_LOGS_EVENT_GAP_US = 500_000
LOG_STEPS = 12
# Fractional digits seen in published objects: created_at `…32.23Z`, `…26.864Z`,
# `…26.906823Z`; started_at/completed_at `…42.114513Z`, `…26.893227142Z`.
CREATED_DIGITS = (2, 3, 6)
OTHER_DIGITS = (6, 9)
FAILURE_MESSAGES = (
    "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)",
    "Training failed: loss became NaN at step 7",
    "Prediction input failed validation: input_images must be a zip or tar file",
)


@dataclass(eq=False)
class SimTraining:
    """One simulated training: its request and its planned timeline (times in µs since epoch)."""

    id: str
    model: str
    version: str
    destination: str
    input: dict[str, Any]
    created_us: int
    started_us: int
    completed_us: int
    outcome: str
    webhook: str | None = None
    events: tuple[str, ...] = settings.EVENTS
    source: str = "api"
    canceled_us: int | None = None
    # Replicate's timestamps carry 2 to 9 fractional digits; clients must cope with each.
    created_digits: int = 6
    other_digits: int = 9
    # Real variants (see Lifecycle): `logs` null, a `start` webhook sent on creation.
    null_logs: bool = False
    starting_webhook: bool = False
    # Reads answer 404 before this time (Replicate's lag after a create; see Faults).
    visible_from_us: int = 0
    finished: bool = field(default=False, repr=False)

    def status_at(self, now_us: int) -> str:
        """The training's status at `now_us`."""
        if self.canceled_us is not None and now_us >= self.canceled_us:
            return "canceled"
        if now_us < self.started_us:
            return "starting"
        if now_us < self.completed_us and self.outcome != "aborted":
            return "processing"
        return self.outcome

    def ended_us(self) -> int:
        """When the training reaches (or reached) its terminal status."""
        return self.canceled_us if self.canceled_us is not None else self.completed_us

    def render(self, now_us: int, view: str = "get") -> dict[str, Any]:
        """The training as Replicate shows it at `now_us` in one `view`.

        Views: `create` (the 201 body: `logs` "", no timestamps but `created_at`), `get`,
        `list` (no `logs`), `cancel` and `webhook` (the GET shape with `urls` under
        `/v1/predictions/`, as recorded cancel responses and captured webhooks show).
        A `null_logs` training shows `logs: null` in every view but `create`.
        """
        status = self.status_at(now_us)
        api_path = "trainings" if view in ("get", "list") else "predictions"
        logs: str | None = "" if view == "create" else self.logs_at(now_us, status)
        obj: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "logs": None if self.null_logs and view != "create" else logs,
            "output": None,
            "data_removed": False,
            "error": None,
            "status": status,
            "created_at": format_time(self.created_us, self.created_digits),
            "urls": {
                "get": f"https://api.replicate.com/v1/{api_path}/{self.id}",
                "cancel": f"https://api.replicate.com/v1/{api_path}/{self.id}/cancel",
            },
        }
        if view in ("get", "list"):
            obj["urls"]["web"] = WEB_URL + self.id
            obj["source"] = self.source
        if view == "list":
            del obj["logs"]
        if view != "create":
            obj.update(self._timeline(now_us, status))
        if status == "succeeded":
            obj["output"] = {"version": self.output_version(), "weights": self.weights_url()}
        elif status == "failed":
            obj["error"] = self.error_message()
        if self.webhook is not None and view != "list":
            obj["webhook"] = self.webhook
            obj["webhook_events_filter"] = list(self.events)
        return obj

    def _timeline(self, now_us: int, status: str) -> dict[str, Any]:
        if status == "starting":
            return {"started_at": None, "completed_at": None, "metrics": {}}
        ended = self.ended_us()
        if status == "aborted":
            # Never ran: no started_at and no predict_time, only the time it waited.
            return {
                "started_at": None,
                "completed_at": format_time(ended, self.other_digits),
                "metrics": {"total_time": round((ended - self.created_us) / US, 6)},
            }
        # A training canceled before it started still gets a started_at (recorded cancel).
        started = min(self.started_us, ended)
        timeline: dict[str, Any] = {
            "started_at": format_time(started, self.other_digits),
            "completed_at": None,
            "metrics": {},
        }
        if status in TERMINAL:
            timeline["completed_at"] = format_time(ended, self.other_digits)
            timeline["metrics"] = {
                "predict_time": round((ended - started) / US, 6),
                "total_time": round((ended - self.created_us) / US, 6),
            }
        return timeline

    def logs_at(self, now_us: int, status: str | None = None) -> str:
        """The multi-line logs written so far, growing while the training processes."""
        status = status or self.status_at(now_us)
        if status in ("starting", "aborted"):
            return ""
        ended = self.ended_us()
        span = max(1, self.completed_us - self.started_us)
        done = (min(now_us, ended) - self.started_us) / span
        steps = max(0, min(LOG_STEPS, math.floor(done * LOG_STEPS)))
        stamp = format_time(self.started_us, 0)
        lines = [
            f"{stamp} | INFO  | [ Initiating ] dest=. "
            f"url=https://weights.replicate.delivery/default/{self.model}/files.tar",
            "Downloaded base weights in 26.6 seconds",
            "Extracted 12 files from zip to input_images",
            "Starting train job",
        ]
        digest = int(self._digest("loss")[:8], 16)
        for step in range(1, steps + 1):
            loss = 0.9 * math.exp(-step / 6) + (digest % (97 + step)) / 10_000
            lines.append(f"step {step}/{LOG_STEPS} loss={loss:.4f} lr=0.0004")
        if status == "succeeded":
            lines.append("Training complete; uploading trained_model.tar")
        elif status == "failed":
            lines.append(
                f"Traceback (most recent call last):\nRuntimeError: {self.error_message()}"
            )
        elif status == "canceled":
            lines.append("Canceled by user")
        return "\n".join(lines) + "\n"

    def output_version(self) -> str:
        """`owner/name:hash`, the model version the training creates at its destination."""
        return f"{self.destination}:{self._digest('version')}"

    def weights_url(self) -> str:
        """The HTTPS URL of the trained weights."""
        return f"https://replicate.delivery/xezq/{self._digest('weights')[:40]}/trained_model.tar"

    def error_message(self) -> str:
        """The `error` a failed training reports."""
        return FAILURE_MESSAGES[int(self._digest("error")[:4], 16) % len(FAILURE_MESSAGES)]

    def roll(self, purpose: str) -> float:
        """A number in [0, 1) fixed by the training's id and a purpose."""
        return int(self._digest(purpose)[:13], 16) / 16**13

    def _digest(self, purpose: str) -> str:
        return hashlib.sha256(f"{self.id}/{purpose}".encode()).hexdigest()

    def intermediate_events(self, since_us: int | None = None) -> list[tuple[int, str]]:
        """The (time, event) pairs before the end for this training's filter, in time order.

        `start` fires when processing begins and two `logs` events during processing (when
        it lasts long enough for Replicate's 500 ms throttle); `output` and `completed`
        belong to the end (`final_events`). A cancel makes some moot: `event_applies`.
        A `starting_webhook` training sends `start` on creation instead (its body says
        `starting`), or at `since_us` if that is later and the training has not started.
        """
        if self.webhook is None:
            return []
        start = self.started_us
        if self.starting_webhook:
            start = self.created_us
            if since_us is not None and self.created_us < since_us < self.started_us:
                start = since_us
        planned = [(start, "start")]
        span = self.completed_us - self.started_us
        if span >= 3 * MIN_LOGS_EVENT_GAP_US:
            planned += [(self.started_us + span * k // 3, "logs") for k in (1, 2)]
        return [(due, event) for due, event in planned if event in self.events]

    def event_applies(self, event: str, due_us: int) -> bool:
        """Whether a planned intermediate event still happens at `due_us`: not once the
        training has ended (canceled, or aborted before it ran)."""
        return self.status_at(due_us) not in TERMINAL

    def final_events(self) -> list[str]:
        """The events sent when the training ends: `output` (on success), then `completed`."""
        if self.webhook is None:
            return []
        wanted = ["output"] if self.status_at(self.ended_us()) == "succeeded" else []
        return [event for event in [*wanted, "completed"] if event in self.events]


def format_time(us: int, digits: int) -> str:
    """ISO-8601 UTC with `Z` and `digits` fractional digits (7 to 9 pad the µs value)."""
    seconds, micros = divmod(us, US)
    text = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{micros:06d}"
    if digits > 6:
        fraction += f"{(us * 7919) % 1000:03d}"[: digits - 6]
    fraction = fraction[:digits]
    return f"{text}.{fraction}Z" if fraction else f"{text}Z"


def new_id(rng: random.Random) -> str:
    """A training id like Replicate's: 26 lowercase letters and digits."""
    return "".join(rng.choices(ID_ALPHABET, k=26))


def new_webhook_id(seed: int, training_id: str, event: str, index: int) -> str:
    """A `msg_…` webhook id derived from the seed, so a seeded run repeats itself."""
    rng = random.Random(f"{seed}/{training_id}/{event}/{index}")
    return "msg_" + "".join(rng.choices(ID_ALPHABET + "ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=27))


def plan_training(
    rng: random.Random,
    lifecycle: settings.Lifecycle,
    now_us: int,
    *,
    model: str,
    version: str,
    destination: str,
    input: dict[str, Any],
    webhook: str | None,
    events: Iterable[str] | None,
) -> SimTraining:
    """A training created at `now_us` whose timeline follows `lifecycle` (with jitter)."""

    def jittered(seconds: float) -> int:
        return round(seconds * US * (1 + rng.uniform(-lifecycle.jitter, lifecycle.jitter)))

    started = now_us + jittered(lifecycle.start_seconds)
    training = SimTraining(
        id=new_id(rng),
        model=model,
        version=version,
        destination=destination,
        input=input,
        created_us=now_us,
        started_us=started,
        completed_us=started + jittered(lifecycle.train_seconds),
        outcome="failed" if rng.random() < lifecycle.fail_rate else "succeeded",
        webhook=webhook,
        events=tuple(settings.EVENTS if events is None else events),
        created_digits=rng.choice(CREATED_DIGITS),
        other_digits=rng.choice(OTHER_DIGITS),
    )
    return with_variants(training, lifecycle, now_us)


def with_variants(training: SimTraining, shares: Any, now_us: int) -> SimTraining:
    """Give a planned training the real variants at the `shares` (a Lifecycle or BulkPlan):
    aborted (only one that has not started yet), null logs, a `start` webhook on creation.

    Each is rolled from the training's id, not the seeded stream, so switching a variant
    on changes no id or outcome of a seeded run."""
    if training.started_us > now_us and training.roll("abort") < shares.abort_rate:
        training.outcome = "aborted"
        training.completed_us = training.started_us
    training.null_logs = training.roll("null-logs") < shares.null_logs_rate
    training.starting_webhook = training.roll("starting-webhook") < shares.starting_webhook_rate
    return training


def plan_bulk(rng: random.Random, plan: settings.BulkPlan, now_us: int) -> list[SimTraining]:
    """Trainings already in progress at `now_us`, created and finishing over `plan`'s windows."""
    plan.check()
    trainings = []
    given = iter(plan.ids)
    for _ in range(plan.size):
        created = now_us - round(rng.uniform(*plan.created_ago) * US)
        completed = now_us + round(rng.uniform(*plan.finish_in) * US)
        if plan.status == "processing":
            started = created + round(rng.random() * (now_us - created))
        else:
            started = now_us + round(rng.random() * (completed - now_us))
        training = SimTraining(
            id=next(given, None) or new_id(rng),
            model=plan.model,
            version=plan.version,
            destination=plan.destination,
            input={"input_images": "https://example.com/bulk-images.zip", "steps": 1000},
            created_us=created,
            started_us=started,
            completed_us=max(completed, started),
            outcome="failed" if rng.random() < plan.fail_rate else "succeeded",
            webhook=plan.webhook,
            events=plan.events,
            source=rng.choice(("api", "api", "api", "web")),
            created_digits=rng.choice(CREATED_DIGITS),
            other_digits=rng.choice(OTHER_DIGITS),
        )
        trainings.append(with_variants(training, plan, now_us))
    return trainings


@dataclass(frozen=True)
class Page:
    """One page of `GET /v1/trainings`: newest first, with opaque cursors to its neighbours."""

    results: list[SimTraining]
    next_cursor: str | None
    previous_cursor: str | None


class TrainingStore:
    """Trainings by id and in created_at order, so a page costs O(log N + page), not a sort.

    Not thread-safe: the simulator holds its lock around every call.
    """

    def __init__(self) -> None:
        self._ordered: list[SimTraining] = []
        self._by_id: dict[str, SimTraining] = {}
        self._created: set[int] = set()

    def __len__(self) -> int:
        return len(self._ordered)

    def __iter__(self) -> Any:
        return iter(self._ordered)

    def get(self, training_id: str) -> SimTraining | None:
        """The training with this id, or None."""
        return self._by_id.get(training_id)

    def add(self, training: SimTraining) -> None:
        """Store one training (its created_at is nudged by 1 µs if another has it)."""
        self._make_unique(training)
        bisect.insort(self._ordered, training, key=_created)

    def add_many(self, trainings: list[SimTraining]) -> None:
        """Store many trainings with one merge of two sorted runs (linear, not N inserts);
        SimulatorError (409), storing none, when an id is taken."""
        taken = [training.id for training in trainings if training.id in self._by_id]
        if taken:
            raise settings.SimulatorError(
                f"training ids already exist: {', '.join(taken[:5])}", status_code=409
            )
        for training in trainings:
            self._make_unique(training)
        self._ordered.extend(sorted(trainings, key=_created))
        # Timsort finds the two sorted runs and merges them in linear time.
        self._ordered.sort(key=_created)

    def _make_unique(self, training: SimTraining) -> None:
        if training.id in self._by_id:
            raise settings.SimulatorError(f"duplicate training id {training.id}")
        # Cursors are created_at positions, so two trainings must never share one.
        while training.created_us in self._created:
            training.created_us += 1
        self._created.add(training.created_us)
        self._by_id[training.id] = training

    def page(self, cursor: str | None, size: int = PAGE_SIZE) -> Page:
        """The page a cursor points to (None: the newest); raise SimulatorError if bad."""
        total = len(self._ordered)
        if cursor is None:
            high = total
            low = max(0, high - size)
        else:
            reverse, position = decode_cursor(cursor)
            if reverse:
                low = bisect.bisect_right(self._ordered, position, key=_created)
                high = min(total, low + size)
            else:
                high = bisect.bisect_left(self._ordered, position, key=_created)
                low = max(0, high - size)
        chunk = self._ordered[low:high]
        if not chunk:
            return Page([], None, None)
        return Page(
            results=chunk[::-1],
            next_cursor=encode_cursor(False, chunk[0].created_us) if low > 0 else None,
            previous_cursor=encode_cursor(True, chunk[-1].created_us) if high < total else None,
        )


def _created(training: SimTraining) -> int:
    return training.created_us


def encode_cursor(reverse: bool, position_us: int) -> str:
    """An opaque cursor: base64 of a created_at position, like Replicate's `p=…` cursors."""
    text = ("r=1&" if reverse else "") + f"p={position_us}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[bool, int]:
    """(reverse, position) from a cursor; raise SimulatorError if not ours."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        fields = dict(part.split("=", 1) for part in text.split("&"))
        return fields.get("r") == "1", int(fields["p"])
    except (binascii.Error, UnicodeDecodeError, ValueError, KeyError):
        raise settings.SimulatorError("Invalid cursor") from None
