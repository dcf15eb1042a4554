"""Per-color counters the data plane bumps with plain integer arithmetic.

The hot path only increments ints in preallocated lists and dicts; exporters (the Prometheus
collector, /v1/state) read and aggregate them at scrape time, so counting costs almost nothing per
request. Everything runs on the event loop thread, so no locks are needed.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence

from ..core.colors import COLORS

NONE_COLOR = "none"  # requests refused before a color was chosen


class ColorStats:
    """Counters for one color (or for "none").

    Besides lifetime counters it keeps a rolling error window: a ring of one-second buckets indexed
    by ``int(now) % window``, each stamped with the second it holds, so a reused bucket is zeroed
    lazily and a read can skip stale ones. That makes the window exact to the second without any
    timer or per-request allocation.
    """

    __slots__ = (
        "_win_errors",
        "_win_requests",
        "_win_second",
        "broken",
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
        "window",
    )

    def __init__(self, buckets: Sequence[float], window: int = 60) -> None:
        self.buckets = tuple(buckets)
        self.codes: dict[int, int] = {}
        self.broken: dict[int, int] = {}  # status -> exchanges an upstream error cut after that status
        self.duration_counts = [0] * (len(self.buckets) + 1)  # last slot: +Inf
        self.duration_sum = 0.0
        self.header_counts = [0] * (len(self.buckets) + 1)
        self.header_sum = 0.0
        self.upstream_errors: dict[tuple[str, str], int] = {}
        self.in_flight = 0
        self.streams_ended = 0  # long-lived exchanges of a draining color that ended by themselves
        self.streams_deadline = 0  # closed by bgproxy at a drain or shutdown deadline
        self.window = window
        self._win_second = [-1] * window  # which second each bucket currently holds
        self._win_requests = [0] * window
        self._win_errors = [0] * window

    def response(self, status: int, duration: float, now: float, broken: bool = False) -> None:
        """One answered request; `now` is the loop's monotonic time (for rolling windows).

        `broken`: an upstream error ended the exchange (maybe after a non-5xx status was sent).
        """
        codes = self.codes
        try:
            codes[status] += 1
        except KeyError:
            codes[status] = 1
        self.duration_counts[bisect_left(self.buckets, duration)] += 1  # le semantics: x <= bound
        self.duration_sum += duration
        second = int(now)
        slot = second % self.window
        if self._win_second[slot] != second:
            self._win_second[slot] = second
            self._win_requests[slot] = 0
            self._win_errors[slot] = 0
        self._win_requests[slot] += 1
        if broken:
            self._win_errors[slot] += 1
            try:
                self.broken[status] += 1
            except KeyError:
                self.broken[status] = 1
        elif status >= 500:
            self._win_errors[slot] += 1

    def upstream_header(self, seconds: float) -> None:
        self.header_counts[bisect_left(self.buckets, seconds)] += 1
        self.header_sum += seconds

    def upstream_error(self, upstream: str, reason: str) -> None:
        """An upstream failed an attempt; whether the exchange failed is said by response(broken=)."""
        key = (upstream, reason)
        errors = self.upstream_errors
        try:
            errors[key] += 1
        except KeyError:
            errors[key] = 1

    def window_counts(self, now: float) -> tuple[int, int]:
        """(requests, errors) answered in the last `window` seconds, counting the current one."""
        second = int(now)
        oldest = second - self.window
        requests = errors = 0
        for stamp, req, err in zip(self._win_second, self._win_requests, self._win_errors, strict=True):
            if oldest < stamp <= second:
                requests += req
                errors += err
        return requests, errors


class UncountedColorStats(ColorStats):
    """``metrics.enabled: false``: the per-request calls do nothing at all.

    Only ``in_flight`` (drains wait on it) and the stream-end counters (bumped once per drained
    stream, not per request) keep counting; they are plain attributes the data plane updates itself.
    """

    __slots__ = ()

    def response(self, status: int, duration: float, now: float, broken: bool = False) -> None:
        """Not counted."""

    def upstream_header(self, seconds: float) -> None:
        """Not counted."""

    def upstream_error(self, upstream: str, reason: str) -> None:
        """Not counted."""


class Stats:
    """All counters of the process, one ColorStats per color plus "none"."""

    def __init__(self, buckets: Sequence[float], *, enabled: bool = True, error_window: float = 60.0) -> None:
        self.enabled = enabled
        # Whole seconds: the window is exact to one-second buckets, so a 2.5 s setting means 3.
        self.window_seconds = max(1, math.ceil(error_window))
        kind = ColorStats if enabled else UncountedColorStats
        self.colors = {c: kind(buckets, self.window_seconds) for c in (*COLORS, NONE_COLOR)}
        # Preview requests (routed by name, not by weight) are counted apart, so they never move a
        # color's live error ratio; exported with route="preview".
        self.preview: dict[str, ColorStats] = {c: kind(buckets, self.window_seconds) for c in COLORS}
        self.assignments: dict[str, int] = dict.fromkeys(COLORS, 0)  # new users pinned by sticky sessions

    def in_flight(self, color: str) -> int:
        """Requests of a color being proxied now, previews included."""
        return self.colors[color].in_flight + self.preview[color].in_flight
