"""The client side of the data plane: one Protocol per accepted connection.

Modelled on uvicorn's httptools protocol: httptools (llhttp) calls us back as bytes arrive, and
every byte is forwarded as soon as it can be, never buffering whole bodies. Each request chooses
its color again with ``pick()`` (keep-alive connections are not pinned), so a flip applies to the
next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from typing import cast

import httptools

from .deadline import Deadline
from .exchange import Exchange
from .http1 import (
    HEAD_HAS_BODY,
    HEAD_LENGTH,
    HEAD_UPGRADE,
    Headers,
    Refusal,
    build_request_head,
    error_response,
)
from .routing import pick, route
from .runtime import Runtime
from .stats import NONE_COLOR
from .tunnel import Tunnel

# Why client reading is paused (a bit set: reading resumes when no reason is left).
_WAIT = 1  # the current request's upstream is not connected yet (or an Upgrade awaits its 101)
_BACKPRESSURE = 2  # the upstream's write buffer is above its high-water mark
_REFUSED = 4  # a pipelined request was refused: read nothing more
_QUEUED = 8  # a pipelined request waits its turn: read no further ones meanwhile

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, never a clean FIN


class ClientConnection:
    """Parses requests from one client, queues pipelined ones, and runs one Exchange at a time.

    It implements asyncio.Protocol structurally rather than by inheritance: a class with a Python
    base cannot be a mypyc native class, and native attribute access is most of the speed-up.
    """

    __slots__ = (
        "closing",
        "current",
        "deadline",
        "header_bytes",
        "headers",
        "idle",
        "lost",
        "parser",
        "paused",
        "peer_ip",
        "peer_ip_b",
        "queue",
        "reading",
        "refusal",
        "runtime",
        "send_deadline",
        "to_start",
        "transport",
        "trusted",
        "tunnel",
        "upgrading",
        "url",
        "wbuf",
        "write_paused",
    )

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer_ip = ""
        self.peer_ip_b = b""
        self.trusted = False
        self.url = b""
        self.headers: Headers = []
        self.header_bytes = 0
        self.current: Exchange | None = None  # the exchange being answered
        self.reading: Exchange | None = None  # the request whose body is arriving
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        # Parsed in this read but not yet sent: an exchange starts only once the whole read parsed
        # cleanly, so a request whose body turns out malformed never reaches an upstream.
        self.to_start: Exchange | None = None
        self.upgrading: Exchange | None = None  # an Upgrade request waiting for 101
        self.tunnel: Tunnel | None = None
        self.refusal: Refusal | None = None  # a pipelined refusal, sent after the current answer
        self.paused = 0
        self.write_paused = False
        # While an upstream read is being parsed, writes to the client collect here and go out
        # as one send (head + body + last chunk), instead of one syscall each.
        self.wbuf: list[bytes] | None = None
        self.closing = False
        self.lost = False  # connection_lost ran: the socket is gone (closing may be set long before)
        self.idle = True  # between requests: a timeout closes silently instead of answering 408
        self.deadline = Deadline(runtime.loop, self._timed_out)
        # Armed while our writes to the client are paused: a client that stops reading is let go.
        self.send_deadline = Deadline(runtime.loop, self._send_timed_out)

    # -- the asyncio.Protocol interface -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        runtime = self.runtime
        settings = runtime.settings
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else "unknown"
        self.peer_ip_b = self.peer_ip.encode()
        self.trusted = settings.is_trusted(self.peer_ip)
        runtime.connections.add(self)
        if len(runtime.connections) > settings.max_connections:
            runtime.error_log.warning(
                ("client", "max_connections"), "client connection refused", limit=settings.max_connections
            )
            self._refuse_now(Refusal(503, "too many client connections"))
            return
        self.deadline.arm(settings.client_header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_client(data)
            return
        if self.upgrading is not None:
            self.upgrading.early += data
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raised in HttpParserError; the Refusal is its context.
            ctx = exc.__context__
            self._refuse(ctx if isinstance(ctx, Refusal) else Refusal(400, f"malformed request: {exc}"))
        ex = self.to_start
        if ex is not None:
            self.to_start = None
            if not ex.done:
                ex.start()

    def eof_received(self) -> bool | None:
        # A client that half-closes after its request still gets its answer (RFC 9112 §9.6).
        return self.current is not None or bool(self.queue)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.lost = True
        self.deadline.cancel()
        self.send_deadline.cancel()
        self.runtime.connection_closed(self)
        if self.tunnel is not None:
            self.tunnel.client_lost()
            return
        pending = [self.current, self.upgrading, self.reading, *self.queue]
        self.current = self.reading = self.upgrading = None
        self.queue.clear()
        for ex in pending:
            if ex is not None and not ex.done:
                ex.client_gone()

    def pause_writing(self) -> None:
        self.write_paused = True
        limit = self.runtime.settings.client_send_timeout
        if limit and self.tunnel is None:  # a tunnel has timeouts.tunnel instead
            self.send_deadline.arm(limit)
        ex = self.current
        if ex is not None and ex.conn is not None:
            ex.conn.transport.pause_reading()  # type: ignore[union-attr]
            if ex.response_started:
                ex.conn.deadline.disarm()  # stream_idle: a slow reader is not a silent upstream

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline.disarm()
        ex = self.current
        if ex is not None and ex.conn is not None:
            ex.conn.transport.resume_reading()  # type: ignore[union-attr]
            if ex.response_started:
                ex.stream_progress(ex.conn, self.runtime.loop.time())

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        if self.idle:
            self.idle = False
            self.deadline.arm(self.runtime.settings.client_header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        limit = self.runtime.settings.max_header_bytes
        if self.header_bytes > limit:
            raise Refusal(431, f"request head larger than {limit} bytes")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        runtime = self.runtime
        settings = runtime.settings
        self.deadline.disarm()  # the head is in
        parser = self.parser
        method = parser.get_method()
        http_version = parser.get_http_version()
        req = build_request_head(
            method, self.url, http_version, self.headers, self.peer_ip_b, self.trusted, settings.via
        )
        limit = settings.max_body_bytes
        length = req[HEAD_LENGTH]
        if limit >= 0 and length > limit:
            raise Refusal(413, f"request body of {length} bytes is over the {limit} limit")
        if req[HEAD_UPGRADE] and req[HEAD_HAS_BODY]:
            raise Refusal(400, "an Upgrade request cannot carry a body")
        table = runtime.table
        cookie = b""
        preview = False
        if table.ruled:
            color, cookie, preview = route(table, self.headers, self.peer_ip, self.trusted, runtime.pools)
        else:
            color = pick(table)
        ex = Exchange(
            self,
            req,
            color,
            method == b"HEAD",
            http_version == "1.0",
            parser.should_keep_alive(),
            runtime.loop.time(),
        )
        if cookie:
            ex.set_cookie = cookie
            runtime.stats.assignments[color] += 1
        if preview:
            ex.cstats = runtime.stats.preview[color]
        ex.cstats.in_flight += 1
        runtime.active[color].add(ex)
        self.reading = ex
        if ex.has_body and self.current is None:
            self.deadline.arm(settings.idle_timeout)  # the body must keep coming
        if self.current is None:
            self.current = self.to_start = ex
        else:
            self.queue.append(ex)
            self.pause(_QUEUED)

    def on_body(self, body: bytes) -> None:
        ex = self.reading
        if ex is not None:
            if ex is self.current:  # a queued body waits on us, not the client: not timed yet
                self.deadline.arm(self.runtime.settings.idle_timeout)  # inactivity while it arrives
            ex.request_body(body)

    def on_message_complete(self) -> None:
        ex = self.reading
        self.reading = None
        if ex is not None:
            if ex.has_body:
                self.deadline.disarm()
            ex.request_complete()

    # -- used by exchanges -----------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        if self.wbuf is not None:
            self.wbuf.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def send_many(self, pieces: list[bytes]) -> None:
        if self.wbuf is not None:
            self.wbuf.extend(pieces)
        elif self.transport is not None:
            self.transport.writelines(pieces)

    def hold_writes(self) -> None:
        if self.wbuf is None:
            self.wbuf = []

    def flush(self) -> None:
        """Send what was held, in one write when it is small."""
        buf = self.wbuf
        self.wbuf = None
        if not buf or self.transport is None:
            return
        if len(buf) == 1:
            self.transport.write(buf[0])
        elif len(buf) == 2 and len(buf[1]) < 16384:
            self.transport.write(buf[0] + buf[1])  # head + a small body: one copy, one send
        else:
            self.transport.writelines(buf)

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closing:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def wait_for_upstream(self) -> None:
        """Read no more requests until the current one has an upstream connection."""
        self.pause(_WAIT)

    def upstream_ready(self) -> None:
        self.resume(_WAIT)

    def pause_reading_for_backpressure(self) -> None:
        self.pause(_BACKPRESSURE)

    def resume_reading_after_backpressure(self) -> None:
        self.resume(_BACKPRESSURE)

    def exchange_done(self, ex: Exchange, now: float) -> None:
        """An answer is complete: close, start the next pipelined request, or wait idle."""
        if ex is not self.current or self.transport is None:
            return
        self.current = None
        if self.closing:  # cut or refused: nothing queued may reach an upstream any more
            for queued in list(self.queue):
                queued.client_gone()
            self.queue.clear()
            self._close()
            return
        if not ex.keep:
            self._close()
            return
        if self.queue:
            nxt = self.current = self.queue.popleft()
            if not self.queue:
                self.resume(_QUEUED)
            if nxt is self.reading:  # its body may keep coming now: from here it is timed
                self.deadline.arm(nxt.settings.idle_timeout)
            if nxt.closed_at_deadline:
                nxt.fail(503, f"{nxt.color} drained: its deadline passed before its turn")
            else:
                nxt.start()
            return
        if self.refusal is not None:
            self._refuse_now(self.refusal)
            return
        if self.closing or self.runtime.closing:
            self._close()
            return
        self.resume(_WAIT)
        if self.reading is None:
            self.idle = True
            self.deadline.arm_at(now + ex.settings.idle_timeout)

    def upgrade_started(self) -> None:
        self.upgrading = None
        self.deadline.cancel()
        self.resume(_WAIT)

    def close_if_idle(self) -> None:
        """Shutdown: a keep-alive connection between requests is closed now (no request is lost)."""
        if self.idle and self.current is None and self.tunnel is None and not self.queue:
            self._close()

    def abort(self) -> None:
        """Cut the connection with a reset: a truncated response must never look complete."""
        self.closing = True
        self.wbuf = None
        transport = self.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            transport.abort()

    # -- internals --------------------------------------------------------------------------------
    def _upgrade_requested(self, leftover: bytes) -> None:
        ex = self.reading or self.current
        if ex is None or not ex.upgrade:
            self._refuse(Refusal(400, "unexpected protocol upgrade"))
            return
        ex.request_complete()
        self.reading = None
        ex.early += leftover
        self.upgrading = ex
        self.pause(_WAIT)

    def _refuse(self, refusal: Refusal) -> None:
        """A request we will not forward: answer it once nothing else is owed, then close."""
        ex = self.reading
        if ex is not None:  # broken mid-body: if the upstream got part of it, that connection must go
            self.closing = True
            self.reading = None
            ex._release_upstream()
            if ex is self.current and not ex.response_started:
                ex.fail(refusal.status, refusal.why)
                return
            if ex is self.current:
                self.abort()
                ex.finish()
                return
            self.queue.remove(ex)  # still queued: it never started, account for it and answer below
            ex.status = refusal.status
            ex.finish()
        if self.current is None:
            self._refuse_now(refusal)
        else:
            self.refusal = refusal
            self.pause(_REFUSED)

    def _refuse_now(self, refusal: Refusal) -> None:
        runtime = self.runtime
        runtime.stats.colors[NONE_COLOR].response(refusal.status, 0.0, runtime.loop.time())
        self.send(error_response(refusal.status, refusal.why, via=runtime.settings.via, close=True))
        self._close()

    def _send_timed_out(self) -> None:
        """timeouts.client_send passed with our writes paused: the client stopped reading."""
        if not self.write_paused or self.lost:
            return
        limit = self.runtime.settings.client_send_timeout
        self.runtime.error_log.warning(
            ("client", "send_timeout"), "client stopped reading", peer=self.peer_ip, seconds=limit
        )
        self.abort()  # connection_lost then closes the upstream side of the exchange

    def _timed_out(self) -> None:
        if self.reading is not None:  # the body stalled: free the upstream connection it holds
            self._refuse(Refusal(408, f"request body stalled for {self.runtime.settings.idle_timeout:g}s"))
            return
        if self.idle or self.current is not None:
            self._close()  # idle keep-alive (or a fresh connection that never spoke): just close
            return
        self._refuse(Refusal(408, "request head not received in time"))

    def _close(self) -> None:
        self.closing = True
        self.deadline.cancel()
        self.flush()
        if self.transport is not None:
            self.transport.close()
