"""The Replicate client over real HTTP against a local scripted server."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from tests.fake_replicate import TOKEN, FakeReplicate, Scripted, running
from tests.support import free_port
from webhook_sync import errors, replicate
from webhook_sync.dev.simulator import DEFAULT_TOKEN, BulkPlan, Faults, Simulator, start_in_thread
from webhook_sync.logs import LOGGER_NAME


@pytest.fixture()
def fake() -> Iterator[FakeReplicate]:
    """A FakeReplicate served on a free port."""
    with running() as server:
        yield server


def make_client(fake: FakeReplicate, **options: object) -> replicate.ReplicateClient:
    """A client with test-sized waits: every backoff and cap is a few milliseconds."""
    settings: dict[str, object] = {
        "max_rps": 1000,
        "backoff_base": 0.001,
        "backoff_cap": 0.01,
        "retry_after_cap": 0.05,
        "throttle_wait": 0.02,
        "read_timeout": 2.0,
    }
    settings.update(options)
    return replicate.ReplicateClient(TOKEN, fake.url, **settings)  # type: ignore[arg-type]


class RetryLog(logging.Handler):
    """Collects the `replicate_retry` lines the client writes at DEBUG."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.waits: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "replicate_retry":
            self.waits.append(record.fields["wait"])  # type: ignore[attr-defined]


@pytest.fixture()
def retry_log() -> Iterator[RetryLog]:
    """The waits the client chose before each retry."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = RetryLog()
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_get_training_builds_the_trainings_url_with_the_token(fake: FakeReplicate) -> None:
    """get_training asks /v1/trainings/{id} with the bearer token and returns the object."""
    fake.add("abc123", "processing")
    client = make_client(fake)

    obj = client.get_training("abc123")

    assert obj["id"] == "abc123"
    assert obj["status"] == "processing"
    assert fake.counts["/v1/trainings/abc123"] == 1
    assert client.request_count == 1


def test_429_with_retry_after_waits_that_long_capped(
    fake: FakeReplicate, retry_log: RetryLog
) -> None:
    """A 429 with Retry-After waits what it says (capped), not the default throttle wait."""
    fake.add("abc")
    fake.script("/v1/trainings/abc", Scripted(429, {"detail": "throttled"}, {"Retry-After": "1"}))
    client = make_client(fake, retry_after_cap=0.03, throttle_wait=60)

    obj = client.get_training("abc")

    assert obj["id"] == "abc"
    assert fake.counts["/v1/trainings/abc"] == 2
    assert len(retry_log.waits) == 1
    assert 0.03 <= retry_log.waits[0] <= 0.2


def test_429_without_retry_after_waits_the_default(
    fake: FakeReplicate, retry_log: RetryLog
) -> None:
    """A 429 without Retry-After waits the default throttle wait, then succeeds."""
    fake.add("abc")
    fake.script("/v1/trainings/abc", Scripted(429, {"detail": "throttled"}))
    client = make_client(fake, throttle_wait=0.04)

    obj = client.get_training("abc")

    assert obj["id"] == "abc"
    assert fake.counts["/v1/trainings/abc"] == 2
    assert retry_log.waits and retry_log.waits[0] >= 0.04


def test_5xx_then_success_is_retried(fake: FakeReplicate) -> None:
    """Two server errors then a 200 give the object after three requests."""
    fake.add("abc", "succeeded")
    fake.script("/v1/trainings/abc", Scripted(502, None), Scripted(503, {"detail": "busy"}))
    client = make_client(fake)

    obj = client.get_training("abc")

    assert obj["status"] == "succeeded"
    assert fake.counts["/v1/trainings/abc"] == 3


def test_5xx_forever_gives_up_naming_the_status_and_detail(fake: FakeReplicate) -> None:
    """Endless 500s raise ReplicateUnavailableError after max_attempts, without the token."""
    fake.always = Scripted(500, {"detail": "Internal server error", "status": 500})
    client = make_client(fake, max_attempts=3)

    with pytest.raises(errors.ReplicateUnavailableError) as caught:
        client.get_training("abc")

    assert fake.counts["/v1/trainings/abc"] == 3
    assert caught.value.status_code == 500
    assert "500" in str(caught.value)
    assert "Internal server error" in str(caught.value)
    assert TOKEN not in str(caught.value)


def test_a_gateway_html_502_is_retried_and_named_without_the_page() -> None:
    """The simulator's gateway page (502, text/html) is retried like any 5xx; when it
    lasts, the error names the status and the body's type, never a byte of the HTML."""
    sim = Simulator(faults=Faults(gateway_error_rate=1.0, read_rpm=0))
    with start_in_thread(sim) as server:
        (training_id,) = sim.create_many(BulkPlan(count=1))
        client = replicate.ReplicateClient(
            DEFAULT_TOKEN, server.api_base_url, backoff_base=0.001, backoff_cap=0.01
        )
        with pytest.raises(errors.ReplicateUnavailableError) as caught:
            client.get_training(training_id)
        sim.set_faults(gateway_error_rate=0.0)
        fetched = client.get_training(training_id)
    message = str(caught.value)

    assert sim.request_counts()["by_fault"] == {"gateway_html": client.max_attempts}
    assert caught.value.status_code == 502
    assert "502" in message
    assert "text/html" in message
    assert "<" not in message
    assert "cloudflare" not in message
    assert fetched["id"] == training_id


