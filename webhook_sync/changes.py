"""The change feed: every applied status change after a position, in an order that never
skips one, for apps that were not listening (`webhook-sync changes`, docs/changes.md).

A change's position is `<xact_id>:<transition id>`: the id of the transaction that
recorded it (`training_transitions.xact_id`, stamped by the column's default
`pg_current_xact_id()`, see sql/0007) and the transition's own id. The feed returns the
applied transitions after a position in (xact_id, id) order, but only those whose
transaction is older than the reading statement's snapshot xmin:

    xact_id < pg_snapshot_xmin(pg_current_snapshot())

Why that never skips a change. Transaction ids are handed out in increasing order, but
transactions commit in any order: A may take id 100, B id 101, and B commit first. A
reader that took every visible row would return B (101:…), remember that position and
never go back for A's 100:… once A commits. The snapshot's xmin is the oldest
transaction id still running when the statement began: every transaction below it has
ended, committed (its rows are visible to this very statement) or rolled back (its rows
never will be). So the part of the feed below xmin is final: no row can appear there
later. A reader only ever takes rows from that final part, so its position P is below
that read's xmin, and every row that becomes visible afterwards belongs to a
transaction at or above that xmin, so it sorts after P. In the example, while A runs,
xmin is at most 100 and B waits; when A ends, both come, A first. All rows of one
transaction come together (it ended before the read), and a position names the row
within it, so a page that ends inside a transaction resumes exactly. The filter and the
rows must come from one snapshot: one statement, as below (or a REPEATABLE READ
transaction).

What it costs: lag. Any transaction in the cluster that holds a transaction id (one that
wrote something, in any database of the server; a prepared transaction too) holds xmin
at its id while it runs, so changes recorded after it began wait until it ends. A change
usually appears within milliseconds; behind a transaction left open for an hour (an
`idle in transaction` session, a long migration, a forgotten PREPARE TRANSACTION) the
feed waits an hour, then delivers everything in order. `pg_stat_activity.backend_xid`
and `age(backend_xid)` show who holds it; `idle_in_transaction_session_timeout` bounds
it. Read-only transactions hold no transaction id and hold nothing back.

Transitions older than TRANSITION_RETENTION_DAYS are pruned (`operations`): a reader
further behind than that has lost changes and should resync from the `trainings` table
and continue from the feed's current end.
"""

from __future__ import annotations

import os
import re
import select
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from webhook_sync import db, errors, outbox

# How the feed starts from the beginning: `0`, `start` or nothing.
BEGINNING_WORDS = ("", "0", "start")
# A page of the feed; a reader asks again after a full page.
PAGE_SIZE = 1000
# A follower reads again this often even without a NOTIFY: a change announced while an
# older transaction still ran becomes readable when that one ends, which nobody announces.
FOLLOW_POLL_SECONDS = 1.0
# After a lost connection a follower waits this long before connecting again, twice as
# long after each failed attempt, up to the cap (a failover or a restart takes seconds to
# minutes; a follower of a server that stays down should neither spin nor fall asleep).
RECONNECT_FIRST_SECONDS = 1.0
RECONNECT_MAX_SECONDS = 30.0
_POSITION = re.compile(r"([0-9]{1,20}):([0-9]{1,19})")
_MAX_XACT_ID = 2**64 - 1  # xid8 is unsigned 64-bit
_MAX_TRANSITION_ID = 2**63 - 1  # bigserial
# What each change carries, in display order (`changes --json` uses these names).
CHANGE_COLUMNS = (
    "position",
    "training_id",
    "user_id",
    "from_replicate_status",
    "to_replicate_status",
    "from_training_status",
    "to_training_status",
    "source",
    "at",
)


@dataclass(frozen=True, order=True)
class Position:
    """Where a reader of the feed is: after the change recorded by transaction `xact_id`
    as transition `transition_id`."""

    xact_id: int
    transition_id: int

    def __str__(self) -> str:
        return f"{self.xact_id}:{self.transition_id}"


BEGINNING = Position(0, 0)


