"""The platform's bound table in the funnel (HOST_*): the statement that mirrors a status
change into it, and how a refusal of that table is told from any other failure.

Composed with psycopg2.sql: every name is an Identifier and every spelling a Literal, never
pasted. The mirror is a status-change CTE reading FROM `changed`, so it runs in the same
statement, and the same transaction, as our own row, its transition and the NOTIFY.
"""

from __future__ import annotations

import psycopg2
import psycopg2.errorcodes
from psycopg2 import sql

from webhook_sync.host_binding import HostBinding

MIRROR_CTE_NAME = "host_mirrored"
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


def typed_status(binding: HostBinding, value: sql.Composable) -> sql.Composable:
    """`value` (text) as the status column's own type, whatever that is (text, varchar,
    an enum, a domain): passed through the table's row type by json_populate_record,
    which runs the type's input function with the column's modifier, domain checks
    included. A plain assignment would refuse text into an enum column, and a cast needs
    the type's name, which the settings do not give."""
    return sql.SQL(
        "(json_populate_record(NULL::{table}, json_build_object({name}, {value}))).{column}"
    ).format(
        table=table(binding),
        name=sql.Literal(binding.status_column),
        value=value,
        column=sql.Identifier(binding.status_column),
    )


def mirror_body(binding: HostBinding) -> sql.Composable:
    """The UPDATE of the host's rows whose training id column holds the changed training's
    id: the status column (our app status in its spelling), the updated-at column (now())
    and the HOST_COLUMNS (copied from our refreshed fields); one row returned per row
    written, so a host row that does not exist shows as a count of 0."""
    spelled = sql.SQL("CASE changed.training_status {whens} END").format(
        whens=sql.SQL(" ").join(
            sql.SQL("WHEN {} THEN {}").format(sql.Literal(ours), sql.Literal(theirs))
            for ours, theirs in binding.status_values
        )
    )
    assignments = [
        sql.SQL("{} = {}").format(
            sql.Identifier(binding.status_column), typed_status(binding, spelled)
        )
    ]
    if binding.updated_at_column:
        assignments.append(sql.SQL("{} = now()").format(sql.Identifier(binding.updated_at_column)))
    assignments += [
        sql.SQL("{} = changed.{}").format(sql.Identifier(theirs), sql.Identifier(ours))
        for ours, theirs in binding.extra_columns
    ]
    return sql.SQL(
        "UPDATE {table} SET {assignments} FROM changed"
        " WHERE {table}.{training_id} = changed.id RETURNING 1"
    ).format(
        table=table(binding),
        assignments=sql.SQL(", ").join(assignments),
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
