"""Health decisions as tables, with the time passed in (bgproxy.core.health): no sockets, no clock."""

from __future__ import annotations

import pytest

from bgproxy.core.health import CheckState, OutlierPolicy, Verdict, after_check, after_failure

# ------------------------------------------------------------------------------------------ active checks


@pytest.mark.parametrize(
    ("start", "results", "states"),
    [
        # healthy_threshold 2, unhealthy_threshold 3
        (CheckState(), [False, False, False], [(True, 0, 1), (True, 0, 2), (False, 0, 3)]),
        (CheckState(), [False, False, True, False], [(True, 0, 1), (True, 0, 2), (True, 1, 0), (True, 0, 1)]),
        (CheckState(False, 0, 5), [True, True], [(False, 1, 0), (True, 2, 0)]),
        (CheckState(False, 0, 5), [True, False, True], [(False, 1, 0), (False, 0, 1), (False, 1, 0)]),
        (CheckState(False, 0, 3), [False], [(False, 0, 4)]),  # stays down, counting
        (CheckState(True, 7, 0), [True], [(True, 8, 0)]),
    ],
)
def test_an_upstream_turns_only_after_a_run_of_equal_results(
    start: CheckState, results: list[bool], states: list[tuple[bool, int, int]]
) -> None:
    state = start
    seen = []
    for ok in results:
        state = after_check(state, ok, healthy_threshold=2, unhealthy_threshold=3)
        seen.append((state.healthy, state.passes, state.fails))
    assert seen == states


# ------------------------------------------------------------------------------------------ outlier ejection

POLICY = OutlierPolicy(consecutive_failures=3, base_ejection_time=30.0, max_ejection_time=100.0,
                       max_ejection_percent=50)  # fmt: skip


def fail(policy: OutlierPolicy = POLICY, *, failures: int = 0, ejected: bool = False, ejections: int = 0,
         pool_ejected: int = 0, pool_size: int = 4, now: float = 1000.0) -> Verdict:  # fmt: skip
    return after_failure(
        policy,
        failures=failures,
        ejected=ejected,
        ejections=ejections,
        pool_ejected=pool_ejected,
        pool_size=pool_size,
        now=now,
    )


@pytest.mark.parametrize(
    ("kwargs", "verdict"),
    [
        ({"failures": 0}, Verdict("count", 1, 0)),
        ({"failures": 1}, Verdict("count", 2, 0)),
        ({"failures": 2}, Verdict("eject", 0, 1, 30.0, 1030.0)),  # the third in a row
        ({"failures": 2, "ejections": 1}, Verdict("eject", 0, 2, 60.0, 1060.0)),  # base x ejections
        ({"failures": 2, "ejections": 3}, Verdict("eject", 0, 4, 100.0, 1100.0)),  # capped
        ({"failures": 2, "ejections": 9, "now": 5.5}, Verdict("eject", 0, 10, 100.0, 105.5)),
        ({"failures": 7, "ejected": True, "ejections": 1}, Verdict("count", 8, 1)),  # already out
        # max_ejection_percent 50: 1 of 4 out, a second may go; 2 of 4 out, a third may not
        ({"failures": 2, "pool_ejected": 1}, Verdict("eject", 0, 1, 30.0, 1030.0)),
        ({"failures": 2, "pool_ejected": 2}, Verdict("spare", 3, 0)),
        ({"failures": 2, "pool_size": 1}, Verdict("spare", 3, 0)),  # one upstream: never ejected at 50%
        ({"failures": 5, "pool_size": 2, "pool_ejected": 1}, Verdict("spare", 6, 0)),
    ],
)
def test_failure_verdicts(kwargs: dict[str, object], verdict: Verdict) -> None:
    assert fail(**kwargs) == verdict  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pool_size", "percent", "most"),
    [(2, 50, 1), (3, 50, 1), (4, 50, 2), (2, 100, 2), (2, 0, 0), (10, 30, 3), (1, 100, 1)],
)
def test_max_ejection_percent_bounds_how_many_go(pool_size: int, percent: int, most: int) -> None:
    """Every upstream of a pool fails on and on: exactly `most` end up ejected, the rest are spared."""
    policy = OutlierPolicy(1, 10.0, 10.0, percent)
    out = 0
    for _ in range(pool_size):
        if fail(policy, pool_ejected=out, pool_size=pool_size).action == "eject":
            out += 1
    assert out == most


def test_ejection_times_grow_then_cap() -> None:
    """base 0.2 s, max 0.5 s: an upstream that fails again each time it returns is out 0.2, 0.4, 0.5, 0.5."""
    policy = OutlierPolicy(1, 0.2, 0.5, 100)
    ejections, now, lengths = 0, 50.0, []
    for _ in range(4):
        verdict = fail(policy, ejections=ejections, now=now)
        assert verdict.action == "eject" and verdict.until == now + verdict.seconds
        lengths.append(verdict.seconds)
        ejections, now = verdict.ejections, verdict.until
    assert lengths == [0.2, 0.4, 0.5, 0.5]
