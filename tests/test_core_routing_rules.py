"""Sticky-session and preview decisions as tables (core.sticky, core.preview), the time passed in; and
how the data plane finds cookie values (dataplane.routing.cookie_values)."""

from __future__ import annotations

import ipaddress

import pytest

from bgproxy.core.preview import PreviewPolicy, preview_color
from bgproxy.core.sticky import (
    DrainWindow,
    Pin,
    StickyPolicy,
    admit,
    cookie_value,
    keeps,
    set_cookie,
)
from bgproxy.dataplane.pool import ColorPool, Upstream
from bgproxy.dataplane.routing import RouteTable, cookie_values, route

NOW = 1_800_000_000.0
POLICY = StickyPolicy(b"bgproxy-color", 3600.0, "auto", True, "Lax", "follow", b"k" * 32)
DRAIN = StickyPolicy(b"bgproxy-color", 3600.0, "auto", True, "Lax", "drain", b"k" * 32)
OTHER_KEY = StickyPolicy(b"bgproxy-color", 3600.0, "auto", True, "Lax", "follow", b"x" * 32)


def value(color: str = "green", version: int = 3, at: float = NOW, policy: StickyPolicy = POLICY) -> bytes:
    return cookie_value(policy, color, version, at)


@pytest.mark.parametrize(
    ("cookie", "pin"),
    [
        (value(), Pin("green", 3, int(NOW), int(NOW) + 3600)),
        (value("blue", 0), Pin("blue", 0, int(NOW), int(NOW) + 3600)),
        (
            value(at=NOW - 3600),
            Pin("green", 3, int(NOW - 3600), int(NOW - 3600) + 3600),
        ),  # exactly max_age old
        (
            value(at=NOW + 30),
            Pin("green", 3, int(NOW + 30), int(NOW + 30) + 3600),
        ),  # another proxy's clock, a little ahead
        (value(at=NOW - 3601), None),  # stale: older than max_age
        (value(at=NOW + 120), None),  # issued in the future
        (value(version=4), None),  # from a switch version newer than ours (3)
        (value(policy=OTHER_KEY), None),  # signed with another key: forged
        (value().replace(b"green", b"blue"), None),  # color swapped under the signature
        (value().replace(b".3.", b".2."), None),  # version edited
        (value()[:-1], None),  # signature cut
        (b"red.3.%d." % int(NOW) + value().rsplit(b".", 1)[1], None),
        (b"green.3.%d" % int(NOW), None),  # unsigned
        (b"", None),
        (b"....", None),
        (b"green.-3.1.x", None),
        (b"green.3.1e9.x", None),
        (b"\xff\x00.3.1.x", None),
    ],
)
def test_only_a_genuine_current_cookie_pins(cookie: bytes, pin: Pin | None) -> None:
    assert admit(POLICY, cookie, 3, NOW) == pin


@pytest.mark.parametrize(
    ("headers", "values"),
    [
        ([b"a=1; b=2"], [b"2"]),
        ([b"b=2", b"b=3"], [b"2", b"3"]),
        ([b' b="q" ;x'], [b"q"]),
        ([b"ab=1; b"], []),
        ([b"xb=1;b=2"], [b"2"]),
        ([b"ab=1; b"], []),
        ([b""], []),
    ],
)
def test_cookie_values(headers: list[bytes], values: list[bytes]) -> None:
    assert cookie_values(headers, b"b") == values


PIN = Pin("green", 3, int(NOW) - 100, NOW + 3500)  # issued 100 s ago


