"""The data plane's protocol classes over in-memory transports, h11 style: bytes in, bytes out, exactly.

The real ClientConnection, Exchange and UpstreamConnection (compiled when built with mypyc) run
against bench.memory's transports, which only keep what is written: no sockets, no kernel, no
timing. What reaches the upstream and what the client gets back is asserted to the byte.
"""

from __future__ import annotations

import asyncio

import pytest
from waiting import eventually

from bench.memory import MemoryTransport, client_connection, make_runtime, pooled_connection
from bgproxy.control.drain import Drainer
from bgproxy.core.switchboard import Switchboard
from bgproxy.core.weights import Weights
from bgproxy.dataplane.client import ClientConnection
from bgproxy.dataplane.routing import RouteTable
from bgproxy.dataplane.runtime import Runtime
from bgproxy.dataplane.settings import Settings
from bgproxy.dataplane.upstream import UpstreamConnection

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
FORWARDED = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
    b"X-Forwarded-Host: 127.0.0.1:8080\r\nVia: 1.1 bgproxy\r\n\r\n"
)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nhello, world\n"
)


def wired() -> tuple[Runtime, UpstreamConnection, MemoryTransport, ClientConnection, MemoryTransport]:
    """(runtime, a pooled blue upstream connection and its wire, a client connection and its wire)."""
    runtime = make_runtime()
    conn, upstream = pooled_connection(runtime, "blue")
    client, downstream = client_connection(runtime)
    return runtime, conn, upstream, client, downstream


ANSWER = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 13\r\nVia: 1.1 bgproxy\r\n\r\nhello, world\n"


async def test_a_get_goes_upstream_and_its_answer_comes_back_byte_for_byte() -> None:
    runtime, conn, upstream, client, downstream = wired()
    client.data_received(REQUEST)
    assert upstream.take() == FORWARDED
    assert downstream.take() == b""  # nothing is said before the upstream answers
    conn.data_received(RESPONSE)
    assert downstream.take() == ANSWER
    assert not downstream.is_closing() and runtime.pools["blue"].upstreams[0].idle[-1] is conn  # both kept
    assert runtime.stats.colors["blue"].codes == {200: 1}


async def test_the_installed_route_table_steers_the_next_request() -> None:
    runtime = make_runtime(weights=(100, 0))
    blue, blue_wire = pooled_connection(runtime, "blue")
    green, green_wire = pooled_connection(runtime, "green")
    client, downstream = client_connection(runtime)
    client.data_received(REQUEST)
    blue.data_received(RESPONSE)
    runtime.install(RouteTable(1, 0, 100))  # what the Controller does on a flip
    client.data_received(REQUEST)
    assert (blue_wire.take(), green_wire.take()) == (FORWARDED, FORWARDED)
    green.data_received(RESPONSE)
    assert downstream.take() == ANSWER * 2
    assert {c: runtime.stats.colors[c].codes for c in ("blue", "green")} == {
        "blue": {200: 1},
        "green": {200: 1},
    }


async def test_pipelined_requests_go_upstream_one_at_a_time_and_are_answered_in_order() -> None:
    _, conn, upstream, client, downstream = wired()
    second = b"GET /2 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
    client.data_received(REQUEST + second)
    assert upstream.take() == FORWARDED  # the second waits for the first answer
    assert not downstream.reading  # and the client is not read meanwhile
    conn.data_received(RESPONSE)
    assert upstream.take() == FORWARDED.replace(b"GET / ", b"GET /2 ")
    conn.data_received(RESPONSE.replace(b"hello, world\n", b"second answ\n\n"))
    assert downstream.take() == ANSWER + ANSWER.replace(b"hello, world\n", b"second answ\n\n")
    assert downstream.reading


@pytest.mark.parametrize(
    ("request_bytes", "answer"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"400 Bad Request: malformed request: ",
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400 Bad Request: more than one Host header\n"),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"400 Bad Request: Transfer-Encoding",
        ),
    ],
)
async def test_a_refused_request_never_reaches_an_upstream(request_bytes: bytes, answer: bytes) -> None:
    runtime, _, upstream, client, downstream = wired()
    client.data_received(request_bytes)
    out = downstream.take()
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n") and head.endswith(b"\r\nConnection: close")
    assert body.startswith(answer)
    assert downstream.closed and upstream.take() == b""
    assert runtime.stats.colors["none"].codes == {400: 1}


