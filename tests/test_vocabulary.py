"""The vocabulary in the code is the vocabulary in the database: every CHECK constraint,
column default and partial index of our tables, read back from PostgreSQL's catalogs."""

from __future__ import annotations

import re

from webhook_sync import db
from webhook_sync.vocabulary import (
    EVENT_OUTCOMES,
    EVENT_SOURCES,
    TRANSITION_OUTCOMES,
    UNFINISHED_EVENT_OUTCOMES,
    AppStatus,
    EventType,
    NotificationStatus,
    Outcome,
    Source,
)

# Every column whose words the database constrains, and the words the code uses for it.
CONSTRAINED = {
    ("trainings", "training_status"): set(AppStatus),
    ("trainings", "updated_by"): set(Source),
    ("webhook_events", "source"): set(EVENT_SOURCES),
    ("webhook_events", "outcome"): set(EVENT_OUTCOMES),
    ("training_transitions", "source"): set(Source),
    ("training_transitions", "outcome"): set(TRANSITION_OUTCOMES),
    ("notifications", "event_type"): set(EventType),
    ("notifications", "status"): set(NotificationStatus),
}
# Partial indexes and the words their predicate names.
PARTIAL_INDEXES = {
    "trainings_due_idx": {AppStatus.TRAINING},
    "webhook_events_unfinished_idx": set(UNFINISHED_EVENT_OUTCOMES),
    "notifications_due_idx": {NotificationStatus.PENDING},
    "notifications_pending_order_idx": {NotificationStatus.PENDING},
    "training_transitions_feed_idx": {Outcome.APPLIED},
}
_QUOTED = re.compile(r"'((?:[^']|'')*)'::text")


def quoted_words(definition: str) -> set[str]:
    """The text literals of a constraint or index definition, as PostgreSQL prints it."""
    return {word.replace("''", "'") for word in _QUOTED.findall(definition)}


def catalog(conn: db.Connection, query: str) -> list[tuple[str, ...]]:
    """Rows of a catalog query about our schema (`%(schema)s`)."""
    with conn, conn.cursor() as cur:
        cur.execute(query, {"schema": conn.schema})
        return cur.fetchall()


def test_check_constraints_allow_exactly_the_vocabulary(conn: db.Connection) -> None:
    """Each CHECK constraint allows exactly the words the code defines for its column."""
    found = {
        (table, column): quoted_words(text)
        for table, column, text in catalog(
            conn,
            "SELECT c.relname, a.attname, pg_get_constraintdef(con.oid)"
            " FROM pg_constraint AS con"
            " JOIN pg_class AS c ON c.oid = con.conrelid"
            " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
            " JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum = ANY(con.conkey)"
            " WHERE con.contype = 'c' AND n.nspname = %(schema)s",
        )
    }

    assert found == CONSTRAINED


def test_column_defaults_are_words_of_the_vocabulary(conn: db.Connection) -> None:
    """Every default of a constrained column is one of its words."""
    defaults = {
        (table, column): quoted_words(text)
        for table, column, text in catalog(
            conn,
            "SELECT table_name, column_name, column_default FROM information_schema.columns"
            " WHERE table_schema = %(schema)s AND column_default LIKE '''%%'",
        )
    }

    assert set(defaults) == {
        ("trainings", "training_status"),
        ("trainings", "updated_by"),
        ("webhook_events", "source"),
        ("webhook_events", "outcome"),
        ("notifications", "status"),
    }
    for key, words in defaults.items():
        assert len(words) == 1 and words <= CONSTRAINED[key], key


def test_partial_indexes_name_the_vocabulary(conn: db.Connection) -> None:
    """The partial indexes are built on the words the queries that use them pass."""
    found = {
        name: quoted_words(text.split(" WHERE ", 1)[1])
        for name, text in catalog(
            conn,
            "SELECT indexname, indexdef FROM pg_indexes"
            " WHERE schemaname = %(schema)s AND indexdef LIKE '%% WHERE %%'",
        )
    }

    assert found == PARTIAL_INDEXES
