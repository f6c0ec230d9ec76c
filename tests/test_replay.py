"""`webhook-sync replay` through the real command on a real PostgreSQL: files, saved
deliveries with --verify, --dry-run, stored events, the never-backwards rule, bad input."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.operator_support import REPLICATE, cli, fixture, store_event
from tests.support import run_cli, select_transitions
from tests.web_support import sign_headers
from webhook_sync import db, errors, inbox, service, status
from webhook_sync import replay as replay_module
from webhook_sync.dev.simulator import DEFAULT_TOKEN, Simulator, start_in_thread
from webhook_sync.training import parse_training

TRAINING_FIXTURES = sorted(path.name for path in REPLICATE.glob("training-*.json"))
VECTORS = json.loads((REPLICATE / "webhook-signature-test-vectors.json").read_text("utf-8"))
VECTOR = VECTORS["valid"][0]
OTHER_SECRET = "whsec_5WbX5kEWLlfzsGNjH64I8lOOqUB6e8FH"
SUCCEEDED = "training-webhook-completed-event-succeeded.json"
PROCESSING = "training-webhook-start-event-processing.json"
FAILED = "training-failed.json"


def replay(database_url: str, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """Run `webhook-sync replay ARGS` against this test's database."""
    return cli(database_url, "replay", *args, **settings)


def replay_json(database_url: str, *args: str, **settings: str) -> tuple[int, dict[str, Any]]:
    """Run `webhook-sync replay --json ARGS`; return the exit code and the decoded object."""
    result = replay(database_url, "--json", *args, **settings)
    assert result.stdout.strip(), result.stderr
    return result.returncode, json.loads(result.stdout)


def track(conn: db.Connection, training_id: str) -> None:
    """Track a training the way the host platform does."""
    with conn:
        service.track_training(conn, training_id, "user-1")


