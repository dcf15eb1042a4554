"""Anytime-valid confidence bounds for a rate (errors per request, slow requests per request).

Which test, and why. A rollout looks at its counters every 50 ms, thousands of times per step. A
fixed-sample test (a z-test or a binomial interval at 99%) checked that often would fire on a healthy
candidate sooner or later, because every look is another chance of a fluke. bgproxy therefore uses a
*confidence sequence*: bounds that hold at every sample size at once, so looking after each request
costs nothing in validity. It is the conjugate mixture of Wald's likelihood ratios (Robbins 1970; Howard,
Ramdas, McAuliffe & Sekhon, "Time-uniform, nonparametric, nonasymptotic confidence sequences", 2021):

    M_n(p) = ∫ q^k (1-q)^(n-k) dBeta(q; 1, b)  /  p^k (1-p)^(n-k)

for k events in n requests. Under the true rate p, M_n(p) is a nonnegative martingale with mean 1, so by
Ville's inequality P(M_n(p) ever reaches 1/alpha) ≤ alpha. The bounds are the p with M_n(p) < 1/alpha;
the chance that the true rate ever leaves them, over the whole unbounded stream of looks, is at most alpha.

Why a mixture and not Wald's SPRT with one fixed alternative: the SPRT is fastest at the alternative it
was tuned for and slow away from it (tuned for 1 %, it needs ~70 requests to see a 10 % error rate; the
mixture ~55), and its bounds cannot be shown. The price is a log factor near the threshold: proving
a rate under 0.5 % at 99 % takes ~1,330 error-free requests here against ~920 for the tuned SPRT
(``requests_to_prove``). The prior Beta(1, b) puts its mean at the threshold being tested, which is where
the evidence is hardest to gather.
"""

from __future__ import annotations

import math

_ITERATIONS = 60  # bisection steps: 2^-60 is far below any ratio worth reporting


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def prior_b(center: float) -> float:
    """The Beta(1, b) prior whose mean is ``center``."""
    _check_open("center", center)
    return 1.0 / center - 1.0


def _check_counts(events: int, n: int) -> None:
    if not 0 <= events <= n:
        raise ValueError(f"need 0 <= events <= n, got events={events}, n={n}")


def _check_open(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")


def log_evalue(events: int, n: int, p: float, b: float) -> float:
    """log M_n(p): the evidence against "the true rate is p"; ≥ ln(1/alpha) rejects it."""
    _check_counts(events, n)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be between 0 and 1, got {p!r}")
    if n == 0:
        return 0.0
    return _log_mixture(events, n, b) - _log_likelihood(events, n, p)


def _log_mixture(events: int, n: int, b: float) -> float:
    """The numerator of M_n: the same for every p, so a bisection computes it once."""
    return _log_beta(1.0 + events, b + n - events) - _log_beta(1.0, b)


def _log_likelihood(events: int, n: int, p: float) -> float:
    if (p <= 0.0 and events > 0) or (p >= 1.0 and events < n):
        return -math.inf
    likelihood = 0.0
    if events:
        likelihood += events * math.log(p)
    if n - events:
        likelihood += (n - events) * math.log1p(-p)
    return likelihood


def bounds(events: int, n: int, alpha: float, b: float) -> tuple[float, float]:
    """(low, high): the true rate stays within them at every n, except with probability ≤ alpha.

    The log e-value is convex in p with its minimum (≤ 0) at events/n, so each side is one bisection.
    """
    _check_counts(events, n)
    _check_open("alpha", alpha)
    if n == 0:
        return 0.0, 1.0
    mixture = _log_mixture(events, n, b)  # computed once: the same arithmetic as log_evalue's
    limit = math.log(1.0 / alpha)
    center = events / n
    low = _edge(events, n, mixture, limit, center, 0.0) if events else 0.0
    high = _edge(events, n, mixture, limit, center, 1.0) if events < n else 1.0
    return low, high


def _edge(events: int, n: int, mixture: float, limit: float, inside: float, outside: float) -> float:
    """Where the log e-value crosses ``limit`` between a rate inside the bounds and one outside."""
    if mixture - _log_likelihood(events, n, outside) < limit:
        return outside
    for _ in range(_ITERATIONS):
        mid = (inside + outside) / 2
        if mixture - _log_likelihood(events, n, mid) >= limit:
            outside = mid
        else:
            inside = mid
    return outside


def _shown(events: int, n: int, threshold: float, alpha: float) -> bool:
    """Whether "the rate is ``threshold``" is rejected at ``alpha``."""
    _check_counts(events, n)
    _check_open("threshold", threshold)
    _check_open("alpha", alpha)
    return n > 0 and log_evalue(events, n, threshold, prior_b(threshold)) >= math.log(1.0 / alpha)


def above(events: int, n: int, threshold: float, alpha: float) -> bool:
    """Whether the rate is shown to exceed ``threshold``: the lower bound is past it."""
    return _shown(events, n, threshold, alpha) and events > threshold * n


def below(events: int, n: int, threshold: float, alpha: float) -> bool:
    """Whether the rate is shown to stay under ``threshold``: the upper bound is below it."""
    return _shown(events, n, threshold, alpha) and events < threshold * n


def requests_to_prove(threshold: float, alpha: float) -> int:
    """Error-free requests needed before ``below`` accepts: the price of ``require_proof``."""
    _check_open("threshold", threshold)
    _check_open("alpha", alpha)
    n = 1
    while not below(0, n, threshold, alpha):
        n *= 2
    low, high = n // 2, n
    while high - low > 1:
        mid = (low + high) // 2
        if below(0, mid, threshold, alpha):
            high = mid
        else:
            low = mid
    return high
