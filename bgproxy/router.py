"""The data plane's shared runtime: switching state, color pools, limits and live exchanges.

One Router per process. The protocol classes read everything they need from it, so a flip made
by the admin API (which swaps the Switchboard's weights) is seen by the very next request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from .health import HealthMonitor
from .logs import Throttled
from .pool import ColorPool, Upstream
from .stats import Stats
from .switching import COLORS, Switchboard

if TYPE_CHECKING:
    from .config import Config
    from .proxy import ClientConnection, Exchange


def _ignore(ex: Exchange) -> None:
    """drain_progress until a Drainer is attached."""


class Router:
    """Everything a proxied request needs to be routed, timed and counted."""

    def __init__(self, config: Config, switchboard: Switchboard, stats: Stats) -> None:
        self.loop = asyncio.get_running_loop()
        self.config = config
        self.switchboard = switchboard
        self.stats = stats
        self.pools: dict[str, ColorPool] = {}
        for color in COLORS:
            pc = config.pools.get(color)
            ups = [Upstream(color, hp.host, hp.port, pc.max_idle_per_upstream) for hp in pc.upstreams]
            self.pools[color] = ColorPool(color, ups, pc.balance)
        t = config.timeouts
        self.connect_timeout = t.connect
        self.upstream_header_timeout = t.upstream_header
        self.stream_idle_timeout = t.stream_idle or 0.0  # 0.0: off
        self.client_header_timeout = t.client_header
        self.idle_timeout = t.idle
        self.upstream_idle = t.upstream_idle
        self.max_header_bytes = config.limits.max_header_bytes
        self.max_body_bytes = config.limits.max_body_bytes
        self.max_connections = config.limits.max_connections
        self.via = config.forwarding.via.encode()
        self.access_log = config.logging.access_log
        self._trusted = list(config.forwarding.trusted_proxies)
        self.connections: set[ClientConnection] = set()
        # In-flight exchanges per color: what a drain waits for and, at its deadline, closes.
        self.active: dict[str, set[Exchange]] = {color: set() for color in COLORS}
        self.health = HealthMonitor(self)
        self.error_log = Throttled(logging.getLogger("bgproxy.proxy"))
        self.closing = False  # shutting down: answer with Connection: close
        # Colors being drained (or all, in shutdown): their exchanges are counted as they end.
        self.draining: set[str] = set()
        self.drain_progress: Callable[[Exchange], None] = _ignore

    def is_trusted(self, ip: str) -> bool:
        """Whether a peer's X-Forwarded-* headers may be appended to rather than replaced."""
        if not self._trusted:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self._trusted)

    def open_streams(self, color: str) -> int:
        """Long-lived exchanges of a color in flight (upgraded, or streaming without a length)."""
        return sum(1 for ex in self.active[color] if ex.is_stream)

    def expire_idle(self) -> None:
        """Close pooled upstream connections that sat idle too long (called every second)."""
        now = self.loop.time()
        for pool in self.pools.values():
            for up in pool.upstreams:
                up.expire_idle(now, self.upstream_idle)

    def close_idle(self, color: str) -> None:
        """Close a color's pooled connections (it just started draining)."""
        self.pools[color].close_idle()
