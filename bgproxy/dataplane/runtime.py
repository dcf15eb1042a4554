"""The data plane's shared runtime: route table, settings, color pools, counters and live exchanges.

One Runtime per process. The protocol classes read everything they need from it. The control plane
changes it only through its methods: ``install()`` a new route table, start or stop a drain, begin
shutdown. What the data plane learns that the control plane must act on goes out through the
Reporter it was built with.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

from .pool import ColorPool, Upstream
from .routing import RouteTable
from .settings import Settings
from .stats import Stats
from .throttle import Throttled

if TYPE_CHECKING:
    from .client import ClientConnection
    from .exchange import Exchange


class Reporter(Protocol):
    """What the data plane tells the control plane (implemented by control.health.HealthMonitor)."""

    def upstream_failed(self, up: Upstream) -> None:
        """A connect failure or a 5xx answer from ``up`` (passive health)."""


class Runtime:
    """Everything a proxied request needs to be routed, timed and counted."""

    def __init__(
        self,
        settings: Settings,
        pools: dict[str, ColorPool],
        stats: Stats,
        table: RouteTable,
        reporter: Reporter,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.settings = settings
        self.pools = pools
        self.stats = stats
        self.table = table
        self.reporter = reporter
        self.connections: set[ClientConnection] = set()
        # In-flight exchanges per color: what a drain waits for and, at its deadline, closes.
        self.active: dict[str, set[Exchange]] = {color: set() for color in pools}
        self._idle_waiters: dict[str, list[asyncio.Future[None]]] = {color: [] for color in pools}
        self.watching = 0  # idle waiters pending: while > 0 every ending exchange is reported
        self.error_log = Throttled(logging.getLogger("bgproxy.proxy"))
        self.closing = False  # shutting down: answer with Connection: close
        # Colors being drained (or all, in shutdown): their exchanges are counted as they end.
        self.draining: set[str] = set()
        self._closed_waiters: list[asyncio.Future[None]] = []

    def install(self, table: RouteTable) -> None:
        """Route new requests by ``table`` from now on; exchanges already routed keep their color."""
        self.table = table

    def open_streams(self, color: str) -> int:
        """Long-lived exchanges of a color in flight (upgraded, or streaming without a length)."""
        return sum(1 for ex in self.active[color] if ex.is_stream)

    def expire_idle(self) -> None:
        """Close pooled upstream connections that sat idle too long (called every second)."""
        now = self.loop.time()
        max_age = self.settings.upstream_idle
        for pool in self.pools.values():
            for up in pool.upstreams:
                up.expire_idle(now, max_age)

    # -- drains ---------------------------------------------------------------------------------------
    def start_draining(self, color: str) -> None:
        """No new request goes to `color` now (the table says so); count its exchanges as they end."""
        self.pools[color].close_idle()
        self.draining.add(color)

    def stop_draining(self, color: str) -> None:
        self.draining.discard(color)

    def begin_shutdown(self, idle_grace: float) -> None:
        """Every answer from now on says Connection: close; keep-alive connections still idle after
        ``idle_grace`` seconds are closed then. A busy client's next request gets its answer with
        Connection: close instead of racing a close (a request already on its way would be lost)."""
        self.closing = True
        self.draining.update(self.pools)
        self.loop.call_later(idle_grace, self._close_idle)

    def connection_closed(self, conn: ClientConnection) -> None:
        """A client connection is gone; wakes all_closed() waiters when it was the last."""
        connections = self.connections
        connections.discard(conn)
        if not connections and self._closed_waiters:
            for waiter in self._closed_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._closed_waiters = []

    def all_closed(self) -> asyncio.Future[None]:
        """A future done once no client connection is open (at once if none is)."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        if self.connections:
            self._closed_waiters.append(waiter)
        else:
            waiter.set_result(None)
        return waiter

    def _close_idle(self) -> None:
        for conn in list(self.connections):
            conn.close_if_idle()

    def idle(self, color: str) -> asyncio.Future[None]:
        """A future done once `color` has no exchange in flight (at once if it has none now)."""
        waiter: asyncio.Future[None] = self.loop.create_future()
        if not self.active[color]:
            waiter.set_result(None)
        else:
            self._idle_waiters[color].append(waiter)
            self.watching += 1
        return waiter

    def unwatch(self, color: str, waiter: asyncio.Future[None]) -> None:
        """Drop a waiter that gave up (its wait timed out), so waits on a busy color leave nothing behind."""
        waiters = self._idle_waiters[color]
        if waiter in waiters:
            waiters.remove(waiter)
            self.watching -= 1

    def exchange_ended(self, ex: Exchange) -> None:
        """An exchange ended while a drain or an idle waiter cares: count it, wake the waiters if idle."""
        color = ex.color
        counts = self.stats.colors[color]  # the color's drain counts, previews included
        if ex.closed_at_deadline:
            counts.streams_deadline += 1
        elif color in self.draining:
            counts.streams_ended += 1
        waiters = self._idle_waiters[color]
        if waiters and not self.active[color]:
            self._idle_waiters[color] = []
            self.watching -= len(waiters)
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
