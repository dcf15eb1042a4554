"""Security defects found by attacking bgproxy as a client and as a misbehaving upstream would.

Each test failed before its fix. Real sockets end to end: a raw client, bgproxy, and a raw or aiohttp
upstream; SECURITY.md lists each class with what bgproxy does and the test that pins it.
"""

from __future__ import annotations

import asyncio
import socket

import httptools
import pytest
from rawclient import RawClient
from upstreams import ScriptedServer, origin, recording_server
from waiting import eventually

REAL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal"
STRAY = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nSTRAY"
SECOND = b"GET /2 HTTP/1.1\r\nHost: t\r\n\r\n"


# ------------------------------------------------------------------- 1. response bytes leak between exchanges


GET1 = b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize(
    ("first", "answer"),
    [
        pytest.param(GET1, REAL + STRAY, id="a second response in the same write"),
        pytest.param(GET1, REAL + b"STRAY junk", id="body past Content-Length"),
        pytest.param(GET1, b"HTTP/1.1 204 No Content\r\n\r\n" + STRAY, id="a body after 204"),
        pytest.param(
            GET1, b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nSTRAY", id="a body after 304"
        ),
        pytest.param(
            GET1.replace(b"GET", b"HEAD"), REAL.replace(b"real", b"STRAY"), id="a body after HEAD's answer"
        ),
    ],
)
async def test_bytes_after_a_complete_response_never_reach_the_next_exchange(
    make_proxy, first: bytes, answer: bytes
) -> None:
    """A client pipelines two requests; the stray bytes must not become the second one's answer."""
    async with ScriptedServer([answer]) as upstream:
        proxy = await make_proxy([upstream.addr])
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(first + SECOND)
            responses = await client.responses(2, head_only=first.startswith(b"HEAD"))
        finally:
            await client.close()
        assert upstream.connections == 2  # the out-of-sync connection was not reused
    assert len(responses) == 2 and all(r.complete for r in responses)
    assert all(b"STRAY" not in r.body for r in responses)
    errors = proxy.app.stats.colors["blue"].upstream_errors
    assert errors.get((upstream.addr, "protocol_error"), 0) >= 1


# ------------------------------------------------------------------- 2. Connection naming framing headers


def requests_in(data: bytes) -> list[tuple[bytes, bytes]]:
    """(url, body) of each request a real parser finds in `data`, as an upstream would read it."""

    class Collector:
        def __init__(self) -> None:
            self.found: list[tuple[bytes, bytes]] = []
            self.url = self.body = b""

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.found.append((self.url, self.body))
            self.url = self.body = b""

    collector = Collector()
    httptools.HttpRequestParser(collector).feed_data(data)
    return collector.found


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"


@pytest.mark.parametrize("option", [b"Content-Length", b"content-length", b"close, Content-Length", b"Host"])
async def test_connection_cannot_remove_framing_or_routing_headers(make_proxy, option: bytes) -> None:
    async with recording_server() as upstream:
        proxy = await make_proxy([upstream.addr])
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(
                b"POST /upload HTTP/1.1\r\nHost: a.example\r\nConnection: " + option
                + b"\r\nContent-Length: %d\r\n\r\n" % len(SMUGGLED) + SMUGGLED
            )  # fmt: skip
            await eventually(lambda: upstream.received.endswith(SMUGGLED))
        finally:
            await client.close()
    assert requests_in(upstream.received) == [(b"/upload", SMUGGLED)]
    assert b"\r\nHost: a.example\r\n" in upstream.received


async def test_a_response_cannot_drop_its_own_length_through_connection(make_proxy) -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nworld",
    ]
    async with ScriptedServer(answers) as upstream:
        proxy = await make_proxy([upstream.addr])
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(GET1 + SECOND)
            responses = await client.responses(2)
        finally:
            await client.close()
    assert [(r.header("Content-Length"), r.body) for r in responses] == [("5", b"hello"), ("5", b"world")]


# ------------------------------------------------------------------- 3. absolute-form targets


