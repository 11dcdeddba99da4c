"""The one strict JSON parse of what callers send: a key twice in one object is refused, never resolved.

``json.loads`` keeps the last of duplicate keys, while the bytes go upstream as sent, where a parser
that keeps the first value (or the model, which reads them all) sees what policy never saw. So a
request body or a client event with a duplicate key anywhere is not read at all: the caller gets
``gateway_bad_request``.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKeyError(ValueError):
    """A JSON object that names one key twice (the key itself is never put in the message: it is caller text)."""


def _unique_object(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise DuplicateKeyError("a JSON object names the same key twice")
    return obj


def loads_strict(text: str | bytes) -> Any:
    """json.loads, refusing duplicate keys at any depth (DuplicateKeyError, a ValueError)."""
    return json.loads(text, object_pairs_hook=_unique_object)
