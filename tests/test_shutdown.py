"""Graceful shutdown of `bgproxy run` as a real process: SIGTERM drains, a second SIGTERM exits at once.

The origins run on the test's event loop (upstreams.py); bgproxy runs in a subprocess on free 127.0.0.1
ports, so the signal handling, the exit status and the sockets are the ones production has. Every wait
polls with asyncio.sleep (never blocking the loop the origins need) and has a bound.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import websockets
from process import BgproxyProcess
from rawclient import RawClient
from upstreams import origin

EXIT_MARGIN = 2.0  # how much later than its own deadline the process may exit

StartProxy = Callable[..., Awaitable[BgproxyProcess]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def start_proxy(tmp_path: Path, session: aiohttp.ClientSession) -> AsyncIterator[StartProxy]:
    """start_proxy(shutdown_timeout=S): origins on this loop, bgproxy in a subprocess; all stopped after."""
    procs: list[BgproxyProcess] = []
    async with origin("blue") as blue, origin("green") as green:

        async def start(shutdown_timeout: float = 5.0) -> BgproxyProcess:
            proc = BgproxyProcess(tmp_path, blue.addr, green.addr, shutdown_timeout)
            procs.append(proc)
            await proc.start(session)
            return proc

        try:
            yield start
        finally:
            for proc in procs:
                proc.kill()


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(2)) as r:
        return r.status, await r.json()


async def wait_in_flight(session: aiohttp.ClientSession, proxy: BgproxyProcess, n: int) -> None:
    """Until blue has `n` exchanges in flight: the request reached the proxy, not just the socket."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while loop.time() < deadline:
        _, state = await get_json(session, f"{proxy.admin_url}/v1/state")
        if state["pools"]["blue"]["in_flight"] == n:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"blue never had {n} request(s) in flight")


async def wait_unready(session: aiohttp.ClientSession, proxy: BgproxyProcess, within: float) -> float:
    """Seconds until /readyz answers 503 "shutting down"; fails the test after `within`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < within:
        status, body = await get_json(session, f"{proxy.admin_url}/readyz")
        if status == 503:
            assert body == {"ready": False, "reason": "shutting down"}
            return loop.time() - start
        await asyncio.sleep(0.01)
    pytest.fail(f"/readyz still 200 {within} s after SIGTERM")


async def connect_refused(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


# ---------------------------------------------------------------------------------------------- tests


async def test_sigterm_lets_the_long_request_finish_then_exits_0(
    start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(shutdown_timeout=5)
    loop = asyncio.get_running_loop()

    async def slow() -> tuple[int, bytes, str | None]:
        async with session.get(f"{proxy.url}/slow?delay=1.5", timeout=aiohttp.ClientTimeout(10)) as r:
            return r.status, await r.read(), r.headers.get("Connection")

    request = asyncio.create_task(slow())
    try:
        await wait_in_flight(session, proxy, 1)
        proxy.signal(signal.SIGTERM)
        signalled = loop.time()
        assert await wait_unready(session, proxy, within=0.5) < 0.5
        # Still draining: the admin API answers and shows the request it waits for.
        _, state = await get_json(session, f"{proxy.admin_url}/v1/state")
        assert state["pools"]["blue"]["in_flight"] == 1
        assert await connect_refused(proxy.port), "the proxy port still accepts connections"
        assert not request.done()
        status, body, connection = await asyncio.wait_for(request, 5)
        finished = loop.time() - signalled
    finally:
        request.cancel()
    assert (status, body) == (200, b"slow")
    assert connection == "close"  # no keep-alive promised by a proxy on its way out
    assert 1.0 < finished < 3.0
    assert await proxy.wait_exit(proxy.shutdown_timeout + EXIT_MARGIN) == 0, proxy.log_text()
    assert loop.time() - signalled < proxy.shutdown_timeout + EXIT_MARGIN


async def test_idle_keep_alive_connection_is_closed_at_sigterm(
    start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(shutdown_timeout=10)
    loop = asyncio.get_running_loop()
    idle = await RawClient.connect(proxy.port)
    busy = await RawClient.connect(proxy.port)
    try:
        await idle.send(b"GET /status/200 HTTP/1.1\r\nHost: t\r\n\r\n")
        [first] = await idle.responses(1)
        assert (first.status, first.body, first.header("Connection")) == (200, b"status 200\n", None)
        # A request on another connection keeps the process up, so a close seen on `idle` comes from
        # the shutdown itself, not from the process exiting.
        await busy.send(b"GET /slow?delay=3 HTTP/1.1\r\nHost: t\r\n\r\n")
        await wait_in_flight(session, proxy, 1)
        proxy.signal(signal.SIGTERM)
        signalled = loop.time()
        try:
            stray = await idle.wait_closed(timeout=1.0)
        except TimeoutError:
            pytest.fail("the idle keep-alive connection is still open 1 s after SIGTERM")
        assert stray == b""  # closed, with no unasked-for answer on it
        assert loop.time() - signalled < 1.0
        assert proxy.alive()
        [slow] = await busy.responses(1, timeout=5)
        assert (slow.status, slow.body, slow.complete) == (200, b"slow", True)
        assert slow.header("Connection") == "close"
        assert await busy.wait_closed(timeout=2) == b""
    finally:
        await idle.close()
        await busy.close()
    assert await proxy.wait_exit(proxy.shutdown_timeout + EXIT_MARGIN) == 0, proxy.log_text()


async def test_open_websocket_gets_1001_at_shutdown_timeout(
    start_proxy: StartProxy, session: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(shutdown_timeout=1)
    loop = asyncio.get_running_loop()
    async with websockets.connect(f"ws://127.0.0.1:{proxy.port}/ws", ping_interval=None, proxy=None) as ws:
        await ws.send("whoami")
        assert await asyncio.wait_for(ws.recv(), 2) == "blue"
        proxy.signal(signal.SIGTERM)
        signalled = loop.time()
        await wait_unready(session, proxy, within=0.5)
        echoes = 0
        while loop.time() - signalled < 0.7:  # the stream keeps working until the deadline
            await ws.send(f"echo {echoes}")
            assert await asyncio.wait_for(ws.recv(), 2) == f"echo {echoes}"
            echoes += 1
            await asyncio.sleep(0.05)
        with pytest.raises(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 4)
        closed = loop.time() - signalled
    assert echoes >= 5
    assert ws.close_code == 1001
    assert 0.9 < closed < 2.5
    assert await proxy.wait_exit(proxy.shutdown_timeout + EXIT_MARGIN + 1.5) == 0, proxy.log_text()


async def test_second_sigterm_exits_at_once(start_proxy: StartProxy, session: aiohttp.ClientSession) -> None:
    proxy = await start_proxy(shutdown_timeout=30)
    loop = asyncio.get_running_loop()

    async def slow() -> int:
        async with session.get(f"{proxy.url}/slow?delay=10", timeout=aiohttp.ClientTimeout(15)) as r:
            await r.read()
            return r.status

    request = asyncio.create_task(slow())
    try:
        await wait_in_flight(session, proxy, 1)
        proxy.signal(signal.SIGTERM)
        await wait_unready(session, proxy, within=0.5)  # the first signal is being handled
        assert proxy.alive()
        proxy.signal(signal.SIGTERM)
        second = loop.time()
        status = await proxy.wait_exit(2.0)
        exited = loop.time() - second
        with pytest.raises(aiohttp.ClientError):  # the request is cut, not answered
            await asyncio.wait_for(request, 2)
    finally:
        request.cancel()
    assert status == 1, proxy.log_text()
    assert exited < 1.0
    assert "second signal: exiting at once" in proxy.log_text()
