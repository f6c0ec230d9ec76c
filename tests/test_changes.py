"""The change feed on a real PostgreSQL: positions, the out-of-order commit it must not
skip, `webhook-sync changes` (also --follow as a real process), the NOTIFY's position and
user id, and the transitions' retention."""

from __future__ import annotations

import json
import queue
import re
import select
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2.errors
import pytest

from tests.e2e_support import admin_execute
from tests.operator_support import cli
from tests.support import VENV_BIN, database_name, database_url_for, wait_until
from webhook_sync import changes, db, migrations, operations, service, worker
from webhook_sync.changes import BEGINNING, Position
from webhook_sync.cli import base
from webhook_sync.cli import feed as feed_cli
from webhook_sync.config import Config
from webhook_sync.errors import ConfigError
from webhook_sync.training import parse_training

USER = "45038279"


def track(conn: db.Connection, training_id: str, user_id: str = USER) -> None:
    """Track a training in its own transaction."""
    with conn:
        service.track_training(conn, training_id, user_id)


def apply(conn: db.Connection, training_id: str, status: str) -> None:
    """Apply a webhook's report in its own transaction."""
    with conn:
        service.apply_update(conn, parse_training({"id": training_id, "status": status}), "webhook")


def feed(conn: db.Connection, after: Position = BEGINNING) -> list[dict[str, Any]]:
    """Every change readable now after `after`."""
    return list(changes.read_changes(conn, after))


def settled(conn: db.Connection, count: int, after: Position = BEGINNING) -> list[dict[str, Any]]:
    """The changes after `after` once `count` of them are readable. Transaction ids are
    the cluster's: a transaction of another test on the same server (a CREATE DATABASE)
    may hold the feed back for a moment, as any long transaction does in production."""

    def enough() -> list[dict[str, Any]]:
        read = feed(conn, after)
        return read if len(read) >= count else []

    return wait_until(enough, timeout=30, message=f"{count} readable change(s)")


def json_lines(output: str) -> list[dict[str, Any]]:
    """Decode one JSON object per line."""
    return [json.loads(line) for line in output.splitlines() if line.strip()]


# --- positions ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["0", "start", "", "  START "])
def test_the_beginning_is_spelled_0_start_or_nothing(text: str) -> None:
    """`0`, `start` and an empty position all mean the beginning of the feed."""
    assert changes.parse_position(text) == BEGINNING


def test_a_position_reads_back_as_it_prints() -> None:
    """A change's position parses into its two numbers and prints the same."""
    position = changes.parse_position("18446744073709551615:42")

    assert position == Position(2**64 - 1, 42)
    assert str(position) == "18446744073709551615:42"


@pytest.mark.parametrize(
    "text", ["abc", "12", "1:2:3", "-1:2", "1:", "18446744073709551616:1", "1:9223372036854775808"]
)
def test_a_malformed_position_is_refused(text: str) -> None:
    """Anything but two numbers in range (or the beginning) is a ValueError naming the form."""
    with pytest.raises(ValueError, match="expected a position such as 1234:56"):
        changes.parse_position(text)


# --- the feed ------------------------------------------------------------------------------


def test_a_change_committed_late_with_a_lower_position_is_never_skipped(
    database_url: str, conn: db.Connection
) -> None:
    """A writes a change first (lower transaction id) but commits after B: while A runs, a
    reader is given neither (B although committed and visible); once A commits, the reader
    gets A then B, so a reader that resumes after B can never have skipped A."""
    track(conn, "train_a")
    track(conn, "train_b")
    writer_a = db.connect(database_url)
    writer_b = db.connect(database_url)
    try:
        with writer_a.cursor() as cur:
            cur.execute("SELECT 1")  # A's transaction is open
        service.apply_update(
            writer_a, parse_training({"id": "train_a", "status": "processing"}), "webhook"
        )
        apply(writer_b, "train_b", "processing")
        with conn, conn.cursor() as cur:
            cur.execute("SELECT training_id FROM webhook_sync.training_transitions")
            committed = [row[0] for row in cur.fetchall()]
        while_a_runs = feed(conn)
        writer_a.commit()
        after_a = settled(conn, 2)
    finally:
        writer_a.close()
        writer_b.close()
    positions = [changes.position_of(change) for change in after_a]

    assert committed == ["train_b"]  # a reader of visible rows would take B and move past A
    assert while_a_runs == []
    assert [change["training_id"] for change in after_a] == ["train_a", "train_b"]
    assert positions[0] < positions[1]


