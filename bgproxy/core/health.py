"""Upstream health decisions: active-check thresholds and passive outlier ejection (Envoy's rules).

The control plane feeds in what happened (a probe result, a failed exchange) with the time, and
applies the verdict; nothing here reads a clock, so every rule is a table test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class CheckState:
    """An upstream's active-check standing: healthy or not, and the current run of results."""

    healthy: bool = True
    passes: int = 0
    fails: int = 0


def after_check(state: CheckState, ok: bool, healthy_threshold: int, unhealthy_threshold: int) -> CheckState:
    """The standing after one probe: it turns only after a run of `threshold` equal results."""
    if ok:
        passes = state.passes + 1
        return CheckState(state.healthy or passes >= healthy_threshold, passes, 0)
    fails = state.fails + 1
    return CheckState(state.healthy and fails < unhealthy_threshold, 0, fails)


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """outlier: in a pool's config (Envoy's outlier_detection, consecutive failures only)."""

    consecutive_failures: int
    base_ejection_time: float
    max_ejection_time: float
    max_ejection_percent: int


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one more failure does: keep counting, eject until ``until``, or spare (the cap is reached)."""

    action: Literal["count", "eject", "spare"]
    failures: int  # consecutive failures after this one (0 once ejected)
    ejections: int  # times ejected, this one included
    seconds: float = 0.0
    until: float = 0.0


def after_failure(
    policy: OutlierPolicy,
    *,
    failures: int,
    ejected: bool,
    ejections: int,
    pool_ejected: int,
    pool_size: int,
    now: float,
) -> Verdict:
    """One connect failure or 5xx from an upstream with ``failures`` in a row before it.

    The ejection time grows with each ejection up to the maximum; an ejection that would put more
    than ``max_ejection_percent`` of the pool out is skipped, so a pool never ejects itself empty.
    """
    failures += 1
    if failures < policy.consecutive_failures or ejected:
        return Verdict("count", failures, ejections)
    if (pool_ejected + 1) * 100 > pool_size * policy.max_ejection_percent:
        return Verdict("spare", failures, ejections)
    ejections += 1
    seconds = min(policy.base_ejection_time * ejections, policy.max_ejection_time)
    return Verdict("eject", 0, ejections, seconds, now + seconds)
