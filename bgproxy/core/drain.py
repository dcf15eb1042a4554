"""Drain bookkeeping: which colors lost their weight, and until when their streams may run."""

from __future__ import annotations

from dataclasses import dataclass

from .colors import COLORS, Color
from .weights import Weights


@dataclass(frozen=True, slots=True)
class Drain:
    """A color that lost all its weight: its open streams may finish until ``deadline``."""

    color: Color
    started_at: float
    deadline: float


def drains_started(old: Weights, new: Weights, now: float, timeout: float) -> tuple[Drain, ...]:
    """The colors a change from ``old`` to ``new`` takes all weight from, draining from ``now``."""
    return tuple(
        Drain(color=c, started_at=now, deadline=now + timeout)
        for c in COLORS
        if old.of(c) > 0 and new.of(c) == 0
    )


def drains_cancelled(draining: dict[Color, Drain], new: Weights) -> tuple[Color, ...]:
    """Draining colors that ``new`` gives weight again: their drain ends, their streams stay."""
    return tuple(c for c in COLORS if c in draining and new.of(c) > 0)


def due(draining: dict[Color, Drain], now: float) -> list[Drain]:
    """Drains whose deadline has passed at ``now``."""
    return [d for d in draining.values() if d.deadline <= now]
