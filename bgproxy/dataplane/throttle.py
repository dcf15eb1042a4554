"""Throttled warnings: an upstream outage must not turn into thousands of log lines a second."""

from __future__ import annotations

import logging
import time
from typing import Any


class Throttled:
    """Logs a recurring event at most once per interval per key, saying how many it held back.

    An upstream outage fails thousands of requests a second; one line a second per upstream and
    reason says the same without drowning the log (the metrics keep the exact counts).
    """

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self._logger = logger
        self._interval = interval
        self._seen: dict[tuple[str, ...], tuple[float, int]] = {}

    def warning(self, key: tuple[str, ...], msg: str, **fields: Any) -> None:
        now = time.monotonic()
        last, held = self._seen.get(key, (-self._interval, 0))
        if now - last < self._interval:
            self._seen[key] = (last, held + 1)
            return
        self._seen[key] = (now, 0)
        self._logger.warning(msg, extra={**fields, "suppressed": held})