def test_a_change_waits_for_an_older_transaction_in_another_database(
    database_url: str, pg_admin_url: str, conn: db.Connection
) -> None:
    """Transaction ids are the cluster's: a writing transaction open in another database
    holds the feed back (its lag), and it releases everything when it ends."""
    track(conn, "train_a")
    elsewhere = db.connect(pg_admin_url)
    try:
        with elsewhere.cursor() as cur:
            cur.execute("SELECT pg_current_xact_id()")  # holds a transaction id, writes nothing
        apply(conn, "train_a", "processing")
        held = feed(conn)
        elsewhere.rollback()
        released = settled(conn, 1)
    finally:
        elsewhere.close()

    assert held == []
    assert [change["training_id"] for change in released] == ["train_a"]


def test_after_resumes_exactly_and_positions_only_grow(conn: db.Connection) -> None:
    """Reading after a change's position gives exactly the changes behind it, in the same
    order; positions grow across reads; refused reports are not in the feed."""
    track(conn, "train_a", "user-a")
    apply(conn, "train_a", "processing")
    apply(conn, "train_a", "succeeded")
    apply(conn, "train_a", "failed")  # a conflict: recorded, not applied
    first = settled(conn, 2)
    track(conn, "train_b", "user-b")
    apply(conn, "train_b", "processing")
    second = settled(conn, 1, changes.position_of(first[-1]))
    resumed = feed(conn, changes.position_of(first[0]))
    positions = [changes.position_of(change) for change in first + second]

    assert [(c["training_id"], c["to_replicate_status"]) for c in first] == [
        ("train_a", "processing"),
        ("train_a", "succeeded"),
    ]
    assert first[1]["from_training_status"] == "training"
    assert first[1]["to_training_status"] == "completed"
    assert first[1]["user_id"] == "user-a"
    assert [(c["training_id"], c["user_id"]) for c in second] == [("train_b", "user-b")]
    assert resumed == first[1:] + second
    assert positions == sorted(set(positions))


def test_the_documented_sql_reads_what_the_feed_reads(conn: db.Connection) -> None:
    """The SQL docs/changes.md gives apps (issue 13: "the documented SQL behind it") runs
    as written and returns what `changes` returns, from the beginning and after a
    position."""
    doc = (Path(__file__).parent.parent / "docs" / "changes.md").read_text()
    documented = re.search(r"```sql\n(SELECT .*?);\n```", doc, re.DOTALL)[1]
    track(conn, "train_a")
    apply(conn, "train_a", "processing")
    apply(conn, "train_a", "succeeded")
    rows = settled(conn, 2)

    def run_documented(after: Position) -> list[dict[str, Any]]:
        sql = documented.replace("'X'", f"'{after.xact_id}'").replace(
            "::xid8, I)", f"::xid8, {after.transition_id})"
        )
        with conn, db.dict_cursor(conn) as cur:
            cur.execute(sql)
            return [dict(row) for row in cur.fetchall()]

    assert run_documented(BEGINNING) == rows
    assert run_documented(changes.position_of(rows[0])) == rows[1:]


