"""Sticky sessions during a split: which color a request keeps, and the signed cookie that says so.

A user assigned to a color gets a cookie ``color.version.issued.signature``: the color, the switch
version and the Unix second it was issued under, signed with HMAC-SHA256 (truncated to 96 bits,
base64url) under a key only the proxies know. A cookie that is forged, malformed, expired (older
than max_age, or issued in the future) or from a switch version newer than the current one is
ignored: the request is assigned afresh, never refused. Decisions take the time as ``now``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from .colors import COLORS, Color

_SIGNATURE_BYTES = 12
_SKEW = 60.0  # seconds a cookie's issue time may be ahead of ours (another proxy's clock)


@dataclass(frozen=True, slots=True)
class StickyPolicy:
    """sticky: in the config, with its key as bytes."""

    cookie: bytes
    max_age: float
    secure: str  # "auto" (when the request came over https via a trusted proxy), "always", "never"
    http_only: bool
    same_site: str
    on_zero_weight: str  # "follow": move at once; "drain": stay until the color's drain deadline
    key: bytes


@dataclass(frozen=True, slots=True)
class Pin:
    """What a valid cookie says: the color, and the switch version and second it was issued at."""

    color: Color
    version: int
    issued: int
    expires: float  # issued + max_age: after this instant the pin is stale


@dataclass(frozen=True, slots=True)
class DrainWindow:
    """A color draining since ``started_at`` (Unix time) until ``deadline``."""

    started_at: float
    deadline: float


def _sign(key: bytes, payload: bytes) -> bytes:
    digest = hmac.new(key, payload, hashlib.sha256).digest()[:_SIGNATURE_BYTES]
    return base64.urlsafe_b64encode(digest).rstrip(b"=")


def cookie_value(policy: StickyPolicy, color: str, version: int, now: float) -> bytes:
    payload = b"%s.%d.%d" % (color.encode(), version, int(now))
    return payload + b"." + _sign(policy.key, payload)


def set_cookie(policy: StickyPolicy, value: bytes, secure: bool) -> bytes:
    """The Set-Cookie header line pinning a user (CRLF included)."""
    line = b"Set-Cookie: %s=%s; Max-Age=%d; Path=/" % (policy.cookie, value, int(policy.max_age))
    if policy.http_only:
        line += b"; HttpOnly"
    line += b"; SameSite=" + policy.same_site.encode()
    if secure or policy.same_site == "None":  # browsers drop SameSite=None without Secure
        line += b"; Secure"
    return line + b"\r\n"


def admit(policy: StickyPolicy, value: bytes, version: int, now: float) -> Pin | None:
    """The pin a cookie value carries, if it is genuine and current at ``now``; else None.

    Genuine: four parts, a known color, numbers where numbers go, and our signature. Current: not
    issued in the future (beyond a minute of clock skew), not older than max_age, and not from a
    switch version newer than ``version``. A genuine pin stays genuine, so callers may remember the
    verdict for a value, as long as they check ``pin.expires`` on later use.
    """
    parts = value.split(b".")
    if len(parts) != 4:
        return None
    color, version_text, issued_text, signature = parts
    if (
        not (version_text.isdigit() and issued_text.isdigit())
        or len(version_text) > 18
        or len(issued_text) > 12
    ):
        return None
    if not hmac.compare_digest(signature, _sign(policy.key, value[: -len(signature) - 1])):
        return None
    pinned = color.decode()
    pin_version, issued = int(version_text), int(issued_text)
    if pinned not in COLORS or pin_version > version or issued > now + _SKEW or now > issued + policy.max_age:
        return None
    return Pin("blue" if pinned == "blue" else "green", pin_version, issued, issued + policy.max_age)


def keeps(policy: StickyPolicy, pin: Pin, weight: int, window: DrainWindow | None, now: float) -> bool:
    """Whether a valid pin keeps its user on its color, whose weight is ``weight`` now.

    A color with weight keeps its users. A color at weight 0 loses them at once with ``follow``;
    with ``drain`` it keeps the users it had before its drain began until the drain's deadline.
    """
    return weight > 0 or drain_keeps(policy, pin, window, now)


def drain_keeps(policy: StickyPolicy, pin: Pin, window: DrainWindow | None, now: float) -> bool:
    """For a pin on a color at weight 0: whether its user stays there (``drain``) for now."""
    return (
        policy.on_zero_weight == "drain"
        and window is not None
        and pin.issued <= window.started_at < now < window.deadline
    )