def parse_position(text: str) -> Position:
    """Read `<xact_id>:<transition id>` (as a change's `position` shows it), or `0`,
    `start` or an empty text for the beginning; ValueError naming the form otherwise."""
    raw = text.strip()
    if raw.lower() in BEGINNING_WORDS:
        return BEGINNING
    match = _POSITION.fullmatch(raw)
    if match:
        xact_id, transition_id = int(match[1]), int(match[2])
        if xact_id <= _MAX_XACT_ID and transition_id <= _MAX_TRANSITION_ID:
            return Position(xact_id, transition_id)
    raise ValueError(
        "expected a position such as 1234:56 (a change's `position`), or 0 for the"
        f" beginning, got {text!r}"
    )


# The feed, as an app can run it itself (docs/changes.md shows it with the schema and
# the literals in place). One statement: the rows and the xmin come from one snapshot.
_SELECT_CHANGES = (
    "SELECT t.xact_id::text || ':' || t.id AS position, t.training_id, tr.user_id,"
    " t.from_replicate_status, t.to_replicate_status, t.from_training_status,"
    " t.to_training_status, t.source, t.created_at AS at"
    " FROM {schema}.training_transitions AS t"
    " LEFT JOIN {schema}.trainings AS tr ON tr.id = t.training_id"
    " WHERE t.outcome = {applied}"
    "  AND (t.xact_id, t.id) > (%(xact_id)s::xid8, %(transition_id)s::bigint)"
    "  AND t.xact_id < pg_snapshot_xmin(pg_current_snapshot())"
    " ORDER BY t.xact_id, t.id LIMIT %(limit)s"
)


def select_changes(conn: db.Connection, after: Position, limit: int = PAGE_SIZE) -> list[db.Row]:
    """Up to `limit` applied changes after `after`, in feed order, from transactions that
    can no longer commit (reads only)."""
    params = {"xact_id": str(after.xact_id), "transition_id": after.transition_id, "limit": limit}
    return db.rows(conn, _SELECT_CHANGES, params)


# Both halves: a transition id alone would also match a position of another install (or
# a mistyped one) whose transaction id is not that row's, and call it kept.
_SELECT_TRANSITION_KEPT = (
    "SELECT EXISTS (SELECT 1 FROM {schema}.training_transitions"
    " WHERE id = %(transition_id)s AND xact_id = %(xact_id)s::xid8)"
)


def is_kept(conn: db.Connection, position: Position) -> bool:
    """Whether the change at `position` is still kept (the beginning always is): when it
    is not, the retention has pruned it, and maybe changes after it that the reader has
    not seen (reads only)."""
    if position == BEGINNING:
        return True
    params = {"transition_id": position.transition_id, "xact_id": str(position.xact_id)}
    return db.scalar(conn, _SELECT_TRANSITION_KEPT, params)


def position_of(change: db.Row) -> Position:
    """The position a change carries (a reader resumes after it)."""
    return parse_position(change["position"])


def read_changes(conn: db.Connection, after: Position) -> Iterator[db.Row]:
    """Every change readable now after `after`, page by page, each page in its own
    short read (the caller's connection in autocommit or not, committed per page)."""
    while True:
        with conn:
            page = select_changes(conn, after)
        yield from page
        if len(page) < PAGE_SIZE:
            return
        after = position_of(page[-1])


def follow_changes(
    connect: Callable[[], tuple[db.Connection, db.Connection]],
    after: Position,
    stop: threading.Event,
    *,
    wake_fd: int | None = None,
    poll_seconds: float = FOLLOW_POLL_SECONDS,
    on_lost: Callable[[Exception, float, Position], None] | None = None,
) -> Iterator[db.Row]:
    """Every change after `after`, then each new one as it becomes readable, until `stop`
    is set, on the reader and the listener `connect()` opens (both autocommit; closed
    here). A lost connection is not the end: after `on_lost(error, delay, position)` and
    `delay` seconds (RECONNECT_FIRST_SECONDS, doubling to RECONNECT_MAX_SECONDS while
    reconnecting fails, back to the first once a session has read the feed), it connects
    again, LISTENs again and resumes after the last change yielded, so nothing is skipped
    or yielded twice. The first `connect()` is not retried: its error is raised, the follow
    has not begun. Any other error is raised too."""
    backoff = _Backoff()
    session = connect()
    while True:
        try:
            with closing(
                _follow_session(*session, after, stop, wake_fd, poll_seconds, backoff)
            ) as rows:
                for change in rows:
                    yield change
                    after = position_of(change)
            return
        except db.TIMEOUT_ERRORS:
            # The server gave up on the feed's read (statement_timeout, a lock): the
            # connection is alive and the same read would time out again. An operator's
            # error to see, not a loss to retry forever.
            raise
        except db.CONNECTION_LOST_ERRORS as exc:
            lost = _first_loss(exc)
        session = _reconnect(connect, lost, after, stop, backoff, on_lost)
        if session is None:
            return