def snapshot(conn: db.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the three tables a replay could write."""
    tables = {
        "trainings": "SELECT * FROM webhook_sync.trainings ORDER BY id",
        "webhook_events": "SELECT * FROM webhook_sync.webhook_events ORDER BY webhook_id",
        "training_transitions": "SELECT * FROM webhook_sync.training_transitions ORDER BY id",
    }
    with conn, conn.cursor() as cur:
        result = {}
        for name, query in tables.items():
            cur.execute(query)
            result[name] = cur.fetchall()
        return result


def saved_delivery(
    tmp_path: Path,
    body: str,
    secret: str = VECTOR["secret"],
    timestamp: int = int(VECTOR["webhook_timestamp"]),
    tamper: bool = False,
) -> Path:
    """A delivery saved as {"headers", "body"}, signed by sign_headers at an old time."""
    webhook_id = VECTOR["webhook_id"]
    signed_at = datetime.fromtimestamp(timestamp, UTC)
    signature = sign_headers(
        body.encode(), secret=secret, webhook_id=webhook_id, signed_at=signed_at
    )["webhook-signature"]
    if tamper:
        body = body.replace('"processing"', '"succeeded"')
    path = tmp_path / "delivery.json"
    headers = {
        "Webhook-Id": webhook_id,
        "Webhook-Timestamp": str(timestamp),
        "Webhook-Signature": signature,
    }
    path.write_text(json.dumps({"headers": headers, "body": body}), encoding="utf-8")
    return path


def inbox_events(conn: db.Connection) -> list[dict[str, Any]]:
    """Every inbox row, oldest first."""
    with conn:
        return db.select_events(conn, limit=None, newest_first=False)


@pytest.mark.parametrize("name", TRAINING_FIXTURES)
def test_each_published_example_replays_through_the_inbox(
    database_url: str, conn: db.Connection, name: str
) -> None:
    """A tracked training takes each published example's status, recorded as a replay."""
    payload = fixture(name)
    track(conn, payload["id"])

    result = replay(database_url, str(REPLICATE / name))
    row = db.select_training(conn, payload["id"])
    events = inbox_events(conn)
    transitions = select_transitions(conn, payload["id"])

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("applied: ")
    assert "Traceback" not in result.stderr
    assert row is not None
    assert row["replicate_status"] == payload["status"]
    assert row["training_status"] == status.app_status_for(payload["status"])
    assert row["updated_by"] == "replay"
    assert len(events) == 1
    assert events[0]["webhook_id"].startswith("replay_")
    assert events[0]["webhook_id"] in result.stdout
    assert events[0]["source"] == "replay"
    assert events[0]["outcome"] == "applied"
    assert [t["source"] for t in transitions] == ["replay"]


def test_table_shows_each_field_before_and_after(database_url: str, conn: db.Connection) -> None:
    """The people's output lists the changed fields with their old and new values."""
    payload = fixture(SUCCEEDED)
    track(conn, payload["id"])

    result = replay(database_url, str(REPLICATE / SUCCEEDED))
    lines = result.stdout.splitlines()

    assert result.returncode == 0
    assert "none -> succeeded" in lines[0]
    assert any(line.split() == ["training_status", "training", "completed"] for line in lines)
    assert any(line.split() == ["replicate_status", "-", "succeeded"] for line in lines)
    assert any(line.split() == ["updated_by", "track", "replay"] for line in lines)


def test_json_output_holds_before_after_and_summary(database_url: str, conn: db.Connection) -> None:
    """--json prints one object with the row before and after and a summary."""
    payload = fixture(SUCCEEDED)
    track(conn, payload["id"])

    code, out = replay_json(database_url, str(REPLICATE / SUCCEEDED))
    [report] = out["results"]

    assert code == 0
    assert out["summary"] == {"applied": 1}
    assert out["dry_run"] is False
    assert report["outcome"] == "applied"
    assert report["before"]["training_status"] == "training"
    assert report["after"]["training_status"] == "completed"
    assert report["after"]["version_id"] == payload["output"]["version"].split(":")[1]
    assert {"field": "replicate_status", "before": None, "after": "succeeded"} in report["changes"]


def test_stdin_is_read_for_a_dash(database_url: str, conn: db.Connection) -> None:
    """`replay -` reads the payload from standard input."""
    payload = fixture(PROCESSING)
    track(conn, payload["id"])

    result = cli(database_url, "replay", "-", input=json.dumps(payload))
    row = db.select_training(conn, payload["id"])

    assert result.returncode == 0, result.stderr
    assert row is not None
    assert row["replicate_status"] == "processing"


@pytest.mark.parametrize("name", TRAINING_FIXTURES)
def test_dry_run_writes_nothing_and_agrees_with_the_real_replay(
    database_url: str, conn: db.Connection, name: str
) -> None:
    """--dry-run leaves all three tables untouched and predicts exactly what replay does."""
    payload = fixture(name)
    track(conn, payload["id"])
    before = snapshot(conn)

    dry_code, dry = replay_json(database_url, "--dry-run", str(REPLICATE / name))
    after_dry_run = snapshot(conn)
    real_code, real = replay_json(database_url, str(REPLICATE / name))
    [predicted], [done] = dry["results"], real["results"]

    assert after_dry_run == before
    assert dry["dry_run"] is True
    assert dry_code == real_code == 0
    assert predicted["outcome"] == done["outcome"]
    assert predicted["webhook_id"] is None
    assert predicted["changes"] == done["changes"]


def test_dry_run_of_a_refusal_records_nothing(database_url: str, conn: db.Connection) -> None:
    """A dry run that would be refused says why and records no refused transition."""
    payload = fixture(SUCCEEDED)
    track(conn, payload["id"])
    replay(database_url, str(REPLICATE / SUCCEEDED))
    before = snapshot(conn)

    result = replay(database_url, "--dry-run", str(REPLICATE / PROCESSING))

    assert snapshot(conn) == before
    assert result.returncode == 3
    assert result.stdout.startswith("ignored (dry run): ")
    assert "would be refused" in result.stdout
    assert "processing after terminal succeeded" in result.stdout


def test_never_moves_a_status_backwards(database_url: str, conn: db.Connection) -> None:
    """Replaying `processing` after `succeeded` is refused, reported and recorded."""
    payload = fixture(SUCCEEDED)
    track(conn, payload["id"])
    replay(database_url, str(REPLICATE / SUCCEEDED))

    result = replay(database_url, str(REPLICATE / PROCESSING))
    row = db.select_training(conn, payload["id"])
    transitions = select_transitions(conn, payload["id"])
    events = inbox_events(conn)

    assert result.returncode == 3
    assert result.stdout.startswith("ignored: ")
    assert "processing after terminal succeeded; the row is unchanged" in result.stdout
    assert row is not None
    assert row["training_status"] == "completed"
    assert row["replicate_status"] == "succeeded"
    assert transitions[-1]["outcome"] == "ignored"
    assert transitions[-1]["source"] == "replay"
    assert events[-1]["outcome"] == "ignored"


def test_contradicting_terminal_status_is_a_conflict(
    database_url: str, conn: db.Connection
) -> None:
    """Replaying `failed` for a training that succeeded is refused as a conflict."""
    payload = {**fixture(FAILED), "id": fixture(SUCCEEDED)["id"]}
    track(conn, payload["id"])
    replay(database_url, str(REPLICATE / SUCCEEDED))

    result = cli(database_url, "replay", "-", input=json.dumps(payload))
    row = db.select_training(conn, payload["id"])

    assert result.returncode == 3
    assert result.stdout.startswith("conflict: ")
    assert "failed contradicts terminal succeeded" in result.stdout
    assert row is not None
    assert row["training_status"] == "completed"


def test_rewriting_a_completed_training_is_a_recorded_conflict(
    database_url: str, conn: db.Connection, tmp_path: Path
) -> None:
    """A file that would change weights_url, destination, version_id and completed_at of
    a completed training is refused (exit 3) and recorded as a conflict naming them, and
    --dry-run predicts the same refusal without writing."""
    payload = fixture(SUCCEEDED)
    track(conn, payload["id"])
    replay(database_url, str(REPLICATE / SUCCEEDED))
    rewritten = {
        **payload,
        "output": {"version": "evil/other:" + "b" * 64, "weights": "https://evil.example/x"},
        "completed_at": "2030-01-01T00:00:00Z",
    }
    path = tmp_path / "rewritten.json"
    path.write_text(json.dumps(rewritten), encoding="utf-8")
    before = snapshot(conn)
    row_before = db.select_training(conn, payload["id"])

    dry_code, dry = replay_json(database_url, "--dry-run", str(path))
    after_dry_run = snapshot(conn)
    code, done = replay_json(database_url, str(path))
    [predicted], [report] = dry["results"], done["results"]
    refused = select_transitions(conn, payload["id"])[-1]

    assert after_dry_run == before
    assert dry_code == code == 3
    assert predicted["outcome"] == report["outcome"] == "conflict"
    assert (
        predicted["reason"]
        == report["reason"]
        == ("would change destination, version_id, weights_url, completed_at of terminal succeeded")
    )
    assert predicted["changes"] == report["changes"] == []
    assert db.select_training(conn, payload["id"]) == row_before
    assert (refused["outcome"], refused["source"]) == ("conflict", "replay")


def test_verify_accepts_an_old_delivery_and_names_the_secret(
    database_url: str, conn: db.Connection, tmp_path: Path
) -> None:
    """A delivery signed in 2021 with the published secret passes --verify as secret #2."""
    body = (REPLICATE / PROCESSING).read_text(encoding="utf-8")
    track(conn, parse_training(json.loads(body)).id)
    path = saved_delivery(tmp_path, body)

    result = replay(
        database_url,
        "--verify",
        str(path),
        REPLICATE_WEBHOOK_SECRET=f"{OTHER_SECRET} {VECTOR['secret']}",
    )
    [event] = inbox_events(conn)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"signature ok: secret #2 signed {VECTOR['webhook_id']} at 2021-02-25"
    )
    assert VECTOR["secret"] not in result.stdout + result.stderr
    assert event["outcome"] == "applied"
    assert event["signed_at"] == datetime.fromtimestamp(int(VECTOR["webhook_timestamp"]), UTC)