def test_the_feed_reads_page_by_page(conn: db.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    """With pages of two, five changes still come whole and in order, one page after the
    other (a page may end inside one transaction's changes)."""
    monkeypatch.setattr(changes, "PAGE_SIZE", 2)
    track(conn, "train_a")
    track(conn, "train_b")
    with conn:
        for status in ("starting", "processing", "succeeded"):
            service.apply_update(
                conn, parse_training({"id": "train_a", "status": status}), "webhook"
            )
        for status in ("processing", "failed"):
            service.apply_update(
                conn, parse_training({"id": "train_b", "status": status}), "webhook"
            )

    read = settled(conn, 5)

    assert len({change["position"].split(":")[0] for change in read}) == 1  # one transaction
    assert [(c["training_id"], c["to_replicate_status"]) for c in read] == [
        ("train_a", "starting"),
        ("train_a", "processing"),
        ("train_a", "succeeded"),
        ("train_b", "processing"),
        ("train_b", "failed"),
    ]


def test_transitions_from_before_the_feed_come_first(
    empty_database_url: str, tmp_path: Path
) -> None:
    """Rows written before 0007 get transaction id 0: they lead the feed, in id order."""
    for path in migrations.list_migrations():
        if path.name < "0007":
            shutil.copy(path.path, tmp_path / path.name)
    conn = db.connect(empty_database_url)
    try:
        migrations.migrate(conn, tmp_path)
        # Today's code needs 0008's function: the rows that release wrote, written by hand.
        track(conn, "train_old")
        with conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO webhook_sync.training_transitions (training_id, source, outcome,"
                " from_replicate_status, to_replicate_status, from_training_status,"
                " to_training_status) VALUES ('train_old', 'poll', 'applied', NULL,"
                " 'processing', 'training', 'training')"
            )
        migrations.migrate(conn)
        track(conn, "train_new")
        apply(conn, "train_new", "processing")
        read = settled(conn, 2)
    finally:
        conn.close()

    assert [(c["position"].split(":")[0], c["training_id"]) for c in read] == [
        ("0", "train_old"),
        (read[1]["position"].split(":")[0], "train_new"),
    ]
    assert changes.position_of(read[1]).xact_id > 0


# --- the NOTIFY ------------------------------------------------------------------------------


def heard(listener: db.Connection, count: int) -> list[Any]:
    """The notifications received so far, once there are `count` of them."""
    if select.select([listener], [], [], 0.05)[0]:
        listener.poll()
    return listener.notifies if len(listener.notifies) >= count else []


def test_the_notify_carries_the_user_id_and_the_feeds_position(
    database_url: str, conn: db.Connection
) -> None:
    """Each status change's NOTIFY names the user and the position the feed gives that
    change; a user id longer than 200 characters is sent as null, never cut."""
    long_user = "u" * 201
    track(conn, "train_a")
    track(conn, "train_b", long_user)
    listener = db.connect(database_url)
    listener.autocommit = True
    listener.cursor().execute("LISTEN training_status")
    apply(conn, "train_a", "processing")
    apply(conn, "train_b", "processing")
    notes = wait_until(lambda: heard(listener, 2), message="two NOTIFYs")
    listener.close()
    payloads = [json.loads(note.payload) for note in notes]
    read = settled(conn, 2)

    assert payloads[0]["user_id"] == USER
    assert payloads[1]["user_id"] is None
    assert [p["position"] for p in payloads] == [c["position"] for c in read]
    assert read[1]["user_id"] == long_user
    assert max(len(note.payload.encode()) for note in notes) < 8000


# --- the command ---------------------------------------------------------------------------


def test_changes_prints_a_line_per_change_and_json_lines(
    database_url: str, conn: db.Connection
) -> None:
    """`changes` prints one line per change (position, training, user, statuses, source);
    --json one object per line; --after a position resumes after it; nothing new is a
    quiet success."""
    track(conn, "train_a")
    apply(conn, "train_a", "processing")
    apply(conn, "train_a", "succeeded")
    settled(conn, 2)  # from here on every reader sees both: a snapshot's xmin only grows

    text = cli(database_url, "changes")
    as_json = cli(database_url, "changes", "--after", "start", "--json")
    rows = json_lines(as_json.stdout)
    resumed = cli(database_url, "changes", "--after", rows[0]["position"], "--json")
    at_end = cli(database_url, "changes", "--after", rows[-1]["position"])

    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert len(lines) == 2
    assert re.match(
        rf"{rows[1]['position']}  train_a  user {USER}  replicate processing -> succeeded"
        r"  app training -> completed  webhook  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d$",
        lines[1],
    )
    assert [list(row) for row in rows] == [list(changes.CHANGE_COLUMNS)] * 2
    assert rows[0]["from_replicate_status"] is None
    assert json_lines(resumed.stdout) == rows[1:]
    assert (at_end.returncode, at_end.stdout) == (0, "")


@pytest.mark.parametrize("position", ["abc", "12", "1:2:3"])
def test_changes_refuses_a_malformed_position(database_url: str, position: str) -> None:
    """A malformed --after is a usage error (exit 2) naming the expected form."""
    result = cli(database_url, "changes", "--after", position)

    assert result.returncode == 2
    assert "expected a position such as 1234:56" in result.stderr
    assert result.stdout == ""


def test_follow_gives_back_the_signal_handlers_it_took(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While `changes --follow` runs, SIGTERM (and SIGINT) ask it to stop; afterwards the
    process's handlers and signal wake-up fd are as they were before it."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    signums = (signal.SIGINT, signal.SIGTERM)
    before = {signum: signal.getsignal(signum) for signum in signums}
    stopped = []

    def one_signal(*args: Any, **options: Any) -> Any:
        stop = args[2]
        signal.raise_signal(signal.SIGTERM)
        stopped.append(stop.is_set())
        return iter([])

    monkeypatch.setattr(changes, "follow_changes", one_signal)
    feed_cli._follow(base.Context(verbose=False), BEGINNING, as_json=True)

    assert stopped == [True]
    assert {signum: signal.getsignal(signum) for signum in signums} == before
    assert signal.set_wakeup_fd(-1) == -1


class Follower:
    """`webhook-sync changes --follow --json` as a real process; its stdout (decoded) and
    stderr lines are gathered on threads of their own."""

    def __init__(self, database_url: str) -> None:
        self.process = subprocess.Popen(
            [str(VENV_BIN / "webhook-sync"), "changes", "--follow", "--json"],
            env={"PATH": "/usr/bin:/bin", "DATABASE_URL": database_url, "LOG_FORMAT": "kv"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.printed: list[dict[str, Any]] = []
        self.logged: list[str] = []
        self._out: queue.Queue[str] = queue.Queue()
        self._err: queue.Queue[str] = queue.Queue()
        self._readers = [
            threading.Thread(target=_read_lines, args=(stream, lines), daemon=True)
            for stream, lines in (
                (self.process.stdout, self._out),
                (self.process.stderr, self._err),
            )
        ]
        for reader in self._readers:
            reader.start()

    def printed_at_least(self, count: int) -> list[dict[str, Any]]:
        """The changes printed so far, once there are `count` of them."""
        while not self._out.empty():
            self.printed.append(json.loads(self._out.get()))
        return self.printed if len(self.printed) >= count else []

    def logged_with(self, text: str) -> list[str]:
        """The stderr lines so far that hold `text`."""
        while not self._err.empty():
            self.logged.append(self._err.get())
        return [line for line in self.logged if text in line]

    def stderr(self) -> str:
        """Everything written on stderr so far."""
        self.logged_with("")
        return "".join(self.logged)

    def close(self) -> None:
        """Kill the process if it still runs; close its pipes once read to their end."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        self.process.stdout.close()
        self.process.stderr.close()


def _read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    """Put each line of `stream` on `lines` until it ends."""
    for line in stream:
        lines.put(line)


def terminate_follower_sessions(conn: db.Connection) -> int:
    """End the follower's server sessions in this test's database, as a restart, a failover
    or an idle-session killer would; how many there were."""
    with conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'webhook-sync changes%'"
        )
        return cur.fetchone()[0]


def allow_connections(admin_url: str, name: str, *, allowed: bool) -> None:
    """Let new sessions into the database `name`, or refuse them (those open stay); from
    another database, as PostgreSQL refuses it from the database itself."""
    admin_execute(admin_url, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {allowed}')


def test_a_follower_waits_twice_as_long_after_each_failed_attempt_up_to_30_s() -> None:
    """Reconnecting waits 1 s, then twice as long after each failure, never over 30 s;
    once a session works, the next loss waits 1 s again."""
    backoff = changes._Backoff()
    delays = [backoff.next_delay() for _ in range(7)]
    backoff.reset()

    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.next_delay() == 1.0


def test_follow_changes_starts_over_from_1_s_after_a_session_that_read(
    database_url: str, conn: db.Connection
) -> None:
    """A follower that lost its connections, got them back and read the feed waits 1 s
    again when it loses them a second time; it yields each change once."""
    track(conn, "train_a")
    track(conn, "train_b")
    apply(conn, "train_a", "processing")
    stop = threading.Event()
    lost: list[float] = []
    yielded: list[dict[str, Any]] = []

    def connect() -> tuple[db.Connection, db.Connection]:
        """A reader and a listener as the command opens them, named for the kill below."""
        reader = db.connect(database_url, "webhook-sync changes (test)")
        listener = db.connect(database_url, "webhook-sync changes --follow (test)")
        reader.autocommit = listener.autocommit = True
        return reader, listener

    def follow() -> None:
        """Gather what the follower yields until `stop`."""
        rows = changes.follow_changes(
            connect, BEGINNING, stop, poll_seconds=0.05, on_lost=lambda _e, d, _p: lost.append(d)
        )
        yielded.extend(rows)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        wait_until(lambda: yielded, timeout=30, message="the change before")
        # A change yielded after a loss was read on the new session: that session worked.
        for losses, (training_id, status) in enumerate(
            [("train_a", "succeeded"), ("train_b", "processing")], start=1
        ):
            terminate_follower_sessions(conn)
            wait_until(lambda n=losses: len(lost) == n, message=f"loss {losses}")
            apply(conn, training_id, status)
            wait_until(lambda n=losses: len(yielded) > n, timeout=30, message="a change after")
    finally:
        stop.set()
        follower.join(timeout=10)

    assert not follower.is_alive()
    assert lost == [1.0, 1.0]
    assert [row["position"] for row in yielded] == [c["position"] for c in settled(conn, 3)]


def test_a_feed_read_that_times_out_is_raised_not_retried(
    database_url: str, conn: db.Connection
) -> None:
    """A read the server cancels (statement_timeout behind a lock) on a live connection is
    an error for the operator: raised at once, never taken for a lost connection."""
    stop = threading.Event()
    lost: list[str] = []

    def connect() -> tuple[db.Connection, db.Connection]:
        """A reader and a listener whose statements give up after 200 ms."""
        reader = db.connect(database_url, "webhook-sync changes (test)", 200)
        listener = db.connect(database_url, "webhook-sync changes --follow (test)", 200)
        reader.autocommit = listener.autocommit = True
        return reader, listener

    with conn, conn.cursor() as cur:
        cur.execute("LOCK TABLE webhook_sync.training_transitions IN ACCESS EXCLUSIVE MODE")
        rows = changes.follow_changes(
            connect, BEGINNING, stop, poll_seconds=0.05, on_lost=lambda e, _d, _p: lost.append(e)
        )
        with pytest.raises(psycopg2.errors.QueryCanceled):
            next(rows)

    assert lost == []


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_follow_prints_a_change_made_after_it_started_and_stops_on_a_signal(
    database_url: str, conn: db.Connection, stop_signal: signal.Signals
) -> None:
    """`changes --follow --json` as a real process prints what was there, then a change
    made while it runs; SIGTERM or Ctrl-C (SIGINT) ends it with exit 0."""
    track(conn, "train_a")
    apply(conn, "train_a", "processing")
    follower = Follower(database_url)
    try:
        wait_until(lambda: follower.printed_at_least(1), timeout=30, message="the change before")
        apply(conn, "train_a", "succeeded")
        wait_until(lambda: follower.printed_at_least(2), timeout=30, message="the change after")
        follower.process.send_signal(stop_signal)
        code = follower.process.wait(timeout=30)
    finally:
        follower.close()

    assert code == 0, follower.stderr()
    assert [row["to_replicate_status"] for row in follower.printed] == ["processing", "succeeded"]
    assert [row["position"] for row in follower.printed] == [
        c["position"] for c in settled(conn, 2)
    ]


@pytest.mark.slow
def test_follow_reconnects_after_its_sessions_are_killed_and_prints_each_change_once(
    database_url: str, conn: db.Connection
) -> None:
    """Both sessions of a running `changes --follow` killed on the server: it logs one
    redacted line, reconnects, LISTENs again and goes on after the last change it printed
    (the change made while it was cut off comes once, nothing printed before comes again);
    SIGTERM still ends it with exit 0."""
    track(conn, "train_a")
    track(conn, "train_b")
    apply(conn, "train_a", "processing")
    follower = Follower(database_url)
    try:
        wait_until(lambda: follower.printed_at_least(1), timeout=30, message="the change before")
        terminated = terminate_follower_sessions(conn)
        apply(conn, "train_a", "succeeded")
        wait_until(lambda: follower.printed_at_least(2), timeout=30, message="the change after")
        # A duplicate would come right after the change it repeats: before this one.
        apply(conn, "train_b", "processing")
        wait_until(lambda: follower.printed_at_least(3), timeout=30, message="one more change")
        follower.process.send_signal(signal.SIGTERM)
        code = follower.process.wait(timeout=30)
    finally:
        follower.close()
    read = settled(conn, 3)
    retries = follower.logged_with("changes_follow_reconnecting")

    assert code == 0, follower.stderr()
    assert terminated == 2
    assert [row["position"] for row in follower.printed] == [c["position"] for c in read]
    assert len(retries) == 1, follower.stderr()
    assert "retry_in=1.0" in retries[0]
    assert f"after={read[0]['position']}" in retries[0]
    assert 'error="OperationalError: ' in retries[0]
    assert database_url not in follower.stderr()


@pytest.mark.slow
def test_follow_stops_at_once_on_sigterm_while_waiting_to_reconnect(
    pg_admin_url: str, database_url: str, conn: db.Connection
) -> None:
    """A follower cut off from a database that refuses connections keeps retrying, each
    attempt a warning line naming the cause (redacted), twice as long apart; SIGTERM
    during the wait ends it at once with exit 0."""
    track(conn, "train_a")
    apply(conn, "train_a", "processing")
    name = database_name(database_url)
    follower = Follower(database_url)
    try:
        wait_until(lambda: follower.printed_at_least(1), timeout=30, message="the change before")
        allow_connections(pg_admin_url, name, allowed=False)
        terminate_follower_sessions(conn)
        # The first attempt (after 1 s) is refused; the next waits 2 s.
        wait_until(lambda: follower.logged_with("retry_in=2.0"), timeout=30, message="a retry")
        signalled = time.monotonic()
        follower.process.send_signal(signal.SIGTERM)
        code = follower.process.wait(timeout=30)
        stopped_in = time.monotonic() - signalled
    finally:
        allow_connections(pg_admin_url, name, allowed=True)
        follower.close()
    refused = follower.logged_with("retry_in=2.0")[0]

    assert code == 0, follower.stderr()
    assert stopped_in < 1.0
    assert "DatabaseUnavailableError: cannot connect to the database" in refused
    assert "not currently accepting connections" in refused
    assert name not in refused
    assert not follower.logged_with("retry_in=4.0")


def test_follow_exits_1_when_the_database_cannot_be_reached_at_the_start(
    database_url: str,
) -> None:
    """The very first connection is not retried: a database that cannot be reached when
    `changes --follow` starts is an error, one line, exit 1."""
    missing = database_url_for(database_url, "wst_no_such_database")

    result = cli(missing, "changes", "--follow")

    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot connect to the database")
    assert "wst_no_such_database" not in result.stderr
    assert result.stdout == ""


@pytest.mark.slow
def test_follow_exits_1_on_an_error_that_is_not_a_lost_connection(
    database_url: str, conn: db.Connection
) -> None:
    """Only a lost connection is retried: a follower whose feed's table goes away (the
    schema no longer migrated) stops with the one-line cause and exit 1."""
    track(conn, "train_a")
    apply(conn, "train_a", "processing")
    follower = Follower(database_url)
    try:
        wait_until(lambda: follower.printed_at_least(1), timeout=30, message="the change before")
        with conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE webhook_sync.training_transitions RENAME TO moved_away")
        code = follower.process.wait(timeout=30)
    finally:
        follower.close()

    assert code == 1
    assert "error: the database is not migrated" in follower.stderr()
    assert not follower.logged_with("changes_follow_reconnecting")


# --- retention -------------------------------------------------------------------------------


@pytest.fixture()
def aged_transitions(conn: db.Connection) -> None:
    """Four transitions of train_a, recorded 120, 100, 20 days and a minute ago."""
    track(conn, "train_a")
    for status in ("starting", "processing", "succeeded", "failed"):
        apply(conn, "train_a", status)
    with conn, conn.cursor() as cur:
        cur.execute(
            "UPDATE webhook_sync.training_transitions SET created_at = now() - age"
            " FROM (SELECT id, (ARRAY[interval '120 days', interval '100 days',"
            "  interval '20 days', interval '1 minute'])[row_number() OVER (ORDER BY id)] AS age"
            "  FROM webhook_sync.training_transitions) AS aged"
            " WHERE aged.id = training_transitions.id"
        )


def transition_count(conn: db.Connection) -> int:
    """How many transitions are kept."""
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM webhook_sync.training_transitions")
        return cur.fetchone()[0]


def test_prune_transitions_works_in_batches(conn: db.Connection, aged_transitions: None) -> None:
    """Transitions older than the retention go, across several small batches."""
    deleted = operations.prune_transitions(conn, operations.parse_duration("10d"), batch_size=2)

    assert deleted == 3
    assert transition_count(conn) == 1


def test_prune_takes_transitions_past_their_retention(
    database_url: str, conn: db.Connection, aged_transitions: None
) -> None:
    """`prune` deletes transitions past TRANSITION_RETENTION_DAYS (90 by default), and
    --transitions-older-than says otherwise; --dry-run only counts."""
    by_default = cli(database_url, "prune", "--json")
    dry = cli(database_url, "prune", "--transitions-older-than", "10d", "--dry-run")
    kept = transition_count(conn)
    flag = cli(database_url, "prune", "--transitions-older-than", "10d")

    assert by_default.returncode == 0, by_default.stderr
    assert json.loads(by_default.stdout) == {
        "deleted": 0,
        "matched": 0,
        "older_than": "30d",
        "transitions_deleted": 2,
        "transitions_matched": 2,
        "transitions_older_than": "90d",
        "dry_run": False,
    }
    assert dry.stdout.splitlines()[1] == "would delete 1 transition(s) recorded more than 10d ago"
    assert kept == 2
    assert flag.stdout.splitlines()[1] == "deleted 1 transition(s) recorded more than 10d ago"
    assert transition_count(conn) == 1


def test_a_reader_behind_the_retention_is_warned(
    database_url: str, conn: db.Connection, aged_transitions: None
) -> None:
    """Reading after a change that prune deleted still prints what is kept, and warns on
    stderr that changes may be lost and to resync; a kept position gives no warning."""
    first, *rest = settled(conn, 3)
    cli(database_url, "prune", "--transitions-older-than", "110d")

    behind = cli(database_url, "changes", "--after", first["position"], "--json")
    current = cli(database_url, "changes", "--after", rest[0]["position"], "--json")

    assert behind.returncode == 0, behind.stderr
    assert [row["position"] for row in json_lines(behind.stdout)] == [
        row["position"] for row in rest
    ]
    assert f"warning: the change at {first['position']} is no longer kept" in behind.stderr
    assert "resync from the trainings table" in behind.stderr
    assert "warning" not in current.stderr


def test_a_position_is_kept_only_with_its_own_transaction_id(conn: db.Connection) -> None:
    """A saved position whose transition id exists under another transaction id (another
    install's position, a mistyped one) is not taken for kept."""
    track(conn, "train_a")
    apply(conn, "train_a", "processing")
    [change] = settled(conn, 1)
    position = changes.position_of(change)
    elsewhere = Position(position.xact_id + 1, position.transition_id)

    assert changes.is_kept(conn, position)
    assert not changes.is_kept(conn, elsewhere)


def test_the_worker_prunes_transitions_past_the_setting(
    database_url: str, conn: db.Connection, aged_transitions: None
) -> None:
    """The worker's daily job deletes transitions older than TRANSITION_RETENTION_DAYS."""
    config = Config(database_url=database_url, api_token="r8_unused", transition_retention_days=50)

    worker.Worker(config).prune_once()

    assert transition_count(conn) == 2


def test_the_worker_prunes_transitions_when_the_inbox_prune_fails(
    database_url: str, conn: db.Connection, aged_transitions: None, caplog: pytest.LogCaptureFixture
) -> None:
    """An inbox prune that fails (here: its table locked past the statement timeout) is
    logged, and the transitions are pruned all the same."""
    config = Config(
        database_url=database_url,
        api_token="r8_unused",
        transition_retention_days=50,
        statement_timeout_ms=200,
    )
    holder = db.connect(database_url)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE webhook_sync.webhook_events IN ACCESS EXCLUSIVE MODE")
        worker.Worker(config).prune_once()
    finally:
        holder.rollback()
        holder.close()
    failures = [r for r in caplog.records if r.getMessage() == "prune_failed"]

    assert [r.fields["rows"] for r in failures] == ["events"]  # type: ignore[attr-defined]
    assert transition_count(conn) == 2


def test_transition_retention_days_is_a_positive_whole_number() -> None:
    """TRANSITION_RETENTION_DAYS defaults to 90, takes a number of days, refuses the rest."""
    assert Config.from_env({}).transition_retention_days == 90
    assert Config.from_env({"TRANSITION_RETENTION_DAYS": "7"}).transition_retention_days == 7
    for bad in ("0", "-3", "ninety", "1.5"):
        with pytest.raises(ConfigError, match="TRANSITION_RETENTION_DAYS"):
            Config.from_env({"TRANSITION_RETENTION_DAYS": bad})
