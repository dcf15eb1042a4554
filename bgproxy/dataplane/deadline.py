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

    __slots__ = ("_callback", "_handle", "_loop", "_scheduled", "when")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._scheduled = 0.0  # when the live handle fires
        self.when = 0.0  # 0.0 = disarmed

    def arm(self, seconds: float) -> None:
        self.arm_at(self._loop.time() + seconds)

    def arm_at(self, when: float) -> None:
        """Expire at loop time `when` (for callers that already hold the current time)."""
        self.when = when
        if self._handle is None or self._scheduled > when:  # no wake-up, or one too late
            if self._handle is not None:
                self._handle.cancel()
            self._scheduled = when
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
            self._scheduled = when
            self._handle = self._loop.call_at(when, self._fire)
            return
        self.when = 0.0
        self._callback()