def test_verify_checks_the_published_vector_before_the_body(
    database_url: str, tmp_path: Path
) -> None:
    """The published vector itself verifies; its body then proves not to be a training."""
    path = tmp_path / "vector.json"
    headers = {
        "webhook-id": VECTOR["webhook_id"],
        "webhook-timestamp": VECTOR["webhook_timestamp"],
        "webhook-signature": VECTOR["expected_signature"],
    }
    path.write_text(json.dumps({"headers": headers, "body": VECTOR["body"]}), encoding="utf-8")

    result = replay(database_url, "--verify", str(path), REPLICATE_WEBHOOK_SECRET=VECTOR["secret"])

    assert result.returncode == 1
    assert result.stdout.startswith("signature ok: secret #1 signed msg_p5jXN8AQM9LWM0D4loKWxJek")
    assert "body is not a training object: training object has no id" in result.stderr
    assert "Traceback" not in result.stderr


def test_verify_refuses_a_tampered_body_and_applies_nothing(
    database_url: str, conn: db.Connection, tmp_path: Path
) -> None:
    """A body changed after signing fails --verify (exit 3) and nothing is written."""
    body = (REPLICATE / PROCESSING).read_text(encoding="utf-8")
    track(conn, parse_training(json.loads(body)).id)
    path = saved_delivery(tmp_path, body, tamper=True)
    before = snapshot(conn)

    result = replay(database_url, "--verify", str(path), REPLICATE_WEBHOOK_SECRET=VECTOR["secret"])

    assert result.returncode == 3
    assert "refused: signature check failed" in result.stderr
    assert "nothing applied" in result.stderr
    assert snapshot(conn) == before


