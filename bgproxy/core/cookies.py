"""Reading cookies out of request headers, for the routing rules (RFC 6265 §5.4 shape, bytes in)."""

from __future__ import annotations

from collections.abc import Iterable


def cookie_values(headers: Iterable[bytes], name: bytes) -> list[bytes]:
    """Every value of cookie ``name`` in the given Cookie header values, in order (there may be several)."""
    found = []
    for header in headers:
        for pair in header.split(b";"):
            key, sep, value = pair.strip().partition(b"=")
            if sep and key.strip() == name:
                found.append(value.strip().strip(b'"'))
    return found
