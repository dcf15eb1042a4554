"""Where a request chooses its color: the route table the control plane installs, ``pick()`` and ``route()``.

The control plane validates every change (bgproxy.core) and then installs a fresh, immutable
RouteTable; the data plane only ever reads the one installed when a request's head is complete. So
a flip is seen by the very next request, and no request sees half a change. Without routing rules a
request's color is ``pick(table)``, the smooth weighted round robin; with sticky sessions or preview
routing configured it is ``route(...)``, which applies them (their decisions are core's) and falls
back to the same pick for new users.
"""

from __future__ import annotations

import time
from typing import Final, final

from ..core.preview import TOKEN_HEADER, PreviewPolicy, preview_color
from ..core.sticky import DrainWindow, Pin, StickyPolicy, admit, cookie_value, keeps, set_cookie
from .http1 import Headers
from .pool import ColorPool

_MEMO = 4096  # cookies issued per color and second, kept per route table
_PIN_MEMO = 16384  # Cookie headers (each at most _MEMO_KEY bytes) and their pins, per route table
_PAIR_START = b"; \t"  # what may stand before a cookie's name in a Cookie header
# What a request header is to route(), learned per exact name (lower() is a slow call here).
_OTHER: Final = 0
_COOKIE: Final = 1
_PREVIEW: Final = 2
_TOKEN: Final = 3
_PROTO: Final = 4
_XFF: Final = 5
_MEMO_KEY = 512  # bytes: longer header names and Cookie headers are never memoized
_PINS_TRIED = 4  # cookie values of our name checked per request (each may cost an HMAC)


@final
class SmoothWRR:
    """nginx's smooth weighted round robin over the two colors: exact ratios, evenly interleaved.

    With two colors the two ``current`` values always sum to zero, so one integer is enough;
    it is kept doubled so that the "is blue's current the max?" test needs no multiplication.
    Ties go to blue, as in nginx (first peer wins). The weights come validated from the control
    plane (integers >= 0, not both 0), which is why this can be compiled without its own checks.
    """

    __slots__ = ("_d", "_only", "_t", "_t2", "_w2")

    def __init__(self, blue: int, green: int) -> None:
        self._only = "blue" if green == 0 else ("green" if blue == 0 else "")
        self._d = 0  # 2 * current_blue; current_green == -current_blue
        self._w2 = 2 * blue
        self._t = blue + green
        self._t2 = 2 * (blue + green)

    def pick(self) -> str:
        """The color for the next request."""
        only = self._only
        if only:
            return only
        d = self._d + self._w2
        if d >= self._t:
            self._d = d - self._t2
            return "blue"
        self._d = d
        return "green"


@final
class RouteTable:
    """How new requests are routed, as of one switch version. Replaced whole, never edited.

    The picker inside advances as requests are routed (that is what makes the split exact); a new
    table starts it afresh, as nginx does when its upstream weights change.
    """

    __slots__ = (
        "blue",
        "drains",
        "green",
        "header_kinds",
        "issued",
        "pins",
        "preview",
        "ruled",
        "sticky",
        "swrr",
        "version",
    )

    def __init__(
        self,
        version: int,
        blue: int,
        green: int,
        sticky: StickyPolicy | None = None,
        preview: PreviewPolicy | None = None,
        drains: dict[str, DrainWindow] | None = None,
    ) -> None:
        self.version: Final = version
        self.blue: Final = blue
        self.green: Final = green
        self.swrr: Final = SmoothWRR(blue, green)
        self.sticky: Final = sticky
        self.preview: Final = preview
        self.drains: Final = drains or {}
        self.ruled: Final = sticky is not None or preview is not None  # else pick() is the whole story
        # Memos of core's verdicts, so returning users cost no HMAC: the pin a Cookie header carries
        # (valid for this table's version; its expiry is still checked on each use), and the
        # Set-Cookie line issued per color and second (every new user of that second gets the same).
        self.pins: dict[bytes, Pin | None] = {}
        self.issued: dict[tuple[str, int, bool], bytes] = {}
        self.header_kinds: dict[bytes, int] = {}

    def weight(self, color: str) -> int:
        return self.blue if color == "blue" else self.green


def pick(table: RouteTable) -> str:
    """The color of the next request: the one decision every proxied request makes."""
    return table.swrr.pick()


