"""Preview routing: testers and pipelines reach a color by name, whatever its weight.

Only from allowed networks and, when a token is set, with the token (compared in constant time).
Anything else, including a well-formed request from elsewhere, is simply not a preview: the request
is routed as any other, so the feature is not revealed by an error.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .address import Network, in_networks
from .colors import COLORS, Color

TOKEN_HEADER = b"x-bgproxy-preview-token"


@dataclass(frozen=True, slots=True)
class PreviewPolicy:
    """preview: in the config; ``header`` lower-cased, the token as bytes."""

    header: bytes
    cookie: bytes | None
    allow_from: tuple[Network, ...]
    token: bytes | None


def preview_color(
    policy: PreviewPolicy,
    header: bytes | None,
    cookie: bytes | None,
    token: bytes | None,
    client_ip: str,
) -> Color | None:
    """The color a request asks to preview (the header's, else the cookie's), if it may; else None."""
    named = header if header is not None else cookie
    if named is None:
        return None
    color = named.strip().lower().decode("latin-1")
    if color not in COLORS or not in_networks(client_ip, policy.allow_from):
        return None
    if policy.token is not None and (token is None or not hmac.compare_digest(token.strip(), policy.token)):
        return None
    return "blue" if color == "blue" else "green"
