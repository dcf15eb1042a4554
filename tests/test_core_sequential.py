"""Anytime-valid bounds for a rate as tables and seeded simulations (bgproxy.core.sequential).

No clock, no sockets: every figure is either a closed form worked out in the test or a seeded
simulation, so a failure always reproduces.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

import pytest
from binomial import binomial_quantile

from bgproxy.core.sequential import above, below, bounds, log_evalue, prior_b, requests_to_prove

B005 = prior_b(0.005)  # the prior of the default max_error_ratio: Beta(1, 199)
ALPHA = 0.05


def log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


# --- prior_b -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("center", "b"), [(0.5, 1.0), (0.005, 199.0), (0.01, 99.0), (0.2, 4.0), (0.9, 1 / 9)]
)
def test_prior_b_puts_the_mean_at_the_center(center: float, b: float) -> None:
    assert prior_b(center) == pytest.approx(b)
    assert 1 / (1 + prior_b(center)) == pytest.approx(center)  # the mean of Beta(1, b)


@pytest.mark.parametrize("center", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_prior_b_rejects(center: float) -> None:
    with pytest.raises(ValueError, match="center must be between 0 and 1"):
        prior_b(center)


# --- log_evalue ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "n", "p", "b", "expected"),
    [
        # nothing seen: no evidence against anything
        (0, 0, 0.5, B005, 0.0),
        (0, 0, 0.0, B005, 0.0),
        (0, 0, 1.0, B005, 0.0),
        # an impossible observation under p is infinite evidence against it
        (1, 1, 0.0, B005, math.inf),
        (3, 10, 0.0, B005, math.inf),
        (0, 1, 1.0, B005, math.inf),
        (9, 10, 1.0, B005, math.inf),
        # events = 0: log(b / (b + n)) - n log(1 - p)
        (0, 1, 0.0, B005, math.log(199 / 200)),
        (0, 10, 0.0, B005, math.log(199 / 209)),
        (0, 100, 0.005, B005, math.log(199 / 299) - 100 * math.log1p(-0.005)),
        (0, 1000, 0.005, B005, math.log(199 / 1199) - 1000 * math.log1p(-0.005)),
        # events = n: log B(1 + n, b) - log B(1, b) - n log p
        (1, 1, 0.005, B005, 0.0),  # 1 / (b + 1) = p exactly
        (2, 2, 0.005, B005, math.log(2 * 200 * 200 / (200 * 201))),
        (5, 5, 1.0, B005, log_beta(6, 199) - log_beta(1, 199)),
        (10, 10, 0.5, 1.0, log_beta(11, 1) - log_beta(1, 1) + 10 * math.log(2)),
        # the general case
        (3, 50, 0.1, 9.0, log_beta(4, 56) - log_beta(1, 9) - 3 * math.log(0.1) - 47 * math.log(0.9)),
    ],
)
def test_log_evalue(events: int, n: int, p: float, b: float, expected: float) -> None:
    got = log_evalue(events, n, p, b)
    if math.isinf(expected):
        assert got == expected
    else:
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("events", "n"), [(5, 10), (0, 40), (40, 40), (1, 300)])
def test_log_evalue_is_lowest_near_the_observed_rate_and_at_most_zero_there(events: int, n: int) -> None:
    """The mixture never beats the best single rate: at events/n the evidence is <= 0 (no rejection)."""
    center = events / n
    assert log_evalue(events, n, center, B005) <= 0.0
    grid = [i / 200 for i in range(201)]
    values = [log_evalue(events, n, p, B005) for p in grid]
    lowest = grid[values.index(min(values))]
    assert abs(lowest - center) <= 1 / 200


# --- bounds --------------------------------------------------------------------------------------


def high_with_no_events(n: int, alpha: float, b: float) -> float:
    """Closed form for events = 0: log(b / (b + n)) - n log(1 - p) = log(1 / alpha)."""
    return 1 - (alpha * b / (b + n)) ** (1 / n)


def low_with_all_events(n: int, alpha: float, b: float) -> float:
    """Closed form for events = n: log B(1 + n, b) - log B(1, b) - n log p = log(1 / alpha)."""
    return math.exp((log_beta(1 + n, b) - log_beta(1, b) + math.log(alpha)) / n)


@pytest.mark.parametrize(
    ("events", "n", "alpha", "b", "low", "high"),
    [
        (0, 0, 0.05, B005, 0.0, 1.0),  # nothing seen: anything goes
        (0, 0, 0.001, 1.0, 0.0, 1.0),
        (0, 10, 0.05, B005, 0.0, high_with_no_events(10, 0.05, B005)),
        (0, 1325, 0.01, B005, 0.0, high_with_no_events(1325, 0.01, B005)),
        (0, 10**6, 0.05, B005, 0.0, high_with_no_events(10**6, 0.05, B005)),
        (10, 10, 0.05, B005, low_with_all_events(10, 0.05, B005), 1.0),
        (7, 7, 0.01 / 8, B005, low_with_all_events(7, 0.01 / 8, B005), 1.0),
        (200, 200, 0.05, 4.0, low_with_all_events(200, 0.05, 4.0), 1.0),
    ],
)
def test_bounds_at_the_edges(events: int, n: int, alpha: float, b: float, low: float, high: float) -> None:
    assert bounds(events, n, alpha, b) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))


def test_bounds_at_the_edges_are_exact_zero_and_one() -> None:
    assert bounds(0, 50, ALPHA, B005)[0] == 0.0
    assert bounds(50, 50, ALPHA, B005)[1] == 1.0
    assert bounds(1, 50, ALPHA, B005)[0] > 0.0
    assert bounds(49, 50, ALPHA, 1.0)[1] < 1.0
    # With the prior at 0.005, nothing above 49/50 can be rejected in float: the mixture is ~e^-119 there
    # (Beta(1, 199) has next to no mass near 0.98), so only 1 - p < e^-113 would be; the bound is 1.0.
    assert bounds(49, 50, ALPHA, B005)[1] == 1.0


GRID = [
    (k, n) for n in (1, 2, 5, 10, 50, 200, 1000, 5000) for k in sorted({0, 1, n // 100, n // 10, n // 2, n})
]


@pytest.mark.parametrize(("events", "n"), GRID)
@pytest.mark.parametrize("b", [B005, prior_b(0.05), 1.0])
def test_bounds_contain_the_observed_rate_and_are_where_the_evidence_crosses(
    events: int, n: int, b: float
) -> None:
    low, high = bounds(events, n, ALPHA, b)
    limit = math.log(1 / ALPHA)
    assert 0.0 <= low <= events / n <= high <= 1.0
    # each bound is the edge of the rejected region: rejected at the bound, not just inside it
    if low > 0.0:
        assert log_evalue(events, n, low, b) >= limit
        assert log_evalue(events, n, low * (1 + 1e-9) + 1e-15, b) < limit
    if high < 1.0:
        assert log_evalue(events, n, high, b) >= limit
        assert log_evalue(events, n, high * (1 - 1e-9), b) < limit


@pytest.mark.parametrize("rate", [0.0, 0.003, 0.05, 0.5, 1.0])
def test_bounds_shrink_as_n_grows(rate: float) -> None:
    widths = []
    for n in (10, 100, 1000, 10_000, 100_000):
        low, high = bounds(round(rate * n), n, ALPHA, B005)
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True)
    assert widths[-1] < widths[0] / 10
    # far from the prior's center (0.005) the bounds are wide for long: 0.053 at 0.5 after 100,000
    assert widths[-1] < 0.06


@pytest.mark.parametrize(("events", "n"), [(0, 100), (3, 100), (50, 100), (100, 100), (17, 4000)])
def test_bounds_widen_as_alpha_shrinks(events: int, n: int) -> None:
    seen = [bounds(events, n, alpha, B005) for alpha in (0.2, 0.05, 0.01, 0.001)]
    lows = [low for low, _ in seen]
    highs = [high for _, high in seen]
    assert lows == sorted(lows, reverse=True)
    assert highs == sorted(highs)


# --- above and below -----------------------------------------------------------------------------

ROLLOUT_ALPHA = 0.01 / 8  # confidence 0.99 split over 4 steps x 2 rules: what a default rollout spends


@pytest.mark.parametrize(
    ("events", "n", "threshold", "alpha", "is_above", "is_below"),
    [
        (0, 0, 0.005, ALPHA, False, False),  # nothing seen, nothing shown
        (0, 1, 0.005, ALPHA, False, False),
        (1, 1, 0.005, ALPHA, False, False),  # one error in one request: e-value exactly 1
        # all errors: 7 in a row are needed at the rollout's alpha, 6 are not enough
        (6, 6, 0.005, ROLLOUT_ALPHA, False, False),
        (7, 7, 0.005, ROLLOUT_ALPHA, True, False),
        (10, 10, 0.005, ALPHA, True, False),
        (20, 200, 0.005, ROLLOUT_ALPHA, True, False),
        # at or under the threshold is never "above", however strong the evidence
        (0, 10**6, 0.005, ALPHA, False, True),
        (5000, 10**6, 0.005, ALPHA, False, False),  # exactly at it: neither
        (1, 200, 0.005, ROLLOUT_ALPHA, False, False),  # 0.5 % on 200: nothing shown either way
        # error-free requests prove "below" after requests_to_prove of them
        (0, 1324, 0.005, 0.01, False, False),
        (0, 1325, 0.005, 0.01, False, True),
        (1, 1325, 0.005, 0.01, False, False),  # one error: more requests needed
        (1, 5000, 0.005, 0.01, False, True),
        (1, 1, 0.5, ALPHA, False, False),
        (999, 1000, 0.5, ALPHA, True, False),
        (1, 1000, 0.5, ALPHA, False, True),
    ],
)
def test_above_and_below(
    events: int, n: int, threshold: float, alpha: float, is_above: bool, is_below: bool
) -> None:
    assert above(events, n, threshold, alpha) is is_above
    assert below(events, n, threshold, alpha) is is_below


@pytest.mark.parametrize(("events", "n"), GRID)
@pytest.mark.parametrize("threshold", [0.005, 0.05, 0.3])
def test_above_and_below_agree_with_the_bounds(events: int, n: int, threshold: float) -> None:
    """above = the threshold is under the lower bound; below = over the upper one (same prior)."""
    low, high = bounds(events, n, ALPHA, prior_b(threshold))
    assert above(events, n, threshold, ALPHA) is (threshold <= low and events > threshold * n)
    assert below(events, n, threshold, ALPHA) is (threshold >= high and events < threshold * n)
    assert not (above(events, n, threshold, ALPHA) and below(events, n, threshold, ALPHA))


# --- requests_to_prove ---------------------------------------------------------------------------


def test_requests_to_prove_matches_the_docstring() -> None:
    """The module docstring: proving a rate under 0.5 % at 99 % takes ~1,330 error-free requests."""
    n = requests_to_prove(0.005, 0.01)
    assert 900 <= n <= 1500
    assert (n + 5) // 10 * 10 == 1330  # half up: Python's round(1325, -1) would give 1320
    assert n == 1325
    assert below(0, n, 0.005, 0.01)
    assert not below(0, n - 1, 0.005, 0.01)


def test_requests_to_prove_beats_nothing_and_costs_a_log_factor_over_the_tuned_sprt() -> None:
    """Wald's SPRT for 0.5 % against 1 % at 99 %: ln(100) / ln(0.995 / 0.99) ~ 915 clean requests."""
    sprt = math.ceil(math.log(100) / math.log(0.995 / 0.99))
    assert sprt == 915  # the docstring's "~920"
    assert sprt < requests_to_prove(0.005, 0.01) < 1.5 * sprt


