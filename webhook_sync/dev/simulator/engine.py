"""The `Simulator` class: one in-memory Replicate account with its trainings and webhooks.

It answers the API operations the HTTP routes expose, applies the API faults (latency is
applied by the app), schedules each training's webhooks, and keeps the records the admin
routes report: true statuses, request counts and webhook deliveries.
"""

from __future__ import annotations

import base64
import json
import math
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from webhook_sync import logs
from webhook_sync.dev.simulator import settings, state, webhooks

# Fixed development credentials, never valid at Replicate, so that `make run`'s processes,
# scripts and tests reach a simulator started without --token or --secret. They are
# published on purpose: a simulator serves no secret but these or one given explicitly.
DEFAULT_TOKEN = "r8_simulator_local_dev_token".ljust(40, "0")
DEV_SECRET = "whsec_bG9jYWwtc2ltdWxhdG9yLWRldi1zZWNyZXQ="  # noqa: S105 ("local-simulator-dev-secret")
THROTTLED = "Request was throttled. Your rate limit resets in ~{}s."
SERVER_ERRORS = (500, 502, 503)
# What a gateway in front of the API (Cloudflare's, for Replicate) answers when the API
# behind it does not: an HTML page, not JSON.
GATEWAY_PAGE = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    "</body>\r\n</html>\r\n"
)


