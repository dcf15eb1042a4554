"""Smoke test of bench.rollback: one always-503 run at a small rate must roll back on the error ratio rule.

The bounds are loose on purpose (a noisy 2-core box): the bench itself measures the real figures.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.rollback import SUMMARIZED, Options, render, run_bench


@pytest.mark.timeout(30)
def test_always_503_is_rolled_back_by_the_error_ratio_rule() -> None:
    if shutil.which("bgproxy") is None and not (Path(sys.executable).parent / "bgproxy").exists():
        pytest.skip("the bgproxy console script is not installed")
    began = time.monotonic()
    report = run_bench(
        ["always-503"], 1, Options(rate=300, max_seconds=5, warmup=0.5, tail=0.3, connections=16)
    )
    assert time.monotonic() - began < 10

    (run,) = report["runs"]["always-503"]
    assert run["problems"] == []
    assert run["state"] == "rolled_back"
    assert run["rule"] == "error_ratio"
    assert run["candidate_bad_answers"] >= 1
    assert run["to_stable_only_ms"] is not None and 0 < run["to_stable_only_ms"] < 5000
    assert 1 <= run["failed"] < 100
    assert run["failed_blue"] == 0
    assert run["judged_errors"] == run["judged_requests"] >= 1

    summary = report["summary"]["always-503"]
    assert summary["runs"] == 1 and summary["rolled_back"] == 1 and summary["rules"] == ["error_ratio"]
    assert set(SUMMARIZED) <= set(summary)
    assert "target_met" in summary
    assert report["meta"]["rate"] == 300

    table = render(report)
    for column in ("stable-only ms", "failed", "judged", "always-503 target"):
        assert column in table
