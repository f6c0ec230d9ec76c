"""The platform's bound table (HOST_*) checked against the database, at start and by
`doctor`: the table and every configured column exist, their types take what we write,
and the role may read and write them. Each problem is one line naming its setting.

Reads only: the catalog, and SELECTs that run a value through the status column's type
exactly as the funnel's mirror does (host_sql.typed_status), each in a savepoint, the
whole check rolled back. Nothing of the host's is written and no trigger of theirs runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg2
from psycopg2 import sql

from webhook_sync import db, errors, host_sql
from webhook_sync.config import Config
from webhook_sync.host_binding import HostBinding
from webhook_sync.logs import log_event
from webhook_sync.vocabulary import AppStatus

# PostgreSQL's type categories (pg_type.typcategory) that take what we write: a training
# id and our text fields are strings; now() and our timestamps go into a date/time column
# or, as ISO text, into a string one.
_STRING = "S"
_DATETIME = "D"
_TIMESTAMP_FIELDS = frozenset({"started_at", "completed_at"})

_SELECT_TABLE = (
    "SELECT c.oid, has_schema_privilege(n.oid, 'USAGE')"
    " FROM pg_catalog.pg_class AS c"
    " JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace"
    " WHERE n.nspname = %(schema)s AND c.relname = %(table)s"
    " AND c.relkind IN ('r', 'p', 'v', 'f')"
)
# A domain is judged by its base type's category (one level: a domain over a domain
# is rare enough to be told by the spelling probe instead).
_SELECT_COLUMNS = (
    "SELECT a.attname, format_type(a.atttypid, a.atttypmod),"
    " COALESCE(b.typcategory, t.typcategory),"
    " has_column_privilege(a.attrelid, a.attnum, 'SELECT'),"
    " has_column_privilege(a.attrelid, a.attnum, 'UPDATE')"
    " FROM pg_catalog.pg_attribute AS a"
    " JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid"
    " LEFT JOIN pg_catalog.pg_type AS b ON b.oid = NULLIF(t.typbasetype, 0)"
    " WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped"
)


@dataclass(frozen=True)
class _Column:
    type_name: str
    category: str
    may_select: bool
    may_update: bool


@dataclass(frozen=True)
class _Need:
    """What one configured column must allow."""

    setting: str
    column: str
    select: bool = False
    update: bool = False
    categories: frozenset[str] = frozenset()
    takes: str = ""  # what it must take, for the message


def check_binding(conn: db.Connection, binding: HostBinding) -> list[str]:
    """The binding's problems in this database (empty when it is right), each one line
    naming its setting; reads only, and rolls back what it did."""
    try:
        return _problems(conn, binding)
    finally:
        conn.rollback()


def require_binding(conn: db.Connection, binding: HostBinding) -> None:
    """HostBindingError (one line, every problem) unless the binding is right."""
    problems = check_binding(conn, binding)
    if problems:
        raise errors.HostBindingError("; ".join(problems))


def check_at_start(config: Config, process: str) -> None:
    """Refuse to start a process whose HOST_* binding the database does not take
    (HostBindingError); nothing to do without a binding. A database that cannot be
    reached is not judged here: the process reports that as it runs."""
    binding = config.host_binding
    if binding is None:
        return
    try:
        conn = db.connect(
            config.require_database_url(),
            f"webhook-sync {process} check",
            schema=config.database_schema,
        )
    except errors.DatabaseUnavailableError as exc:
        log_event("host_binding_not_checked", logging.WARNING, process=process, error=str(exc))
        return
    try:
        require_binding(conn, binding)
    except psycopg2.Error as exc:
        log_event(
            "host_binding_not_checked", logging.WARNING, process=process, error=db.first_line(exc)
        )
    finally:
        conn.close()


def _problems(conn: db.Connection, binding: HostBinding) -> list[str]:
    where = binding.qualified_table
    with conn.cursor() as cur:
        cur.execute(_SELECT_TABLE, {"schema": binding.table_schema, "table": binding.table})
        found = cur.fetchone()
        if found is None:
            return [f"HOST_TABLE: {where} does not exist (or is not a table)"]
        oid, may_use_schema = found
        if not may_use_schema:
            return [f"HOST_TABLE: the database role may not use schema {binding.table_schema}"]
        cur.execute(_SELECT_COLUMNS, {"oid": oid})
        columns = {name: _Column(*rest) for name, *rest in cur.fetchall()}
    problems = []
    for need in _needs(binding):
        column = columns.get(need.column)
        if column is None:
            problems.append(f'{need.setting}: {where} has no column "{need.column}"')
            continue
        problems.extend(_column_problems(need, column, where))
    status = columns.get(binding.status_column)
    if status is not None:
        problems.extend(_spelling_problems(conn, binding, status))
    return problems


def _needs(binding: HostBinding) -> list[_Need]:
    needs = [
        _Need(
            "HOST_TRAINING_ID_COLUMN",
            binding.training_id_column,
            select=True,
            categories=frozenset({_STRING}),
            takes="a training id (text)",
        ),
        _Need("HOST_USER_ID_COLUMN", binding.user_id_column, select=True),
        _Need("HOST_STATUS_COLUMN", binding.status_column, select=True, update=True),
    ]
    if binding.updated_at_column:
        needs.append(
            _Need(
                "HOST_UPDATED_AT_COLUMN",
                binding.updated_at_column,
                update=True,
                categories=frozenset({_DATETIME, _STRING}),
                takes="now()",
            )
        )
    for ours, theirs in binding.extra_columns:
        timestamp = ours in _TIMESTAMP_FIELDS
        needs.append(
            _Need(
                "HOST_COLUMNS",
                theirs,
                update=True,
                categories=frozenset({_DATETIME, _STRING} if timestamp else {_STRING}),
                takes=f"{ours} ({'timestamptz' if timestamp else 'text'})",
            )
        )
    return needs


def _column_problems(need: _Need, column: _Column, where: str) -> list[str]:
    named = f'"{need.column}" of {where}'
    problems = []
    if need.categories and column.category not in need.categories:
        problems.append(
            f"{need.setting}: {named} is {column.type_name}, which does not take {need.takes}"
        )
    if need.select and not column.may_select:
        problems.append(f"{need.setting}: the database role may not SELECT {named}")
    if need.update and not column.may_update:
        problems.append(f"{need.setting}: the database role may not UPDATE {named}")
    return problems


def _spelling_problems(conn: db.Connection, binding: HostBinding, status: _Column) -> list[str]:
    """Each of our four statuses, in its spelling, through the status column's type the
    way the mirror writes it; a savepoint keeps one refusal from hiding the next."""
    probe = sql.SQL("SELECT {}").format(
        host_sql.typed_status(binding, sql.SQL("{}::text").format(sql.Placeholder("value")))
    )
    problems = []
    with conn.cursor() as cur:
        for ours in AppStatus:
            theirs = binding.spelling(ours)
            cur.execute("SAVEPOINT host_spelling")
            try:
                cur.execute(probe, {"value": theirs})
            except psycopg2.Error:
                cur.execute("ROLLBACK TO SAVEPOINT host_spelling")
                problems.append(
                    f'HOST_STATUS_VALUES: "{binding.status_column}" of {binding.qualified_table}'
                    f" ({status.type_name}) does not take {theirs!r} (our {ours})"
                )
    return problems