@pytest.mark.parametrize(
    ("threshold", "alpha", "n"),
    [(0.005, 0.01, 1325), (0.005, 0.05, 947), (0.01, 0.01, 662), (0.5, 0.05, 8), (0.001, 0.01, 6636)],
)
def test_requests_to_prove_is_the_first_clean_run_that_proves(threshold: float, alpha: float, n: int) -> None:
    assert requests_to_prove(threshold, alpha) == n
    b = prior_b(threshold)
    # the closed form of log_evalue at zero events crosses log(1/alpha) exactly there
    evidence = [math.log(b / (b + m)) - m * math.log1p(-threshold) for m in (n - 1, n)]
    assert evidence[0] < math.log(1 / alpha) <= evidence[1]


def first_shown_above(rate: float, threshold: float, alpha: float) -> int:
    """Requests until a stream at exactly ``rate`` (round(rate * n) events) is shown above ``threshold``."""
    return next(n for n in range(1, 10_000) if above(round(rate * n), n, threshold, alpha))


def test_a_ten_percent_error_rate_is_seen_sooner_than_by_the_tuned_sprt() -> None:
    """SPRT of 0.5 % against 1 % at 99 % drifts ln 2 x 0.1 + ln(0.99/0.995) x 0.9 per request at 10 %."""
    drift = 0.1 * math.log(2) + 0.9 * math.log(0.99 / 0.995)
    sprt = math.ceil(math.log(100) / drift)
    assert sprt == 72  # the docstring's "~70"
    assert first_shown_above(0.1, 0.005, 0.01) == 55 < sprt  # the docstring's "~55"


