"""A change that gives weight to a color probes that color's upstreams first (flip_probe)."""

from __future__ import annotations

import aiohttp
import pytest
from upstreams import closed_port, origin

from bgproxy.core.weights import Weights


async def flip(proxy, body: dict[str, object]) -> tuple[int, dict[str, object]]:  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as s, s.post(f"{proxy.admin_url}/v1/flip", json=body) as r:
        return r.status, await r.json()


async def test_a_flip_to_a_color_whose_upstreams_are_all_down_is_refused_naming_each(make_proxy) -> None:
    """No health check configured, so nothing knew green was dead: the probe finds out before the flip."""
    dead = [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"]
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], dead)
        status, body = await flip(proxy, {"to": "green"})
        assert status == 409
        assert all(addr in str(body["error"]) for addr in dead) and "flip probe" in str(body["error"])
        assert proxy.app.switchboard.version == 0  # nothing changed
        status, _ = await flip(proxy, {"to": "green", "force": True})
        assert status == 200 and proxy.app.switchboard.weights == Weights(0, 100)


async def test_one_answering_upstream_is_enough(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [f"127.0.0.1:{closed_port()}", green.addr])
        status, _ = await flip(proxy, {"to": "green"})
    assert status == 200


@pytest.mark.parametrize(("mode", "status"), [("http", 409), ("tcp", 200), ("off", 200)])
async def test_http_mode_asks_the_health_path(make_proxy, mode: str, status: int) -> None:
    """green listens but its health path answers 500: only the http probe can tell."""
    async with origin("blue") as blue, origin("green") as green:
        check = {"path": "/status/500", "interval": 60, "timeout": 1}
        pools = {
            "blue": {"upstreams": [blue.addr]},
            "green": {"upstreams": [green.addr], "health_check": check},
        }
        proxy = await make_proxy(pools=pools, flip_probe=mode)
        got, body = await flip(proxy, {"to": "green"})
    assert got == status, body
    if status == 409:
        assert f"{green.addr}: HTTP 500" in str(body["error"])


async def test_weights_are_probed_too(make_proxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], [f"127.0.0.1:{closed_port()}"])
        async with (
            aiohttp.ClientSession() as s,
            s.put(f"{proxy.admin_url}/v1/weights", json={"blue": 90, "green": 10}) as r,
        ):
            assert r.status == 409
