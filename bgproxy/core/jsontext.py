"""Strict JSON for untrusted text (API bodies, state files): what Python's json lets through, refused."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
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


def exact_keys(data: Mapping[Any, object], keys: Sequence[str], what: str) -> None:
    """ValueError naming the first key of ``data`` that is not one of ``keys``, or the first missing."""
    expected = " and ".join(", ".join(repr(k) for k in keys).rsplit(", ", 1))
    for key in data:
        if key not in keys:
            raise ValueError(f"unknown key {key!r} in {what}: expected exactly {expected}")
    for key in keys:
        if key not in data:
            raise ValueError(f"missing key {key!r} in {what}: expected exactly {expected}")


def loads_strict(text: str | bytes) -> Any:
    """json.loads without NaN/Infinity or duplicate keys; ValueError (JSONDecodeError for syntax)."""
    return json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
