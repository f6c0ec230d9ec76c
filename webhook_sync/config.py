"""Every setting, read from the environment and validated at once (pure: takes a mapping)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from webhook_sync import errors, signing
from webhook_sync.host_binding import HostBinding, parse_host_binding
from webhook_sync.vocabulary import EventType

DEFAULT_API_BASE_URL = "https://api.replicate.com/v1"
DEFAULT_DATABASE_SCHEMA = "webhook_sync"
# A plain identifier: nothing to quote wherever people type it (psql, LISTEN, their own
# SQL). At most 47 characters, so that the NOTIFY channel `<schema>_training_status` fits
# in PostgreSQL's 63-byte names.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,46}")
# Schemas that are not ours to fill: the host's default one and PostgreSQL's own.
_FOREIGN_SCHEMAS = re.compile(r"public|information_schema|pg_.*")
MIB = 1024 * 1024
# The events a notification can carry, in NOTIFY_EVENTS's words and order.
NOTIFY_EVENT_TYPES = tuple(str(event) for event in EventType)
MIN_NOTIFY_LEASE_SECONDS = 15
_AGE = re.compile(r"([0-9]+)\s*([smhd]?)")
_AGE_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Config:
    """The validated settings; secrets are kept out of repr() so they never reach a log."""

    database_url: str | None = field(default=None, repr=False)
    database_schema: str = DEFAULT_DATABASE_SCHEMA
    port: int = 8000
    web_concurrency: int = 2
    db_pool_max: int = 4
    webhook_secrets: tuple[str, ...] = field(default=(), repr=False)
    api_token: str | None = field(default=None, repr=False)
    api_base_url: str = DEFAULT_API_BASE_URL
    max_rps: float = 40.0
    max_webhook_bytes: int = 32 * MIB
    poll_interval_seconds: int = 120
    poll_concurrency: int = 8
    poll_lease_seconds: int = 90
    stuck_after_seconds: int = 6 * 3600
    event_retention_days: int = 30
    # The change feed's history (training_transitions), pruned with the inbox.
    transition_retention_days: int = 90
    statement_timeout_ms: int = 10_000
    log_level: str = "INFO"
    log_format: str = "kv"
    worker_metrics_port: int | None = None
    # An optional bearer token that /metrics then requires.
    metrics_token: str | None = field(default=None, repr=False)
    # Registration (issue 14): who a training belongs to, discovery, the HTTP API.
    public_webhook_url: str | None = None
    adopt_destination_pattern: re.Pattern[str] | None = None
    discovery_window_seconds: int = 3600
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    # Notifications to the platform's app (the outbox, issue 15).
    # An endpoint's URL may carry a credential (a token in its path or query).
    notify_urls: tuple[str, ...] = field(default=(), repr=False)
    notify_secrets: tuple[str, ...] = field(default=(), repr=False)
    notify_events: tuple[str, ...] = NOTIFY_EVENT_TYPES
    notify_max_age_seconds: int = 3 * 86400
    notify_concurrency: int = 8
    notify_lease_seconds: int = 60
    notify_max_retry_seconds: int = 3600
    # The platform's own table kept true (HOST_*, issue 13); None when HOST_TABLE is unset.
    host_binding: HostBinding | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        """Build a Config from environment variables; raise ConfigError naming every problem."""
        problems: list[str] = []
        values: dict[str, Any] = {}

        def read(name: str, attr: str, parse: Callable[[str], Any]) -> None:
            raw = environ.get(name, "").strip()
            if not raw:
                return
            try:
                values[attr] = parse(raw)
            except ValueError as exc:
                problems.append(f"{name}: {exc}")

        read("DATABASE_URL", "database_url", parse_database_url)
        read("DATABASE_SCHEMA", "database_schema", parse_schema_name)
        read("PORT", "port", positive_int)
        read("WEB_CONCURRENCY", "web_concurrency", positive_int)
        read("DB_POOL_MAX", "db_pool_max", positive_int)
        read("REPLICATE_WEBHOOK_SECRET", "webhook_secrets", parse_secrets)
        read("REPLICATE_API_TOKEN", "api_token", str)
        read("REPLICATE_API_BASE_URL", "api_base_url", parse_api_base_url)
        read("REPLICATE_MAX_RPS", "max_rps", positive_float)
        read("MAX_WEBHOOK_BYTES", "max_webhook_bytes", positive_int)
        read("POLL_INTERVAL_SECONDS", "poll_interval_seconds", positive_int)
        read("POLL_CONCURRENCY", "poll_concurrency", positive_int)
        read("POLL_LEASE_SECONDS", "poll_lease_seconds", positive_int)
        read("STUCK_AFTER_SECONDS", "stuck_after_seconds", positive_int)
        read("EVENT_RETENTION_DAYS", "event_retention_days", positive_int)
        read("TRANSITION_RETENTION_DAYS", "transition_retention_days", positive_int)
        read("DB_STATEMENT_TIMEOUT_MS", "statement_timeout_ms", positive_int)
        read("LOG_LEVEL", "log_level", parse_log_level)
        read("LOG_FORMAT", "log_format", parse_log_format)
        read("WORKER_METRICS_PORT", "worker_metrics_port", positive_int)
        read("METRICS_TOKEN", "metrics_token", str)
        read("PUBLIC_WEBHOOK_URL", "public_webhook_url", parse_http_url)
        read("ADOPT_DESTINATION_PATTERN", "adopt_destination_pattern", parse_user_pattern)
        read("DISCOVERY_WINDOW_SECONDS", "discovery_window_seconds", positive_int)
        read("API_TOKENS", "api_tokens", parse_api_tokens)
        read("NOTIFY_URLS", "notify_urls", parse_notify_urls)
        read("NOTIFY_SECRET", "notify_secrets", parse_secrets)
        read("NOTIFY_EVENTS", "notify_events", parse_notify_events)
        read("NOTIFY_MAX_AGE", "notify_max_age_seconds", parse_age)
        read("NOTIFY_CONCURRENCY", "notify_concurrency", positive_int)
        read("NOTIFY_LEASE_SECONDS", "notify_lease_seconds", positive_int)
        read("NOTIFY_MAX_RETRY_SECONDS", "notify_max_retry_seconds", positive_int)
        if values.get("notify_lease_seconds", 60) < MIN_NOTIFY_LEASE_SECONDS:
            problems.append(
                f"NOTIFY_LEASE_SECONDS: must be at least {MIN_NOTIFY_LEASE_SECONDS}, longer than"
                " one attempt (3 s to connect, 10 s to read)"
            )
        if values.get("notify_urls") and not values.get("notify_secrets"):
            problems.append("NOTIFY_SECRET: must be set when NOTIFY_URLS is (whsec_...)")
        # A binding wrong by itself stops a process as one the database refuses does.
        binding_only = not problems
        host_binding, host_problems = parse_host_binding(environ)
        our_schema = values.get("database_schema", DEFAULT_DATABASE_SCHEMA)
        if host_binding is not None and host_binding.table_schema == our_schema:
            # Our schema holds our tables only, and a refusal is told from a bug of ours by
            # the schema PostgreSQL names (host_sql.is_refusal): a table there would be both.
            host_problems = [f"HOST_TABLE: must not be in DATABASE_SCHEMA ({our_schema}, ours)"]
            host_binding = None
        problems.extend(host_problems)
        if host_binding is not None:
            values["host_binding"] = host_binding
        if problems:
            message = "invalid configuration: " + "; ".join(problems)
            if binding_only:
                raise errors.HostBindingError(message)
            raise errors.ConfigError(message)
        return cls(**values)

    def require_database_url(self) -> str:
        """Return DATABASE_URL or raise ConfigError saying it must be set."""
        if not self.database_url:
            raise errors.ConfigError("DATABASE_URL is not set (postgresql://user:pass@host/db)")
        return self.database_url

    def require_api_token(self) -> str:
        """Return REPLICATE_API_TOKEN or raise ConfigError saying it must be set."""
        if not self.api_token:
            raise errors.ConfigError("REPLICATE_API_TOKEN is not set")
        return self.api_token


def positive_int(raw: str) -> int:
    """Parse a whole number greater than zero."""
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"expected a whole number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"must be greater than 0, got {value}")
    return value


def positive_float(raw: str) -> float:
    """Parse a number greater than zero."""
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"must be greater than 0, got {raw}")
    return value


def parse_database_url(raw: str) -> str:
    """Accept a postgres:// or postgresql:// URL whose user and password have every
    character a URL reserves percent-encoded. A raw `@`, `/`, `?` or `%` in a password moves
    the boundaries libpq sees, and libpq then quotes the fragment it chokes on in its error;
    a raw `#` or space before the query is read differently by every other URL reader (a
    fragment, no URL at all). Such a URL is refused here. The value may hold a password:
    no message echoes any of it. (The query may hold spaces: a socket directory's path.)"""
    match = re.match(r"postgres(?:ql)?://", raw)
    if not match:
        raise ValueError("must start with postgres:// or postgresql://")
    rest = raw[match.end() :]
    authority, separator, tail = _split_authority(rest)
    path = tail.partition("?")[0] if separator == "/" else ""
    if re.search(r"[\x00-\x1f\x7f]", raw) or re.search(r"\s", authority + path):
        raise ValueError("holds a space or control character: percent-encode it (%20)")
    if "#" in authority + path:
        raise ValueError("holds a '#': percent-encode it (%23)")
    if re.search(r"%(?![0-9A-Fa-f]{2})|%00", raw):
        raise ValueError("holds a '%' that is not a percent-encoded byte: encode it as %25")
    if authority.count("@") > 1 or "@" in path:
        raise ValueError(
            "has an '@' past the user and password: percent-encode '@' (%40) and '/' (%2F) in them"
        )
    for host in authority.rpartition("@")[2].split(","):
        port = host.rpartition("]")[2] if host.startswith("[") else host
        if ":" in port and not port.rpartition(":")[2].isdigit():
            raise ValueError(
                "has a port that is not a number: percent-encode ':' (%3A), '/' (%2F) and"
                " '?' (%3F) in the user and password"
            )
    return raw


def _split_authority(rest: str) -> tuple[str, str, str]:
    """A URL's part after `scheme://` split into the authority (user, password, hosts) and
    what follows it (path and query), the way libpq splits it: at the first `/` or `?`."""
    match = re.search(r"[/?]", rest)
    if match is None:
        return rest, "", ""
    return rest[: match.start()], match.group(), rest[match.end() :]


def parse_schema_name(raw: str) -> str:
    """Accept a plain lowercase identifier for the schema that holds all our objects."""
    if not _SCHEMA_NAME.fullmatch(raw):
        raise ValueError(
            "must be a plain identifier: lowercase letters, digits and _, not starting with a"
            f" digit, at most 47 characters; got {raw!r}"
        )
    if _FOREIGN_SCHEMAS.fullmatch(raw):
        raise ValueError(f"must be a schema of our own, not {raw!r}")
    return raw


def parse_http_url(raw: str) -> str:
    """Accept an http(s) base URL, without its trailing slash."""
    if not re.match(r"^https?://[^/\s]+", raw):
        raise ValueError(f"must be an http(s) URL, got {raw!r}")
    return raw.rstrip("/")


def parse_api_base_url(raw: str) -> str:
    """Accept an https base URL, or http for a loopback host only (the local simulator):
    every request carries REPLICATE_API_TOKEN, which plain http would send in clear."""
    url = parse_http_url(raw)
    parts = urlsplit(url)
    if parts.scheme.lower() == "http" and not _is_loopback(parts.hostname or ""):
        raise ValueError(
            "plain http:// would send REPLICATE_API_TOKEN in clear to a host that is not this"
            f" machine ({parts.hostname!r}); use https://"
        )
    return url


def _is_loopback(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_secrets(raw: str) -> tuple[str, ...]:
    """Split one or more whsec_ secrets separated by spaces or commas, each decoded strictly
    (`signing.decode_secret`) so that a malformed or short one stops the process at start."""
    secrets = tuple(part for part in re.split(r"[\s,]+", raw) if part)
    for position, secret in enumerate(secrets, start=1):
        try:
            signing.decode_secret(secret)
        except ValueError as exc:
            # The secret itself is never echoed; its position identifies it.
            raise ValueError(f"secret #{position} {exc}") from None
    return secrets


def parse_log_level(raw: str) -> str:
    """Accept a standard logging level name."""
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(f"expected DEBUG, INFO, WARNING or ERROR, got {raw!r}")
    return level


def parse_log_format(raw: str) -> str:
    """Accept kv (key=value lines) or json."""
    fmt = raw.lower()
    if fmt not in {"kv", "json"}:
        raise ValueError(f"expected kv or json, got {raw!r}")
    return fmt


def parse_user_pattern(raw: str) -> re.Pattern[str]:
    """Compile a regular expression with a named group `user` (ADOPT_DESTINATION_PATTERN)."""
    try:
        pattern = re.compile(raw)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
    if "user" not in pattern.groupindex:
        raise ValueError("needs a named group `user`, as in ^[^/]+/(?P<user>\\d+)-")
    return pattern


# Shorter bearer tokens are guessable; the value itself is never echoed.
MIN_API_TOKEN_LENGTH = 16


def parse_api_tokens(raw: str) -> tuple[str, ...]:
    """Split one or more bearer tokens separated by spaces or commas (several: rotation)."""
    tokens = tuple(part for part in re.split(r"[\s,]+", raw) if part)
    for position, token in enumerate(tokens, start=1):
        if len(token) < MIN_API_TOKEN_LENGTH or not token.isascii() or not token.isprintable():
            raise ValueError(
                f"token #{position} must be at least {MIN_API_TOKEN_LENGTH} printable ASCII"
                " characters"
            )
    return tokens


def parse_notify_urls(raw: str) -> tuple[str, ...]:
    """Split one or more endpoint URLs (spaces or commas); each https://, or http:// only
    to a loopback host (a signed notification crosses no network in clear text)."""
    urls = tuple(dict.fromkeys(part for part in re.split(r"[\s,]+", raw) if part))
    # A URL may carry a credential (Config.notify_urls): a message names its position and
    # at most its host, never the rest.
    for position, url in enumerate(urls, start=1):
        match = re.match(r"^(https?)://([^/?#\s:]+|\[[^\]]+\])(:[0-9]+)?([/?#]|$)", url)
        if not match:
            raise ValueError(f"must be http(s) URLs, URL #{position} is not")
        host = match.group(2)
        if match.group(1) == "http" and not _is_loopback(host.strip("[]")):
            raise ValueError(
                f"must use https:// (http:// only for loopback), URL #{position} is http:// to"
                f" {host.rpartition('@')[2]!r}"
            )
    return urls


def parse_notify_events(raw: str) -> tuple[str, ...]:
    """Accept a subset of the event types (spaces or commas), in their canonical order."""
    wanted = {part for part in re.split(r"[\s,]+", raw) if part}
    unknown = sorted(wanted - set(NOTIFY_EVENT_TYPES))
    if unknown:
        raise ValueError(
            f"unknown event type {', '.join(unknown)}; expected {', '.join(NOTIFY_EVENT_TYPES)}"
        )
    if not wanted:
        raise ValueError("names no event type")
    return tuple(event for event in NOTIFY_EVENT_TYPES if event in wanted)


def parse_age(raw: str) -> int:
    """Parse an age such as `3d`, `12h`, `90m`, `45s` or a number of seconds, into seconds."""
    match = _AGE.fullmatch(raw.strip().lower())
    if not match:
        raise ValueError(f"expected an age such as 3d, 12h, 90m or seconds, got {raw!r}")
    seconds = int(match.group(1)) * _AGE_UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"must be longer than zero, got {raw!r}")
    return seconds
