"""The test origins hit directly (no proxy), so a proxy test failure never means a broken fixture."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket

import aiohttp
import pytest
import websockets
from upstreams import (
    closed_port,
    cut_after_headers_server,
    origin,
    pattern_bytes,
    pattern_sha256,
    recording_server,
    reset_before_headers_server,
    silent_server,
)

from bgproxy.demo import banner, start_demo_upstreams


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send bytes exactly as written and read the reply until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_echo_raw_path_is_byte_exact() -> None:
    async with origin("blue", name="b1") as srv:
        reply = await raw_exchange(
            srv.port,
            b"GET /echo/a%2Fb?x=%20y&z HTTP/1.1\r\nHost: h\r\nX-B: 2\r\nx-a: 1\r\nConnection: close\r\n\r\n",
        )
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"X-Color: blue" in head and b"X-Upstream: b1" in head
        data = json.loads(body)
        assert data["raw_path"] == "/echo/a%2Fb?x=%20y&z"
        assert data["headers"][:3] == [["Host", "h"], ["X-B", "2"], ["x-a", "1"]]
        assert (data["color"], data["upstream"], data["method"], data["version"]) == (
            "blue",
            "b1",
            "GET",
            "1.1",
        )
        assert srv.requests == 1


async def test_echo_body_and_default_upstream_name() -> None:
    body = b"x" * 200_000
    async with (
        origin("green") as srv,
        aiohttp.ClientSession() as session,
        session.put(f"{srv.url}/echo/up", data=body) as resp,
    ):
        data = await resp.json()
        assert resp.headers["X-Upstream"] == srv.addr
    assert data["body_len"] == len(body)
    assert data["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert data["method"] == "PUT"


@pytest.mark.parametrize("chunked", [False, True])
async def test_bytes_sha_and_framing(chunked: bool) -> None:
    n = 300_001
    async with (
        origin("blue") as srv,
        aiohttp.ClientSession() as session,
        session.get(f"{srv.url}/bytes/{n}", params={"chunked": "1"} if chunked else {}) as resp,
    ):
        body = await resp.read()
    assert resp.headers["X-Sha256"] == pattern_sha256(n) == hashlib.sha256(body).hexdigest()
    if chunked:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert "Content-Length" not in resp.headers
    else:
        assert resp.headers["Content-Length"] == str(n)
    assert body == bytes(i % 251 for i in range(n)) == pattern_bytes(n)


async def test_fail_ratio_is_exact() -> None:
    async with origin("blue") as srv, aiohttp.ClientSession() as session:
        srv.fail_ratio = 0.05
        statuses = []
        for _ in range(100):
            async with session.get(f"{srv.url}/echo") as resp:
                statuses.append(resp.status)
    assert statuses.count(500) == 5
    assert [i for i, s in enumerate(statuses, 1) if s == 500] == [20, 40, 60, 80, 100]


async def test_stop_start_same_port_and_health() -> None:
    async with origin("green") as srv, aiohttp.ClientSession() as session:
        port = srv.port
        async with session.get(f"{srv.url}/healthz") as resp:
            assert (resp.status, await resp.text()) == (200, "ok")
        await srv.stop()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(f"{srv.url}/healthz"):
                pass
        await srv.start()
        assert srv.port == port
        srv.healthy = False
        async with session.get(f"{srv.url}/healthz") as resp:
            assert resp.status == 503
        assert srv.health_checks == 2 and srv.requests == 0


async def test_upload_slow_status_and_expect() -> None:
    payload = b"u" * 150_000
    async with origin("blue") as srv, aiohttp.ClientSession() as session:
        async with session.post(f"{srv.url}/upload?slow=1", data=payload) as resp:
            assert await resp.json() == {"len": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        async with session.get(f"{srv.url}/status/204") as resp:
            assert resp.status == 204 and await resp.read() == b""
        async with session.get(f"{srv.url}/status/418") as resp:
            assert resp.status == 418 and await resp.text() == "status 418\n"
        async with session.get(f"{srv.url}/slow", params={"delay": "0.05"}) as resp:
            assert await resp.text() == "slow"
        async with session.post(f"{srv.url}/expect", data=payload, expect100=True) as resp:
            assert await resp.json() == {"len": len(payload)}
        reply = await raw_exchange(
            srv.port,
            b"POST /expect HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n"
            b"Connection: close\r\n\r\nabc",
        )
        assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")


async def test_headers_out_sets_hop_by_hop_headers() -> None:
    async with origin("blue") as srv, aiohttp.ClientSession() as session:
        params = {"Connection": "X-Foo", "X-Foo": "secret", "Keep-Alive": "timeout=5"}
        async with session.get(f"{srv.url}/headers-out", params=params) as resp:
            assert resp.headers["Connection"] == "X-Foo"
            assert resp.headers["X-Foo"] == "secret"
            assert resp.headers["Keep-Alive"] == "timeout=5"


async def test_sse_event_count() -> None:
    async with (
        origin("green") as srv,
        aiohttp.ClientSession() as session,
        session.get(f"{srv.url}/sse", params={"n": "3", "interval": "0.01"}) as resp,
    ):
        assert resp.headers["Content-Type"] == "text/event-stream"
        text = await resp.text()
    assert text == "data: green 0\n\ndata: green 1\n\ndata: green 2\n\n"


async def test_sse_endless_until_client_leaves() -> None:
    async with (
        origin("green") as srv,
        aiohttp.ClientSession() as session,
        session.get(f"{srv.url}/sse", params={"n": "0", "interval": "0.01"}) as resp,
    ):
        for i in range(5):
            assert await resp.content.readuntil(b"\n\n") == f"data: green {i}\n\n".encode()


async def test_ws_echo_whoami_and_close_code() -> None:
    async with origin("blue") as srv:
        async with websockets.connect(f"ws://{srv.addr}/ws") as ws:
            await ws.send("whoami")
            assert await ws.recv() == "blue"
            await ws.send("whoami")
            assert await ws.recv() == "whoami"
            await ws.send(b"\x00\x01")
            assert await ws.recv() == b"\x00\x01"
            await ws.ping()
            await ws.close(code=4001, reason="bye")
        assert ws.close_code == 4001 and ws.close_reason == "bye"
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{srv.url}/ws") as cws:
            await cws.send_str("hi")
            assert await cws.receive_str() == "hi"
            await cws.close(code=3000)
            assert cws.close_code == 3000


async def test_recording_and_silent_servers_record_and_never_answer() -> None:
    async with recording_server() as rec:
        reader, writer = await asyncio.open_connection("127.0.0.1", rec.port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        await writer.drain()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.1)
        assert rec.received == b"GET / HTTP/1.1\r\n\r\n" and rec.connections == 1
        writer.close()
    async with silent_server() as silent, aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            async with session.get(f"http://{silent.addr}/", timeout=aiohttp.ClientTimeout(total=0.1)):
                pass
        assert silent.received.startswith(b"GET / HTTP/1.1\r\n")


async def test_reset_before_headers() -> None:
    async with reset_before_headers_server() as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert srv.received == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


async def test_cut_after_headers() -> None:
    async with cut_after_headers_server() as srv:
        reply = await raw_exchange(srv.port, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert reply == b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + bytes(range(10))
        async with aiohttp.ClientSession() as session, session.get(f"http://{srv.addr}/") as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


def test_closed_port_refuses() -> None:
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", closed_port()))


async def test_demo_upstreams_serve_their_colour() -> None:
    demo = await start_demo_upstreams(
        {"blue": [("127.0.0.1", 0)], "green": [("127.0.0.1", 0), ("127.0.0.1", 0)]}
    )
    try:
        assert [len(demo.addresses[c]) for c in ("blue", "green")] == [1, 2]
        green = demo.addresses["green"][1]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{green}/") as resp:
                assert resp.headers["X-Color"] == "green"
                assert "background:green" in await resp.text()
            async with session.get(f"http://{green}/api") as resp:
                assert await resp.json() == {"color": "green", "upstream": green, "served": 2}
            async with session.get(f"http://{green}/healthz") as resp:
                assert await resp.text() == "ok"
            async with session.get(f"http://{green}/sse") as resp:
                assert await resp.content.readuntil(b"\n\n") == f"data: green {green} #0\n\n".encode()
            async with session.ws_connect(f"http://{green}/ws") as ws:
                await ws.send_str("ping")
                assert await ws.receive_str() == "ping"
    finally:
        await demo.close()
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", int(green.rsplit(":", 1)[1])))


async def test_demo_start_failure_leaves_nothing_running() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free = closed_port()
        with pytest.raises(OSError):
            await start_demo_upstreams({"blue": [("127.0.0.1", free)], "green": [taken.getsockname()]})
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", free))


def test_banner_mentions_flip_weights_and_metrics() -> None:
    text = banner("http://127.0.0.1:8080/", "http://127.0.0.1:9090")
    assert "curl -X POST http://127.0.0.1:9090/v1/flip" in text
    assert """-d '{"blue":90,"green":10}'""" in text and "http://127.0.0.1:9090/v1/weights" in text
    assert "curl http://127.0.0.1:9090/metrics" in text and "http://127.0.0.1:8080/api" in text