@pytest.mark.parametrize(
    ("policy", "weight", "window", "kept"),
    [
        (POLICY, 10, None, True),  # the color has weight: its users stay
        (DRAIN, 10, None, True),
        (POLICY, 0, DrainWindow(NOW - 10, NOW + 20), False),  # follow: moved at once
        (DRAIN, 0, DrainWindow(NOW - 10, NOW + 20), True),  # drain: stays until the deadline
        (DRAIN, 0, DrainWindow(NOW - 30, NOW - 1), False),  # ... and not after it
        (DRAIN, 0, DrainWindow(NOW - 200, NOW + 20), False),  # pinned after the drain began
        (DRAIN, 0, None, False),  # weight 0 and no drain (it ended): moved
    ],
)
def test_which_pins_keep_their_color(
    policy: StickyPolicy, weight: int, window: DrainWindow | None, kept: bool
) -> None:
    assert keeps(policy, PIN, weight, window, NOW) is kept


@pytest.mark.parametrize(
    ("policy", "secure", "line"),
    [
        (POLICY, False, b"Set-Cookie: bgproxy-color=V; Max-Age=3600; Path=/; HttpOnly; SameSite=Lax\r\n"),
        (
            POLICY,
            True,
            b"Set-Cookie: bgproxy-color=V; Max-Age=3600; Path=/; HttpOnly; SameSite=Lax; Secure\r\n",
        ),
        (
            StickyPolicy(b"c", 60.0, "never", False, "None", "follow", b"k" * 16),
            False,
            b"Set-Cookie: c=V; Max-Age=60; Path=/; SameSite=None; Secure\r\n",  # None needs Secure
        ),
    ],
)
def test_set_cookie(policy: StickyPolicy, secure: bool, line: bytes) -> None:
    assert set_cookie(policy, b"V", secure) == line


LOCAL = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
OPEN = PreviewPolicy(b"x-bgproxy-color", b"bgproxy-preview", LOCAL, None)
TOKEN = PreviewPolicy(b"x-bgproxy-color", None, LOCAL, b"t" * 20)


@pytest.mark.parametrize(
    ("policy", "header", "cookie", "token", "client", "color"),
    [
        (OPEN, b"green", None, None, "127.0.0.1", "green"),
        (OPEN, b" GREEN ", None, None, "::1", "green"),
        (OPEN, None, b"blue", None, "127.0.0.9", "blue"),
        (OPEN, b"blue", b"green", None, "127.0.0.1", "blue"),  # the header first
        (OPEN, b"green", None, None, "10.0.0.1", None),  # not an allowed network
        (OPEN, b"red", None, None, "127.0.0.1", None),
        (OPEN, None, None, None, "127.0.0.1", None),
        (OPEN, b"green", None, None, "not an ip", None),
        (TOKEN, b"green", None, b"t" * 20, "127.0.0.1", "green"),
        (TOKEN, b"green", None, None, "127.0.0.1", None),  # token required
        (TOKEN, b"green", None, b"t" * 19, "127.0.0.1", None),
    ],
)
def test_preview_decisions(
    policy: PreviewPolicy,
    header: bytes | None,
    cookie: bytes | None,
    token: bytes | None,
    client: str,
    color: str | None,
) -> None:
    assert preview_color(policy, header, cookie, token, client) == color


@pytest.mark.parametrize(
    ("trusted", "forwarded_for", "color"),
    [
        (
            False,
            b"203.0.113.9",
            "green",
        ),  # an untrusted peer's X-Forwarded-For means nothing: the peer is local
        (True, b"203.0.113.9", "blue"),  # behind our own proxy: the client it forwards is not local
        (True, b"203.0.113.9, 127.0.0.1", "green"),  # the proxy appends the client it saw, last
        (True, b"", "green"),
    ],
)
def test_preview_behind_a_trusted_proxy_asks_who_it_forwards(
    trusted: bool, forwarded_for: bytes, color: str
) -> None:
    table = RouteTable(0, 100, 0, preview=OPEN)
    headers = [(b"Host", b"h"), (b"X-Bgproxy-Color", b"green")]
    if forwarded_for:
        headers.append((b"X-Forwarded-For", forwarded_for))
    pools = {c: ColorPool(c, [Upstream(c, "127.0.0.1", 1, 1)], "round_robin") for c in ("blue", "green")}
    assert route(table, headers, "127.0.0.1", trusted, pools)[0] == color
