"""Per-color counters the data plane bumps with plain integer arithmetic.

The hot path only increments ints and appends to nothing; exporters (Prometheus, /v1/state) read
these at scrape time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from .switching import COLORS

NONE_COLOR = "none"  # requests refused before a color was chosen


class ColorStats:
    """Counters for one color (or for "none")."""

    __slots__ = (
        "buckets",
        "codes",
        "duration_counts",
        "duration_sum",
        "header_counts",
        "header_sum",
        "in_flight",
        "streams_deadline",
        "streams_ended",
        "upstream_errors",
    )

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.codes: dict[int, int] = {}
        self.duration_counts = [0] * (len(self.buckets) + 1)  # last slot: +Inf
        self.duration_sum = 0.0
        self.header_counts = [0] * (len(self.buckets) + 1)
        self.header_sum = 0.0
        self.upstream_errors: dict[tuple[str, str], int] = {}
        self.in_flight = 0
        self.streams_ended = 0  # long-lived exchanges of a draining color that ended by themselves
        self.streams_deadline = 0  # closed by bgproxy at a drain or shutdown deadline

    def response(self, status: int, duration: float, now: float) -> None:
        """One answered request; `now` is the loop's monotonic time (for rolling windows)."""
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1
        self.duration_counts[bisect_left(self.buckets, duration)] += 1
        self.duration_sum += duration

    def upstream_header(self, seconds: float) -> None:
        self.header_counts[bisect_left(self.buckets, seconds)] += 1
        self.header_sum += seconds

    def upstream_error(self, upstream: str, reason: str) -> None:
        key = (upstream, reason)
        self.upstream_errors[key] = self.upstream_errors.get(key, 0) + 1


class Stats:
    """All counters of the process, one ColorStats per color plus "none"."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.colors = {c: ColorStats(buckets) for c in (*COLORS, NONE_COLOR)}
