"""The local Replicate simulator over real HTTP: shapes, pagination, signatures and faults."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
import requests
import standardwebhooks

from tests.support import FIXTURES, VENV_BIN, free_port, wait_until
from tests.webhook_receiver import WebhookReceiver
from webhook_sync.dev.simulator import (
    DEFAULT_TOKEN,
    DEV_SECRET,
    BulkPlan,
    Faults,
    Lifecycle,
    Simulator,
    SimulatorError,
    SimulatorServer,
    generate_secret,
    start_in_thread,
)
from webhook_sync.dev.simulator import state as simulator_state
from webhook_sync.dev.simulator.settings import TokenBucket

PUBLISHED = FIXTURES / "replicate"
AUTH = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
VERSION = "39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b"
FAST = Lifecycle(start_seconds=0.1, train_seconds=0.3, fail_rate=0.0, jitter=0.0)
TRAINING_FIXTURES = (
    "training-create-response-starting.json",
    "training-get-processing.json",
    "training-cancel-response-canceled.json",
    "training-succeeded-docs-example.json",
    "training-failed.json",
    "training-processing-with-logs.json",
    "training-webhook-start-event-processing.json",
    "training-webhook-completed-event-succeeded.json",
)
# Only in 2023 recordings: the legacy field for the old webhook option.
LEGACY_KEYS = {"webhook_completed"}


def published(name: str) -> Any:
    """A published example payload from the fixtures."""
    return json.loads((PUBLISHED / name).read_text())


def json_type(value: Any) -> str:
    """The JSON type name of a decoded value."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}[type(value)]


def assert_same_shape(ours: dict[str, Any], example: dict[str, Any]) -> None:
    """Every key of the example is ours too, with the same JSON type where both are set."""
    for key, value in example.items():
        if key in LEGACY_KEYS:
            continue
        assert key in ours, f"missing {key!r}"
        if value is not None and ours[key] is not None:
            assert json_type(ours[key]) == json_type(value), key
        if isinstance(value, dict) and isinstance(ours[key], dict) and key != "input":
            assert_same_shape(ours[key], value)


def assert_no_invented_keys(ours: dict[str, Any]) -> None:
    """Every key we send appears in at least one published training object."""
    listed = published("trainings-list-page-docs-example.json")["results"][0]
    known = set(listed).union(*(published(name).keys() for name in TRAINING_FIXTURES))
    assert set(ours) <= known


@pytest.fixture()
def serve() -> Iterator[Callable[..., SimulatorServer]]:
    """Start simulators on free ports (fast lifecycle unless told); stop them afterwards."""
    servers: list[SimulatorServer] = []

    def start(**options: Any) -> SimulatorServer:
        options.setdefault("lifecycle", FAST)
        options.setdefault("retry_base_seconds", 0.05)
        options.setdefault("retry_window_seconds", 0.5)
        server = start_in_thread(Simulator(**options))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture()
def receiver() -> Iterator[WebhookReceiver]:
    """A webhook receiver that answers 200."""
    with WebhookReceiver() as recorder:
        yield recorder


def create(server: SimulatorServer, **body: Any) -> requests.Response:
    """POST a training to the simulator like a Replicate client would."""
    body = {"destination": "alice/my-model", "input": {"input_images": "x.zip"}, **body}
    url = f"{server.api_base_url}/models/stability-ai/sdxl/versions/{VERSION}/trainings"
    return requests.post(url, json=body, headers=AUTH, timeout=5)


def get(server: SimulatorServer, training_id: str) -> dict[str, Any]:
    """GET one training and return its JSON."""
    response = requests.get(
        f"{server.api_base_url}/trainings/{training_id}", headers=AUTH, timeout=10
    )
    response.raise_for_status()
    return response.json()


def reaches(server: SimulatorServer, training_id: str, status: str) -> dict[str, Any]:
    """Poll GET until the training has `status`; return that object."""
    return wait_until(
        lambda: (obj := get(server, training_id))["status"] == status and obj,
        message=f"{training_id} {status}",
    )


def delivery_log(server: SimulatorServer, count: int) -> list[dict[str, Any]]:
    """Wait until the simulator logged `count` webhook attempts; return its log."""

    def logged() -> list[dict[str, Any]] | None:
        log = server.simulator.deliveries()
        return log if len(log) >= count else None

    return wait_until(logged, message=f"{count} logged deliveries")


def verify(secret: str, delivery: Any) -> dict[str, Any]:
    """Verify one received webhook with standardwebhooks and return its JSON body."""
    return standardwebhooks.Webhook(secret).verify(delivery.body, delivery.headers)


def test_create_response_has_the_published_create_shape(serve: Callable[..., SimulatorServer]):
    """A created training answers 201 with the keys and types of the recorded create response."""
    server = serve()

    response = create(server)

    assert response.status_code == 201
    body = response.json()
    assert_same_shape(body, published("training-create-response-starting.json"))
    assert_no_invented_keys(body)
    assert body["status"] == "starting"
    assert body["logs"] == ""
    assert body["urls"]["get"].endswith(f"/v1/predictions/{body['id']}")


