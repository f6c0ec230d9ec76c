"""fetching.fetch_all's contract, against a local Replicate over real HTTP."""

from __future__ import annotations

from contextlib import closing

import pytest

from tests.fake_replicate import FakeReplicate, running
from webhook_sync import errors, fetching, replicate


def make_client(fake: FakeReplicate, token: str) -> replicate.ReplicateClient:
    """A fast client for the fake: no real waits between retries."""
    return replicate.ReplicateClient(
        token, fake.url, max_rps=1000, backoff_base=0.001, backoff_cap=0.01, max_attempts=2
    )


def test_each_id_is_yielded_once_with_its_object_or_its_error() -> None:
    """Every asked-for id comes back once, never a tick: with the object Replicate
    answered, or with the ReplicateError of a GET that failed."""
    with running() as fake:
        fake.add("t1")
        fake.add("t2")
        client = make_client(fake, fake.token)
        fetched_ids = fetching.fetch_all(client, ["t1", "gone", "t2"], 2, None)
        with closing(client), closing(fetched_ids):
            fetched = {training_id: (obj, error) for training_id, obj, error in fetched_ids}

    assert sorted(fetched) == ["gone", "t1", "t2"]
    assert fetched["t1"][0]["id"] == "t1" and fetched["t1"][1] is None
    assert fetched["t2"][0]["id"] == "t2" and fetched["t2"][1] is None
    assert fetched["gone"][0] is None
    assert isinstance(fetched["gone"][1], errors.ReplicateError)


def test_a_refused_token_is_raised_at_once_and_cancels_the_rest() -> None:
    """A 401 is not yielded for the caller to notice: fetch_all raises ReplicateAuthError
    itself, and the GETs still queued are never sent."""
    ids = [f"t{i}" for i in range(200)]
    with running() as fake:
        for training_id in ids:
            fake.add(training_id)
        client = make_client(fake, "r8_wrong")
        with closing(client), pytest.raises(errors.ReplicateAuthError):
            for _ in fetching.fetch_all(client, ids, 1, None):
                pass
        sent = fake.count("/v1/trainings/")

    assert 1 <= sent < len(ids)
