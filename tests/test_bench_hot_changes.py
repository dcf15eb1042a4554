"""Smoke test of bench.hot_changes: a short run under wrk with every kind of change must lose nothing.

Needs wrk (bash .ci/system-deps installs it); the bench itself measures the real figures.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.hot_changes import Options, render, run_bench


@pytest.mark.timeout(40)
def test_reloads_membership_changes_and_a_takeover_under_wrk_lose_nothing() -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (bash .ci/system-deps installs it)")
    if not (Path(sys.executable).parent / "bgproxy").exists():
        pytest.skip("the bgproxy console script is not installed next to this interpreter")
    began = time.monotonic()
    report = run_bench(Options(duration=7, baseline=1, warmup=0, reloads=2, changes=2, takeovers=1))
    assert time.monotonic() - began < 15

    assert report["problems"] == [], render(report)
    assert report["passed"]
    during = report["during"]
    assert during["requests"] > 0
    assert during["non2xx"] == 0
    assert sum(during["socket_errors"].values()) == 0
    changes = report["changes"]
    assert {kind: (c["done"], c["ok"]) for kind, c in changes.items()} == {
        "reload": (2, 2),
        "membership": (2, 2),
        "takeover": (1, 1),
    }
    assert [p["exit"] for p in report["processes"]] == [0, None]  # the first exited 0, the second runs
    assert report["baseline"]["requests"] > 0 and report["baseline_after"]["requests"] > 0
    table = render(report)
    for text in ("baseline before (1 s)", "with changes (7 s)", "baseline after (1 s)", ": PASS"):
        assert text in table