def test_verify_refuses_a_delivery_signed_with_another_secret(
    database_url: str, conn: db.Connection, tmp_path: Path
) -> None:
    """A delivery whose signer is not among the configured secrets is refused."""
    body = (REPLICATE / PROCESSING).read_text(encoding="utf-8")
    path = saved_delivery(tmp_path, body, secret=OTHER_SECRET)

    code, out = replay_json(
        database_url, "--verify", str(path), REPLICATE_WEBHOOK_SECRET=VECTOR["secret"]
    )

    assert code == 3
    assert out["verified"] is False
    assert "No configured secret matches" in out["error"]
    assert "(tried 1 configured secret(s))" in out["error"]
    assert inbox_events(conn) == []


def test_event_reapplies_a_stored_event(database_url: str, conn: db.Connection) -> None:
    """--event applies a stored failed event again and records its new outcome."""
    payload = fixture(SUCCEEDED)
    track(conn, payload["id"])
    store_event(conn, "msg_failed_1", payload, "failed")

    result = replay(database_url, "--event", "msg_failed_1")
    event = db.select_event(conn, "msg_failed_1")
    row = db.select_training(conn, payload["id"])

    assert result.returncode == 0, result.stderr
    assert "msg_failed_1" in result.stdout
    assert "none -> succeeded" in result.stdout
    assert result.stdout.splitlines()[-1] == "summary: 1 event(s): 1 applied"
    assert event is not None
    assert event["outcome"] == "applied"
    assert event["attempts"] == 2
    assert row is not None
    assert row["training_status"] == "completed"
    assert row["updated_by"] == "replay"


def test_event_dry_run_writes_nothing(database_url: str, conn: db.Connection) -> None:
    """--event --dry-run predicts the change and leaves the event and the row alone."""
    payload = fixture(SUCCEEDED)
    track(conn, payload["id"])
    store_event(conn, "msg_failed_1", payload, "failed")
    before = snapshot(conn)

    result = replay(database_url, "--event", "msg_failed_1", "--dry-run")

    assert result.returncode == 0
    assert "applied" in result.stdout
    assert result.stdout.splitlines()[-1].endswith("dry run, nothing written")
    assert snapshot(conn) == before


def test_failed_reapplies_every_failed_event_in_the_window(
    database_url: str, conn: db.Connection
) -> None:
    """--failed --since replays the failed events received since then, one line each."""
    succeeded, processing = fixture(SUCCEEDED), fixture(PROCESSING)
    track(conn, succeeded["id"])
    store_event(conn, "msg_old", processing, "failed", age="3 days")
    store_event(conn, "msg_a", processing, "failed", age="2 hours")
    store_event(conn, "msg_b", succeeded, "failed", age="1 hour")
    store_event(conn, "msg_done", processing, "applied", age="1 hour")

    result = replay(database_url, "--failed", "--since", "1d")
    lines = result.stdout.splitlines()
    outcomes = {e["webhook_id"]: e["outcome"] for e in inbox_events(conn)}

    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in lines[1:3]] == ["msg_a", "msg_b"]
    assert lines[-1] == "summary: 2 event(s): 2 applied"
    assert outcomes == {
        "msg_old": "failed",
        "msg_a": "applied",
        "msg_b": "applied",
        "msg_done": "applied",
    }


