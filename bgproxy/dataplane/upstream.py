"""The upstream side of the data plane: one keep-alive HTTP/1.1 connection to an upstream."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

import httptools

from .deadline import Deadline

if TYPE_CHECKING:
    from .exchange import Exchange
    from .pool import Upstream
    from .tunnel import Tunnel


class ResponseHeadTooLarge(Exception):
    """Raised from a parser callback: the response head outgrew limits.max_header_bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


class OutOfSync(Exception):
    """Raised from a parser callback: bytes came after a complete response (or a HEAD answer's head)."""


class UpstreamConnection:
    """Parses responses from one upstream and hands them to the exchange it serves.

    A connection serves one exchange at a time (no pipelining toward upstreams) and returns to its
    Upstream's idle pool when both sides agree to keep it alive. Like ClientConnection it is an
    asyncio.Protocol by structure, not inheritance, so mypyc can compile it as a native class.
    """

    __slots__ = (
        "closed",
        "deadline",
        "ex",
        "finished",
        "head_bytes",
        "header_timeout",
        "headers",
        "idle_since",
        "keep_alive",
        "out_of_sync",
        "parser",
        "reason",
        "reset_parser",
        "served",
        "transport",
        "tunnel",
        "upstream",
    )

    def __init__(self, upstream: Upstream, loop: asyncio.AbstractEventLoop, header_timeout: float) -> None:
        self.upstream = upstream
        self.header_timeout = header_timeout
        # Armed while we wait for a response head, then while a response body streams.
        self.deadline = Deadline(loop, self._timed_out)
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.idle_since = 0.0
        self.closed = False
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.head_bytes = 0  # status line and headers of the response being parsed
        self.reset_parser = False  # after a response to HEAD: llhttp would wait for a body
        # The final response is complete, and is handed to the exchange once the whole read is
        # parsed: a byte after it means the connection is out of sync and must not be reused.
        self.finished = False
        self.keep_alive = False  # what the upstream said about the finished response
        self.out_of_sync = False
        self.served = 0  # exchanges served; >0 means a reused connection (stale-race retry)
        self.tunnel: Tunnel | None = None

    # -- the asyncio.Protocol interface -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
            return
        ex = self.ex
        if ex is None:
            self.close()  # an idle connection must not talk
            self.upstream.forget(self)
            return
        ex.got_response_bytes = True
        if ex.response_started:  # more of a streaming body
            ex.stream_progress(self, ex.runtime.loop.time())
        client = ex.client
        client.hold_writes()
        try:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                client.flush()  # the 101 goes out before any tunneled byte
                ex.upgraded(self, data[exc.args[0] :])
            except httptools.HttpParserError as exc:
                if self.finished:  # whatever broke the parse came after the response's end
                    self.out_of_sync = True
                else:
                    self._bad_response(exc)
            if self.finished:
                self._response_done()
        finally:
            client.flush()
        if self.reset_parser:
            self.reset_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def _bad_response(self, exc: httptools.HttpParserError) -> None:
        # httptools wraps what a callback raised in HttpParserError; our exception is its context.
        ex = self.ex
        if ex is None:
            self.close()
        elif isinstance(exc.__context__, ResponseHeadTooLarge):
            why = f"sent a response head larger than {exc.__context__.limit} bytes"
            ex.upstream_failed(self, "response_head_too_large", why)
        else:
            ex.upstream_failed(self, "protocol_error", f"bad response: {exc}")

    def finish_response(self, keep_alive: bool) -> None:
        """The exchange has its whole response; it gets it once the rest of the read is checked."""
        self.finished = True
        self.keep_alive = keep_alive

    def _response_done(self) -> None:
        self.finished = False
        ex = self.ex
        if ex is None:
            return
        if self.out_of_sync:
            ex.response_overrun(self)
        else:
            ex.response_complete(self, self.keep_alive)

    def _after_end(self) -> None:
        """Parser callback past the end of the response: mark the connection, stop parsing."""
        self.out_of_sync = True
        raise OutOfSync

    def eof_received(self) -> bool | None:
        return None  # close our side too: a half-closed upstream is not reusable

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadline.cancel()
        if self.tunnel is not None:
            self.tunnel.upstream_lost()
            return
        ex = self.ex
        if ex is None:
            self.upstream.forget(self)
            return
        ex.upstream_lost(self, exc is None)

    def pause_writing(self) -> None:
        if self.ex is not None:
            self.ex.client.pause_reading_for_backpressure()

    def resume_writing(self) -> None:
        if self.ex is not None:
            self.ex.client.resume_reading_after_backpressure()

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.finished:
            self._after_end()
        self.headers = []
        self.reason = b""
        self.head_bytes = 0

    def on_status(self, status: bytes) -> None:
        self._count_head(len(status))
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        self.headers.append((name, value))

    def _count_head(self, n: int) -> None:
        """Bound what an upstream can make us hold: limits.max_header_bytes applies to responses too."""
        self.head_bytes += n
        ex = self.ex
        if ex is not None and self.head_bytes > ex.settings.max_header_bytes:
            raise ResponseHeadTooLarge(ex.settings.max_header_bytes)

    def on_headers_complete(self) -> None:
        ex = self.ex
        if ex is None:
            raise httptools.HttpParserError("response without a request")
        ex.response_head(self, self.parser.get_status_code(), self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if self.finished or ex is None:
            self._after_end()
            return
        ex.response_body(body)

    def on_message_complete(self) -> None:
        ex = self.ex
        if ex is not None and not self.finished and ex.status >= 200:  # a 1xx is not the answer yet
            self.finish_response(self.parser.should_keep_alive())

    def _timed_out(self) -> None:
        if self.ex is not None:
            self.ex.upstream_timed_out(self)

    # -- used by the exchange ---------------------------------------------------------------------
    def close(self) -> None:
        """Close now, dropping anything unsent: used when the connection cannot be trusted."""
        self.closed = True
        self.ex = None
        self.deadline.cancel()
        if self.transport is not None:
            self.transport.abort()


async def open_connection(
    upstream: Upstream, connect_timeout: float, header_timeout: float
) -> UpstreamConnection:
    """Connect to an upstream within `connect_timeout` (TimeoutError / OSError on failure)."""
    loop = asyncio.get_running_loop()
    conn = UpstreamConnection(upstream, loop, header_timeout)
    async with asyncio.timeout(connect_timeout):
        await loop.create_connection(lambda: cast(asyncio.Protocol, conn), upstream.host, upstream.port)
    return conn