async def test_a_5xx_answer_is_relayed_and_reported_to_passive_health() -> None:
    runtime, conn, _, client, downstream = wired()
    client.data_received(REQUEST)
    conn.data_received(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")
    assert downstream.take() == b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nVia: 1.1 bgproxy\r\n\r\n"
    assert runtime.pools["blue"].upstreams[0].failures == 1  # the Reporter (HealthMonitor) counted it


async def test_an_upstream_that_says_close_is_not_pooled() -> None:
    runtime, conn, upstream, client, downstream = wired()
    client.data_received(REQUEST)
    conn.data_received(RESPONSE.replace(b"keep-alive", b"close"))
    assert downstream.take() == ANSWER  # the client connection stays open: it is its own hop
    assert upstream.aborted and not runtime.pools["blue"].upstreams[0].idle


async def test_a_chunked_answer_reaches_an_http10_client_close_delimited() -> None:
    _, conn, _, client, downstream = wired()
    client.data_received(b"GET / HTTP/1.0\r\n\r\n")
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert downstream.take() == b"HTTP/1.1 200 OK\r\nVia: 1.1 bgproxy\r\nConnection: close\r\n\r\nhello"
    assert downstream.closed


async def test_a_close_delimited_answer_is_rechunked_for_an_http11_client() -> None:
    _, conn, _, client, downstream = wired()
    client.data_received(REQUEST)
    conn.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc")
    conn.data_received(b"defgh")
    assert downstream.take() == (
        b"HTTP/1.1 200 OK\r\nVia: 1.1 bgproxy\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n5\r\ndefgh\r\n"
    )
    conn.connection_lost(None)  # EOF ends a close-delimited body: the last chunk follows
    assert downstream.take() == b"0\r\n\r\n"


async def test_idle_future_and_drain_counts() -> None:
    """A draining color's exchanges are counted as they end, and its idle future resolves after the last."""
    runtime, conn, _, client, _ = wired()
    client.data_received(REQUEST)
    runtime.start_draining("blue")
    idle = runtime.idle("blue")
    assert not idle.done() and runtime.open_streams("blue") == 0
    conn.data_received(RESPONSE)
    assert idle.done()
    assert runtime.stats.colors["blue"].streams_ended == 1
    assert runtime.idle("green").done()  # nothing in flight: done at once


async def test_a_wait_that_gives_up_leaves_no_waiter_behind() -> None:
    """drain/wait on a busy color that times out must not pile up futures on every call."""
    runtime, _, _, client, _ = wired()
    drainer = Drainer(runtime, Switchboard(Weights(100, 0), drain_timeout=30))
    client.data_received(REQUEST)  # in flight, never answered
    for _ in range(3):
        assert not await drainer.wait_idle("blue", 0.001)
    assert runtime.watching == 0


async def test_a_queued_request_past_its_drain_deadline_is_refused_in_its_turn() -> None:
    """The 503 goes out after the current answer, never inside it, and nothing reaches an upstream."""
    _, conn, upstream, client, downstream = wired()
    client.data_received(REQUEST + REQUEST.replace(b"GET / ", b"GET /2 "))
    [queued] = client.queue
    queued.close_at_deadline(1.0)
    assert downstream.take() == b""
    conn.data_received(RESPONSE)
    out = downstream.take()
    assert out.startswith(ANSWER + b"HTTP/1.1 503 Service Unavailable\r\n")
    assert out.endswith(b"blue drained: its deadline passed before its turn\n")
    assert upstream.take() == FORWARDED  # the queued one was never sent


async def test_after_a_cut_no_queued_request_reaches_an_upstream() -> None:
    """An upstream reset mid-body cuts the client; the pipelined request behind it must not be sent."""
    runtime, conn, upstream, client, downstream = wired()
    client.data_received(REQUEST + b"POST /order HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nok")
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    conn.connection_lost(ConnectionResetError())
    assert downstream.aborted
    assert upstream.take() == FORWARDED  # only the first request ever went upstream
    assert runtime.stats.colors["blue"].codes == {200: 1, 499: 1}


async def test_a_reader_that_stops_is_let_go_even_after_its_last_answer() -> None:
    """Connection: close sets closing before the buffer drains; client_send must still apply."""
    runtime = make_runtime(Settings(client_send_timeout=0.05))
    conn, _ = pooled_connection(runtime, "blue")
    client, downstream = client_connection(runtime)
    client.data_received(REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    client.pause_writing()  # the client stopped reading: our buffer is over its high-water mark
    conn.data_received(RESPONSE)
    assert downstream.closed and not downstream.aborted  # closing, waiting for the buffer to drain
    await eventually(lambda: downstream.aborted, 2)


async def test_a_queued_body_is_not_timed_while_we_hold_it() -> None:
    runtime = make_runtime(Settings(idle_timeout=0.05))
    conn, _ = pooled_connection(runtime, "blue")
    client, downstream = client_connection(runtime)
    client.data_received(REQUEST + b"POST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    await asyncio.sleep(0.15)  # three idle timeouts while the answer to the first is pending
    assert downstream.take() == b"" and not downstream.closed
    conn.data_received(RESPONSE)
    assert downstream.take() == ANSWER
    await eventually(lambda: downstream.closed, 2)  # now it is the client's turn, and it stalls
    assert b"408 Request Timeout" in downstream.take()