def generate_secret() -> str:
    """A fresh Standard Webhooks secret: `whsec_` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass(frozen=True)
class Refusal:
    """An API request the faults or limits refuse: its status, body (JSON, or the text of
    an HTML page) and headers; `fault` names it in the request counts."""

    status: int
    body: dict[str, Any] | str
    fault: str
    headers: dict[str, str] = field(default_factory=dict)


class Simulator:
    """A local stand-in for Replicate's trainings API and webhooks; thread-safe.

    Args:
        secret: the `whsec_…` webhook signing secret (generated when None).
        tokens: API tokens accepted as `Authorization: Bearer …` (or `Token …`).
        seed: makes ids, outcomes and per-message webhook faults repeat (random if None).
        lifecycle: durations and failure share of new trainings (`Lifecycle`).
        faults: the faults in force at start (`Faults`); change with `set_faults`.
        retry_window_seconds: how long a terminal webhook is retried (Replicate: ~60 s).
        retry_base_seconds: the first retry delay; each next one doubles.
        webhook_timeout_seconds: how long one delivery attempt may take.
        webhook_workers: threads sending webhooks, so one slow receiver blocks no other.
        burst_seconds: the rate limits allow bursts of this many seconds' worth of requests.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        tokens: Iterable[str] = (DEFAULT_TOKEN,),
        seed: int | None = None,
        lifecycle: settings.Lifecycle | None = None,
        faults: settings.Faults | None = None,
        retry_window_seconds: float = 60.0,
        retry_base_seconds: float = 1.0,
        webhook_timeout_seconds: float = 10.0,
        webhook_workers: int = 16,
        burst_seconds: float = 10.0,
    ) -> None:
        self.secret = secret or generate_secret()
        settings.check_secret(self.secret)
        self.tokens = tuple(tokens)
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**32)
        self._rng = random.Random(self.seed)
        # API fault rolls use their own stream, so they never shift the ids of a seeded run.
        self._fault_rng = random.Random(f"{self.seed}/api")
        self._lock = threading.RLock()
        self._store = state.TrainingStore()
        self._lifecycle = lifecycle or settings.Lifecycle()
        self._faults = faults or settings.Faults()
        self._burst_seconds = burst_seconds
        self._buckets = self._make_buckets(self._faults)
        self._counts: dict[str, Counter[str]] = {}
        self.reset_request_counts()
        self._scheduler = webhooks.Scheduler(workers=webhook_workers)
        self._sender = webhooks.WebhookSender(
            self._scheduler,
            self.secret,
            lambda: self._faults,
            seed=self.seed,
            retry_window_seconds=retry_window_seconds,
            retry_base_seconds=retry_base_seconds,
            timeout_seconds=webhook_timeout_seconds,
        )

    # -- running -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread that sends webhooks as they fall due."""
        self._scheduler.start()

    def stop(self) -> None:
        """Stop sending webhooks; deliveries still in flight finish on their own."""
        self._scheduler.stop()

    # -- the Replicate API ---------------------------------------------------------------

    def create_training(
        self, model_owner: str, model_name: str, version: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Create a training like `POST /v1/models/…/trainings`; return the 201 body.

        Raises SimulatorError with status_code 404 for a destination that is not
        `owner/name` (Replicate's answer for a missing destination), 422 for bad fields.
        """
        destination = body.get("destination")
        if not isinstance(destination, str) or not _is_owner_name(destination):
            raise settings.SimulatorError(
                "The specified training destination does not exist", status_code=404
            )
        webhook, events = _webhook_fields(body)
        training_input = body.get("input")
        if not isinstance(training_input, dict):
            raise settings.SimulatorError(
                "input is required and must be an object", status_code=422
            )
        with self._lock:
            now = _now_us()
            training = state.plan_training(
                self._rng,
                self._lifecycle,
                now,
                model=f"{model_owner}/{model_name}",
                version=version,
                destination=destination,
                input=training_input,
                webhook=webhook,
                events=events,
            )
            self._plan_lag([training])
            self._store.add(training)
            created = training.render(now, "create")
        self._schedule([training], now)
        logs.log_event(
            "simulator_training_created", training_id=training.id, has_webhook=bool(webhook)
        )
        return created

    def get_training(self, training_id: str, view: str = "get") -> dict[str, Any]:
        """The training as `GET /v1/trainings/{id}` shows it now; SimulatorError 404 if
        unknown, or if created so recently that Replicate's lag hides it (faults)."""
        with self._lock:
            training = self._find(training_id)
            now = _now_us()
            if self._lagging(training, now):
                self._counts["by_fault"]["new_training_404"] += 1
                raise settings.SimulatorError("Not found.", status_code=404)
            return training.render(now, view)

    def list_trainings(self, cursor: str | None, page_url: str) -> dict[str, Any]:
        """One page of `GET /v1/trainings` (100, newest first); `page_url` prefixes cursors."""
        try:
            with self._lock:
                page = self._store.page(cursor, state.PAGE_SIZE)
                now = _now_us()
                results = [
                    training.render(now, "list")
                    for training in page.results
                    if not self._lagging(training, now)
                ]
        except settings.SimulatorError as exc:
            raise settings.SimulatorError(str(exc), status_code=404) from exc
        return {
            "next": f"{page_url}?cursor={page.next_cursor}" if page.next_cursor else None,
            "previous": f"{page_url}?cursor={page.previous_cursor}"
            if page.previous_cursor
            else None,
            "results": results,
        }

    def cancel_training(self, training_id: str, view: str = "cancel") -> dict[str, Any]:
        """Cancel like `POST /v1/trainings/{id}/cancel`; a terminal training stays as it is."""
        with self._lock:
            training = self._find(training_id)
            now = _now_us()
            canceled = training.status_at(now) not in state.TERMINAL
            if canceled:
                training.canceled_us = now
            body = training.render(now, view)
        if canceled and training.webhook is not None:
            self._scheduler.call_at(now / state.US, self._finish, training.id)
        return body

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries an accepted token (Bearer or Token)."""
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() in ("bearer", "token") and token.strip() in self.tokens

    def admit(self, kind: str) -> Refusal | None:
        """Apply the rate limits and injected 429/5xx to one request of `kind`.

        `kind` is `read` (GETs, limited by read_rpm), `create` (limited by create_rpm)
        or `write` (cancel: no limit). Returns the refusal to answer, or None.
        """
        faults = self._faults
        with self._lock:
            bucket = self._buckets.get(kind)
            wait = bucket.take(time.monotonic()) if bucket else 0.0
            throttled = self._fault_rng.random() < faults.throttle_rate
            failed = self._fault_rng.random() < faults.error_rate
            error_status = self._fault_rng.choice(SERVER_ERRORS)
            gateway = self._fault_rng.random() < faults.gateway_error_rate
            refusal = None
            if wait > 0 or throttled:
                seconds = max(1, math.ceil(wait))
                headers = {"Retry-After": str(seconds)} if faults.throttle_retry_after else {}
                refusal = Refusal(429, {"detail": THROTTLED.format(seconds)}, "throttled", headers)
            elif failed:
                body = {"detail": "Internal server error", "status": error_status}
                refusal = Refusal(error_status, body, "server_error")
            elif gateway:
                refusal = Refusal(502, GATEWAY_PAGE, "gateway_html")
            if refusal is not None:
                self._counts["by_fault"][refusal.fault] += 1
        return refusal

    # -- administration (also under /_admin) ---------------------------------------------

    @property
    def faults(self) -> settings.Faults:
        """The faults in force."""
        return self._faults

    def set_faults(self, **changes: Any) -> settings.Faults:
        """Change some faults (see `Faults`); raise SimulatorError naming every bad one."""
        with self._lock:
            self._faults = self._faults.updated(changes)
            if {"read_rpm", "create_rpm"} & changes.keys():
                self._buckets = self._make_buckets(self._faults)
            return self._faults

    @property
    def lifecycle(self) -> settings.Lifecycle:
        """Durations and failure share used for trainings created from now on."""
        return self._lifecycle

    def set_lifecycle(self, **changes: Any) -> settings.Lifecycle:
        """Change the lifecycle of new trainings; raise SimulatorError naming every bad key."""
        with self._lock:
            self._lifecycle = self._lifecycle.updated(changes)
            return self._lifecycle

    def create_many(self, plan: settings.BulkPlan) -> list[str]:
        """Create `plan.size` trainings already in progress at once (with `plan.ids` when
        given); return their ids.

        `created_at` values fall `plan.created_ago` seconds back (so a range far in the
        past puts them on older list pages) and each ends `plan.finish_in` seconds from
        now. Ten thousand take well under a second; webhooks follow `plan.webhook`.
        """
        with self._lock:
            now = _now_us()
            trainings = state.plan_bulk(self._rng, plan, now)
            self._plan_lag(trainings)
            self._store.add_many(trainings)
        self._schedule(trainings, now)
        logs.log_event("simulator_trainings_bulk_created", count=len(trainings))
        return [training.id for training in trainings]

    def true_statuses(self) -> dict[str, str]:
        """Every training's status right now, by id (the truth a synced database should reach)."""
        with self._lock:
            now = _now_us()
            return {training.id: training.status_at(now) for training in self._store}

    def describe_training(self, training_id: str) -> dict[str, Any]:
        """The simulator's whole record of one training: its plan, status and GET body."""
        with self._lock:
            training = self._find(training_id)
            now = _now_us()
            return {
                "id": training.id,
                "status": training.status_at(now),
                "outcome": training.outcome,
                "null_logs": training.null_logs,
                "starting_webhook": training.starting_webhook,
                "planned_started_at": state.format_time(training.started_us, 6),
                "planned_completed_at": state.format_time(training.completed_us, 6),
                "canceled_at": (
                    state.format_time(training.canceled_us, 6) if training.canceled_us else None
                ),
                "webhook": training.webhook,
                "webhook_events_filter": list(training.events),
                "training": training.render(now, "get"),
            }

    def count_request(self, route: str, training_id: str | None, status: int) -> None:
        """Record one API request: its route template, training id (GETs) and answer."""
        with self._lock:
            self._counts["total"]["requests"] += 1
            self._counts["by_route"][route] += 1
            self._counts["by_status"][str(status)] += 1
            if training_id and route == "GET /v1/trainings/{training_id}":
                self._counts["training_gets"][training_id] += 1
                if status == 200:
                    self._counts["training_gets_ok"][training_id] += 1

    def request_counts(self) -> dict[str, Any]:
        """API requests so far: `total`, `by_route`, `by_status`, `training_gets(_ok)` by
        id, and `by_fault` (`throttled`, `server_error`, `gateway_html`, `new_training_404`)."""
        with self._lock:
            counts = {name: dict(counter) for name, counter in self._counts.items()}
        counts["total"] = counts["total"].get("requests", 0)
        return counts

    def reset_request_counts(self) -> None:
        """Forget the request counts (the rate limits keep their state)."""
        with self._lock:
            self._counts = {
                name: Counter()
                for name in (
                    "total",
                    "by_route",
                    "by_status",
                    "by_fault",
                    "training_gets",
                    "training_gets_ok",
                )
            }

    def deliveries(self) -> list[dict[str, Any]]:
        """Every webhook attempt and dropped message so far, oldest first (see `Delivery`)."""
        return self._sender.deliveries()

    def pending_tasks(self) -> int:
        """How many webhook events and retries are still waiting for their time."""
        return self._scheduler.pending()

    # -- internals -----------------------------------------------------------------------

    def _lagging(self, training: state.SimTraining, now_us: int) -> bool:
        """Whether reads do not see this training yet: Replicate's lag after a create."""
        return now_us < training.visible_from_us

    def _plan_lag(self, trainings: list[state.SimTraining]) -> None:
        """Hide some new trainings from reads for a while, as the faults say now."""
        faults = self._faults
        for training in trainings:
            if training.roll("new-training-404") < faults.new_training_404_rate:
                lag = round(faults.new_training_404_seconds * state.US)
                training.visible_from_us = training.created_us + lag

    def _find(self, training_id: str) -> state.SimTraining:
        training = self._store.get(training_id)
        if training is None:
            raise settings.SimulatorError("Not found.", status_code=404)
        return training

    def _make_buckets(self, faults: settings.Faults) -> dict[str, settings.TokenBucket]:
        return {
            "read": settings.TokenBucket(faults.read_rpm, self._burst_seconds),
            "create": settings.TokenBucket(faults.create_rpm, self._burst_seconds),
        }

    def _schedule(self, trainings: list[state.SimTraining], now_us: int) -> None:
        calls: list[tuple[float, Callable[..., Any], tuple[Any, ...]]] = []
        for training in trainings:
            if training.webhook is None:
                continue
            for index, (due, event) in enumerate(training.intermediate_events(now_us)):
                if due >= now_us:
                    calls.append((due / state.US, self._fire, (training.id, event, due, index)))
            calls.append((training.completed_us / state.US, self._finish, (training.id,)))
        self._scheduler.call_many(calls)

    def _fire(self, training_id: str, event: str, due_us: int, index: int) -> None:
        with self._lock:
            training = self._find(training_id)
            if not training.event_applies(event, due_us):
                return
            message = self._message(training, event, due_us, index)
        self._sender.send(message)

    def _finish(self, training_id: str) -> None:
        with self._lock:
            training = self._find(training_id)
            if training.finished:
                return  # a cancel already finished it
            training.finished = True
            ended = training.ended_us()
            events = training.final_events()
            messages = [self._message(training, event, ended, 0) for event in events]
        for message in messages:
            message.terminal = message.event == "completed"
            message.release_after = message.terminal
            self._sender.send(message)
        if "completed" not in events:
            self._sender.release_held(training_id)

    def _message(
        self, training: state.SimTraining, event: str, at_us: int, index: int
    ) -> webhooks.Message:
        body = training.render(at_us, "webhook")
        return webhooks.Message(
            webhook_id=state.new_webhook_id(self.seed, training.id, event, index),
            training_id=training.id,
            event=event,
            status=body["status"],
            url=str(training.webhook),
            body=_compact_json(body),
            terminal=False,
        )


def _compact_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _is_owner_name(text: str) -> bool:
    owner, slash, name = text.partition("/")
    return bool(slash and owner and name and "/" not in name)


def _webhook_fields(body: Mapping[str, Any]) -> tuple[str | None, tuple[str, ...] | None]:
    webhook = body.get("webhook")
    events = body.get("webhook_events_filter")
    if webhook is None and isinstance(body.get("webhook_completed"), str):
        # The legacy field still works: it means a webhook for the completed event only.
        webhook, events = body["webhook_completed"], events or ["completed"]
    if webhook is not None and not (
        isinstance(webhook, str) and webhook.startswith(("http://", "https://"))
    ):
        raise settings.SimulatorError("webhook must be an http(s) URL", status_code=422)
    if events is not None and (
        not isinstance(events, list) or not events or not set(events) <= set(settings.EVENTS)
    ):
        raise settings.SimulatorError(
            f"webhook_events_filter must be a list of {', '.join(settings.EVENTS)}", status_code=422
        )
    return webhook, (tuple(events) if events is not None else None)


def _now_us() -> int:
    return time.time_ns() // 1000
