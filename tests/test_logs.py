"""Structured logging: JSON records carry their extra fields; recurring errors are throttled."""

from __future__ import annotations

import json
import logging
import time

import pytest

from bgproxy.dataplane.throttle import Throttled
from bgproxy.logs import JsonFormatter, TextFormatter


def test_json_formatter_puts_extra_fields_at_top_level() -> None:
    record = logging.LogRecord("bgproxy.proxy", logging.WARNING, __file__, 1, "upstream error", None, None)
    record.color = "blue"
    record.upstream = "127.0.0.1:9001"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "upstream error" and entry["level"] == "warning"
    assert entry["color"] == "blue" and entry["upstream"] == "127.0.0.1:9001"
    assert entry["ts"].endswith("Z")


def test_throttled_logs_once_per_interval_per_key_and_counts_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("bgproxy.test-throttle")
    throttled = Throttled(logger, interval=0.2)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for _ in range(5):
            throttled.warning(("a", "connect_refused"), "upstream error", upstream="a")
        throttled.warning(("b", "connect_refused"), "upstream error", upstream="b")  # its own key
        time.sleep(0.25)
        throttled.warning(("a", "connect_refused"), "upstream error", upstream="a")
    got = [(r.upstream, r.suppressed) for r in caplog.records]  # type: ignore[attr-defined]
    assert got == [("a", 0), ("b", 0), ("a", 4)]


def test_text_formatter_appends_the_structured_fields() -> None:
    record = logging.LogRecord("bgproxy.drain", logging.INFO, __file__, 1, "drain started", None, None)
    record.color = "blue"
    record.in_flight = 3
    line = TextFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert line == "INFO bgproxy.drain: drain started color=blue in_flight=3"
