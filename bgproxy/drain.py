"""Draining: the I/O half of what the Switchboard decides.

When a color loses all its weight the Switchboard records a Drain (pure bookkeeping). The
Drainer acts on it: closes the color's idle pooled connections, lets in-flight exchanges finish,
counts them as they end, and at the deadline closes what is left (WebSockets with a 1001 close
frame at a frame boundary). Graceful shutdown is the same procedure applied to every color.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .switching import COLORS, Color, Switchboard, SwitchResult

if TYPE_CHECKING:
    from .proxy import Exchange
    from .router import Router

log = logging.getLogger("bgproxy.drain")

# After a close frame, how long the peers get to answer it before the TCP connections go.
CLOSE_GRACE = 1.0


class Drainer:
    """Carries out drains and the shutdown drain; one per process."""

    def __init__(self, router: Router, switchboard: Switchboard) -> None:
        self._router = router
        self._board = switchboard
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._idle_waiters: dict[str, list[asyncio.Future[None]]] = {c: [] for c in COLORS}
        router.drain_progress = self.exchange_ended

    # -- Controller observer ----------------------------------------------------------------------
    def on_switch(self, result: SwitchResult) -> None:
        for color in result.cancelled_draining:
            self._stop(color)
            log.info("drain cancelled", extra={"color": color})
        for drain in result.started_draining:
            self._start(drain.color, drain.deadline)

    def _start(self, color: Color, deadline: float) -> None:
        router = self._router
        router.close_idle(color)
        router.draining.add(color)
        log.info("drain started", extra={"color": color, "in_flight": len(router.active[color])})
        if not router.active[color]:
            self._finish(color)
            return
        delay = max(0.0, deadline - time.time())
        self._timers[color] = router.loop.call_later(delay, self._deadline, color)

    def _stop(self, color: str) -> None:
        self._router.draining.discard(color)
        timer = self._timers.pop(color, None)
        if timer is not None:
            timer.cancel()

    def _finish(self, color: Color) -> None:
        self._stop(color)
        self._board.finish_drain(color)
        log.info("drain finished", extra={"color": color})

    def _deadline(self, color: Color) -> None:
        self._timers.pop(color, None)
        left = list(self._router.active[color])
        log.info("drain deadline reached", extra={"color": color, "closing": len(left)})
        for ex in left:
            ex.close_at_deadline(CLOSE_GRACE)
        self._finish(color)

    # -- data plane hook --------------------------------------------------------------------------
    def exchange_ended(self, ex: Exchange) -> None:
        """An exchange of a draining (or shutting down) color ended; count it and maybe finish."""
        stats = ex.cstats
        if ex.closed_at_deadline:
            stats.streams_deadline += 1
        else:
            stats.streams_ended += 1
        color = ex.color
        if not self._router.active[color]:
            for waiter in self._idle_waiters[color]:
                if not waiter.done():
                    waiter.set_result(None)
            if color in self._timers:
                self._finish(ex.color)  # type: ignore[arg-type]

    # -- waiting ----------------------------------------------------------------------------------
    async def wait_idle(self, color: str, within: float) -> bool:
        """True once `color` has no open exchange, False if `within` seconds pass first."""
        if not self._router.active[color]:
            return True
        waiter: asyncio.Future[None] = self._router.loop.create_future()
        self._idle_waiters[color].append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), within)
        except TimeoutError:
            return False
        finally:
            self._idle_waiters[color].remove(waiter)
        return True

    async def shutdown(self, within: float) -> None:
        """Let in-flight exchanges finish for `within` seconds, then close what is left like a drain."""
        router = self._router
        router.closing = True
        router.draining.update(COLORS)
        for conn in list(router.connections):
            conn.close_if_idle()
        deadline = router.loop.time() + within
        for color in COLORS:
            left = deadline - router.loop.time()
            if not await self.wait_idle(color, max(left, 0.0)):
                for ex in list(router.active[color]):
                    ex.close_at_deadline(CLOSE_GRACE)
        for color in COLORS:  # give close frames their grace, then stop waiting
            await self.wait_idle(color, CLOSE_GRACE + 0.5)