def _header_kind(lname: bytes, preview: PreviewPolicy | None) -> int:
    if lname == b"cookie":
        return _COOKIE
    if preview is not None and lname == preview.header:
        return _PREVIEW
    if lname == TOKEN_HEADER:
        return _TOKEN
    if lname == b"x-forwarded-for":
        return _XFF
    return _PROTO if lname == b"x-forwarded-proto" else _OTHER


def cookie_values(headers: list[bytes], name: bytes) -> list[bytes]:
    """Every value of cookie ``name`` in the given Cookie header values, in order (RFC 6265 §4.2.1).

    Only locates bytes, with as few calls as the hot path can afford: what a value is worth is for
    core to say (core.sticky.admit, core.preview).
    """
    found: list[bytes] = []
    want = name + b"="
    for header in headers:
        at = header.find(want)
        while at >= 0:
            if at == 0 or header[at - 1] in _PAIR_START:
                start = at + len(want)
                end = header.find(b";", start)
                value = header[start:] if end < 0 else header[start:end]
                found.append(value.strip(b' \t"'))
            at = header.find(want, at + 1)
    return found


def route(
    table: RouteTable, headers: Headers, client_ip: str, trusted: bool, pools: dict[str, ColorPool]
) -> tuple[str, bytes, bool]:
    """(color, Set-Cookie line or b"", whether it is a preview) for a request under the table's rules.

    Preview first (a named color, if this client may); then a valid sticky pin on a color that still
    takes its users and has a serving upstream; else a fresh assignment by the weights, pinned by a
    new cookie. X-Forwarded-Proto counts (for the cookie's Secure) only from a trusted proxy.
    """
    sticky = table.sticky
    preview = table.preview
    cookies: list[bytes] = []
    named: bytes | None = None
    token: bytes | None = None
    https = False
    forwarded_for = b""
    kinds = table.header_kinds
    for name, value in headers:
        kind = kinds.get(name, -1)
        if kind < 0:
            kind = _header_kind(name.lower(), preview)
            if len(kinds) < _MEMO and len(name) <= _MEMO_KEY:  # bounded: names come from the network
                kinds[name] = kind
        if kind == _OTHER:
            continue
        if kind == _COOKIE:
            cookies.append(value)
        elif kind == _PREVIEW:
            named = value
        elif kind == _TOKEN:
            token = value
        elif kind == _XFF:
            forwarded_for = value
        elif trusted:
            https = value.strip().lower() == b"https"
    if preview is not None:
        by_cookie = (
            cookie_values(cookies, preview.cookie) if preview.cookie is not None and named is None else []
        )
        if trusted and forwarded_for:  # behind our own proxy the peer is that proxy: ask who it forwards
            client_ip = forwarded_for.rsplit(b",", 1)[-1].strip().decode("latin-1")
        named_color = preview_color(preview, named, by_cookie[0] if by_cookie else None, token, client_ip)
        if named_color is not None:
            return named_color, b"", True
    if sticky is None:
        return table.swrr.pick(), b"", False
    now = time.time()
    # Memo by the whole Cookie header: a browser sends the same one on every request until its jar
    # changes, so a returning user costs one dict lookup (core's verdict is computed once).
    header = cookies[0] if len(cookies) == 1 else b"\n".join(cookies)
    pins = table.pins
    if header in pins:
        pin = pins[header]
    else:
        pin = None
        for value in cookie_values(cookies, sticky.cookie)[:_PINS_TRIED]:
            pin = admit(sticky, value, table.version, now)
            if pin is not None:
                break
        if len(header) <= _MEMO_KEY:  # bounded in count and size: headers come from the network
            if len(pins) >= _PIN_MEMO:
                pins.clear()
            pins[header] = pin
    if pin is not None and now <= pin.expires:
        pinned: str = pin.color
        weight = table.weight(pinned)
        # A color with weight keeps its users; at weight 0, core.sticky.keeps says (follow or drain).
        kept = weight > 0 or keeps(sticky, pin, weight, table.drains.get(pinned), now)
        if kept and pools[pinned].serving:
            return pinned, b"", False
    color = table.swrr.pick()
    secure = sticky.secure == "always" or (sticky.secure == "auto" and https)
    key = (color, int(now), secure)
    line = table.issued.get(key)
    if line is None:
        if len(table.issued) >= _MEMO:
            table.issued.clear()
        line = table.issued[key] = set_cookie(sticky, cookie_value(sticky, color, table.version, now), secure)
    return color, line, False