def test_read_timeout_then_success_is_retried(fake: FakeReplicate) -> None:
    """A response slower than the read timeout is abandoned and the GET is retried."""
    fake.add("abc", "failed")
    fake.script("/v1/trainings/abc", Scripted(200, {"id": "abc", "status": "x"}, delay=1.0))
    client = make_client(fake, read_timeout=0.1)

    obj = client.get_training("abc")

    assert obj["status"] == "failed"
    assert fake.counts["/v1/trainings/abc"] == 2


def test_timeouts_forever_raise_unavailable(fake: FakeReplicate) -> None:
    """A server that never answers in time gives ReplicateUnavailableError naming the cause."""
    fake.always = Scripted(200, {"id": "abc", "status": "processing"}, delay=0.5)
    client = make_client(fake, read_timeout=0.05, max_attempts=2)

    with pytest.raises(errors.ReplicateUnavailableError) as caught:
        client.get_training("abc")

    assert fake.counts["/v1/trainings/abc"] == 2
    assert "Timeout" in str(caught.value)
    assert caught.value.status_code is None


def test_connection_refused_raises_unavailable() -> None:
    """Nothing listening on the port gives ReplicateUnavailableError after the retries."""
    client = replicate.ReplicateClient(
        TOKEN, f"http://127.0.0.1:{free_port()}/v1", backoff_base=0.001, max_attempts=2
    )

    with pytest.raises(errors.ReplicateUnavailableError) as caught:
        client.get_training("abc")

    assert "cannot reach Replicate" in str(caught.value)
    assert client.request_count == 2


def test_401_names_the_setting_not_the_token(fake: FakeReplicate) -> None:
    """A wrong token gives ReplicateAuthError naming REPLICATE_API_TOKEN, asked only once."""
    fake.add("abc")
    client = replicate.ReplicateClient("r8_wrong_secret_value", fake.url, backoff_base=0.001)

    with pytest.raises(errors.ReplicateAuthError) as caught:
        client.get_training("abc")

    assert fake.counts["/v1/trainings/abc"] == 1
    assert caught.value.status_code == 401
    assert "REPLICATE_API_TOKEN" in str(caught.value)
    assert "Invalid token." in str(caught.value)
    assert "r8_wrong_secret_value" not in str(caught.value)


