"""Structured logging: plain text for people, one JSON object per line for log pipelines."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from .config import LoggingConfig

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}  # set by Formatter.format


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a call passed with `extra=`."""
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    """Plain lines for people, with the structured fields appended as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _extra(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record; `extra=` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extra(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(cfg: LoggingConfig) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if cfg.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("bgproxy")
    root.handlers[:] = [handler]
    root.setLevel(cfg.level.upper())
    root.propagate = False


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
