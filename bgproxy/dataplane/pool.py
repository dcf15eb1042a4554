"""Upstream servers of one color, their balancing, and their idle keep-alive connections."""

from __future__ import annotations

import contextlib
from collections import deque
from typing import TYPE_CHECKING, Literal

from ..core.address import host_port

if TYPE_CHECKING:
    from .upstream import UpstreamConnection

Balance = Literal["round_robin", "least_outstanding"]


class Upstream:
    """One upstream server: where it is, how busy it is, and its idle connections."""

    __slots__ = (
        "addr",
        "available",
        "check_fails",
        "check_passes",
        "color",
        "ejected_until",
        "ejections",
        "failures",
        "healthy",
        "host",
        "idle",
        "last_check",
        "max_idle",
        "outstanding",
        "port",
    )

    def __init__(self, color: str, host: str, port: int, max_idle: int) -> None:
        self.color = color
        self.host = host
        self.port = port
        self.addr = host_port(host, port)
        self.max_idle = max_idle
        # LIFO reuse (append/pop on the right) keeps the warmest connections busy and lets the
        # cold ones on the left expire.
        self.idle: deque[UpstreamConnection] = deque()
        self.outstanding = 0  # requests in flight to this upstream
        # Health (see control/health.py). `available` is what the hot path reads; refresh() derives it.
        self.healthy = True  # active checks: unhealthy after N failed probes
        self.check_passes = 0
        self.check_fails = 0
        self.last_check: tuple[float, bool, str] | None = None  # (epoch, ok, detail)
        self.failures = 0  # passive: consecutive connect failures / 5xx answers
        self.ejected_until = 0.0  # epoch seconds; 0 = not ejected
        self.ejections = 0
        self.available = True

    def refresh(self) -> None:
        self.available = self.healthy and not self.ejected_until
        if not self.available:
            self.close_idle()

    def take_idle(self, now: float, max_age: float) -> UpstreamConnection | None:
        """A pooled connection young enough to trust, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < max_age and not conn.closed:
                return conn
            conn.close()
        return None

    def give_back(self, conn: UpstreamConnection, now: float) -> None:
        """Keep a finished connection for reuse, unless the pool is full."""
        if len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = now
        self.idle.append(conn)

    def expire_idle(self, now: float, max_age: float) -> None:
        """Close idle connections before the upstream's own keep-alive timeout can race us."""
        idle = self.idle
        while idle and now - idle[0].idle_since >= max_age:
            idle.popleft().close()

    def close_idle(self) -> None:
        while self.idle:
            self.idle.pop().close()

    def retire(self) -> None:
        """Removed from its pool: no new request picks it, and no connection returns to idle."""
        self.max_idle = 0
        self.available = False
        self.close_idle()

    def forget(self, conn: UpstreamConnection) -> None:
        """Drop a pooled connection the upstream closed."""
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)


class ColorPool:
    """The upstreams of one color and how a request picks one of them."""

    __slots__ = ("_next", "balance", "color", "upstreams")

    def __init__(self, color: str, upstreams: list[Upstream], balance: Balance) -> None:
        self.color = color
        self.upstreams = upstreams
        self.balance = balance
        self._next = 0

    def pick(self, exclude: Upstream | None = None) -> Upstream | None:
        """The upstream for the next request, skipping unavailable ones (and `exclude`)."""
        ups = self.upstreams
        n = len(ups)
        if self.balance == "least_outstanding":
            best: Upstream | None = None
            start = self._next
            self._next = (start + 1) % n if n else 0
            for i in range(n):
                up = ups[(start + i) % n]  # rotating start breaks ties fairly
                if up.available and up is not exclude and (best is None or up.outstanding < best.outstanding):
                    best = up
            return best
        for _ in range(n):
            i = self._next
            up = ups[i]
            self._next = i + 1 if i + 1 < n else 0
            if up.available and up is not exclude:
                return up
        return None

    def replace(self, upstreams: list[Upstream]) -> None:
        """New membership, swapped whole: a request picks from the old list or the new, never a mix."""
        self.upstreams = upstreams
        self._next = 0

    @property
    def serving(self) -> bool:
        """Whether any upstream of this color takes requests (healthy and not ejected)."""
        return any(up.available for up in self.upstreams)

    def close_idle(self) -> None:
        for up in self.upstreams:
            up.close_idle()