def test_ids_versions_and_timestamps_look_like_replicates(serve: Callable[..., SimulatorServer]):
    """Ids are 26 lowercase alphanumerics; timestamps end in Z and parse as ISO-8601."""
    server = serve()
    training_id = create(server).json()["id"]

    done = reaches(server, training_id, "succeeded")

    assert re.fullmatch(r"[a-z0-9]{26}", training_id)
    for key in ("created_at", "started_at", "completed_at"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{2,9}Z", done[key]), done[key]
    started = datetime.fromisoformat(done["started_at"])
    assert datetime.fromisoformat(done["created_at"]) <= started
    assert started <= datetime.fromisoformat(done["completed_at"])


def test_processing_training_has_the_recorded_get_shape(serve: Callable[..., SimulatorServer]):
    """While processing, GET matches the recorded processing response, urls under /trainings."""
    server = serve(lifecycle=Lifecycle(start_seconds=0.05, train_seconds=60, jitter=0))
    training_id = create(server).json()["id"]

    body = reaches(server, training_id, "processing")

    assert_same_shape(body, published("training-get-processing.json"))
    assert_same_shape(body, published("training-processing-with-logs.json"))
    assert_no_invented_keys(body)
    assert body["urls"]["get"] == f"https://api.replicate.com/v1/trainings/{training_id}"
    assert body["completed_at"] is None
    assert body["output"] is None


def test_succeeded_training_has_output_at_its_destination(serve: Callable[..., SimulatorServer]):
    """A succeeded training has output.version `destination:hash`, a weights URL, logs, metrics."""
    server = serve()
    training_id = create(server, destination="alice/flux-me").json()["id"]

    body = reaches(server, training_id, "succeeded")

    assert_same_shape(body, published("training-succeeded-docs-example.json"))
    assert re.fullmatch(r"alice/flux-me:[0-9a-f]{64}", body["output"]["version"])
    assert body["output"]["weights"].startswith("https://replicate.delivery/")
    assert body["logs"].count("\n") > 5
    assert set(body["metrics"]) == {"predict_time", "total_time"}


def test_failed_training_has_the_published_failed_shape(serve: Callable[..., SimulatorServer]):
    """With a fail share of 1 trainings fail with a string error and no output."""
    server = serve(lifecycle=Lifecycle(start_seconds=0.05, train_seconds=0.1, fail_rate=1))
    training_id = create(server).json()["id"]

    body = reaches(server, training_id, "failed")

    assert_same_shape(body, published("training-failed.json"))
    assert isinstance(body["error"], str)
    assert body["output"] is None


def test_cancel_makes_a_running_training_canceled(serve: Callable[..., SimulatorServer]):
    """Cancel answers 200 with a canceled training shaped like the recorded cancel response."""
    server = serve(lifecycle=Lifecycle(start_seconds=60, train_seconds=60))
    training_id = create(server).json()["id"]

    response = requests.post(
        f"{server.api_base_url}/trainings/{training_id}/cancel", headers=AUTH, timeout=10
    )

    assert response.status_code == 200
    body = response.json()
    assert_same_shape(body, published("training-cancel-response-canceled.json"))
    assert body["status"] == "canceled"
    assert body["completed_at"] is not None
    assert get(server, training_id)["status"] == "canceled"


def test_cancel_leaves_a_finished_training_alone(serve: Callable[..., SimulatorServer]):
    """Canceling a succeeded training answers 200 and changes nothing."""
    server = serve()
    training_id = create(server).json()["id"]
    reaches(server, training_id, "succeeded")

    response = requests.post(
        f"{server.api_base_url}/trainings/{training_id}/cancel", headers=AUTH, timeout=10
    )

    assert response.json()["status"] == "succeeded"


def test_create_reads_json_without_a_json_content_type(serve: Callable[..., SimulatorServer]):
    """A create body sent without Content-Type: application/json is still read as JSON."""
    server = serve()
    body = json.dumps({"destination": "alice/x", "input": {"steps": 3}})
    url = f"{server.api_base_url}/models/a/b/versions/{VERSION}/trainings"

    response = requests.post(url, data=body, headers=AUTH, timeout=10)

    assert response.status_code == 201
    assert response.json()["input"] == {"steps": 3}


def test_bad_destination_answers_like_replicate(serve: Callable[..., SimulatorServer]):
    """A destination that is not owner/name gets the recorded 404 problem+json body."""
    server = serve()

    response = create(server, destination="no-slash-here")

    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json() == published("error-404-invalid-training-destination.json")


@pytest.mark.parametrize("header", [None, "Bearer r8_wrong", "Basic abc"])
def test_requests_without_an_accepted_token_get_401(
    serve: Callable[..., SimulatorServer], header: str | None
):
    """No token, a wrong token or another scheme answers 401 with Replicate's problem body,
    `"title": "Unauthenticated"` included."""
    server = serve()
    headers = {"Authorization": header} if header else {}

    response = requests.get(f"{server.api_base_url}/trainings", headers=headers, timeout=10)

    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/problem+json"
    assert list(response.json()) == ["title", "detail", "status"]
    assert response.json()["title"] == "Unauthenticated"
    assert response.json()["status"] == 401
    assert "authentication token" in response.json()["detail"]


def test_the_401_title_can_be_switched_off(serve: Callable[..., SimulatorServer]):
    """POST /_admin/faults {"unauthenticated_title": false} gives the title-less body."""
    server = serve()

    set_knobs(server, "faults", unauthenticated_title=False)
    response = requests.get(f"{server.api_base_url}/trainings", timeout=10)

    assert response.status_code == 401
    assert set(response.json()) == {"detail", "status"}


def test_secret_endpoint_returns_the_signing_secret(serve: Callable[..., SimulatorServer]):
    """GET /v1/webhooks/default/secret returns {"key": "whsec_…"} like the docs example."""
    server = serve(secret="whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD")

    response = requests.get(
        f"{server.api_base_url}/webhooks/default/secret", headers=AUTH, timeout=10
    )

    assert response.json() == published("webhook-default-secret-response-docs-example.json")


def test_unknown_training_is_404(serve: Callable[..., SimulatorServer]):
    """GET of an id the simulator never created answers 404 with a detail."""
    server = serve()

    response = requests.get(f"{server.api_base_url}/trainings/{'x' * 26}", headers=AUTH, timeout=10)

    assert response.status_code == 404
    assert response.json()["status"] == 404


def walk(server: SimulatorServer, url: str | None = None) -> list[dict[str, Any]]:
    """Follow `next` from the first list page; return the pages."""
    pages = []
    url = url or f"{server.api_base_url}/trainings"
    while url:
        page = requests.get(url, headers=AUTH, timeout=10).json()
        pages.append(page)
        url = page["next"]
    return pages


def test_list_pages_newest_first_with_cursor_urls(serve: Callable[..., SimulatorServer]):
    """250 trainings list as 100, 100, 50, newest first, with full next/previous cursor URLs."""
    server = serve()
    created = server.simulator.create_many(BulkPlan(count=250))

    pages = walk(server)

    assert [len(page["results"]) for page in pages] == [100, 100, 50]
    listed = [obj for page in pages for obj in page["results"]]
    assert sorted(obj["id"] for obj in listed) == sorted(created)
    stamps = [datetime.fromisoformat(obj["created_at"]) for obj in listed]
    assert stamps == sorted(stamps, reverse=True)
    assert pages[0]["previous"] is None
    assert pages[0]["next"].startswith(f"{server.api_base_url}/trainings?cursor=")
    back = requests.get(pages[1]["previous"], headers=AUTH, timeout=10).json()
    assert [obj["id"] for obj in back["results"]] == [obj["id"] for obj in pages[0]["results"]]


def test_list_results_have_the_documented_list_shape(serve: Callable[..., SimulatorServer]):
    """A succeeded training lists with the docs example's keys and types, and no logs."""
    server = serve()
    reaches(server, create(server).json()["id"], "succeeded")

    page = requests.get(f"{server.api_base_url}/trainings", headers=AUTH, timeout=10).json()

    example = published("trainings-list-page-docs-example.json")
    assert set(page) == set(example)
    assert_same_shape(page["results"][0], example["results"][0])
    assert "logs" not in page["results"][0]


def test_pagination_is_stable_while_trainings_are_created(serve: Callable[..., SimulatorServer]):
    """A new training between two pages does not shift the next page."""
    server = serve()
    server.simulator.create_many(BulkPlan(count=150))
    first = requests.get(f"{server.api_base_url}/trainings", headers=AUTH, timeout=10).json()

    create(server)
    second = requests.get(first["next"], headers=AUTH, timeout=10).json()

    seen = {obj["id"] for obj in first["results"]}
    assert len(second["results"]) == 50
    assert not seen & {obj["id"] for obj in second["results"]}


def test_an_invalid_cursor_is_404(serve: Callable[..., SimulatorServer]):
    """A cursor the simulator did not make answers 404 like an invalid cursor on Replicate."""
    server = serve()

    response = requests.get(f"{server.api_base_url}/trainings?cursor=!!", headers=AUTH, timeout=10)

    assert response.status_code == 404


def test_bulk_trainings_created_long_ago_land_on_older_pages(
    serve: Callable[..., SimulatorServer],
):
    """10,000 trainings created hours back list after a new one, 100 pages plus one."""
    server = serve()
    newest = create(server).json()["id"]
    response = requests.post(
        f"{server.url}/_admin/trainings",
        json={"count": 10_000, "created_ago": [3600, 7200], "finish_in": [60, 120]},
        timeout=30,
    )

    pages = walk(server)

    assert response.status_code == 201
    assert response.json()["created"] == 10_000
    assert len(pages) == 101
    assert pages[0]["results"][0]["id"] == newest
    statuses = requests.get(f"{server.url}/_admin/trainings", timeout=10).json()
    assert statuses["by_status"]["processing"] == 10_000


def test_bulk_trainings_finish_within_their_window(serve: Callable[..., SimulatorServer]):
    """Bulk trainings finishing within a second are all terminal soon after, some failed."""
    server = serve(seed=3)
    server.simulator.create_many(BulkPlan(count=200, finish_in=(0.0, 0.5), fail_rate=0.5))

    def all_terminal() -> dict[str, int] | None:
        by_status = requests.get(f"{server.url}/_admin/trainings", timeout=10).json()["by_status"]
        return by_status if set(by_status) <= {"succeeded", "failed"} else None

    by_status = wait_until(all_terminal, message="all bulk trainings terminal")

    assert by_status["succeeded"] + by_status["failed"] == 200
    assert by_status["failed"] > 0


def test_bulk_trainings_take_the_ids_given(
    serve: Callable[..., SimulatorServer], receiver: WebhookReceiver
):
    """`ids` creates those trainings (a platform's own record names them): GET finds each
    by its id, it finishes within `finish_in`, and its dropped `completed` is on record."""
    server = serve()
    set_knobs(server, "faults", drop_rate=1.0)
    response = requests.post(
        f"{server.url}/_admin/trainings",
        json={
            "ids": ["k8sy6bgx31rm80cr2cwbn2bqkw", "given-2"],
            "finish_in": [0.2, 0.2],
            "webhook": receiver.url,
            "webhook_events_filter": ["completed"],
        },
        timeout=10,
    )

    assert response.status_code == 201
    assert response.json() == {"created": 2, "ids": ["k8sy6bgx31rm80cr2cwbn2bqkw", "given-2"]}
    assert get(server, "given-2")["status"] == "processing"
    reaches(server, "k8sy6bgx31rm80cr2cwbn2bqkw", "succeeded")
    wait_until(lambda: server.simulator.pending_tasks() == 0)
    dropped = [(d["training_id"], d["event"], d["dropped"]) for d in server.simulator.deliveries()]
    assert ("k8sy6bgx31rm80cr2cwbn2bqkw", "completed", True) in dropped
    assert receiver.received == []


@pytest.mark.parametrize(
    ("body", "status", "problem"),
    [
        ({"ids": ["a", "a"]}, 400, "ids must not repeat an id"),
        ({"ids": ["a b"]}, 400, "ids must be 1 to 64 letters"),
        ({"ids": ["a"], "count": 2}, 400, "count must be left out with ids"),
        ({"ids": "abc"}, 400, "ids must be a list"),
        ({"ids": ["exists", "fresh"]}, 409, "training ids already exist: exists"),
    ],
)
def test_bulk_ids_that_cannot_be_created_create_nothing(
    serve: Callable[..., SimulatorServer], body: dict[str, Any], status: int, problem: str
):
    """A repeated, malformed or taken id, or a count that disagrees, is refused whole."""
    server = serve()
    server.simulator.create_many(BulkPlan(ids=("exists",)))

    response = requests.post(f"{server.url}/_admin/trainings", json=body, timeout=10)

    assert response.status_code == status
    assert problem in response.json()["detail"]
    assert list(server.simulator.true_statuses()) == ["exists"]


def test_webhooks_are_signed_with_the_secret(
    serve: Callable[..., SimulatorServer], receiver: WebhookReceiver
):
    """start and completed webhooks verify with standardwebhooks and carry the GET shape."""
    server = serve()
    training_id = create(
        server, webhook=receiver.url, webhook_events_filter=["start", "completed"]
    ).json()["id"]

    arrived = receiver.wait_for(2)

    bodies = [verify(server.simulator.secret, delivery) for delivery in arrived]
    assert [body["status"] for body in bodies] == ["processing", "succeeded"]
    assert all(body["id"] == training_id for body in bodies)
    assert_same_shape(bodies[1], published("training-webhook-completed-event-succeeded.json"))
    assert_same_shape(bodies[0], published("training-webhook-start-event-processing.json"))
    assert arrived[0].headers["content-type"] == "application/json"
    assert arrived[0].headers["webhook-id"] != arrived[1].headers["webhook-id"]


def test_the_default_filter_sends_output_and_completed(
    serve: Callable[..., SimulatorServer], receiver: WebhookReceiver
):
    """Without a filter every event type is sent; a success ends with output then completed."""
    server = serve(
        lifecycle=Lifecycle(start_seconds=0.05, train_seconds=1.6, fail_rate=0, jitter=0)
    )
    training_id = create(server, webhook=receiver.url).json()["id"]
    reaches(server, training_id, "succeeded")

    wait_until(lambda: server.simulator.pending_tasks() == 0 and len(receiver.received) >= 5)

    events = [d["event"] for d in server.simulator.deliveries()]
    assert events[:3] == ["start", "logs", "logs"]
    # output and completed go out together, on two sender threads, in either order.
    assert sorted(events[3:]) == ["completed", "output"]
    assert get(server, training_id)["webhook_events_filter"] == [
        "start",
        "output",
        "logs",
        "completed",
    ]


def test_terminal_webhook_is_retried_with_the_same_id(serve: Callable[..., SimulatorServer]):
    """A completed webhook answered 500 twice is retried with the same id and body."""
    server = serve()
    with WebhookReceiver(statuses=[500, 503]) as failing:
        create(server, webhook=failing.url, webhook_events_filter=["completed"])

        arrived = failing.wait_for(3)

    assert [delivery.answered for delivery in arrived] == [500, 503, 200]
    assert len({delivery.headers["webhook-id"] for delivery in arrived}) == 1
    assert len({delivery.body for delivery in arrived}) == 1
    for delivery in arrived:
        verify(server.simulator.secret, delivery)


def test_terminal_retries_stop_after_the_retry_window(serve: Callable[..., SimulatorServer]):
    """A receiver that always fails gets a few attempts, then no more."""
    server = serve(retry_window_seconds=0.3, retry_base_seconds=0.05)
    with WebhookReceiver(default=500) as failing:
        created = create(server, webhook=failing.url, webhook_events_filter=["completed"])
        reaches(server, created.json()["id"], "succeeded")

        wait_until(lambda: server.simulator.pending_tasks() == 0 and failing.received)

    attempts = [d["attempt"] for d in server.simulator.deliveries()]
    assert attempts == list(range(1, len(attempts) + 1))
    assert 2 <= len(attempts) <= 10


def test_intermediate_webhooks_are_not_retried(serve: Callable[..., SimulatorServer]):
    """A start webhook answered 500 is sent once; the completed one still arrives."""
    server = serve()
    with WebhookReceiver(statuses=[500]) as receiver:
        create(server, webhook=receiver.url, webhook_events_filter=["start", "completed"])

        arrived = receiver.wait_for(2)

    assert [verify(server.simulator.secret, d)["status"] for d in arrived] == [
        "processing",
        "succeeded",
    ]


def test_a_drop_rate_of_one_sends_nothing(
    serve: Callable[..., SimulatorServer], receiver: WebhookReceiver
):
    """With drop_rate 1.0 no webhook reaches the receiver; the log marks them dropped."""
    server = serve(faults=Faults(drop_rate=1.0))
    for _ in range(3):
        create(server, webhook=receiver.url)

    def completed_dropped() -> list[dict[str, Any]]:
        log = server.simulator.deliveries()
        return [d for d in log if d["event"] == "completed"] if len(log) >= 9 else []

    dropped = wait_until(completed_dropped, message="three completed webhooks dropped")

    assert len(dropped) == 3
    assert all(d["dropped"] for d in server.simulator.deliveries())
    assert receiver.received == []


def test_a_duplicate_keeps_the_webhook_id(
    serve: Callable[..., SimulatorServer], receiver: WebhookReceiver
):
    """With duplicate_rate 1.0 each message arrives twice with the same id and body."""
    server = serve(faults=Faults(duplicate_rate=1.0))
    create(server, webhook=receiver.url, webhook_events_filter=["completed"])

    first, second = receiver.wait_for(2)

    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    verify(server.simulator.secret, second)
    assert [d["duplicate"] for d in delivery_log(server, 2)] == [False, True]


def test_reordering_delivers_start_after_completed(
    serve: Callable[..., SimulatorServer], receiver: WebhookReceiver
):
    """With reorder_rate 1.0 the processing webhook arrives after the succeeded one."""
    server = serve(faults=Faults(reorder_rate=1.0))
    create(server, webhook=receiver.url, webhook_events_filter=["start", "completed"])

    arrived = receiver.wait_for(2)

    statuses = [verify(server.simulator.secret, delivery)["status"] for delivery in arrived]
    assert statuses == ["succeeded", "processing"]


def test_delayed_webhooks_are_marked_and_still_arrive(
    serve: Callable[..., SimulatorServer], receiver: WebhookReceiver
):
    """With delay_rate 1.0 webhooks arrive later, flagged as delayed in the delivery log."""
    server = serve(faults=Faults(delay_rate=1.0, delay_seconds=0.2))
    create(server, webhook=receiver.url, webhook_events_filter=["completed"])

    receiver.wait_for(1)

    assert [d["delayed"] for d in delivery_log(server, 1)] == [True]


def test_error_rate_one_answers_5xx(serve: Callable[..., SimulatorServer]):
    """With error_rate 1.0 every API call answers a 5xx."""
    server = serve(faults=Faults(error_rate=1.0))

    response = requests.get(f"{server.api_base_url}/trainings", headers=AUTH, timeout=10)

    assert response.status_code in (500, 502, 503)


@pytest.mark.parametrize("retry_after", [True, False])
def test_throttling_answers_429_like_replicate(
    serve: Callable[..., SimulatorServer], retry_after: bool
):
    """With throttle_rate 1.0 calls answer 429 with the documented body, Retry-After as set."""
    server = serve(faults=Faults(throttle_rate=1.0, throttle_retry_after=retry_after))

    response = requests.get(f"{server.api_base_url}/trainings", headers=AUTH, timeout=10)

    assert response.status_code == 429
    assert set(response.json()) == set(published("error-429-throttled-docs-example.json"))
    assert ("Retry-After" in response.headers) is retry_after


def test_the_read_limit_throttles_past_its_budget(serve: Callable[..., SimulatorServer]):
    """With read_rpm 1 the second read in a row is throttled with a Retry-After."""
    server = serve(faults=Faults(read_rpm=1))
    url = f"{server.api_base_url}/trainings"

    first = requests.get(url, headers=AUTH, timeout=10)
    second = requests.get(url, headers=AUTH, timeout=10)

    assert first.status_code == 200
    assert second.status_code == 429
    assert int(second.headers["Retry-After"]) >= 1


def test_faults_can_be_read_and_set_over_http(serve: Callable[..., SimulatorServer]):
    """POST /_admin/faults changes some faults; a bad one is refused naming the problem."""
    server = serve()

    changed = requests.post(f"{server.url}/_admin/faults", json={"drop_rate": 0.5}, timeout=10)
    refused = requests.post(
        f"{server.url}/_admin/faults", json={"drop_rate": 2, "nope": 1}, timeout=10
    )

    assert changed.json()["drop_rate"] == 0.5
    assert requests.get(f"{server.url}/_admin/faults", timeout=10).json() == changed.json()
    assert refused.status_code == 400
    assert "drop_rate" in refused.json()["detail"]
    assert "nope" in refused.json()["detail"]
    assert server.simulator.faults.drop_rate == 0.5


def test_request_counts_record_each_training_get(serve: Callable[..., SimulatorServer]):
    """/_admin/requests counts calls by route and GETs per training id."""
    server = serve()
    training_id = create(server).json()["id"]
    get(server, training_id)
    get(server, training_id)

    counts = requests.get(f"{server.url}/_admin/requests", timeout=10).json()

    assert counts["total"] == 3
    assert counts["training_gets"] == {training_id: 2}
    assert counts["training_gets_ok"] == {training_id: 2}
    assert counts["by_route"]["GET /v1/trainings/{training_id}"] == 2
    reset = requests.delete(f"{server.url}/_admin/requests", timeout=10).json()
    assert reset["total"] == 0


def test_delivery_log_reports_each_attempt(
    serve: Callable[..., SimulatorServer], receiver: WebhookReceiver
):
    """/_admin/deliveries lists the webhook id, training, event and answer of each attempt."""
    server = serve()
    created = create(server, webhook=receiver.url, webhook_events_filter=["completed"])
    arrived = receiver.wait_for(1)
    delivery_log(server, 1)

    log = requests.get(f"{server.url}/_admin/deliveries", timeout=10).json()["deliveries"]

    assert len(log) == 1
    assert log[0]["webhook_id"] == arrived[0].headers["webhook-id"]
    assert log[0]["training_id"] == created.json()["id"]
    assert log[0]["event"] == "completed"
    assert log[0]["response_status"] == 200
    assert log[0]["dropped"] is False


def set_knobs(server: SimulatorServer, kind: str, **knobs: Any) -> dict[str, Any]:
    """POST knobs to /_admin/faults or /_admin/lifecycle; return the settings now in force."""
    response = requests.post(f"{server.url}/_admin/{kind}", json=knobs, timeout=10)
    assert response.status_code == 200, response.text
    settings = response.json()
    assert {key: settings[key] for key in knobs} == knobs
    return settings


def test_aborted_trainings_end_before_they_run(
    serve: Callable[..., SimulatorServer], receiver: WebhookReceiver
):
    """With abort_rate 1 a training goes from starting to aborted: never started, no output,
    terminal for cancel, and its only webhook is `completed` saying aborted."""
    server = serve(lifecycle=Lifecycle(start_seconds=0.2, train_seconds=0.2, jitter=0))
    set_knobs(server, "lifecycle", abort_rate=1.0)
    created = create(server, webhook=receiver.url).json()

    body = reaches(server, created["id"], "aborted")
    wait_until(lambda: server.simulator.pending_tasks() == 0 and receiver.received)
    canceled = requests.post(
        f"{server.api_base_url}/trainings/{created['id']}/cancel", headers=AUTH, timeout=10
    ).json()

    assert created["status"] == "starting"
    assert (body["started_at"], body["output"], body["error"]) == (None, None, None)
    assert datetime.fromisoformat(body["completed_at"]) > datetime.fromisoformat(body["created_at"])
    assert set(body["metrics"]) == {"total_time"}
    assert canceled["status"] == "aborted"
    webhooks = [verify(server.simulator.secret, delivery) for delivery in receiver.received]
    assert [delivery["event"] for delivery in server.simulator.deliveries()] == ["completed"]
    assert [webhook["status"] for webhook in webhooks] == ["aborted"]
    truth = requests.get(f"{server.url}/_admin/trainings", timeout=10).json()
    assert truth["by_status"] == {"aborted": 1}


def test_null_logs_show_as_null_everywhere_but_the_create_response(
    serve: Callable[..., SimulatorServer], receiver: WebhookReceiver
):
    """With null_logs_rate 1 `logs` is null while processing, when done and in webhooks."""
    server = serve(lifecycle=Lifecycle(start_seconds=0.05, train_seconds=0.4, jitter=0))
    set_knobs(server, "lifecycle", null_logs_rate=1.0, fail_rate=0.0)
    created = create(server, webhook=receiver.url).json()

    processing = reaches(server, created["id"], "processing")
    succeeded = reaches(server, created["id"], "succeeded")
    wait_until(lambda: server.simulator.pending_tasks() == 0 and len(receiver.received) >= 3)

    assert created["logs"] == ""
    assert processing["logs"] is None
    assert succeeded["logs"] is None
    assert succeeded["output"]["weights"].startswith("https://")
    bodies = [verify(server.simulator.secret, delivery) for delivery in receiver.received]
    assert {body["logs"] for body in bodies} == {None}
    assert server.simulator.describe_training(created["id"])["null_logs"] is True


def test_a_starting_webhook_says_starting(
    serve: Callable[..., SimulatorServer], receiver: WebhookReceiver
):
    """With starting_webhook_rate 1 the `start` webhook goes out on creation saying
    `starting`, shaped like Replicate's published starting webhook; trainings created in
    bulk while still starting send it at once."""
    server = serve(lifecycle=Lifecycle(start_seconds=0.5, train_seconds=0.2, fail_rate=0, jitter=0))
    set_knobs(server, "lifecycle", starting_webhook_rate=1.0)
    created = create(server, webhook=receiver.url, webhook_events_filter=["start", "completed"])
    bulk = requests.post(
        f"{server.url}/_admin/trainings",
        json={
            "count": 1,
            "created_ago": [1, 1],
            "finish_in": [3600, 3600],
            "status": "starting",
            "starting_webhook_rate": 1,
            "webhook": receiver.url,
        },
        timeout=10,
    ).json()

    arrived = receiver.wait_for(3)

    bodies = [verify(server.simulator.secret, delivery) for delivery in arrived]
    by_training = {}
    for body in bodies:
        by_training.setdefault(body["id"], []).append(body["status"])
    assert by_training == {
        created.json()["id"]: ["starting", "succeeded"],
        bulk["ids"][0]: ["starting"],
    }
    starting = next(body for body in bodies if body["id"] == bulk["ids"][0])
    assert_same_shape(starting, published("prediction-webhook-starting-docs-example.json"))
    assert starting["started_at"] is None


def test_new_trainings_can_answer_404_at_first(serve: Callable[..., SimulatorServer]):
    """With new_training_404_rate 1 a new training answers GET 404 and is left out of the
    list for new_training_404_seconds, then shows up; the counts name the fault."""
    server = serve(lifecycle=Lifecycle(start_seconds=60, train_seconds=60))
    set_knobs(server, "faults", new_training_404_rate=1.0, new_training_404_seconds=0.5)
    training_id = create(server).json()["id"]
    url = f"{server.api_base_url}/trainings"

    early = requests.get(f"{url}/{training_id}", headers=AUTH, timeout=10)
    listed_early = requests.get(url, headers=AUTH, timeout=10).json()["results"]
    later = wait_until(
        lambda: (
            (answer := requests.get(f"{url}/{training_id}", headers=AUTH, timeout=10)).ok
            and answer.json()
        ),
        message="the training visible",
    )
    listed_later = requests.get(url, headers=AUTH, timeout=10).json()["results"]

    assert early.status_code == 404
    assert early.json() == {"detail": "Not found.", "status": 404}
    assert listed_early == []
    assert later["id"] == training_id
    assert [obj["id"] for obj in listed_later] == [training_id]
    counts = requests.get(f"{server.url}/_admin/requests", timeout=10).json()
    assert counts["by_fault"]["new_training_404"] >= 1


def test_a_gateway_answers_an_html_502(serve: Callable[..., SimulatorServer]):
    """With gateway_error_rate 1 API calls get a 502 HTML page, not JSON, counted by fault."""
    server = serve()
    set_knobs(server, "faults", gateway_error_rate=1.0)

    response = requests.get(f"{server.api_base_url}/trainings", headers=AUTH, timeout=10)

    assert response.status_code == 502
    assert response.headers["Content-Type"].startswith("text/html")
    assert response.text.startswith("<html>")
    with pytest.raises(ValueError):
        response.json()
    counts = requests.get(f"{server.url}/_admin/requests", timeout=10).json()
    assert counts["by_fault"] == {"gateway_html": 1}


def test_the_cli_flags_set_every_real_shape_knob():
    """`webhook-sync simulator` flags reach the faults and lifecycle the admin routes show."""
    port = free_port()
    flags = [
        "--abort-rate=0.1",
        "--null-logs-rate=0.2",
        "--starting-webhook-rate=0.3",
        "--gateway-error-rate=0.4",
        "--new-training-404-rate=0.5",
        "--new-training-404-seconds=6",
        "--no-unauthenticated-title",
    ]
    process = subprocess.Popen(
        [str(VENV_BIN / "webhook-sync"), "simulator", "--port", str(port), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/_admin"
    try:
        assert process.stdout and "listening" in process.stdout.readline()
        faults = requests.get(f"{base}/faults", timeout=5).json()
        lifecycle = requests.get(f"{base}/lifecycle", timeout=5).json()
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)

    assert (lifecycle["abort_rate"], lifecycle["null_logs_rate"]) == (0.1, 0.2)
    assert lifecycle["starting_webhook_rate"] == 0.3
    assert (faults["gateway_error_rate"], faults["new_training_404_rate"]) == (0.4, 0.5)
    assert faults["new_training_404_seconds"] == 6
    assert faults["unauthenticated_title"] is False


def test_a_seed_repeats_ids_and_outcomes():
    """Two simulators with the same seed create the same ids, outcomes and webhook faults."""
    plan = BulkPlan(count=50, fail_rate=0.5)

    runs = [Simulator(seed=7) for _ in range(2)]
    ids = [run.create_many(plan) for run in runs]

    assert ids[0] == ids[1]
    outcomes = [[run.describe_training(i)["outcome"] for i in ids[0]] for run in runs]
    assert outcomes[0] == outcomes[1]


def test_token_bucket_allows_a_burst_then_refills():
    """The rate limit allows its burst, then one request per 60/rpm seconds."""
    bucket = TokenBucket(per_minute=60, burst_seconds=2)

    allowed = [bucket.take(100.0) for _ in range(3)]

    assert allowed[:2] == [0.0, 0.0]
    assert allowed[2] == pytest.approx(1.0)
    assert bucket.take(101.0) == 0.0


@pytest.mark.parametrize("digits", [0, 2, 3, 6, 9])
def test_timestamps_have_the_asked_fractional_digits(digits: int):
    """format_time writes 0 to 9 fractional digits and always a Z."""
    text = simulator_state.format_time(1_700_000_000_123_456, digits)

    assert text.endswith("Z")
    assert len(text.partition(".")[2].rstrip("Z")) == digits
    assert datetime.fromisoformat(text).timestamp() == pytest.approx(1_700_000_000.123456, abs=1)


def test_bad_settings_are_refused_with_every_problem():
    """Simulator settings refuse unknown keys and out-of-range values all at once."""
    with pytest.raises(SimulatorError) as caught:
        Faults().updated({"drop_rate": -1, "latency_ms": 1.5, "bogus": True})

    message = str(caught.value)
    assert "drop_rate" in message
    assert "latency_ms" in message
    assert "bogus" in message


@pytest.mark.parametrize("secret", ["C2FVsBQIhrscChlQIMV", "whsec_", "whsec_a"])
def test_a_malformed_secret_is_refused(secret: str):
    """A secret without the whsec_ prefix, empty, or not base64 is refused at once."""
    with pytest.raises(SimulatorError, match="whsec_"):
        Simulator(secret=secret)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_the_cli_serves_until_interrupted(stop_signal: signal.Signals):
    """`webhook-sync simulator --port N` prints URL and secret, serves, exits 0 on ^C/TERM."""
    port = free_port()
    process = subprocess.Popen(
        [str(VENV_BIN / "webhook-sync"), "simulator", "--port", str(port), "--seed", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        banner = [process.stdout.readline() for _ in range(4)] if process.stdout else []
        api = f"http://127.0.0.1:{port}/v1"

        response = requests.get(f"{api}/webhooks/default/secret", headers=AUTH, timeout=5)

        assert any(api in line for line in banner), banner
        assert any(response.json()["key"] in line for line in banner), banner
    finally:
        process.send_signal(stop_signal)
        assert process.wait(timeout=10) == 0


def test_the_cli_never_serves_a_secret_from_the_environment():
    """With REPLICATE_WEBHOOK_SECRET set, the published default token is handed the
    development secret, and the banner neither prints nor uses the configured one."""
    configured = generate_secret()
    port = free_port()
    process = subprocess.Popen(
        [str(VENV_BIN / "webhook-sync"), "simulator", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "REPLICATE_WEBHOOK_SECRET": configured},
    )
    try:
        banner = [process.stdout.readline() for _ in range(6)] if process.stdout else []
        url = f"http://127.0.0.1:{port}/v1/webhooks/default/secret"

        response = requests.get(url, headers=AUTH, timeout=5)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)

    assert response.json() == {"key": DEV_SECRET}
    assert not any(configured in line for line in banner)
    assert any("from the environment is not used" in line for line in banner)
