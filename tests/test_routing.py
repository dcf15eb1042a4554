"""Where a request picks its color: smooth weighted round robin and the route table (dataplane.routing).

Run against the compiled module when the package is built with mypyc, so this checks the code that
serves traffic.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest

from bgproxy.core.colors import COLORS, Color
from bgproxy.dataplane.routing import RouteTable, SmoothWRR, pick

B: Color = "blue"
G: Color = "green"


def nginx_swrr(blue: int, green: int) -> Iterator[Color]:
    """The textbook nginx algorithm, written independently of the optimised one under test."""
    weight = {B: blue, G: green}
    current = {B: 0, G: 0}
    total = blue + green
    while True:
        for c in COLORS:
            current[c] += weight[c]
        best = max(COLORS, key=lambda c: current[c])  # max() keeps the first on ties: blue
        current[best] -= total
        yield best


def picks(w: SmoothWRR, n: int) -> list[str]:
    return [w.pick() for _ in range(n)]


b, g = B, G


@pytest.mark.parametrize(
    ("blue", "green", "sequence"),
    [
        # Worked by hand from the nginx rules, so they check the reference too.
        (3, 2, [b, g, b, g, b] * 2),
        (2, 3, [g, b, g, b, g] * 2),
        (1, 1, [b, g] * 4),
        (2, 1, [b, g, b] * 2),
        (1, 2, [g, b, g] * 2),
        (5, 1, [b, b, b, g, b, b] * 2),
        (100, 0, [b] * 10),
        (0, 5, [g] * 10),
    ],
)
def test_swrr_known_sequences(blue: int, green: int, sequence: list[Color]) -> None:
    assert picks(SmoothWRR(blue, green), len(sequence)) == sequence
    assert list(itertools.islice(nginx_swrr(blue, green), len(sequence))) == sequence


SWRR_PAIRS = [
    (90, 10),
    (1, 1),
    (3, 2),
    (7, 3),
    (1, 999),
    (999, 1),
    (9999, 1),
    (1, 9999),
    (50, 50),
    (2, 4),  # not in lowest terms: the period is still the total
    (333, 667),
    (12345, 54321),
    (100, 0),
    (0, 1),
]


@pytest.mark.parametrize(("blue", "green"), SWRR_PAIRS)
def test_swrr_matches_nginx_and_is_exact(blue: int, green: int) -> None:
    total = blue + green
    n = 3 * total
    got = picks(SmoothWRR(blue, green), n)
    assert got == list(itertools.islice(nginx_swrr(blue, green), n))
    # Every window of `total` consecutive picks holds exactly the configured counts.
    in_window = got[:total].count(B)
    assert in_window == blue
    for i in range(total, n):
        in_window += (got[i] == B) - (got[i - total] == B)
        assert in_window == blue, f"window ending at {i}"
    # Evenly interleaved: every prefix is within half a pick of the exact share.
    seen = 0
    for k, color in enumerate(got, start=1):
        seen += color == B
        assert abs(2 * (seen * total - k * blue)) <= total, f"prefix {k}"


@pytest.mark.parametrize(("blue", "green", "n", "expected_blue"), [(90, 10, 1000, 900), (7, 3, 1000, 700)])
def test_swrr_counts(blue: int, green: int, n: int, expected_blue: int) -> None:
    assert picks(SmoothWRR(blue, green), n).count(B) == expected_blue


def test_swrr_windows_of_100_for_90_10() -> None:
    got = picks(SmoothWRR(90, 10), 1000)
    for start in range(0, 1000 - 100 + 1):
        assert got[start : start + 100].count(B) == 90


def test_swrr_random_pairs_match_nginx() -> None:
    """Stands in for a hypothesis property test (hypothesis is not in the venv): fixed seed, many pairs."""
    rng = random.Random(20240601)
    for _ in range(400):
        blue = rng.choice([0, rng.randint(1, 10), rng.randint(1, 1000), rng.randint(1, 10**6)])
        green = rng.choice([rng.randint(1, 10), rng.randint(1, 1000), rng.randint(1, 10**6)])
        if rng.random() < 0.5:
            blue, green = green, blue
        n = min(2 * (blue + green), 3000)
        got = picks(SmoothWRR(blue, green), n)
        assert got == list(itertools.islice(nginx_swrr(blue, green), n)), (blue, green)
        period = blue + green
        if period <= 3000:
            assert got[:period].count(B) == blue, (blue, green)


def test_route_table_is_a_snapshot_with_its_own_picker() -> None:
    """A new table restarts the interleaving, as nginx does when weights change; the old one is untouched."""
    old = RouteTable(4, 3, 2)
    assert [pick(old) for _ in range(3)] == [b, g, b]
    new = RouteTable(5, 3, 2)
    assert [pick(new) for _ in range(5)] == [b, g, b, g, b]
    assert [pick(old) for _ in range(2)] == [g, b]  # old carried on where it was
    assert (new.version, new.weight("blue"), new.weight("green")) == (5, 3, 2)


@pytest.mark.parametrize(("blue", "green", "only"), [(100, 0, "blue"), (0, 1, "green")])
def test_one_live_color_always_wins(blue: int, green: int, only: str) -> None:
    table = RouteTable(1, blue, green)
    assert {pick(table) for _ in range(50)} == {only}
