"""config/grafana-dashboard.json may only query series a live bgproxy really exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from conftest import MakeProxy
from prometheus_client.parser import text_string_to_metric_families
from upstreams import closed_port, origin

DASHBOARD = Path(__file__).resolve().parents[1] / "config" / "grafana-dashboard.json"

# Pieces of PromQL that are never metric names, removed before looking at identifiers.
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NUMBERS = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?\b")  # and durations
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*(?=\s*(\()?)")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "group_left", "group_right"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not called, not keywords."""
    for pattern in (_STRINGS, _MATCHERS, _RANGES, _GROUPING, _NUMBERS):
        expr = pattern.sub(" ", expr)
    return {m[0] for m in _IDENT.finditer(expr) if m[1] is None and m[0].lower() not in _KEYWORDS}


def exprs(node: Any) -> Iterator[str]:
    """Every "expr" in the dashboard: panel targets and annotation queries alike."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from exprs(item)


def test_metric_names_finds_selectors_and_ignores_the_rest() -> None:
    expr = (
        'sum by (color, le) (rate(a_total{code=~"5..",x="rate(b)"}[$__rate_interval] offset 5m)) '
        "/ on (color) group_left sum without (code) (c_bucket) > bool 0.5e3 and d:x or histogram_quantile"
    )
    assert metric_names(expr) == {"a_total", "c_bucket", "d:x", "histogram_quantile"}


async def test_dashboard_uses_only_exported_series(make_proxy: MakeProxy) -> None:
    async with origin("blue") as blue:
        dead = f"127.0.0.1:{closed_port()}"
        proxy = await make_proxy(blue=[blue.addr], green=[dead], weights=(50, 50))
        async with aiohttp.ClientSession() as session:
            for _ in range(4):  # both colors, one of them failing: every family gets samples
                async with session.get(f"{proxy.url}/echo") as resp:
                    await resp.read()
            async with session.get(f"{proxy.admin_url}/metrics") as resp:
                text = await resp.text()
    exported: set[str] = set()
    sampled: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            exported.add(f"{family.name}_total")
        elif family.type == "histogram":
            exported |= {f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count")}
        else:
            exported.add(family.name)
        sampled |= {s.name for s in family.samples}
    assert sampled <= exported  # the suffix rules above describe what is really served

    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(exprs(dashboard))
    used = set().union(*(metric_names(q) for q in queries))
    assert used - exported == set()
    # The panels the issue asks for are there.
    assert "bgproxy_requests_total" in used
    assert any('code=~"5.."' in q for q in queries)
    assert any("histogram_quantile(0.5," in q for q in queries)
    assert any("histogram_quantile(0.99," in q for q in queries)
    assert {"bgproxy_request_duration_seconds_bucket", "bgproxy_weight", "bgproxy_open_streams"} <= used
