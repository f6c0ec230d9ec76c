"""The platform's bound table in the funnel (HOST_*): the statement that mirrors a status
change into it, the one list of what any write of ours sets there, and how a refusal of
that table is told from any other failure.

Composed with psycopg2.sql: every name is an Identifier and every spelling a Literal, never
pasted. The mirror is a status-change CTE reading FROM `changed`, so it runs in the same
statement, and the same transaction, as our own row, its transition and the NOTIFY. The
sweep's reconciliation (`host_rows`) writes the same `assignments` from a finished row of
ours, so a host row it corrects reads exactly as if the mirror had written it.
"""

from __future__ import annotations

import psycopg2
import psycopg2.errorcodes
from psycopg2 import sql

from webhook_sync.host_binding import HostBinding

MIRROR_CTE_NAME = "host_mirrored"
# What the funnel's status-change CTEs read FROM (db._RECEIVE_DELIVERY): the changed row.
MIRROR_SOURCE = "changed"
# A report that fills in fields without moving the status (the poll that brings
# `weights_url` after the terminal webhook) refreshes the HOST_COLUMNS alone, from the
# funnel's `refreshed` row.
REFRESH_CTE_NAME = "host_refreshed"
REFRESH_SOURCE = "refreshed"
# What a write to the host's table raises when the table refuses it: an integrity
# constraint (23: CHECK, NOT NULL, foreign key, unique, exclusion, a domain's CHECK), a
# value its column type does not take (22: an enum without the spelling, a varchar too
# short), a trigger's RAISE (P0) or another trigger failure (09, 27), and a permission
# the role lacks on it (42501).
_REFUSAL_CLASSES = frozenset({"22", "23", "P0", "09", "27"})
_REFUSAL_CODES = frozenset({"42501"})


def table(binding: HostBinding) -> sql.Identifier:
    """The bound table, schema-qualified and quoted."""
    return sql.Identifier(binding.table_schema, binding.table)


def spelled_status(binding: HostBinding, source: str) -> sql.Composable:
    """`source.training_status` (our app status) in the host's spelling, typed as the
    status column itself, whatever its type (text, varchar, an enum, a domain).

    The spellings are untyped literals and the CASE's last branch is the column, so
    PostgreSQL resolves the CASE to the column's type and reads each spelling with that
    type's input: an enum takes its own labels, where text would be refused by an enum
    column; a varchar's length and a domain's checks apply when the value is assigned.
    No type name is needed (the settings give none). The ELSE keeps the row's value and is
    never taken: our status is always one of the four."""
    return sql.SQL("CASE {ours} {whens} ELSE {table}.{status} END").format(
        ours=sql.Identifier(source, "training_status"),
        whens=sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}").format(sql.Literal(ours), sql.Literal(theirs))
            for ours, theirs in binding.status_values
        ),
        table=table(binding),
        status=sql.Identifier(binding.status_column),
    )


def assignments(binding: HostBinding, source: str) -> sql.Composable:
    """The SET list of every write to the host's rows, from one row of our trainings
    named `source` (the funnel's `changed`, or the row reconciled): the status column
    (our app status in its spelling), the updated-at column (now()) and the HOST_COLUMNS
    (copied from our refreshed fields). One list, so the mirror and the reconciliation
    (`host_rows`) can never write differently."""
    status = sql.Identifier(binding.status_column)
    written = [sql.SQL("{} = {}").format(status, spelled_status(binding, source))]
    if binding.updated_at_column:
        written.append(sql.SQL("{} = now()").format(sql.Identifier(binding.updated_at_column)))
    written += _copied_fields(binding, source)
    return sql.SQL(", ").join(written)


def _copied_fields(binding: HostBinding, source: str) -> list[sql.Composable]:
    """The HOST_COLUMNS' assignments, each copied from our refreshed field of `source`."""
    return [
        sql.SQL("{} = {}").format(sql.Identifier(theirs), sql.Identifier(source, ours))
        for ours, theirs in binding.extra_columns
    ]


def refresh_body(binding: HostBinding) -> sql.Composable:
    """The UPDATE of the host's rows of a training whose fields a report filled in without
    moving its status: the HOST_COLUMNS and the updated-at column only. The status column
    is left as it is: it was written with the last status change (or is the app's own),
    and nothing about the status happened. Only with HOST_COLUMNS bound."""
    written = _copied_fields(binding, REFRESH_SOURCE)
    if binding.updated_at_column:
        written.append(sql.SQL("{} = now()").format(sql.Identifier(binding.updated_at_column)))
    return _update_rows_of(binding, sql.SQL(", ").join(written), REFRESH_SOURCE)


def mirror_body(binding: HostBinding) -> sql.Composable:
    """The UPDATE of the host's rows whose training id column holds the changed training's
    id, with `assignments`; one row returned per row written, so a host row that does not
    exist shows as a count of 0."""
    return _update_rows_of(binding, assignments(binding, MIRROR_SOURCE), MIRROR_SOURCE)


def _update_rows_of(binding: HostBinding, written: sql.Composable, source: str) -> sql.Composable:
    """The UPDATE, with `written`, of the host's rows whose training id column holds the
    id of the funnel's row `source`: one row returned per row written."""
    return sql.SQL(
        "UPDATE {table} SET {written} FROM {source}"
        " WHERE {table}.{training_id} = {source_id} RETURNING 1"
    ).format(
        table=table(binding),
        written=written,
        source=sql.Identifier(source),
        source_id=sql.Identifier(source, "id"),
        training_id=sql.Identifier(binding.training_id_column),
    )


def is_refusal(exc: psycopg2.Error, our_schema: str) -> bool:
    """Whether the funnel statement of a connection with a binding failed because the
    host's table refused the write.

    Told by the error's SQLSTATE and by where PostgreSQL says it happened, not by its
    text: only the refusal codes above count, and never one whose `diag.schema_name` is
    our schema. That is reliable because our part of the statement cannot raise those
    codes otherwise: PostgreSQL names the table's schema in every constraint violation
    (so ours are excluded, and a bug of ours is not taken for a refusal), our tables have
    no trigger that raises, our role owns them, and our values are parsed and typed
    before they are bound (a value PostgreSQL finds wrong in the statement is the
    spelling, in the host's column type). A trigger's RAISE names no table, which is why
    the table itself cannot be the test. Lost connections and timeouts (class 08, 57)
    are not refusals: they stay `database unavailable`."""
    code = exc.pgcode or ""
    if code[:2] not in _REFUSAL_CLASSES and code not in _REFUSAL_CODES:
        return False
    return getattr(exc.diag, "schema_name", None) != our_schema


def refusal_reason(exc: psycopg2.Error, binding: HostBinding) -> str:
    """A short reason for a refusal: the host table, the condition's name and the
    constraint's, never a value (a row's values, a trigger's message may hold any)."""
    condition = _condition_name(exc.pgcode or "")
    constraint = getattr(exc.diag, "constraint_name", None)
    named = f" (constraint {constraint})" if constraint else ""
    return f"host table {binding.qualified_table} refused the write: {condition}{named}"


def _condition_name(code: str) -> str:
    """PostgreSQL's condition name for a SQLSTATE (`check_violation`), or the code."""
    try:
        return psycopg2.errorcodes.lookup(code).lower()
    except KeyError:
        return code or "unknown"
