"""Binomial tail figures the statistical tests use to say how many misses chance alone allows."""

from __future__ import annotations

import math


def binomial_quantile(n: int, p: float, level: float) -> int:
    """The smallest c with P(Binomial(n, p) <= c) >= level."""
    total = 0.0
    for c in range(n + 1):
        total += math.comb(n, c) * p**c * (1 - p) ** (n - c)
        if total >= level:
            return c
    return n