def test_403_is_an_auth_error(fake: FakeReplicate) -> None:
    """A 403 is treated like a 401: the token cannot do this, so retrying is pointless."""
    fake.script("/v1/trainings/abc", Scripted(403, {"detail": "Forbidden"}))
    client = make_client(fake)

    with pytest.raises(errors.ReplicateAuthError):
        client.get_training("abc")

    assert fake.counts["/v1/trainings/abc"] == 1


def test_404_raises_not_found_with_the_detail(fake: FakeReplicate) -> None:
    """An unknown id gives ReplicateNotFoundError carrying Replicate's detail, not retried."""
    client = make_client(fake)

    with pytest.raises(errors.ReplicateNotFoundError) as caught:
        client.get_training("missing")

    assert fake.counts["/v1/trainings/missing"] == 1
    assert caught.value.status_code == 404
    assert "Not found." in str(caught.value)


def test_other_4xx_is_not_retried(fake: FakeReplicate) -> None:
    """A 422 is a plain ReplicateError, raised after one request."""
    fake.script("/v1/trainings/abc", Scripted(422, {"detail": "bad id"}))
    client = make_client(fake)

    with pytest.raises(errors.ReplicateError) as caught:
        client.get_training("abc")

    assert type(caught.value) is errors.ReplicateError
    assert caught.value.status_code == 422
    assert fake.counts["/v1/trainings/abc"] == 1


def test_list_trainings_follows_next_newest_first(fake: FakeReplicate) -> None:
    """250 trainings come back newest first over three pages."""
    for number in range(250):
        fake.add(f"t{number:03d}")
    client = make_client(fake)

    ids = [obj["id"] for page in client.list_training_pages() for obj in page]

    assert ids == [f"t{number:03d}" for number in reversed(range(250))]
    assert fake.counts["/v1/trainings"] == 3


def test_list_trainings_fetches_pages_only_when_needed(fake: FakeReplicate) -> None:
    """Reading the first page of 100 trainings costs one request."""
    for number in range(250):
        fake.add(f"t{number:03d}")
    client = make_client(fake)

    first = next(client.list_training_pages())

    assert len(first) == 100
    assert fake.counts["/v1/trainings"] == 1


def test_get_webhook_secret(fake: FakeReplicate) -> None:
    """The account's signing secret is returned as text."""
    client = make_client(fake)

    assert client.get_webhook_secret().startswith("whsec_")


def test_rate_limiter_grants_its_burst_then_waits() -> None:
    """The bucket hands out its capacity at once, then one token per 1/rate seconds."""
    now = [100.0]
    limiter = replicate.RateLimiter(5, clock=lambda: now[0])
    stopped = threading.Event()
    stopped.set()  # acquire returns False instead of waiting

    burst = [limiter.acquire(stopped) for _ in range(5)]
    over = limiter.acquire(stopped)
    now[0] += 0.2
    refilled = limiter.acquire(stopped)

    assert burst == [True] * 5
    assert over is False
    assert refilled is True


def test_stop_interrupts_a_retry_wait(fake: FakeReplicate) -> None:
    """A set stop event ends the retries instead of waiting out a long backoff."""
    fake.always = Scripted(503, {"detail": "busy"})
    stop = threading.Event()
    stop.set()
    client = make_client(fake, backoff_base=60, backoff_cap=60, stop=stop)

    with pytest.raises(errors.ReplicateUnavailableError, match="stopped"):
        client.get_training("abc")

    assert fake.counts["/v1/trainings/abc"] == 0


def test_parse_retry_after_accepts_seconds_and_dates() -> None:
    """Retry-After may be seconds or an HTTP date; junk gives None."""
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

    assert replicate.parse_retry_after("7") == 7.0
    assert replicate.parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert replicate.parse_retry_after("soon") is None
    assert replicate.parse_retry_after(None) is None


def test_repr_hides_the_token(fake: FakeReplicate) -> None:
    """The client's repr names the base URL only."""
    client = make_client(fake)

    assert TOKEN not in repr(client)
