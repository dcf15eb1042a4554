"""Smoke test of bench.fleet: a small fleet on each real store must apply every flip and resync.

The bounds are loose on purpose (a noisy 2-core box): the bench itself measures the real figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.fleet import render, run_bench


@pytest.mark.timeout(90)
def test_every_flip_reaches_every_instance_they_resync_and_a_new_leader_takes_over() -> None:
    report = run_bench(["redis", "etcd"], instances=3, flips=6, outages=1)
    for kind, result in report["backends"].items():
        assert result["missed"] == 0 and result["failed"] == 0, (kind, result)
        assert result["from_answer_ms"]["max"] < 1000, (kind, result)
        assert 0 < result["from_write_ms"]["p50"] < 1000, (kind, result)
        assert result["resync_ms"]["max"] < 5000, (kind, result)
        assert result["leader_failover_s"] is not None and result["leader_failover_s"] < 10, (kind, result)
    table = render(report)
    assert "redis" in table and "etcd" in table