def test_failed_reports_refusals_and_broken_payloads(
    database_url: str, conn: db.Connection
) -> None:
    """A refused event exits 3 unless one failed again, which makes it exit 1; all are listed."""
    succeeded, processing = fixture(SUCCEEDED), fixture(PROCESSING)
    track(conn, succeeded["id"])
    store_event(conn, "msg_1", succeeded, "failed", age="3 hours")
    store_event(conn, "msg_2", processing, "failed", age="2 hours")

    refused = replay(database_url, "--failed")
    store_event(conn, "msg_3", {"id": succeeded["id"], "status": 7}, "failed", age="1 hour")
    broken = replay(database_url, "--failed", "--json")
    out = json.loads(broken.stdout)

    assert refused.returncode == 3
    assert refused.stdout.splitlines()[-1] == "summary: 2 event(s): 1 applied, 1 ignored"
    assert broken.returncode == 1
    assert [r["outcome"] for r in out["results"]] == ["failed"]
    assert "no status" in out["results"][0]["reason"]
    assert "Traceback" not in broken.stderr


def test_failed_with_nothing_to_do(database_url: str) -> None:
    """--failed on an inbox without failures says so and succeeds."""
    result = replay(database_url, "--failed")

    assert result.returncode == 0
    assert result.stdout.strip() == "summary: 0 event(s)"


def test_unknown_training_is_stored_pending_and_says_how_to_track_it(
    database_url: str, conn: db.Connection
) -> None:
    """An untracked training's replay exits 4, names the track command and waits as
    pending; `track` applies it later as what it is, a replay, not a webhook."""
    payload = fixture(SUCCEEDED)

    result = replay(database_url, str(REPLICATE / SUCCEEDED))
    [event] = inbox_events(conn)
    track(conn, payload["id"])
    row = db.select_training(conn, payload["id"])
    transitions = select_transitions(conn, payload["id"])

    assert result.returncode == 4
    assert result.stdout.startswith("pending: ")
    assert f"webhook-sync track {payload['id']} --user USER" in result.stdout
    assert event["outcome"] == "pending"
    assert row is not None
    assert row["training_status"] == "completed"
    assert row["updated_by"] == "replay"
    assert [(t["source"], t["outcome"]) for t in transitions] == [("replay", "applied")]


def test_unknown_training_dry_run_stores_nothing(database_url: str, conn: db.Connection) -> None:
    """A dry run for an untracked training says so and writes nothing."""
    result = replay(database_url, "--dry-run", str(REPLICATE / SUCCEEDED))

    assert result.returncode == 4
    assert "is not tracked" in result.stdout
    assert "webhook-sync track" in result.stdout
    assert inbox_events(conn) == []


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        ("{not json", "is not JSON"),
        ("[1, 2]", "is not a training object: expected a JSON object"),
        (
            (REPLICATE / "error-404-invalid-training-destination.json").read_text("utf-8"),
            "is not a training object: training object has no id",
        ),
        ('{"id": "abc"}', "is not a training object: training object has no status"),
        ('{"headers": [], "body": "{}"}', "`headers` must be an object of strings"),
        ('{"headers": {}, "body": "{oops"}', "body is not JSON"),
        ('{"headers": {}, "body": "{}"}', "body is not a training object"),
        ("[" * 100_000, "nested too deeply"),
        ('{"id": "t1", "status": "failed", "metrics": {"predict_time": NaN}}', "NaN is not"),
        ('{"headers": {}, "body": "{\\"id\\": \\"t1\\", \\"x\\": Infinity}"}', "Infinity"),
        ('{"id": "t1", "status": "failed", "x": 1e400}', "out of range"),
    ],
    ids=[
        "missing",
        "not-json",
        "array",
        "error-body",
        "no-status",
        "bad-headers",
        "body-not-json",
        "body-not-training",
        "too-deep",
        "nan",
        "body-infinity",
        "float-overflow",
    ],
)
def test_bad_input_is_a_clear_error(
    database_url: str, conn: db.Connection, tmp_path: Path, content: str | None, message: str
) -> None:
    """Each kind of unusable input exits 1 with a one-line cause, no traceback, nothing stored."""
    path = tmp_path / "input.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")

    result = replay(database_url, str(path))

    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert inbox_events(conn) == []