def _first_loss(exc: Exception) -> Exception:
    """The error that lost the connection, not a later one it caused: `with conn:` rolls
    back on its way out, and that raises "connection already closed" over the cause."""
    while isinstance(exc.__context__, db.CONNECTION_LOST_ERRORS):
        exc = exc.__context__
    return exc


@dataclass
class _Backoff:
    """How long a follower waits before its next attempt to reconnect."""

    upcoming: float = RECONNECT_FIRST_SECONDS

    def next_delay(self) -> float:
        """The wait before this attempt; the next one waits twice as long, up to the cap."""
        delay = self.upcoming
        self.upcoming = min(RECONNECT_MAX_SECONDS, delay * 2)
        return delay

    def reset(self) -> None:
        """A session worked: the next loss waits the first delay again."""
        self.upcoming = RECONNECT_FIRST_SECONDS


def _follow_session(
    conn: db.Connection,
    listener: db.Connection,
    after: Position,
    stop: threading.Event,
    wake_fd: int | None,
    poll_seconds: float,
    backoff: _Backoff,
) -> Iterator[db.Row]:
    """One session of `follow_changes` on these two connections (closed at its end):
    LISTEN, then read, yield and wait until `stop`; a lost connection raises."""
    try:
        outbox.listen(listener)
        waited_on: list[Any] = [listener] if wake_fd is None else [listener, wake_fd]
        while True:
            for change in read_changes(conn, after):
                if stop.is_set():
                    return
                yield change
                after = position_of(change)
            backoff.reset()
            if stop.is_set():
                return
            ready = select.select(waited_on, [], [], poll_seconds)[0]
            if listener in ready:
                listener.poll()
                listener.notifies.clear()
            if wake_fd in ready:
                os.read(wake_fd, 4096)  # another signal's wake-up: consumed, or it wakes us forever
    finally:
        conn.close()
        listener.close()


def _reconnect(
    connect: Callable[[], tuple[db.Connection, db.Connection]],
    lost: Exception,
    after: Position,
    stop: threading.Event,
    backoff: _Backoff,
    on_lost: Callable[[Exception, float, Position], None] | None,
) -> tuple[db.Connection, db.Connection] | None:
    """New connections once `lost` ended the last session: wait, try, wait longer while
    the database cannot be reached; None when `stop` is set meanwhile."""
    while True:
        delay = backoff.next_delay()
        if on_lost is not None:
            on_lost(lost, delay, after)
        # Event.wait returns as soon as a signal handler (or another thread) sets `stop`.
        if stop.wait(delay):
            return None
        try:
            return connect()
        except (errors.DatabaseUnavailableError, *db.CONNECTION_LOST_ERRORS) as exc:
            lost = exc


# --- retention -------------------------------------------------------------------------

_COUNT_TRANSITIONS_CREATED_BEFORE = (
    "SELECT count(*) FROM {schema}.training_transitions WHERE created_at < %(cutoff)s"
)


def count_transitions_created_before(conn: db.Connection, cutoff: datetime) -> int:
    """How many transitions (applied or refused) were recorded before `cutoff`."""
    return db.scalar(conn, _COUNT_TRANSITIONS_CREATED_BEFORE, {"cutoff": cutoff})


# A bounded batch keeps each transaction (and its locks and WAL) small.
_DELETE_TRANSITIONS_CREATED_BEFORE = (
    "DELETE FROM {schema}.training_transitions WHERE id IN ("
    " SELECT id FROM {schema}.training_transitions WHERE created_at < %(cutoff)s"
    " ORDER BY created_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
)


def delete_transitions_created_before(conn: db.Connection, cutoff: datetime, limit: int) -> int:
    """Delete up to `limit` transitions recorded before `cutoff`; return how many."""
    return db.execute(conn, _DELETE_TRANSITIONS_CREATED_BEFORE, {"cutoff": cutoff, "limit": limit})
