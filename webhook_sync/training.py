"""A Replicate training object parsed leniently into a frozen dataclass (pure).

Replicate's objects carry extra keys, miss others, use 2 to 9 fractional digits in
timestamps and sometimes put a non-string in `error`; none of that may break parsing.
Only an object without `id` or `status` is refused, because nothing can be applied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from webhook_sync import errors

# Inbox rows keep only the end of `logs`: succeeded trainings carry megabytes of them.
LOGS_TAIL_CHARS = 4000
MAX_ID_LENGTH = 200
# The longest user id we track (registration, the API, adoption from the host's table):
# a NOTIFY carries it, so it is bounded like the id.
MAX_USER_ID_LENGTH = 200
# Replicate's statuses are single words; a longer one is not a status. The id and the
# status are what a NOTIFY payload carries of a report, and PostgreSQL refuses payloads
# of 8,000 bytes or more: bounded here, they can never make a delivery fail at commit.
MAX_STATUS_LENGTH = 64


@dataclass(frozen=True)
class Training:
    """What we keep of one Replicate training object."""

    id: str
    status: str
    destination: str | None = None
    version_id: str | None = None
    weights_url: str | None = None
    error: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    created_at: datetime | None = None


def parse_training(obj: Any) -> Training:
    """Parse a decoded JSON training object; raise InvalidTrainingError if it is not one."""
    if not isinstance(obj, Mapping):
        raise errors.InvalidTrainingError("expected a JSON object")
    training_id = obj.get("id")
    status = obj.get("status")
    if not isinstance(training_id, str) or not training_id.strip():
        raise errors.InvalidTrainingError("training object has no id")
    if len(training_id) > MAX_ID_LENGTH or _clean_text(training_id) != training_id:
        raise errors.InvalidTrainingError("training id is not a plausible Replicate id")
    if not isinstance(status, str) or not status.strip() or _clean_text(status) != status:
        raise errors.InvalidTrainingError("training object has no status")
    if len(status) > MAX_STATUS_LENGTH:
        raise errors.InvalidTrainingError(
            f"training status is longer than {MAX_STATUS_LENGTH} characters"
        )
    output = obj.get("output")
    destination, version_id = split_version(output.get("version") if _is_map(output) else None)
    weights = output.get("weights") if _is_map(output) else None
    return Training(
        id=training_id,
        status=status.strip().lower(),
        destination=destination,
        version_id=version_id,
        weights_url=_clean_text(weights) if isinstance(weights, str) else None,
        error=error_text(obj.get("error")),
        started_at=parse_timestamp(obj.get("started_at")),
        completed_at=parse_timestamp(obj.get("completed_at")),
        created_at=parse_timestamp(obj.get("created_at")),
    )


def split_version(value: Any) -> tuple[str | None, str | None]:
    """Split `owner/name:hash` into (`owner/name`, `hash`); anything else gives what it can."""
    if not isinstance(value, str) or not value:
        return None, None
    model, sep, version_id = _clean_text(value).partition(":")
    destination = model if "/" in model else None
    return destination, (version_id or None) if sep else None


def error_text(value: Any) -> str | None:
    """Keep Replicate's `error` as text whatever its JSON type."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return _clean_text(value)
    return _clean_text(json.dumps(value, sort_keys=True, default=str))


def parse_timestamp(value: Any) -> datetime | None:
    """Parse ISO-8601 with `Z` and 0 to 9 fractional digits; None for anything unusable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        # Python 3.11 reads `Z` and any number of fractional digits (beyond 6 are dropped).
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def payload_for_storage(
    obj: Mapping[str, Any], tail_chars: int = LOGS_TAIL_CHARS, *, clean: bool = False
) -> dict[str, Any]:
    """Return the payload with `logs` cut to its last `tail_chars` characters and NULs removed;
    `clean` says the caller knows it holds no NUL and no lone surrogate (decoded JSON text
    without a `\\u0000` escape), which spares walking every value of it."""
    stored = dict(obj)
    if _logs_past(obj, tail_chars):
        stored["logs"] = "…" + obj["logs"][-tail_chars:]
    return stored if clean else _without_nul(stored)


def _logs_past(obj: Mapping[str, Any], tail_chars: int) -> bool:
    """Whether the payload's `logs` is text longer than the stored tail (then it is cut)."""
    logs = obj.get("logs")
    return isinstance(logs, str) and len(logs) > tail_chars


# A JSON number with an exponent of three digits or more, or a run of a thousand digits:
# jsonb keeps a number's text exact, where Python reads a float. Past numeric's range
# (0e-20000, 1e-16384, 0e2147483648, 16,384 fraction digits) jsonb refuses what Python
# reads as 0.0 or rounds, and 1e-300 is 300 digits when jsonb writes it out. Anchored at
# a number's start, so that hex digests in strings (`3e451…`) do not match; linear time.
_WIDE_NUMBER = re.compile(
    rb"[:,\[\s]-?[0-9]+(?:\.[0-9]+)?[eE][-+]?0*[1-9][0-9]{2,}|(?<![0-9])[0-9]{1000}"
)


def stored_json(
    obj: Mapping[str, Any], body: bytes, tail_chars: int = LOGS_TAIL_CHARS, *, clean: bool
) -> str:
    """The JSON text to store for a delivery decoded from `body`: the body itself when
    storing needs no change (`clean`, as `payload_for_storage` says, and `logs` within the
    tail, and no number jsonb would read otherwise: `_WIDE_NUMBER`), which spares encoding
    the payload again, else `payload_for_storage`'s value encoded. PostgreSQL's jsonb reads
    either to the same value."""
    if clean and not _logs_past(obj, tail_chars) and _WIDE_NUMBER.search(body) is None:
        return body.decode("utf-8")
    return json.dumps(payload_for_storage(obj, tail_chars, clean=clean))


def _is_map(value: Any) -> bool:
    return isinstance(value, Mapping)


def _without_nul(value: Any) -> Any:
    """PostgreSQL jsonb cannot hold U+0000; drop it from keys and strings, keep the rest."""
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, Mapping):
        return {_clean_text(str(key)): _without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    return value


def _clean_text(value: str) -> str:
    """Make text storable: PostgreSQL cannot hold NUL characters, and a lone surrogate
    (JSON allows `\\ud800` alone) cannot be encoded as UTF-8; both become nothing / U+FFFD."""
    text = value.replace("\x00", "")
    if not text.isascii():
        # Round-tripping through UTF-16 keeps valid pairs and replaces lone halves.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
