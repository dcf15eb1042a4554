"""Bad input and broken upstreams: precise refusals, nothing leaked upstream, nothing truncated silently."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp
import pytest
from rawclient import RawClient, exchange
from upstreams import (
    BigHeadServer,
    closed_port,
    cut_after_headers_server,
    origin,
    recording_server,
    reset_before_headers_server,
    silent_server,
    stall_after_headers_server,
)

SMUGGLING = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    "two_cl": b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "te_gzip": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "te_chunked_then_gzip": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\nabc",
    "te_gzip_then_chunked": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    b"0\r\n\r\n",
    "te_in_http10": b"POST / HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: t\r\nX-A: b\r\n c\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length : 4\r\n\r\nabcd",
    "bare_lf": b"GET / HTTP/1.1\nHost: t\n\n",
    "no_host": b"GET / HTTP/1.1\r\nX: y\r\n\r\n",
    "two_hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "bad_chunk_size": b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "nul_in_header": b"GET / HTTP/1.1\r\nHost: t\r\nX: a\x00b\r\n\r\n",
    "connect": b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
async def test_ambiguous_framing_is_refused_and_nothing_reaches_upstream(make_proxy, name: str) -> None:
    async with recording_server() as upstream:
        proxy = await make_proxy([upstream.addr])
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(SMUGGLING[name])
            [resp] = await client.responses()
            await client.wait_closed()
        finally:
            await client.close()
        await asyncio.sleep(0.05)
        assert upstream.received == b""
        assert upstream.connections == 0
    assert resp.status in (400, 405)
    assert resp.header("Connection") == "close"
    assert resp.body.startswith(f"{resp.status} ".encode())


async def test_oversized_head_gets_431(make_proxy) -> None:
    async with recording_server() as upstream:
        proxy = await make_proxy([upstream.addr], limits={"max_header_bytes": 2048})
        [resp] = await exchange(
            proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 4096 + b"\r\n\r\n"
        )
        assert upstream.received == b""
    assert resp.status == 431


async def test_oversized_body_gets_413_before_upstream(make_proxy) -> None:
    async with recording_server() as upstream:
        proxy = await make_proxy([upstream.addr], limits={"max_body_bytes": 100})
        [resp] = await exchange(proxy.port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\n\r\n")
        assert upstream.received == b""
    assert resp.status == 413


async def test_pipelined_bad_request_after_a_good_one(make_proxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr])
        responses = await exchange(
            proxy.port,
            b"GET /bytes/3 HTTP/1.1\r\nHost: t\r\n\r\nPOST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            2,
        )
        assert blue.requests == 1
    assert [r.status for r in responses] == [200, 400]


async def test_upstream_refusing_connections_gives_502(make_proxy) -> None:
    proxy = await make_proxy([f"127.0.0.1:{closed_port()}"])
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/x") as r:
        text = await r.text()
    assert r.status == 502
    assert "blue" in text and "refused" in text


async def test_upstream_reset_before_headers_gives_502(make_proxy) -> None:
    async with reset_before_headers_server() as upstream:
        proxy = await make_proxy([upstream.addr])
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/x") as r:
            assert r.status == 502
            assert "blue" in await r.text()


async def test_silent_upstream_gives_504(make_proxy) -> None:
    async with silent_server() as upstream:
        proxy = await make_proxy([upstream.addr], timeouts={"upstream_header": 0.3, "connect": 1})
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/x") as r:
            text = await r.text()
        assert r.status == 504
        assert "blue" in text
        assert 0.25 < loop.time() - t0 < 2


async def test_empty_color_pool_gives_503(make_proxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], [], weights=(0, 100))
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/x") as r:
            assert r.status == 503
            assert "green" in await r.text()


async def test_response_cut_after_headers_is_not_passed_off_as_complete(make_proxy) -> None:
    async with cut_after_headers_server() as upstream:
        proxy = await make_proxy([upstream.addr])
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/x") as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()


async def test_slow_request_head_gets_408(make_proxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], timeouts={"client_header": 0.3})
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n")  # never finishes its head
            [resp] = await client.responses(timeout=3)
            await client.wait_closed()
        finally:
            await client.close()
        assert blue.requests == 0
    assert resp.status == 408


async def test_idle_keep_alive_connection_is_closed(make_proxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], timeouts={"idle": 0.3})
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(b"GET /status/200 HTTP/1.1\r\nHost: t\r\n\r\n")
            [resp] = await client.responses()
            assert resp.status == 200
            assert await client.wait_closed(timeout=3) == b""  # closed quietly, no 408
        finally:
            await client.close()


async def test_client_disconnect_closes_the_upstream_connection(make_proxy) -> None:
    """A client that leaves mid-request makes bgproxy close its upstream connection too."""
    got_eof = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # returns b"" at EOF: the proxy closed its side
        got_eof.set()
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        proxy = await make_proxy([f"127.0.0.1:{port}"])
        client = await RawClient.connect(proxy.port)
        await client.send(b"GET /wait HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.sleep(0.1)
        await client.close()
        await asyncio.wait_for(got_eof.wait(), 3)
    finally:
        server.close()


async def test_max_connections_answers_503(make_proxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], limits={"max_connections": 1})
        first = await RawClient.connect(proxy.port)
        try:
            await first.send(b"GET /status/200 HTTP/1.1\r\nHost: t\r\n\r\n")
            [ok] = await first.responses()
            [refused] = await exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        finally:
            await first.close()
        assert blue.requests == 1  # the refused connection never reached the upstream
    assert ok.status == 200
    assert refused.status == 503


async def test_stalled_request_body_gets_408_and_frees_the_upstream(make_proxy) -> None:
    """A client that announces a body and stops sending it does not hold an upstream forever."""
    async with recording_server() as upstream:
        proxy = await make_proxy([upstream.addr], timeouts={"idle": 0.3, "upstream_header": 5})
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
            [resp] = await client.responses(timeout=3)
            await client.wait_closed()
        finally:
            await client.close()
        assert upstream.received.endswith(b"x" * 10)  # streamed as it came...
    assert resp.status == 408  # ...and given up once the client went quiet
    assert b"stalled" in resp.body


async def test_slow_upload_does_not_eat_into_the_upstream_header_timeout(make_proxy) -> None:
    """The wait for an answer starts once the whole request is sent (Envoy's route timeout does too)."""
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], timeouts={"upstream_header": 0.3, "idle": 2})
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 80\r\n\r\n")
            for _ in range(8):  # 8 x 0.1 s: well past upstream_header, each piece within `idle`
                await asyncio.sleep(0.1)
                await client.send(b"y" * 10)
            [resp] = await client.responses(timeout=3)
        finally:
            await client.close()
    assert resp.status == 200
    assert b'"len": 80' in resp.body


