"""A re-armable timeout that is cheap enough to re-arm on every request.

Scheduling and cancelling a loop timer per request costs more than the rest of a small request's
bookkeeping. A Deadline keeps one timer handle alive; re-arming only stores a new expiry time, and
when the timer fires early it simply schedules itself again for the stored time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """Calls `callback` once the armed expiry passes, unless disarmed or re-armed first."""

    __slots__ = ("_callback", "_handle", "_loop", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self.when = 0.0  # 0.0 = disarmed

    def arm(self, seconds: float) -> None:
        self.when = when = self._loop.time() + seconds
        handle = self._handle
        if handle is None:
            self._handle = self._loop.call_at(when, self._fire)
        elif handle.when() > when:  # earlier than the pending wake-up: reschedule
            handle.cancel()
            self._handle = self._loop.call_at(when, self._fire)

    def disarm(self) -> None:
        self.when = 0.0

    def cancel(self) -> None:
        self.when = 0.0
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        when = self.when
        if not when:
            return
        if self._loop.time() < when:
            self._handle = self._loop.call_at(when, self._fire)
            return
        self.when = 0.0
        self._callback()
