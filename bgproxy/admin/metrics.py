"""Prometheus exposition at ``GET /metrics`` and the rolling error window for ``/v1/state``.

A custom collector reads the plain counters in bgproxy.dataplane.stats at scrape time, so the hot path never
touches a prometheus_client object. Each process view gets its own registry (tests run many
proxies in one process, and the global registry would mix them up).

With ``metrics.enabled: false`` the per-request families (requests, upstream errors, latency
histograms, error ratio) are left out, since nothing counts them; the families read from live state
(active requests, open streams, stream ends, weights, version, info) are still served.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import __version__
from ..core.colors import COLORS
from ..core.rollout import OUTCOMES, RULES, STATES
from .readmodel import Process

__all__ = ["BgproxyCollector", "error_window_state", "metrics_handler"]


def error_window_state(app: Process, color: str) -> dict[str, int | float | None]:
    """The rolling error window of one color, as /v1/state shows it (the guardrail's input).

    ``error_ratio`` is 0.0 when the window saw no requests (read ``requests`` to tell); with metrics
    disabled nothing is counted, so the counts and the ratio are None rather than a false 0.
    """
    stats = app.stats
    if not stats.enabled:
        return {"window_seconds": stats.window_seconds, "requests": None, "errors": None, "error_ratio": None}
    requests, errors = _window_counts(app, color)
    return {
        "window_seconds": stats.window_seconds,
        "requests": requests,
        "errors": errors,
        "error_ratio": errors / requests if requests else 0.0,
    }


def _window_counts(app: Process, color: str) -> tuple[int, int]:
    """Read with the data plane's own clock: the buckets are stamped with its loop.time()."""
    return app.stats.colors[color].window_counts(app.runtime.loop.time())


def _cumulative(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (last one is +Inf) to Prometheus's cumulative ``le`` buckets."""
    out: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip((*bounds, None), counts, strict=True):
        total += count
        out.append(("+Inf" if bound is None else repr(float(bound)), total))
    return out


class BgproxyCollector(Collector):
    """Turns one process's counters and switching state into metric families at scrape time."""

    def __init__(self, app: Process) -> None:
        self.app = app

    def collect(self) -> Iterable[Metric]:
        app = self.app
        stats = app.stats
        if stats.enabled:
            yield from self._per_request()
        active = GaugeMetricFamily(
            "bgproxy_active_requests", "Requests in flight, per color.", labels=["color"]
        )
        streams = GaugeMetricFamily(
            "bgproxy_open_streams",
            "Long-lived exchanges in flight (upgraded, or streaming a body without a length).",
            labels=["color"],
        )
        ended = CounterMetricFamily(
            "bgproxy_streams_ended",
            "Exchanges (mostly streams) left open by a drain that ended by themselves (how=self) "
            "or were closed at the drain or shutdown deadline (how=deadline).",
            labels=["color", "how"],
        )
        weight = GaugeMetricFamily("bgproxy_weight", "Current traffic weight, per color.", labels=["color"])
        weights = app.switchboard.weights.as_dict()
        for color in COLORS:
            cs = stats.colors[color]
            active.add_metric([color], stats.in_flight(color))
            streams.add_metric([color], app.runtime.open_streams(color))
            ended.add_metric([color, "self"], cs.streams_ended)
            ended.add_metric([color, "deadline"], cs.streams_deadline)
            weight.add_metric([color], weights[color])
        version = app.switchboard.version
        yield active
        yield streams
        yield ended
        yield weight
        yield GaugeMetricFamily(
            "bgproxy_state_version", "Version of the switching state (bumped by every change).", value=version
        )
        yield CounterMetricFamily(
            "bgproxy_switches", "Weight changes applied (flips included), all time.", value=version
        )
        info = InfoMetricFamily("bgproxy", "bgproxy build information.", labels=["version"])
        info.add_metric([__version__], {})
        yield info
        yield from self._health()
        yield from self._rollouts()
        yield from self._fleet()

    def _fleet(self) -> Iterable[Metric]:
        """In a fleet: whether the shared store answers and whether this node leads rollouts."""
        fleet = self.app.fleet
        if fleet is None:
            return
        yield GaugeMetricFamily(
            "bgproxy_store_up",
            "1 while the fleet's shared state store answers; 0: serving the last state, refusing changes.",
            value=0 if fleet.error else 1,
        )
        yield GaugeMetricFamily(
            "bgproxy_fleet_leader",
            "1 while this node holds the rollout lease.",
            value=1 if fleet.leading else 0,
        )

    def _rollouts(self) -> Iterable[Metric]:
        """Where the current rollout is, and how rollouts ended (counted since this process started)."""
        runner = self.app.rollouts
        current = runner.running
        yield GaugeMetricFamily(
            "bgproxy_rollout_step",
            "Index of the running rollout's step (0 = first); -1 when none runs.",
            value=current.step if current is not None else -1,
        )
        state = GaugeMetricFamily(
            "bgproxy_rollout_state", "1 for the state the newest rollout is in, else 0.", labels=["state"]
        )
        newest = runner.current
        for name in STATES:
            state.add_metric([name], 1 if newest is not None and newest.state == name else 0)
        yield state
        outcomes = CounterMetricFamily(
            "bgproxy_rollouts", "Rollouts finished, per outcome.", labels=["outcome"]
        )
        for outcome in OUTCOMES:
            outcomes.add_metric([outcome], runner.outcomes.get(outcome, 0))
        yield outcomes
        rollbacks = CounterMetricFamily(
            "bgproxy_rollbacks", "Automatic rollbacks, per rule that fired.", labels=["rule"]
        )
        for rule in RULES:
            rollbacks.add_metric([rule], runner.rollbacks.get(rule, 0))
        yield rollbacks

    def _health(self) -> Iterable[Metric]:
        """Upstream health as the data plane sees it: available (healthy, not ejected) and ejections."""
        up_metric = GaugeMetricFamily(
            "bgproxy_upstream_up",
            "1 while the upstream takes requests (healthy and not ejected), else 0.",
            labels=["color", "upstream"],
        )
        ejections = CounterMetricFamily(
            "bgproxy_ejections", "Passive outlier ejections, all time.", labels=["color", "upstream"]
        )
        for color, pool in self.app.runtime.pools.items():
            for up in pool.upstreams:
                up_metric.add_metric([color, up.addr], 1 if up.available else 0)
                ejections.add_metric([color, up.addr], up.ejections)
        yield up_metric
        yield ejections

    def _per_request(self) -> Iterable[Metric]:
        """The families counted on the hot path; only served when metrics are enabled."""
        stats = self.app.stats
        requests = CounterMetricFamily(
            "bgproxy_requests",
            "Requests answered, by color and status; proxy-made 502/503/504 count under the chosen color, "
            'client errors refused before choosing one under color="none". route="preview": requests '
            'sent to a color by name (preview routing), kept out of the error ratio; else route="live".',
            labels=["color", "code", "route"],
        )
        upstream_errors = CounterMetricFamily(
            "bgproxy_upstream_errors",
            "Exchanges an upstream broke, by color, upstream address and reason.",
            labels=["color", "upstream", "reason"],
        )
        for route, by_color in (("live", stats.colors), ("preview", stats.preview)):
            for color, cs in by_color.items():
                for code, count in sorted(cs.codes.items()):
                    requests.add_metric([color, str(code), route], count)
        broken: dict[tuple[str, str, str], int] = {}
        for color, cs in (*stats.colors.items(), *stats.preview.items()):
            for (upstream, reason), count in cs.upstream_errors.items():
                key = (color, upstream, reason)
                broken[key] = broken.get(key, 0) + count
        for labels, count in sorted(broken.items()):
            upstream_errors.add_metric(list(labels), count)
        yield requests
        yield upstream_errors
        assignments = CounterMetricFamily(
            "bgproxy_sticky_assignments",
            "New users pinned to a color by sticky sessions (the split holds over these, exactly).",
            labels=["color"],
        )
        for color, count in stats.assignments.items():
            assignments.add_metric([color], count)
        yield assignments

        duration = HistogramMetricFamily(
            "bgproxy_request_duration_seconds",
            "Time from request head to last response byte.",
            labels=["color"],
        )
        header = HistogramMetricFamily(
            "bgproxy_upstream_header_seconds",
            "Time from request head to the upstream's response head.",
            labels=["color"],
        )
        window = f"{stats.window_seconds}s"
        ratio = GaugeMetricFamily(
            "bgproxy_error_ratio",
            "Share of requests in the rolling window that were answered 5xx or ended in an upstream error.",
            labels=["color", "window"],
        )
        for color in COLORS:
            cs = stats.colors[color]
            duration.add_metric([color], _cumulative(cs.buckets, cs.duration_counts), cs.duration_sum)
            header.add_metric([color], _cumulative(cs.buckets, cs.header_counts), cs.header_sum)
            count, errors = _window_counts(self.app, color)
            ratio.add_metric([color, window], errors / count if count else 0.0)
        yield duration
        yield header
        yield ratio


def metrics_handler(app: Process) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The aiohttp handler serving this process's metrics in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BgproxyCollector(app))

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handler
