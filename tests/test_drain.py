"""Zero-downtime flips: the old color drains; long-lived streams run to the deadline, then close cleanly."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import pytest
import websockets
from upstreams import origin, pattern_sha256

MB = 1024 * 1024


async def admin(session: aiohttp.ClientSession, proxy: Any, method: str, path: str, **body: Any) -> Any:
    async with session.request(method, proxy.admin_url + path, json=body or None) as r:
        assert r.status == 200, await r.text()
        return await r.json()


@pytest.fixture
async def blue_green(make_proxy):  # type: ignore[no-untyped-def]
    async with origin("blue") as blue, origin("green") as green:
        yield await make_proxy([blue.addr], [green.addr], drain_timeout=1)


async def test_websocket_drains_until_deadline_then_gets_1001(blue_green) -> None:
    proxy = blue_green
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s, proxy.websocket() as old:
        await old.send("whoami")
        assert await old.recv() == "blue"
        await admin(s, proxy, "POST", "/v1/flip", to="green", drain_timeout=1.0)
        flipped = loop.time()
        state = await admin(s, proxy, "GET", "/v1/state")
        assert state["pools"]["blue"]["draining"] is True
        assert state["pools"]["blue"]["streams"] == 1
        assert state["pools"]["blue"]["drain_deadline"] is not None
        async with proxy.websocket() as new:
            await new.send("whoami")
            assert await new.recv() == "green"
        echoes = 0
        while loop.time() - flipped < 0.8:  # the old one keeps working through the window
            await old.send(f"still here {echoes}")
            assert await old.recv() == f"still here {echoes}"
            echoes += 1
            await asyncio.sleep(0.05)
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(old.recv(), 3)
        assert old.close_code == 1001
        assert 0.9 < loop.time() - flipped < 3
        await asyncio.sleep(0.1)
        state = await admin(s, proxy, "GET", "/v1/state")
    blue = state["pools"]["blue"]
    assert blue["draining"] is False and blue["streams"] == 0
    assert blue["drained"]["deadline"] == 1
    assert echoes > 5


async def test_sse_keeps_flowing_until_deadline(blue_green) -> None:
    proxy = blue_green
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/sse?n=0&interval=0.05") as r:
            assert r.headers["X-Color"] == "blue"
            await r.content.readline()
            await admin(s, proxy, "POST", "/v1/flip", to="green", drain_timeout=1.0)
            flipped = loop.time()
            after = 0
            with pytest.raises(aiohttp.ClientPayloadError):
                while line := await asyncio.wait_for(r.content.readline(), 3):
                    if line.startswith(b"data: blue"):
                        after += 1
        assert 0.9 < loop.time() - flipped < 3
        assert after >= 10  # events kept coming for the whole window
        async with s.get(proxy.url + "/status/200") as r2:
            assert r2.headers["X-Color"] == "green"


async def test_flip_back_within_window_cancels_the_drain(blue_green) -> None:
    proxy = blue_green
    async with aiohttp.ClientSession() as s, proxy.websocket() as ws:
        await ws.send("whoami")
        assert await ws.recv() == "blue"
        await admin(s, proxy, "POST", "/v1/flip", to="green", drain_timeout=0.5)
        await asyncio.sleep(0.2)
        await admin(s, proxy, "POST", "/v1/flip", to="blue")
        await asyncio.sleep(0.8)  # well past the first drain's deadline
        await ws.send("alive")
        assert await ws.recv() == "alive"
        state = await admin(s, proxy, "GET", "/v1/state")
        assert state["pools"]["blue"]["draining"] is False
        assert state["pools"]["blue"]["drained"]["deadline"] == 0


async def test_download_started_before_flip_completes_intact(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr], drain_timeout=30)
        digest = hashlib.sha256()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{proxy.url}/bytes/{20 * MB}?chunked=1") as r:
                digest.update(await r.content.readexactly(65536))
                await admin(s, proxy, "POST", "/v1/flip", to="green")
                async with s.get(proxy.url + "/status/200") as r2:
                    assert r2.headers["X-Color"] == "green"
                async for piece in r.content.iter_chunked(1 << 20):
                    digest.update(piece)
                    await asyncio.sleep(0.001)  # a slowish reader: backpressure holds the rest
            assert digest.hexdigest() == pattern_sha256(20 * MB)
            await asyncio.sleep(0.05)
            state = await admin(s, proxy, "GET", "/v1/state")
    assert state["pools"]["blue"]["draining"] is False
    assert state["pools"]["blue"]["drained"] == {"ended": 1, "deadline": 0}


async def test_drain_wait_returns_when_the_old_color_is_idle(blue_green) -> None:
    proxy = blue_green
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        slow = asyncio.ensure_future(s.get(proxy.url + "/slow?delay=0.5"))
        await asyncio.sleep(0.1)
        await admin(s, proxy, "POST", "/v1/flip", to="green", drain_timeout=5)
        t0 = loop.time()
        async with s.post(proxy.admin_url + "/v1/drain/wait?color=blue&timeout=3") as r:
            assert r.status == 200, await r.text()
        assert loop.time() - t0 < 1.5
        resp = await slow
        assert resp.status == 200 and resp.headers["X-Color"] == "blue"
        resp.release()
        busy = asyncio.ensure_future(s.get(proxy.url + "/slow?delay=1"))  # green, the live color
        await asyncio.sleep(0.1)
        async with s.post(proxy.admin_url + "/v1/drain/wait?color=green&timeout=0.2") as r:
            assert r.status == 408
            assert "green" in (await r.json())["error"]
        (await busy).release()


async def test_flips_under_keep_alive_load_lose_nothing(make_proxy) -> None:
    """50 keep-alive clients, 20 flips: no failure, and every request sent after a flip's answer
    goes to the new color."""
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr], drain_timeout=5)
        loop = asyncio.get_running_loop()
        seen: list[tuple[float, str]] = []
        failures: list[str] = []
        stop = asyncio.Event()

        async def client(s: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                sent = loop.time()
                try:
                    async with s.get(proxy.url + "/status/200") as r:
                        await r.read()
                        if r.status != 200:
                            failures.append(f"status {r.status}")
                        seen.append((sent, r.headers["X-Color"]))
                except aiohttp.ClientError as exc:
                    failures.append(repr(exc))

        flips: list[tuple[float, float, str]] = []
        connector = aiohttp.TCPConnector(limit=50, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as s, aiohttp.ClientSession() as ctl:
            workers = [asyncio.create_task(client(s)) for _ in range(50)]
            await asyncio.sleep(0.2)
            for i in range(20):
                to = "green" if i % 2 == 0 else "blue"
                asked = loop.time()
                await admin(ctl, proxy, "POST", "/v1/flip", to=to)
                flips.append((asked, loop.time(), to))
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*workers)
    assert failures == []
    assert len(seen) > 1000
    for k, (_, answered, color) in enumerate(flips):
        next_asked = flips[k + 1][0] if k + 1 < len(flips) else float("inf")
        window = [c for sent, c in seen if answered <= sent < next_asked]
        assert window and set(window) == {color}, (k, color, set(window))
