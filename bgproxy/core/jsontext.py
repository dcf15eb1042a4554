"""Strict JSON for untrusted text (API bodies, state files): what Python's json lets through, refused."""

from __future__ import annotations

import json
from typing import Any


def _reject_constant(name: str) -> Any:
    """Python's json accepts NaN and Infinity, which are not JSON."""
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Python keeps the last of two equal keys; ``{"blue": 1, "blue": 90}`` is ambiguous, so refuse it."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def loads_strict(text: str | bytes) -> Any:
    """json.loads without NaN/Infinity or duplicate keys; ValueError (JSONDecodeError for syntax)."""
    return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