# --- invalid input -------------------------------------------------------------------------------


def call_id(call: Callable[..., object], args: tuple[Any, ...]) -> str:
    return f"{call.__name__}{args}"


def row(call: Callable[..., object], args: tuple[Any, ...]) -> Any:
    return pytest.param(call, args, id=call_id(call, args))


@pytest.mark.parametrize(
    ("call", "args"),
    [
        row(log_evalue, (-1, 5, 0.1, B005)),
        row(log_evalue, (6, 5, 0.1, B005)),
        row(log_evalue, (0, -1, 0.1, B005)),
        row(log_evalue, (1, 0, 0.1, B005)),
        row(bounds, (1, 5, 0.0, B005)),
        row(bounds, (1, 5, 1.0, B005)),
        row(bounds, (1, 5, -0.5, B005)),
        row(bounds, (0, 0, 1.5, B005)),  # alpha is checked even with nothing seen
        row(bounds, (6, 5, 0.05, B005)),
        row(bounds, (-1, 5, 0.05, B005)),
        row(above, (1, 10, 0.0, 0.05)),
        row(below, (1, 10, 1.0, 0.05)),
        row(below, (5, 10, 1.5, 0.05)),
        row(above, (6, 5, 0.1, 0.05)),
        row(below, (-1, 5, 0.1, 0.05)),
        row(requests_to_prove, (1.0, 0.05)),
        # checked on every path, not only where the arithmetic happens to need it
        row(bounds, (5, 0, 0.05, B005)),
        row(bounds, (-1, 0, 0.05, B005)),
        row(bounds, (0, -1, 0.05, B005)),
        row(log_evalue, (0, 10, -0.1, B005)),
        row(log_evalue, (1, 1, 1.5, B005)),
        row(above, (5, 10, 0.1, 1.5)),
        row(above, (5, 10, 0.1, 0.0)),
        row(below, (0, 10, 0.1, 0.0)),
        row(above, (0, 10, 0.0, 0.05)),
        row(above, (-1, 5, 0.1, 0.05)),
        row(below, (7, 5, 0.1, 0.05)),
        row(requests_to_prove, (0.005, 0.0)),
        row(requests_to_prove, (0.005, 1.0)),
        row(requests_to_prove, (0.0, 0.05)),
    ],
)
def test_invalid_input_raises_value_error(call: Callable[..., object], args: tuple[Any, ...]) -> None:
    try:
        got = call(*args)
    except ValueError:
        return
    except Exception as exc:  # the point is which exception
        pytest.fail(f"{call.__name__}{args} raised {type(exc).__name__}: {exc}, not ValueError")
    pytest.fail(f"{call.__name__}{args} returned {got!r}, not ValueError")