def test_verify_needs_a_saved_delivery(database_url: str) -> None:
    """--verify on a bare training object explains what it needs."""
    result = replay(
        database_url,
        "--verify",
        str(REPLICATE / SUCCEEDED),
        REPLICATE_WEBHOOK_SECRET=VECTOR["secret"],
    )

    assert result.returncode == 1
    assert "--verify needs a saved delivery" in result.stderr


def test_verify_needs_a_configured_secret(database_url: str, tmp_path: Path) -> None:
    """--verify without REPLICATE_WEBHOOK_SECRET says which setting is missing."""
    path = saved_delivery(tmp_path, (REPLICATE / PROCESSING).read_text(encoding="utf-8"))

    result = replay(database_url, "--verify", str(path))

    assert result.returncode == 1
    assert "REPLICATE_WEBHOOK_SECRET is not set" in result.stderr


def test_verify_fetches_the_account_secret_with_the_token_alone(
    database_url: str, conn: db.Connection, tmp_path: Path
) -> None:
    """With only REPLICATE_API_TOKEN set, --verify checks against the account's secret
    fetched from Replicate, as the web process would, and never prints it."""
    body = (REPLICATE / PROCESSING).read_text(encoding="utf-8")
    track(conn, parse_training(json.loads(body)).id)
    path = saved_delivery(tmp_path, body)
    server = start_in_thread(Simulator(secret=VECTOR["secret"], seed=1))
    try:
        result = replay(
            database_url,
            "--verify",
            str(path),
            REPLICATE_API_TOKEN=DEFAULT_TOKEN,
            REPLICATE_API_BASE_URL=server.api_base_url,
        )
    finally:
        server.shutdown()
    [event] = inbox_events(conn)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("signature ok: the account's secret (fetched from Replicate)")
    assert VECTOR["secret"].removeprefix("whsec_") not in result.stdout + result.stderr
    assert event["outcome"] == "applied"


def test_unknown_event_is_a_clear_error(database_url: str) -> None:
    """--event with an id the inbox does not hold exits 1 and names it."""
    result = replay(database_url, "--event", "msg_nope")

    assert result.returncode == 1
    assert result.stderr.strip() == "error: no inbox event with webhook-id msg_nope"


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("file.json", "--failed"),
        ("--event", "msg_1", "--failed"),
        ("--since", "1h", "--event", "msg_1"),
        ("--verify", "--failed"),
        ("--failed", "--since", "last tuesday"),
    ],
)
def test_wrong_usage_exits_2(database_url: str, args: tuple[str, ...]) -> None:
    """Conflicting or missing sources and unreadable times are usage errors."""
    result = replay(database_url, *args)

    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_help_documents_the_exit_codes() -> None:
    """`replay --help` lists every exit code."""
    result = run_cli("replay", "--help")

    assert result.returncode == 0
    for text in ("0 applied", "1 error", "2 wrong usage", "3 refused", "4 the training"):
        assert text in " ".join(result.stdout.split())


def test_receive_delivery_is_the_path_a_replay_takes(
    database_url: str, conn: db.Connection
) -> None:
    """An event the web process stored as pending is applied by --event once tracked."""
    payload = fixture(PROCESSING)
    inbox.receive_delivery(conn, webhook_id="msg_early", payload=payload, signed_at=None)
    conn.autocommit = False
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO webhook_sync.trainings (id, user_id) VALUES (%(id)s, 'user-1')",
            {"id": payload["id"]},
        )

    result = replay(database_url, "--event", "msg_early")
    event = db.select_event(conn, "msg_early")

    assert result.returncode == 0, result.stderr
    assert event is not None
    assert event["outcome"] == "applied"


@given(
    st.one_of(
        st.text(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["id", "status", "headers", "body", "output", "x"]),
                    inner,
                    max_size=5,
                )
            ),
            max_leaves=12,
        ).map(json.dumps),
    )
)
def test_any_input_gives_a_training_or_one_of_our_errors(text: str) -> None:
    """Whatever a replay file holds, reading it raises only our own errors, never a crash."""
    try:
        replay_input = replay_module.parse_input(text, "input")
        training = replay_input.training
    except errors.WebhookSyncError:
        return

    assert training.id.strip()
    assert training.status.strip()


