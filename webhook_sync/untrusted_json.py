"""The one decoder for JSON that comes from outside: a delivery's body, a replay file (pure).

Python's `json` reads more than JSON and more than PostgreSQL's jsonb can hold: `NaN`,
`Infinity`, numbers that overflow to infinity, lone UTF-16 surrogate escapes, and nesting
deep enough to exhaust the interpreter's stack when the value is walked later. Each of
these is refused here with a short reason, so that every caller answers the same way
instead of failing later in the database.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from webhook_sync import errors

# A training object nests a few levels; its `input` is the trainer's own small JSON.
MAX_DEPTH = 100
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_REASON_CHARS = 300


def decode(data: bytes | str, what: str = "input") -> Any:
    """The decoded value; InvalidJSONError saying why `what` (the body, a file's name) is
    not JSON we can store."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.InvalidJSONError(f"{what} is not UTF-8 text") from None
    else:
        text = data
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        if _SURROGATE_ESCAPE.search(text):
            # Only a \uD800-\uDFFF escape can decode to a lone surrogate, which UTF-8 (and
            # so PostgreSQL) cannot hold; paired escapes (emoji) encode fine.
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise errors.InvalidJSONError(f"{what} is JSON nested too deeply") from None
    except UnicodeEncodeError:
        raise errors.InvalidJSONError(f"{what} holds a lone UTF-16 surrogate escape") from None
    except ValueError as exc:
        raise errors.InvalidJSONError(f"{what} is not JSON: {exc}"[:_REASON_CHARS]) from None
    # Each level of nesting opens with a bracket of its own: text with no more brackets
    # than the limit (a training object has a dozen) cannot nest deeper, and is not walked.
    brackets = text.count("{") + text.count("[")
    if brackets > MAX_DEPTH and nesting_exceeds(value, MAX_DEPTH):
        raise errors.InvalidJSONError(f"{what} is JSON nested deeper than {MAX_DEPTH}")
    return value


def may_hold_nul(data: bytes) -> bool:
    """Whether JSON text that `decode` accepted can hold a NUL character once decoded: only
    through a `\\u0000` escape (a raw NUL is refused, and `decode` refuses lone surrogates),
    so without one its value needs no cleaning before PostgreSQL stores it."""
    return b"\\u0000" in data


def nesting_exceeds(value: Any, limit: int) -> bool:
    """True when objects and arrays nest more than `limit` deep (walked without recursion)."""
    stack = [(value, 1)] if isinstance(value, dict | list) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _refuse_constant(name: str) -> Any:
    # Python reads NaN and Infinity, which are not JSON and which jsonb refuses.
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e400 is valid JSON but becomes Infinity in Python, which jsonb refuses.
        raise ValueError(f"{text[:20]} is out of range")
    return value