# --- the anytime-valid claim, simulated ----------------------------------------------------------


def ever_leaves(rng: random.Random, rate: float, b: float, draws: int, alpha: float) -> bool:
    """Whether the true ``rate`` leaves the bounds at any of ``draws`` Bernoulli(rate) draws.

    It leaves exactly when log_evalue(k, n, rate, b) >= ln(1/alpha). Between two events (k fixed) the
    log e-value is convex in n: its step from n to n + 1 is log((b + n - k) / (b + n + 1)) - log(1 - rate),
    which grows with n. So its largest value over a run of non-events is at one end of the run, and
    looking at n = 1, n = draws, and just before and at each event is the same as looking at every n
    (``test_the_shortcut_sees_every_exit`` checks that against looking at every draw).
    """
    limit = math.log(1 / alpha)
    events = [n for n in range(1, draws + 1) if rng.random() < rate]
    looks = sorted({1, draws, *events, *(e - 1 for e in events)} - {0})
    k = 0
    for n in looks:
        while k < len(events) and events[k] <= n:
            k += 1
        if log_evalue(k, n, rate, b) >= limit:
            return True
    return False


def first_exit_every_draw(rng: random.Random, rate: float, b: float, draws: int, alpha: float) -> bool:
    limit = math.log(1 / alpha)
    k = 0
    for n in range(1, draws + 1):
        k += rng.random() < rate
        if log_evalue(k, n, rate, b) >= limit:
            return True
    return False


