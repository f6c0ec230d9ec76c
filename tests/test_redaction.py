"""The one redactor: driver error text without the connection's user, password, host or URL."""

from __future__ import annotations

from urllib.parse import quote

import psycopg2
import pytest

from webhook_sync import db, redaction
from webhook_sync.redaction import REDACTED

# Each character a URL reserves, between fragments long enough to be recognised if leaked.
PASSWORD = "Kq7v%Zt9w@Wm3r/Rx8k:Vb2n#Np5j Jd4h"
USER = "leak_role"
HOST = "db.example.com"
URL = f"postgresql://{USER}:{quote(PASSWORD, safe='')}@{HOST}:5432/app"
RAW_URL = f"postgresql://{USER}:{PASSWORD}@{HOST}:5432/app"


def fragments(secret: str, width: int = 4) -> list[str]:
    """Every run of `width` characters of `secret`."""
    return [secret[i : i + width] for i in range(len(secret) - width + 1)]


def shows_a_secret(text: str) -> bool:
    """Whether `text` holds any part of the password, the user, the host or the URL."""
    return any(
        piece in text
        for piece in (
            *fragments(PASSWORD),
            *fragments(quote(PASSWORD, safe="")),
            USER,
            HOST,
            "Kq7v",
        )
    )


class FakeDriverError(Exception):
    """A driver error as psycopg2 raises it before any statement ran: no pgcode, no cursor."""

    pgcode = None
    cursor = None


@pytest.mark.parametrize(
    "message",
    [
        f'connection to server at "{HOST}" (10.1.2.3), port 5432 failed: FATAL:  password'
        f' authentication failed for user "{USER}"',
        f'could not translate host name "{HOST}" to address: Name or service not known',
        f'connection to server at "{HOST}" (10.1.2.3), port 5432 failed: FATAL:  no pg_hba.conf'
        f' entry for host "10.9.9.9", user "{USER}", database "app", no encryption',
        'invalid dsn: invalid percent-encoded token: "Kq7v%Zt9w"',
        'invalid integer value "Kq7v%Zt9w@Wm3r" for connection option "port"',
        'could not translate host name "Wm3r/Rx8k:Vb2n#Np5j Jd4h@db.example.com" to address',
        f'invalid dsn: missing "=" after "{RAW_URL}" in connection info string',
        f"connection failed: host={HOST} user={USER} password='{PASSWORD}' dbname=app",
    ],
)
def test_connection_errors_lose_every_credential(message: str) -> None:
    """A libpq message, even one quoting a fragment of a mangled URL, keeps none of it."""
    shown = redaction.error_message(FakeDriverError(message), URL)

    assert not shows_a_secret(shown), shown
    assert REDACTED in shown


def test_the_url_and_each_spelling_of_the_password_are_removed_from_any_text() -> None:
    """As written, percent-decoded and percent-encoded; and a URL never seen before."""
    text = " | ".join(
        [URL, RAW_URL, PASSWORD, quote(PASSWORD, safe=""), "postgres://other:pw@elsewhere/db"]
    )

    shown = redaction.redact(text, redaction.url_secrets(URL))

    assert not shows_a_secret(shown), shown
    assert "other:pw" not in shown and "elsewhere" not in shown


def test_names_are_removed_as_words_only() -> None:
    """A host called `db` takes the host out, not the word `database` nor `db.py`."""
    secrets = redaction.url_secrets("postgresql://app@db/app")

    shown = redaction.redact('database "app" on db is down (db.py); see db.', secrets)

    assert shown == f'database "{REDACTED}" on {REDACTED} is down (db.py); see {REDACTED}.'


def test_a_query_error_keeps_its_cause(conn: db.Connection) -> None:
    """A server error after connecting names its relation; only credentials go."""
    with pytest.raises(psycopg2.Error) as caught, conn, conn.cursor() as cur:
        cur.execute("SELECT 1 FROM webhook_sync.nowhere")

    assert redaction.describe_error(caught.value, URL) == (
        'UndefinedTable: relation "webhook_sync.nowhere" does not exist'
    )


def test_a_traceback_is_redacted_through_its_chain() -> None:
    """Every message in `raise … from …` chains is redacted, the frames are kept."""
    try:
        try:
            raise FakeDriverError(f'could not translate host name "{HOST}" to address')
        except FakeDriverError as inner:
            raise RuntimeError(f"failed with {RAW_URL}") from inner
    except RuntimeError as exc:
        shown = redaction.format_traceback(exc, URL)

    assert "Traceback" in shown and "test_a_traceback_is_redacted_through_its_chain" in shown
    assert not shows_a_secret(shown), shown