@pytest.mark.parametrize(
    ("target", "forwarded", "host"),
    [
        (b"http://other.example/p?q=1", b"GET /p?q=1 HTTP/1.1", b"other.example"),
        (b"HTTP://other.example:8080", b"GET / HTTP/1.1", b"other.example:8080"),
        (b"https://other.example?x", b"GET /?x HTTP/1.1", b"other.example"),
    ],
)
async def test_absolute_form_target_replaces_host_and_goes_on_in_origin_form(
    make_proxy, target: bytes, forwarded: bytes, host: bytes
) -> None:
    async with recording_server() as upstream:
        proxy = await make_proxy([upstream.addr])
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(b"GET " + target + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
            await eventually(lambda: upstream.received.endswith(b"\r\n\r\n"))
        finally:
            await client.close()
    head = upstream.received
    assert head.startswith(forwarded + b"\r\nHost: " + host + b"\r\n")
    assert b"a.example" not in head
    assert b"\r\nX-Forwarded-Host: " + host + b"\r\n" in head


@pytest.mark.parametrize(
    "target", [b"ftp://other.example/", b"http:///nohost", b"http://user@other.example/", b"other.example/p"]
)
async def test_other_targets_are_refused(make_proxy, target: bytes) -> None:
    async with recording_server() as upstream:
        proxy = await make_proxy([upstream.addr])
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(b"GET " + target + b" HTTP/1.1\r\nHost: a.example\r\n\r\n")
            [resp] = await client.responses()
        finally:
            await client.close()
        assert upstream.connections == 0
    assert resp.status == 400 and resp.body.startswith(b"400 Bad Request: ")


# ------------------------------------------------------------------- 4. a reset is never the end of a body


@pytest.mark.parametrize(
    ("request_line", "framing"),
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", b"Transfer-Encoding: chunked"),
        # HTTP/1.0 has no chunking: only the reset can tell this client its body is short.
        (b"GET / HTTP/1.0\r\n\r\n", b"Connection: close"),
    ],
)
async def test_close_delimited_response_cut_by_a_reset_is_cut_with_a_reset(
    make_proxy, request_line: bytes, framing: bytes
) -> None:
    async with ScriptedServer([b"HTTP/1.1 200 OK\r\n\r\npartial body"], then="reset") as upstream:
        proxy = await make_proxy([upstream.addr])
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(request_line)
            data = await client.reader.readuntil(b"partial body")
            upstream.release.set()
            with pytest.raises(ConnectionResetError):
                data += await client.wait_closed()
        finally:
            await client.close()
    assert framing in data and not data.endswith(b"0\r\n\r\n")
    errors = proxy.app.stats.colors["blue"].upstream_errors
    assert errors == {(upstream.addr, "reset_after_headers"): 1}


async def test_close_delimited_response_ended_by_a_clean_close_is_complete(make_proxy) -> None:
    async with ScriptedServer([b"HTTP/1.1 200 OK\r\n\r\nwhole body"], then="close") as upstream:
        upstream.release.set()
        proxy = await make_proxy([upstream.addr])
        client = await RawClient.connect(proxy.port)
        try:
            await client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            [resp] = await client.responses()
        finally:
            await client.close()
    assert (resp.complete, resp.body) == (True, b"whole body")
    assert proxy.app.stats.colors["blue"].upstream_errors == {}


# ------------------------------------------------------------------- 5. a client that never reads


async def test_a_client_that_stops_reading_is_let_go_with_its_upstream(make_proxy) -> None:
    size = 32 * 1024 * 1024
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], timeouts={"client_send": 0.3})
        client = await RawClient.connect(proxy.port)
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        try:
            await client.send(f"GET /bytes/{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            runtime = proxy.app.runtime
            await eventually(lambda: runtime.active["blue"], 2)
            await eventually(lambda: not runtime.active["blue"] and not runtime.connections, 10)
            received = 0
            with pytest.raises(ConnectionResetError):
                while chunk := await client.reader.read(1 << 20):
                    received += len(chunk)
        finally:
            await client.close()
    assert received < size
    assert not any(up.idle for up in runtime.pools["blue"].upstreams)  # its upstream connection went too


async def test_an_idle_tunnel_is_closed_at_timeouts_tunnel_and_a_busy_one_is_not(make_proxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], timeouts={"tunnel": 0.4})
        async with proxy.websocket() as busy, proxy.websocket() as idle:
            loop = asyncio.get_running_loop()
            started = loop.time()
            while loop.time() - started < 1.0:  # busy: a message every 0.1 s keeps it open
                await busy.send("ping")
                assert await busy.recv() == "ping"
                await asyncio.sleep(0.1)
            async with asyncio.timeout(3):
                await idle.wait_closed()
            assert loop.time() - started < 2.0
            await busy.send("still here")
            assert await busy.recv() == "still here"