@pytest.mark.parametrize(
    ("rate", "center", "streams"),
    [
        (0.001, 0.005, 1000),  # a healthy candidate judged against the default threshold's prior
        (0.005, 0.005, 1000),  # a rate sitting exactly at the prior's center
        (0.05, 0.005, 300),  # far from the center: the prior is least helpful
        (0.05, 0.05, 300),
    ],
    ids=str,
)
def test_the_true_rate_rarely_ever_leaves_the_bounds(rate: float, center: float, streams: int) -> None:
    """Anytime validity: over a whole stream of looks, the true rate leaves the bounds with chance <= alpha.

    300-1000 streams of 3,000 Bernoulli draws, looked at after every draw (see ``ever_leaves``). The
    claim is about a probability, so the seeded count is held to what Binomial(streams, alpha) allows
    99 % of the time: a method that is exactly at alpha fails this with probability <= 1 %. Asserting
    the fraction <= alpha outright would fail on noise: Ville's inequality is nearly tight when the
    e-value moves in small steps, and by hand 40,000 streams at rate 0.05 with the 0.005 prior left
    the bounds 2,008 times (5.02 %, standard error 0.11 %); this seed gives 21/300 for that row.
    """
    rng = random.Random(f"coverage {rate} {center}")
    left = sum(ever_leaves(rng, rate, prior_b(center), 3000, ALPHA) for _ in range(streams))
    allowed = binomial_quantile(streams, ALPHA, 0.99)
    print(f"rate {rate} (prior center {center}): left the 95% bounds in {left}/{streams} streams")
    assert left <= allowed, f"{left}/{streams} streams left the bounds; Binomial allows {allowed}"


@pytest.mark.parametrize(("rate", "center"), [(0.005, 0.005), (0.05, 0.005), (0.3, 0.05)])
def test_the_shortcut_sees_every_exit(rate: float, center: float) -> None:
    """ever_leaves looks only at the ends of runs; looking after every draw finds the same streams."""
    b = prior_b(center)
    for seed in range(40):
        for alpha in (0.5, 0.05):  # 0.5: many exits, so the two really are compared
            shortcut = ever_leaves(random.Random(seed), rate, b, 1000, alpha)
            every = first_exit_every_draw(random.Random(seed), rate, b, 1000, alpha)
            assert shortcut is every, (seed, alpha)


def test_log_evalue_and_bounds_agree_on_when_the_true_rate_is_out() -> None:
    """The same streams through bounds(): the rate is inside (low, high) exactly when not rejected."""
    rng = random.Random("bounds agree")
    limit = math.log(1 / ALPHA)
    outside = 0
    for rate in (0.005, 0.05):
        for _ in range(5):
            k = 0
            for n in range(1, 1001):
                k += rng.random() < rate
                if n % 10:
                    continue
                low, high = bounds(k, n, ALPHA, B005)
                rejected = log_evalue(k, n, rate, B005) >= limit
                assert (not low < rate < high) is rejected
                outside += rejected
    assert outside < 500  # a sanity bound: most looks have the true rate inside
