"""How a pydantic validation error reads to a person: one wording for config files and API bodies."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic_core import ErrorDetails

_WORDING = {
    "extra_forbidden": "unknown key",
    "missing": "required",
    "greater_than_equal": "must be >= {ge}",
    "less_than_equal": "must be <= {le}",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "string_too_short": "must not be empty",
    "string_too_long": "must be at most {max_length} characters",
    "string_pattern_mismatch": "must not contain control characters",
    "literal_error": "must be {expected}",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "path_type": "must be a file path",
}


def describe(error: ErrorDetails, dialect: Mapping[str, str] | None = None) -> str:
    """The message of one error; ``dialect`` rewords some types (JSON says "object", YAML "mapping")."""
    ctx = error.get("ctx", {})
    if error["type"] == "value_error":
        return str(ctx["error"])
    template = (dialect or {}).get(error["type"]) or _WORDING.get(error["type"])
    return template.format(**ctx) if template else error["msg"]
