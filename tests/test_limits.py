"""Resource exhaustion and slow clients: every shape is bounded by a limit or a timeout, none spins,
and none holds an upstream connection it does not need."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from process import BgproxyProcess
from rawclient import RawClient
from upstreams import origin, recording_server
from waiting import eventually


async def fate(port: int) -> str:
    """What happens to one more connection: "503", "closed", "reset" or "open" (accepted, waiting)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return "refused"
    try:
        data = await asyncio.wait_for(reader.read(4096), 2.0)
    except TimeoutError:
        return "open"
    except ConnectionResetError:
        return "reset"
    finally:
        writer.close()
    return "503" if data.startswith(b"HTTP/1.1 503 ") and b"too many client connections" in data else "closed"


async def test_an_open_file_limit_below_max_connections_caps_them_with_503s(tmp_path: Path) -> None:
    """ulimit -n 256 and 400 connections: bgproxy caps itself below the limit (two descriptors per
    proxied connection), answers the rest 503 with a throttled log line, keeps serving, never spins."""
    async with origin("blue") as blue, origin("green") as green, aiohttp.ClientSession() as session:
        proxy = BgproxyProcess(
            tmp_path, blue.addr, green.addr, 5, nofile=256, extra={"limits": {"max_connections": 1000}}
        )
        try:
            await proxy.start(session)
            assert "effective=96" in proxy.log_text()  # (256 - 64 reserved) / 2
            kept = await RawClient.connect(proxy.port)
            await kept.send(b"GET /status/200 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert [r.status for r in await kept.responses()] == [200]

            cpu_before = proxy.cpu_seconds()
            fates = Counter(await asyncio.gather(*(fate(proxy.port) for _ in range(400))))
            assert fates["503"] >= 400 - 96 and fates["503"] + fates["open"] == 400, fates
            assert proxy.cpu_seconds() - cpu_before < 1.5  # ~2 s of wall time: no busy loop

            await kept.send(b"GET /status/200 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert [r.status for r in await kept.responses()] == [200]
            await kept.close()
            async with session.get(proxy.url + "/status/204") as resp:  # room again
                assert resp.status == 204
            refusals = [line for line in proxy.log_text().splitlines() if "client connection refused" in line]
            assert 1 <= len(refusals) <= 5  # throttled: one line a second, with a suppressed count
        finally:
            proxy.kill()


async def test_a_trickled_request_head_gets_408_at_client_header(make_proxy) -> None:
    """The head timeout runs from its first byte: a byte every 50 ms does not keep it alive."""
    async with recording_server() as upstream:
        proxy = await make_proxy([upstream.addr], timeouts={"client_header": 0.4})
        client = await RawClient.connect(proxy.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            reply = asyncio.ensure_future(client.responses(timeout=3))
            with contextlib.suppress(ConnectionError):
                for byte in b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 200:
                    if reply.done():
                        break
                    await client.send(bytes([byte]))
                    await asyncio.sleep(0.05)
            [resp] = await reply
        finally:
            await client.close()
        assert upstream.connections == 0
    assert resp.status == 408
    assert loop.time() - started < 2


async def test_silent_and_half_open_connections_are_closed_without_an_upstream(make_proxy) -> None:
    async with recording_server() as upstream:
        proxy = await make_proxy([upstream.addr], timeouts={"client_header": 0.3})
        silent = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(50)]
        half = []
        for _ in range(10):  # a partial head, then the client shuts its sending side
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"GET / HTTP/1.1\r\nHo")
            writer.write_eof()
            half.append((reader, writer))
        await eventually(lambda: len(proxy.app.runtime.connections) >= 50, 2)  # the silent ones, accepted
        await eventually(lambda: not proxy.app.runtime.connections, 3)  # all gone at client_header
        for reader, writer in [*silent, *half]:
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), 1)
            writer.close()
        assert upstream.connections == 0


@pytest.mark.parametrize("pause", [0.05])
async def test_a_slow_but_steady_body_is_not_cut(make_proxy, pause: float) -> None:
    """The body timeout is inactivity (timeouts.idle), like nginx's client_body_timeout: a slow
    upload that keeps moving gets through; a stalled one gets 408 (test_proxy_faults)."""
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], timeouts={"idle": 0.3})
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n")
            for _ in range(20):  # 1 s in all, three times the idle timeout
                await client.send(b"x")
                await asyncio.sleep(pause)
            [resp] = await client.responses()
        finally:
            await client.close()
    assert resp.status == 200
