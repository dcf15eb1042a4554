"""Draining: the I/O half of what the Switchboard decides.

When a color loses all its weight the Switchboard records a Drain (pure bookkeeping in core). The
Drainer acts on it: the data plane stops pooling the color's idle connections and counts its
exchanges as they end; the Drainer waits until the color is idle or the deadline passes, and at
the deadline closes what is left (WebSockets with a 1001 close frame at a frame boundary).
Graceful shutdown is the same procedure applied to every color.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..core.colors import COLORS, Color
from ..core.drain import Drain
from ..core.switchboard import Switchboard, SwitchResult
from ..dataplane.pool import Upstream
from ..dataplane.runtime import Runtime

log = logging.getLogger("bgproxy.drain")

# After a close frame, how long the peers get to answer it before the TCP connections go.
CLOSE_GRACE = 1.0
# At shutdown, how long an idle keep-alive connection may stay for a request already on its way.
IDLE_GRACE = 0.5
UPSTREAM_POLL = 0.1  # seconds between looks at a removed upstream's exchanges


class Drainer:
    """Carries out drains and the shutdown drain; one per process."""

    def __init__(self, runtime: Runtime, switchboard: Switchboard, *, full_term: bool = False) -> None:
        """``full_term``: a drain lasts until its deadline even when its color goes idle before,
        because sticky sessions (on_zero_weight: drain) keep sending pinned users there until then."""
        self._runtime = runtime
        self._board = switchboard
        self._full_term = full_term
        self._tasks: dict[Color, asyncio.Task[None]] = {}
        self._upstream_drains: set[asyncio.Task[None]] = set()

    def on_switch(self, result: SwitchResult) -> None:
        """After an applied change: cancel the drains it ended, start the ones it began."""
        for color in result.cancelled_draining:
            self._stop(color)
            log.info("drain cancelled", extra={"color": color})
        for drain in result.started_draining:
            self._start(drain)

    def _start(self, drain: Drain) -> None:
        runtime = self._runtime
        color = drain.color
        runtime.start_draining(color)
        log.info("drain started", extra={"color": color, "in_flight": len(runtime.active[color])})
        if not runtime.active[color] and not self._full_term:
            self._finish(color)
            return
        self._tasks[color] = runtime.loop.create_task(self._run(drain))

    async def _run(self, drain: Drain) -> None:
        color = drain.color
        remaining = max(0.0, drain.deadline - time.time())
        if self._full_term:
            await asyncio.sleep(remaining)
            idle = not self._runtime.active[color]
        else:
            idle = await self.wait_idle(color, remaining)
        if not idle:
            left = list(self._runtime.active[color])
            log.info("drain deadline reached", extra={"color": color, "closing": len(left)})
            for ex in left:
                ex.close_at_deadline(CLOSE_GRACE)
        self._tasks.pop(color, None)
        self._finish(color)

    def _stop(self, color: Color) -> None:
        self._runtime.stop_draining(color)
        task = self._tasks.pop(color, None)
        if task is not None:
            task.cancel()

    def _finish(self, color: Color) -> None:
        self._stop(color)
        self._board.finish_drain(color)
        log.info("drain finished", extra={"color": color})

    def drain_upstream(self, up: Upstream, timeout: float) -> None:
        """A removed upstream: its exchanges finish, or are closed like a drain's at the deadline."""
        task = self._runtime.loop.create_task(self._drain_upstream(up, self._runtime.loop.time() + timeout))
        self._upstream_drains.add(task)
        task.add_done_callback(self._upstream_drains.discard)

    async def _drain_upstream(self, up: Upstream, deadline: float) -> None:
        # Polled: an upstream's exchanges are few, and the data plane keeps no per-upstream waiters.
        active = self._runtime.active[up.color]
        while self._runtime.loop.time() < deadline:
            if not any(ex.upstream is up for ex in active):
                log.info("removed upstream drained", extra={"color": up.color, "upstream": up.addr})
                return
            await asyncio.sleep(UPSTREAM_POLL)
        left = [ex for ex in active if ex.upstream is up]
        log.info("removed upstream: drain deadline", extra={"upstream": up.addr, "closing": len(left)})
        for ex in left:
            ex.close_at_deadline(CLOSE_GRACE)

    def close(self) -> None:
        """Stop the drains of removed upstreams (the process is stopping: its connections go anyway)."""
        for task in list(self._upstream_drains):
            task.cancel()

    async def wait_idle(self, color: str, within: float) -> bool:
        """True once `color` has no open exchange, False if `within` seconds pass first."""
        waiter = self._runtime.idle(color)
        try:
            await asyncio.wait_for(waiter, within)
        except TimeoutError:
            return False
        finally:
            self._runtime.unwatch(color, waiter)  # a no-op once the waiter was woken
        return True

    async def shutdown(self, within: float) -> None:
        """Let in-flight exchanges finish for `within` seconds, then close what is left like a drain."""
        runtime = self._runtime
        runtime.begin_shutdown(min(IDLE_GRACE, within))
        deadline = runtime.loop.time() + within
        for color in COLORS:
            left = deadline - runtime.loop.time()
            if not await self.wait_idle(color, max(left, 0.0)):
                for ex in list(runtime.active[color]):
                    ex.close_at_deadline(CLOSE_GRACE)
        for color in COLORS:  # give close frames their grace, then stop waiting
            await self.wait_idle(color, CLOSE_GRACE + 0.5)
        # No exchange in flight is not the end: a keep-alive client may have a request on its way. Each
        # connection closes after an answer with Connection: close, or idle at the grace; only then is
        # it safe to stop (stop() resets what is left).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runtime.all_closed(), max(deadline - runtime.loop.time(), 0.0))
