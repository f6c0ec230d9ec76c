"""The one redactor: the text of every database driver error that leaves the process (a
response, a log line, a CLI message or traceback) passes through it first, without the
connection's user, password, host or URL.

libpq quotes what it was given: the host it could not reach, the user it refused, and,
for a URL it cannot parse, whatever fragment it choked on, which may be part of the
password. So the redactor removes what it knows (the URL's parts in every spelling: as
written, percent-decoded and percent-encoded) and, in errors raised before a connection
existed, every quoted value and address, whatever they hold. Pure: no driver import;
errors are read by their attributes.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote

REDACTED = "[redacted]"
_URL = re.compile(r"postgres(?:ql)?://[^\s\"']*", re.IGNORECASE)
# key=value connection strings (`password=…`, `host='…'`) as libpq and psycopg2 print them.
_KEYWORD_VALUE = re.compile(
    r"\b(password|passfile|user|host|hostaddr|dsn)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE
)
_QUOTED = re.compile(r'"[^"\n]*"')
# libpq names an address in parentheses after the host: `"db.example.com" (10.1.2.3)`.
_ADDRESS = re.compile(r"\((?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]*:[0-9A-Fa-f:.%\w]*)\)")
# Driver errors name the user and the host in these phrases at query time too.
_NAMED = re.compile(r'\b(user|role|host|server at|host name)\s+"[^"\n]*"', re.IGNORECASE)


@dataclass(frozen=True)
class Secrets:
    """What must not be shown: `anywhere` (a password, a URL) is removed wherever it occurs,
    `names` (a user, a host) only as a whole word, so that a host called `db` leaves the
    word `database` alone."""

    anywhere: tuple[str, ...] = ()
    names: tuple[str, ...] = ()

    def __add__(self, other: Secrets) -> Secrets:
        return Secrets(self.anywhere + other.anywhere, self.names + other.names)


def url_secrets(url: str | None) -> Secrets:
    """Every spelling of the URL's user, password and hosts, and of the URL itself; read
    leniently, since a malformed URL is exactly the one libpq quotes."""
    if not url:
        return Secrets()
    anywhere = {url}
    names = set()
    rest = url.split("://", 1)[1] if "://" in url else url
    # A password holding an unencoded `@` or `/` moves the boundaries libpq sees; taking
    # the widest reading (up to the last `@`) and the narrowest (up to the first) covers
    # both.
    userinfo, at, after = rest.rpartition("@")
    if at:
        user, _, password = userinfo.partition(":")
        anywhere.update((userinfo, password, userinfo.split("@", 1)[0].partition(":")[2]))
        names.add(user)
        authority = re.split(r"[/?]", after, maxsplit=1)[0]
    else:
        authority = re.split(r"[/?]", rest, maxsplit=1)[0]
    for entry in authority.split(","):
        names.add((entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry).strip("[]"))
    for key, value in re.findall(r"(?:^|[?&])(host|hostaddr|user|password)=([^&]*)", rest):
        (anywhere if key == "password" else names).update(value.split(","))
    return Secrets(_spellings(anywhere), _spellings(names))


def _spellings(values: Iterable[str]) -> tuple[str, ...]:
    """Each value as written, percent-decoded and percent-encoded; longest first."""
    found: set[str] = set()
    for value in values:
        if value:
            decoded = unquote(value)
            found.update((value, decoded, quote(decoded, safe=""), quote(decoded)))
    return tuple(sorted(found, key=len, reverse=True))


def redact(text: str, secrets: Secrets = Secrets()) -> str:
    """`text` without the given secrets, any postgres:// URL, key=value credentials, and
    the user and host that driver messages name."""
    for secret in sorted(secrets.anywhere, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    for name in sorted(secrets.names, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w-]|\.\w)", REDACTED, text)
    text = _URL.sub(f"postgresql://{REDACTED}", text)
    text = _KEYWORD_VALUE.sub(lambda match: f"{match.group(1)}={REDACTED}", text)
    return _NAMED.sub(lambda match: f'{match.group(1)} "{REDACTED}"', text)


def _is_connection_error(exc: BaseException) -> bool:
    """A driver error raised before the server ran a statement (connecting, parsing the
    URL): its whole text comes from the connection settings."""
    return getattr(exc, "pgcode", "absent") is None and getattr(exc, "cursor", None) is None


def _connection_secrets(exc: BaseException) -> Secrets:
    """What the failed statement's connection knows about itself: user, password, host."""
    cursor = getattr(exc, "cursor", None)
    info = getattr(getattr(cursor, "connection", None), "info", None)
    password, user, host = (getattr(info, name, None) for name in ("password", "user", "host"))
    return Secrets(
        _spellings([password] if isinstance(password, str) else []),
        _spellings(value for value in (user, host) if isinstance(value, str)),
    )


def redact_error_text(exc: BaseException, url: str | None = None) -> str:
    """The whole text of `exc`, redacted (every line, for a traceback)."""
    text = str(exc)
    secrets = _connection_secrets(exc) + url_secrets(url)
    if _is_connection_error(exc):
        text = _QUOTED.sub(f'"{REDACTED}"', redact(text, secrets))
        return _ADDRESS.sub(f"({REDACTED})", text)
    return redact(text, secrets)


def error_message(exc: BaseException, url: str | None = None) -> str:
    """The first line of `exc`, redacted: the cause, without the connection's details."""
    text = redact_error_text(exc, url).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_error(exc: BaseException, url: str | None = None) -> str:
    """`TypeName: first line`, redacted, for a log line."""
    return f"{type(exc).__name__}: {error_message(exc, url)}"


def format_traceback(exc: BaseException, url: str | None = None) -> str:
    """The traceback of `exc` and of the errors it was raised from, every message redacted."""
    text = "".join(traceback.format_exception(exc))
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        raw = str(current)
        if raw:
            text = text.replace(raw, redact_error_text(current, url))
        current = current.__cause__ or current.__context__
    return redact(text, url_secrets(url))