def test_delivery_with_a_parsed_body_replays_but_cannot_be_verified(
    database_url: str, conn: db.Connection, tmp_path: Path
) -> None:
    """A delivery saved with its body as a JSON object applies; --verify explains why not."""
    payload = fixture(PROCESSING)
    track(conn, payload["id"])
    path = tmp_path / "parsed.json"
    path.write_text(json.dumps({"headers": {"webhook-id": "msg_1"}, "body": payload}), "utf-8")

    verified = replay(
        database_url, "--verify", str(path), REPLICATE_WEBHOOK_SECRET=VECTOR["secret"]
    )
    applied = replay(database_url, str(path))
    row = db.select_training(conn, payload["id"])

    assert verified.returncode == 1
    assert "needs the body as the raw text received" in verified.stderr
    assert applied.returncode == 0, applied.stderr
    assert row is not None
    assert row["replicate_status"] == "processing"


def test_unverified_file_says_so_on_stderr(database_url: str, conn: db.Connection) -> None:
    """A file replayed without --verify is applied, with a warning on stderr (not in the
    report on stdout) that nothing vouches for its origin."""
    payload = fixture(PROCESSING)
    track(conn, payload["id"])

    result = replay(database_url, "--json", str(REPLICATE / PROCESSING))

    assert result.returncode == 0, result.stderr
    assert "origin of" in result.stderr and "is unverified" in result.stderr
    assert json.loads(result.stdout)["results"][0]["outcome"] == "applied"


def test_verified_delivery_and_stored_events_carry_no_origin_warning(
    database_url: str, conn: db.Connection, tmp_path: Path
) -> None:
    """--verify and --event replay something whose signature was checked: no warning."""
    body = (REPLICATE / PROCESSING).read_text(encoding="utf-8")
    track(conn, parse_training(json.loads(body)).id)
    path = saved_delivery(tmp_path, body)

    verified = replay(
        database_url, "--verify", str(path), REPLICATE_WEBHOOK_SECRET=VECTOR["secret"]
    )
    [event] = inbox_events(conn)
    again = replay(database_url, "--event", event["webhook_id"])

    assert verified.returncode == 0, verified.stderr
    assert again.returncode == 0, again.stderr
    assert "unverified" not in verified.stderr + again.stderr


@pytest.mark.parametrize("valid_first", [True, False], ids=["valid-first", "valid-last"])
def test_verify_ignores_a_malformed_entry_beside_the_valid_one(
    database_url: str, conn: db.Connection, tmp_path: Path, valid_first: bool
) -> None:
    """--verify reads the signature header exactly as the web process does."""
    body = (REPLICATE / PROCESSING).read_text(encoding="utf-8")
    track(conn, parse_training(json.loads(body)).id)
    path = saved_delivery(tmp_path, body)
    saved = json.loads(path.read_text(encoding="utf-8"))
    entries = [saved["headers"]["Webhook-Signature"], "v1,a,b"]
    saved["headers"]["Webhook-Signature"] = " ".join(entries if valid_first else entries[::-1])
    path.write_text(json.dumps(saved), encoding="utf-8")

    result = replay(database_url, "--verify", str(path), REPLICATE_WEBHOOK_SECRET=VECTOR["secret"])

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("signature ok: secret #1")


@pytest.mark.parametrize("weak", ["whsec_AA", "whsec_dGVzdA$$=="])
def test_verify_refuses_a_weak_or_malformed_secret_by_position(
    database_url: str, tmp_path: Path, weak: str
) -> None:
    """A configured secret under 16 bytes or not strict base64 stops --verify with one line
    naming its position, never its value; nothing is applied."""
    path = saved_delivery(tmp_path, (REPLICATE / PROCESSING).read_text(encoding="utf-8"))

    result = replay(
        database_url, "--verify", str(path), REPLICATE_WEBHOOK_SECRET=f"{VECTOR['secret']} {weak}"
    )

    assert result.returncode == 1
    assert "secret #2" in result.stderr
    assert weak.removeprefix("whsec_") not in result.stderr
    assert "Traceback" not in result.stderr
