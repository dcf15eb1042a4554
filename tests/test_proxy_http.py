"""HTTP/1.1 through bgproxy end to end: methods, bodies, framing, header rules, color weights."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from rawclient import RawClient, exchange
from upstreams import origin, pattern_sha256
from yarl import URL

MB = 1024 * 1024


@pytest.fixture
async def blue_green(make_proxy):  # type: ignore[no-untyped-def]
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        yield proxy, blue, green


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_methods_reach_the_upstream(blue_green, method: str) -> None:
    proxy, _, _ = blue_green
    body = b"payload" if method in ("POST", "PUT", "PATCH") else None
    async with aiohttp.ClientSession() as s, s.request(method, proxy.url + "/echo/x", data=body) as r:
        assert r.status == 200
        echo = await r.json()
    assert echo["method"] == method
    assert echo["body_len"] == (len(body) if body else 0)
    assert r.headers["X-Color"] == "blue"


@pytest.mark.parametrize(
    "target",
    [
        "/echo/a%2Fb?x=%20y&z",
        "/echo/%7E%7e/..%2F?q=%E2%82%AC&&a=b=c",
        ["/echo/;params?x=1", "frag-is-not-sent"][0],
        "/echo/with+plus?space=a+b&pct=%25",
    ],
)
async def test_target_is_forwarded_byte_for_byte(blue_green, target: str) -> None:
    proxy, _, _ = blue_green
    [resp] = await exchange(proxy.port, f"GET {target} HTTP/1.1\r\nHost: example.test\r\n\r\n".encode())
    assert resp.status == 200
    assert json.loads(resp.body)["raw_path"] == target


async def test_large_upload_and_download_keep_their_bytes(blue_green) -> None:
    proxy, _, _ = blue_green
    payload = bytes(range(256)) * (10 * MB // 256)
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/upload", data=payload) as r:
            got = await r.json()
        assert got == {"len": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        for chunked in ("0", "1"):
            async with s.get(f"{proxy.url}/bytes/{10 * MB}", params={"chunked": chunked}) as r:
                digest = hashlib.sha256()
                async for piece in r.content.iter_chunked(65536):
                    digest.update(piece)
                assert r.headers.get("Transfer-Encoding") == ("chunked" if chunked == "1" else None)
                assert digest.hexdigest() == pattern_sha256(10 * MB) == r.headers["X-Sha256"]


async def test_chunked_upload_through_slow_reader_is_backpressured(blue_green) -> None:
    """A chunked 4 MB upload to an upstream that reads slowly arrives whole."""
    proxy, _, _ = blue_green
    piece = b"z" * 65536
    sent = hashlib.sha256()

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(64):
            sent.update(piece)
            yield piece

    async with aiohttp.ClientSession() as s, s.post(proxy.url + "/upload?slow=1", data=gen()) as r:
        got = await r.json()
    assert got == {"len": 64 * 65536, "sha256": sent.hexdigest()}


async def test_head_204_304_framing_keeps_the_connection_usable(blue_green) -> None:
    proxy, _, _ = blue_green
    client = await RawClient.connect(proxy.port)
    try:
        await client.send(b"HEAD /bytes/5000 HTTP/1.1\r\nHost: t\r\n\r\n")
        [head] = await client.responses(head_only=True)
        assert head.status == 200 and head.header("Content-Length") == "5000" and head.body == b""
        for status in (204, 304):
            await client.send(f"GET /status/{status} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            [resp] = await client.responses()
            assert resp.status == status and resp.body == b"" and resp.complete
            assert "transfer-encoding" not in resp.header_names()
        await client.send(b"GET /bytes/10 HTTP/1.1\r\nHost: t\r\n\r\n")
        [last] = await client.responses()
        assert last.status == 200 and len(last.body) == 10
    finally:
        await client.close()


async def test_expect_100_continue(blue_green) -> None:
    proxy, _, _ = blue_green
    client = await RawClient.connect(proxy.port)
    try:
        await client.send(
            b"POST /expect HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        [interim] = await client.responses(0, timeout=3)  # read the 100 before sending the body
        assert interim.status == 100
        await client.send(b"hello")
        [final] = await client.responses()
        assert final.status == 200 and json.loads(final.body)["len"] == 5
    finally:
        await client.close()


async def test_pipelined_requests_are_answered_in_order(blue_green) -> None:
    proxy, _, _ = blue_green
    reqs = b"".join(f"GET /bytes/{n} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for n in (3, 70000, 5))
    responses = await exchange(proxy.port, reqs, 3)
    assert [len(r.body) for r in responses] == [3, 70000, 5]


async def test_http10_client_gets_close_delimited_stream(blue_green) -> None:
    proxy, _, _ = blue_green
    client = await RawClient.connect(proxy.port)
    try:
        await client.send(b"GET /bytes/1000?chunked=1 HTTP/1.0\r\n\r\n")
        rest = await client.wait_closed()
    finally:
        await client.close()
    head, _, body = rest.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"chunked" not in head.lower()
    assert len(body) == 1000


async def test_hop_by_hop_headers_are_stripped_both_ways(blue_green) -> None:
    proxy, _, _ = blue_green
    [resp] = await exchange(
        proxy.port,
        b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-Foo\r\nX-Foo: secret\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\nX-End: kept\r\n\r\n",
    )
    names = {n.lower(): v for n, v in json.loads(resp.body)["headers"]}
    for dropped in ("x-foo", "keep-alive", "te", "proxy-connection", "upgrade"):
        assert dropped not in names
    assert names["x-end"] == "kept"
    assert names["x-forwarded-for"] == "127.0.0.1"  # the client's claim is not trusted
    assert names["x-forwarded-proto"] == "http" and names["x-forwarded-host"] == "t"
    assert names["via"] == "1.1 bgproxy"

    [out] = await exchange(
        proxy.port,
        b"GET /headers-out?Connection=X-Bar&X-Bar=secret&Keep-Alive=timeout%3D5&X-Ok=1 HTTP/1.1\r\n"
        b"Host: t\r\n\r\n",
    )
    assert out.status == 200
    assert "x-bar" not in out.header_names() and "keep-alive" not in out.header_names()
    assert out.header("X-Ok") == "1" and out.header("Via") == "1.1 bgproxy"


async def test_trusted_proxy_forwarded_for_is_appended(make_proxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], forwarding={"trusted_proxies": ["127.0.0.0/8"]})
        [resp] = await exchange(
            proxy.port, b"GET /echo HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"
        )
    names = {n.lower(): v for n, v in json.loads(resp.body)["headers"]}
    assert names["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"


@pytest.mark.parametrize(
    ("weights", "expected"),
    [((100, 0), {"blue": 1000}), ((0, 100), {"green": 1000}), ((90, 10), {"blue": 900, "green": 100})],
)
async def test_weights_split_exactly(make_proxy, weights: tuple[int, int], expected: dict[str, int]) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr], weights=weights)
        seen: Counter[str] = Counter()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=20)) as s:

            async def one() -> None:
                async with s.get(proxy.url + "/status/200") as r:
                    await r.read()
                    seen[r.headers["X-Color"]] += 1

            for _ in range(10):
                await asyncio.gather(*(one() for _ in range(100)))
    assert dict(seen) == expected


async def test_keep_alive_connection_is_not_pinned_to_a_color(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr], weights=(1, 1))
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(b"GET /status/200 HTTP/1.1\r\nHost: t\r\n\r\n" * 4)
            colors = [r.header("X-Color") for r in await client.responses(4)]
        finally:
            await client.close()
    assert colors == ["blue", "green", "blue", "green"]


async def test_round_robin_inside_a_pool(make_proxy) -> None:
    async with origin("blue", name="b1") as b1, origin("blue", name="b2") as b2:
        proxy = await make_proxy([b1.addr, b2.addr])
        async with aiohttp.ClientSession() as s:
            seen = []
            for _ in range(6):
                async with s.get(proxy.url + "/status/200") as r:
                    seen.append(r.headers["X-Upstream"])
    assert Counter(seen) == {"b1": 3, "b2": 3}


async def test_raw_encoded_url_via_aiohttp(blue_green) -> None:
    proxy, _, _ = blue_green
    url = URL(proxy.url + "/echo/%2e%2E/x?a=%2F", encoded=True)
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert (await r.json())["raw_path"] == "/echo/%2e%2E/x?a=%2F"
