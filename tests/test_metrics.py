"""GET /metrics and the rolling error window, checked against traffic whose outcome is known exactly."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest
from conftest import MakeProxy, RunningProxy
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from rawclient import RawClient, exchange
from upstreams import closed_port, cut_after_headers_server, origin, reset_before_headers_server
from waiting import eventually

from bgproxy import __version__
from bgproxy.admin.metrics import error_window_state
from bgproxy.core.weights import Weights
from bgproxy.dataplane.stats import ColorStats, Stats, UncountedColorStats

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(proxy: RunningProxy) -> tuple[set[str], Samples]:
    """Family names and every sample, parsed by prometheus_client's own parser."""
    async with aiohttp.ClientSession() as session, session.get(f"{proxy.admin_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await resp.text()
    families = list(text_string_to_metric_families(text))
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
    return {f.name for f in families}, samples


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names_with(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def test_known_mix_is_counted_exactly(make_proxy: MakeProxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        blue.fail_ratio = 0.05
        proxy = await make_proxy(blue=[blue.addr], green=[green.addr], weights=(50, 50))
        seen: Counter[tuple[str, int]] = Counter()
        async with aiohttp.ClientSession() as session:
            for _ in range(400):
                async with session.get(f"{proxy.url}/echo") as resp:
                    await resp.read()
                    seen[(resp.headers["X-Color"], resp.status)] += 1
        assert seen == {("blue", 200): 190, ("blue", 500): 10, ("green", 200): 200}

        _, samples = await scrape(proxy)
        requests = names_with(samples, "bgproxy_requests_total")
        assert requests == {
            frozenset({("color", color), ("code", str(code)), ("route", "live")}): n
            for (color, code), n in seen.items()
        }
        for color in ("blue", "green"):
            for hist in ("bgproxy_request_duration_seconds", "bgproxy_upstream_header_seconds"):
                assert val(samples, f"{hist}_count", color=color) == 200
                assert val(samples, f"{hist}_bucket", color=color, le="+Inf") == 200
                assert 0 < val(samples, f"{hist}_sum", color=color) < 200 * 2.0
            assert val(samples, "bgproxy_active_requests", color=color) == 0
        assert val(samples, "bgproxy_error_ratio", color="blue", window="60s") == pytest.approx(0.05)
        assert val(samples, "bgproxy_error_ratio", color="green", window="60s") == 0.0
        assert names_with(samples, "bgproxy_upstream_errors_total") == {}
        assert error_window_state(proxy.app, "blue") == {
            "window_seconds": 60,
            "requests": 200,
            "errors": 10,
            "error_ratio": 0.05,
        }
        assert error_window_state(proxy.app, "green") == {
            "window_seconds": 60,
            "requests": 200,
            "errors": 0,
            "error_ratio": 0.0,
        }


GET = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_proxy_made_answers_upstream_errors_and_client_errors(make_proxy: MakeProxy) -> None:
    """502s count under the chosen color; a body cut short is an error despite its 200; 400 is "none"."""
    dead = f"127.0.0.1:{closed_port()}"
    async with cut_after_headers_server() as cut:
        proxy = await make_proxy(blue=[dead], green=[cut.addr], weights=(100, 0))
        for _ in range(2):
            [resp] = await exchange(proxy.port, GET)
            assert resp.status == 502
        await proxy.app.controller.set_weights(Weights(0, 100), actor="test", force=True)
        [cut_resp] = await exchange(proxy.port, GET)
        assert (cut_resp.status, cut_resp.complete) == (200, False)
        [bad] = await exchange(proxy.port, b"NOT HTTP AT ALL\r\n\r\n")
        assert bad.status == 400

        _, samples = await scrape(proxy)
    assert names_with(samples, "bgproxy_requests_total") == {
        frozenset({("color", "blue"), ("code", "502"), ("route", "live")}): 2,
        frozenset({("color", "green"), ("code", "200"), ("route", "live")}): 1,
        frozenset({("color", "none"), ("code", "400"), ("route", "live")}): 1,
    }
    assert names_with(samples, "bgproxy_upstream_errors_total") == {
        frozenset({("color", "blue"), ("upstream", dead), ("reason", "connect_refused")}): 2,
        frozenset({("color", "green"), ("upstream", cut.addr), ("reason", "reset_after_headers")}): 1,
    }
    assert val(samples, "bgproxy_upstream_header_seconds_count", color="green") == 1
    assert val(samples, "bgproxy_upstream_header_seconds_count", color="blue") == 0
    assert val(samples, "bgproxy_error_ratio", color="blue", window="60s") == 1.0
    assert val(samples, "bgproxy_error_ratio", color="green", window="60s") == 1.0
    assert error_window_state(proxy.app, "green")["errors"] == 1


async def test_a_retried_connect_failure_is_no_error_but_a_reset_is(make_proxy: MakeProxy) -> None:
    """The window counts how requests ended: one saved by a retry on another upstream ended well."""
    dead = f"127.0.0.1:{closed_port()}"
    async with origin("blue") as good, reset_before_headers_server() as reset:
        proxy = await make_proxy(blue=[dead, good.addr], green=[reset.addr], weights=(100, 0))
        for _ in range(4):
            [resp] = await exchange(proxy.port, GET)
            assert resp.status == 200
        await proxy.app.controller.set_weights(Weights(0, 100), actor="test", force=True)
        [resp] = await exchange(proxy.port, GET)
        assert resp.status == 502
        _, samples = await scrape(proxy)
    assert (
        val(samples, "bgproxy_upstream_errors_total", color="blue", upstream=dead, reason="connect_refused")
        >= 1
    )
    assert val(samples, "bgproxy_requests_total", color="blue", code="200", route="live") == 4
    assert error_window_state(proxy.app, "blue") == {
        "window_seconds": 60,
        "requests": 4,
        "errors": 0,
        "error_ratio": 0.0,
    }
    assert (
        val(
            samples,
            "bgproxy_upstream_errors_total",
            color="green",
            upstream=reset.addr,
            reason="reset_before_headers",
        )
        == 1
    )
    assert error_window_state(proxy.app, "green")["errors"] == 1


async def test_buckets_and_window_come_from_config(make_proxy: MakeProxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy(
            blue=[blue.addr],
            green=[blue.addr],
            metrics={"latency_buckets": [0.1, 0.25, 2.0], "error_window": "5s"},
        )
        async with aiohttp.ClientSession() as session:
            for path in ("/echo", "/slow?delay=0.3"):
                async with session.get(f"{proxy.url}{path}") as resp:
                    assert resp.status == 200
                    await resp.read()
        _, samples = await scrape(proxy)
    for hist in ("bgproxy_request_duration_seconds", "bgproxy_upstream_header_seconds"):
        buckets = {
            dict(k)["le"]: v
            for k, v in names_with(samples, f"{hist}_bucket").items()
            if ("color", "blue") in k
        }
        assert buckets == {"0.1": 1, "0.25": 1, "2.0": 2, "+Inf": 2}
    assert val(samples, "bgproxy_error_ratio", color="blue", window="5s") == 0.0
    assert error_window_state(proxy.app, "blue")["window_seconds"] == 5


async def test_state_gauges_and_open_streams(make_proxy: MakeProxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy(blue=[blue.addr], green=[green.addr], weights=(100, 0))
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(b"GET /sse?n=0&interval=0.05 HTTP/1.1\r\nHost: x\r\n\r\n")
            [head] = await client.responses(1, head_only=True)
            assert head.status == 200
            _, samples = await scrape(proxy)
            assert val(samples, "bgproxy_open_streams", color="blue") == 1
            assert val(samples, "bgproxy_active_requests", color="blue") == 1
            assert val(samples, "bgproxy_open_streams", color="green") == 0
        finally:
            await client.close()
        cs = proxy.app.stats.colors["green"]
        cs.streams_ended, cs.streams_deadline = 3, 2  # what the drain code records as streams end
        await proxy.app.controller.set_weights(Weights(30, 70), actor="test", force=True)
        await eventually(lambda: proxy.app.stats.colors["blue"].in_flight == 0)
        _, samples = await scrape(proxy)
    assert val(samples, "bgproxy_open_streams", color="blue") == 0
    assert val(samples, "bgproxy_active_requests", color="blue") == 0
    assert val(samples, "bgproxy_streams_ended_total", color="green", how="self") == 3
    assert val(samples, "bgproxy_streams_ended_total", color="green", how="deadline") == 2
    assert val(samples, "bgproxy_weight", color="blue") == 30
    assert val(samples, "bgproxy_weight", color="green") == 70
    assert val(samples, "bgproxy_state_version") == 1
    assert val(samples, "bgproxy_switches_total") == 1
    assert val(samples, "bgproxy_info", version=__version__) == 1


async def test_disabled_metrics_count_only_in_flight(make_proxy: MakeProxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy(blue=[blue.addr], green=[blue.addr], metrics={"enabled": False})
        async with aiohttp.ClientSession() as session:
            slow = asyncio.ensure_future(session.get(f"{proxy.url}/slow?delay=0.3"))
            await eventually(lambda: proxy.app.stats.colors["blue"].in_flight == 1)
            families, samples = await scrape(proxy)
            assert val(samples, "bgproxy_active_requests", color="blue") == 1
            async with await slow as resp:
                assert resp.status == 200
        families, samples = await scrape(proxy)
    assert val(samples, "bgproxy_active_requests", color="blue") == 0
    assert val(samples, "bgproxy_weight", color="blue") == 100
    per_request = {"bgproxy_requests", "bgproxy_upstream_errors", "bgproxy_error_ratio"}
    assert not families & per_request
    assert "bgproxy_request_duration_seconds" not in families
    assert proxy.app.stats.colors["blue"].codes == {}
    assert error_window_state(proxy.app, "blue") == {
        "window_seconds": 60,
        "requests": None,
        "errors": None,
        "error_ratio": None,
    }


def test_error_window_is_exact_per_second_and_forgets_old_seconds() -> None:
    cs = ColorStats([0.1], window=3)
    cs.response(500, 0.01, now=10.2)
    cs.response(200, 0.01, now=11.5)
    cs.upstream_error("127.0.0.1:1", "connect_refused")  # an attempt failed: counted, no verdict
    cs.upstream_error("127.0.0.1:1", "reset_after_headers")
    cs.response(200, 0.01, now=12.9, broken=True)  # a 200 whose body was cut: still an error
    cs.response(200, 0.01, now=12.95)  # the verdict is per exchange
    assert cs.window_counts(12.99) == (4, 2)
    assert cs.window_counts(13.0) == (3, 1)  # second 10 left the window
    cs.response(200, 0.01, now=13.4)  # reuses second 10's bucket: zeroed first
    assert cs.window_counts(13.5) == (4, 1)
    assert cs.window_counts(14.0) == (3, 1)  # seconds 12..14
    assert cs.window_counts(15.0) == (1, 0)
    assert cs.window_counts(100.0) == (0, 0)
    assert cs.codes == {500: 1, 200: 4}


def test_disabled_stats_are_no_ops_and_window_is_whole_seconds() -> None:
    stats = Stats([0.1], enabled=False, error_window=2.5)
    assert stats.window_seconds == 3
    cs = stats.colors["blue"]
    assert isinstance(cs, UncountedColorStats)
    cs.response(500, 0.2, now=1.0)
    cs.upstream_header(0.1)
    cs.upstream_error("127.0.0.1:1", "connect_refused")
    assert (cs.codes, cs.duration_counts, cs.header_counts, cs.upstream_errors) == ({}, [0, 0], [0, 0], {})
    assert cs.window_counts(1.0) == (0, 0)