async def test_upstream_silent_after_a_slow_upload_gives_504_counted_from_its_end(make_proxy) -> None:
    async with silent_server() as upstream:
        proxy = await make_proxy([upstream.addr], timeouts={"upstream_header": 0.3, "idle": 2})
        loop = asyncio.get_running_loop()
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 40\r\n\r\n")
            for _ in range(4):
                await asyncio.sleep(0.15)
                await client.send(b"z" * 10)
            sent = loop.time()
            [resp] = await client.responses(timeout=3)
            waited = loop.time() - sent
        finally:
            await client.close()
        assert upstream.received.endswith(b"z" * 40)
    assert resp.status == 504
    assert 0.25 < waited < 1.5


async def test_stream_idle_timeout_cuts_a_response_body_the_upstream_stopped_sending(make_proxy) -> None:
    async with stall_after_headers_server() as upstream:
        proxy = await make_proxy([upstream.addr], timeouts={"stream_idle": 0.3})
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        [resp] = await exchange(proxy.port, b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        elapsed = loop.time() - t0
    assert resp.status == 200
    assert not resp.complete and len(resp.body) == 10  # cut, never passed off as complete
    assert 0.25 < elapsed < 2
    errors = proxy.app.stats.colors["blue"].upstream_errors
    assert errors == {(upstream.addr, "stream_idle_timeout"): 1}


async def test_stream_idle_timeout_off_leaves_a_quiet_body_open(make_proxy) -> None:
    async with stall_after_headers_server() as upstream:
        proxy = await make_proxy([upstream.addr], timeouts={"stream_idle": None})
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
            with pytest.raises(TimeoutError):
                await client.responses(timeout=0.8)
            assert not client.closed
        finally:
            await client.close()
    assert proxy.app.stats.colors["blue"].upstream_errors == {}


async def test_stream_idle_timeout_does_not_count_a_client_that_is_not_reading(make_proxy) -> None:
    """Backpressure stops reading the upstream; that silence is the client's doing, not the upstream's."""
    size = 32 * 1024 * 1024
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], timeouts={"stream_idle": 0.3})
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(f"GET /bytes/{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            await asyncio.sleep(1.2)  # buffers fill up, the proxy pauses the upstream, nobody moves
            [resp] = await client.responses(timeout=20)
        finally:
            await client.close()
    assert resp.status == 200 and resp.complete
    assert hashlib.sha256(resp.body).hexdigest() == resp.header("x-sha256")
    assert proxy.app.stats.colors["blue"].upstream_errors == {}


@pytest.mark.parametrize(("head_kib", "status"), [(40, 200), (100, 502)])
async def test_response_head_is_bounded_by_max_header_bytes(make_proxy, head_kib: int, status: int) -> None:
    """An upstream cannot make the proxy hold an unbounded head: over limits.max_header_bytes is a 502."""
    async with BigHeadServer(head_kib * 1024) as upstream:
        proxy = await make_proxy([upstream.addr], limits={"max_header_bytes": 65536})
        [resp] = await exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert resp.status == status
    if status == 200:
        assert resp.body == b"ok" and len(resp.header_names()) > 30
    else:
        assert b"response head larger than 65536 bytes" in resp.body
        errors = proxy.app.stats.colors["blue"].upstream_errors
        assert errors == {(upstream.addr, "response_head_too_large"): 1}
