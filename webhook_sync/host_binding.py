"""The HOST_* settings: which table of the platform's own we keep true, and how (pure).

A binding names one table (`HOST_TABLE`, `schema.table`; a bare name means `public`), the
columns that hold the training id, the user id and the status, how our four app statuses
are spelled there, and optionally an updated-at column and columns that take some of our
refreshed fields. Identifiers are kept as given and quoted wherever they are used
(`psycopg2.sql.Identifier`), never pasted; names with a dot in them are not supported in
HOST_TABLE (the dot separates schema and table).

A HostBinding is frozen and hashable: the statements of a connection are composed once
per (schema, binding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from webhook_sync.vocabulary import REFRESHED_COLUMNS, AppStatus

# Settings that belong to a binding; any of them without HOST_TABLE is a mistake.
SETTINGS = (
    "HOST_TABLE",
    "HOST_TRAINING_ID_COLUMN",
    "HOST_USER_ID_COLUMN",
    "HOST_STATUS_COLUMN",
    "HOST_STATUS_VALUES",
    "HOST_UPDATED_AT_COLUMN",
    "HOST_COLUMNS",
)
DEFAULT_USER_ID_COLUMN = "user_id"
DEFAULT_STATUS_COLUMN = "training_status"
DEFAULT_STATUS_VALUES = tuple((str(status), str(status)) for status in AppStatus)
# Our fields HOST_COLUMNS may copy: those a status report refreshes.
MIRRORABLE_FIELDS = REFRESHED_COLUMNS
# PostgreSQL truncates longer names silently; a binding must name what it means.
_MAX_IDENTIFIER_BYTES = 63


@dataclass(frozen=True)
class HostBinding:
    """One table of the platform's, kept true by every status change of ours."""

    table_schema: str
    table: str
    training_id_column: str
    user_id_column: str = DEFAULT_USER_ID_COLUMN
    status_column: str = DEFAULT_STATUS_COLUMN
    # (our app status, their spelling) for each of the four, in AppStatus order.
    status_values: tuple[tuple[str, str], ...] = DEFAULT_STATUS_VALUES
    updated_at_column: str | None = None
    # (our refreshed field, their column), in the order given.
    extra_columns: tuple[tuple[str, str], ...] = ()

    @property
    def qualified_table(self) -> str:
        """`schema.table`, for messages (not for SQL: that quotes each part)."""
        return f"{self.table_schema}.{self.table}"

    def spelling(self, app_status: str) -> str:
        """How the host's table spells one of our app statuses."""
        return dict(self.status_values)[app_status]

    @property
    def in_flight_value(self) -> str:
        """The host's spelling of `training`: rows holding it are in flight."""
        return self.spelling(AppStatus.TRAINING)


def parse_host_binding(environ: Mapping[str, str]) -> tuple[HostBinding | None, list[str]]:
    """The binding the HOST_* settings describe (None when HOST_TABLE is not set), and the
    problems found, each naming its setting."""

    def get(name: str) -> str:
        return environ.get(name, "").strip()

    problems: list[str] = []
    if not get("HOST_TABLE"):
        given = [name for name in SETTINGS if get(name)]
        if given:
            problems.append(f"{given[0]}: needs HOST_TABLE (the table it belongs to)")
        return None, problems

    table_schema, table = _parse_table(get("HOST_TABLE"), problems)
    training_id_column = get("HOST_TRAINING_ID_COLUMN")
    if not training_id_column:
        problems.append(
            "HOST_TRAINING_ID_COLUMN: must be set with HOST_TABLE (the column holding"
            " Replicate's training id)"
        )
    columns = {
        "HOST_TRAINING_ID_COLUMN": training_id_column,
        "HOST_USER_ID_COLUMN": get("HOST_USER_ID_COLUMN") or DEFAULT_USER_ID_COLUMN,
        "HOST_STATUS_COLUMN": get("HOST_STATUS_COLUMN") or DEFAULT_STATUS_COLUMN,
        "HOST_UPDATED_AT_COLUMN": get("HOST_UPDATED_AT_COLUMN"),
    }
    for name, column in columns.items():
        if column:
            _check_identifier(name, column, problems)
    status_values = _parse_status_values(get("HOST_STATUS_VALUES"), problems)
    extra_columns = _parse_extra_columns(get("HOST_COLUMNS"), problems)
    named = [c for c in columns.values() if c] + [column for _, column in extra_columns]
    repeated = sorted({column for column in named if named.count(column) > 1})
    if repeated:
        problems.append(
            f"HOST_COLUMNS: {', '.join(repeated)} named twice (each host column takes one value)"
        )
    if problems:
        return None, problems
    return HostBinding(
        table_schema=table_schema,
        table=table,
        training_id_column=training_id_column,
        user_id_column=columns["HOST_USER_ID_COLUMN"],
        status_column=columns["HOST_STATUS_COLUMN"],
        status_values=status_values,
        updated_at_column=columns["HOST_UPDATED_AT_COLUMN"] or None,
        extra_columns=extra_columns,
    ), []


def _parse_table(raw: str, problems: list[str]) -> tuple[str, str]:
    parts = raw.split(".")
    if len(parts) == 1:
        parts = ["public", *parts]
    if len(parts) != 2 or not all(parts):
        problems.append("HOST_TABLE: must be table or schema.table (e.g. public.user_models)")
        return "", ""
    for part in parts:
        _check_identifier("HOST_TABLE", part, problems)
    return parts[0], parts[1]


def _check_identifier(setting: str, name: str, problems: list[str]) -> None:
    if "\x00" in name or len(name.encode()) > _MAX_IDENTIFIER_BYTES:
        problems.append(f"{setting}: not a PostgreSQL name (at most 63 bytes, no NUL)")


def _pairs(raw: str, setting: str, problems: list[str]) -> list[tuple[str, str]]:
    """`a=b,c=d` as [(a, b), (c, d)], each side stripped and non-empty."""
    pairs = []
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            problems.append(f"{setting}: expected ours=theirs pairs separated by commas")
            return []
        pairs.append((key, value))
    return pairs


def _parse_status_values(raw: str, problems: list[str]) -> tuple[tuple[str, str], ...]:
    """The four spellings: the defaults, overridden by the pairs given."""
    spelled = dict(DEFAULT_STATUS_VALUES)
    for ours, theirs in _pairs(raw, "HOST_STATUS_VALUES", problems) if raw else []:
        if ours not in spelled:
            problems.append(
                f"HOST_STATUS_VALUES: {ours!r} is not one of ours"
                f" ({', '.join(status for status, _ in DEFAULT_STATUS_VALUES)})"
            )
            continue
        spelled[ours] = theirs
    if len(set(spelled.values())) < len(spelled):
        problems.append("HOST_STATUS_VALUES: two of our statuses spelled the same way")
    return tuple(spelled.items())


def _parse_extra_columns(raw: str, problems: list[str]) -> tuple[tuple[str, str], ...]:
    extra = []
    for ours, theirs in _pairs(raw, "HOST_COLUMNS", problems) if raw else []:
        if ours not in MIRRORABLE_FIELDS:
            problems.append(
                f"HOST_COLUMNS: {ours!r} is not a field we refresh ({', '.join(MIRRORABLE_FIELDS)})"
            )
            continue
        _check_identifier("HOST_COLUMNS", theirs, problems)
        extra.append((ours, theirs))
    return tuple(extra)
