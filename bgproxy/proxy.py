"""The client side of the data plane: one Protocol per client connection, one Exchange per request.

Modelled on uvicorn's httptools protocol: httptools (llhttp) calls us back as bytes arrive, and
every byte is forwarded as soon as it can be, never buffering whole bodies. Each request chooses
its color again (keep-alive connections are not pinned), so a flip applies to the next request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import cast

import httptools

from .deadline import Deadline
from .http1 import (
    LAST_CHUNK,
    Headers,
    Refusal,
    RequestHead,
    ResponseFraming,
    build_request_head,
    build_response_head,
    chunk,
    error_response,
    interim_head,
)
from .pool import Upstream
from .router import Router
from .stats import NONE_COLOR, ColorStats
from .tunnel import Tunnel
from .upstream_conn import UpstreamConnection, open_connection

log = logging.getLogger("bgproxy.proxy")

# Why client reading is paused (a bit set: reading resumes when no reason is left).
_WAIT = 1  # the request's upstream is not connected yet, or it waits its pipelined turn
_BACKPRESSURE = 2  # the upstream's write buffer is above its high-water mark
_REFUSED = 4  # a pipelined request was refused: read nothing more

_BODILESS = frozenset({204, 304})


class Exchange:
    """One request/response through the proxy, from parsed head to last response byte."""

    __slots__ = (
        "body_bytes",
        "broken",
        "chunked",
        "client",
        "closed_at_deadline",
        "color",
        "conn",
        "connect_task",
        "cstats",
        "done",
        "early",
        "expect_continue",
        "failed_over",
        "framing",
        "got_response_bytes",
        "has_body",
        "head",
        "http10",
        "is_head",
        "keep",
        "keep_alive",
        "pending",
        "request_done",
        "response_started",
        "retried",
        "reused",
        "router",
        "started",
        "status",
        "tunnel",
        "upgrade",
        "upstream",
    )

    def __init__(
        self,
        client: ClientConnection,
        req: RequestHead,
        color: str,
        is_head: bool,
        http10: bool,
        keep_alive: bool,
        started: float,
    ) -> None:
        router = client.router
        self.client = client
        self.router = router
        self.color = color
        self.cstats: ColorStats = router.stats.colors[color]
        self.head, self.chunked, self.has_body, _, self.expect_continue, self.upgrade = req
        self.is_head = is_head
        self.http10 = http10
        self.keep_alive = keep_alive
        self.started = started
        self.body_bytes = 0
        self.pending: list[bytes] = []  # framed request body waiting for the upstream connection
        self.early = b""  # bytes after an Upgrade request, sent once the upstream says 101
        self.request_done = False
        self.upstream: Upstream | None = None
        self.conn: UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.status = 0
        self.framing = ResponseFraming.NONE
        self.keep = False
        self.response_started = False
        self.got_response_bytes = False
        self.reused = False
        self.retried = False  # replayed once after a reused connection died unanswered
        self.failed_over = False  # moved once to another upstream after a failure before any answer
        self.broken = False  # an upstream error ended this exchange (an error even if the status was 2xx)
        self.done = False
        self.closed_at_deadline = False
        self.tunnel: Tunnel | None = None

    @property
    def is_stream(self) -> bool:
        """A long-lived exchange: upgraded, or a response body still streaming without a length."""
        return self.tunnel is not None or (
            self.response_started and self.framing in (ResponseFraming.CHUNKED, ResponseFraming.CLOSE)
        )

    # -- request side -----------------------------------------------------------------------------
    def start(self) -> None:
        """Pick an upstream of our color and send the request head (connecting if needed)."""
        up = self.router.pools[self.color].pick()
        if up is None:
            self.fail(503, f"no {self.color} upstream available")
            return
        self._use(up)

    def _use(self, up: Upstream) -> None:
        self.upstream = up
        up.outstanding += 1
        conn = up.take_idle(self.router.loop.time(), self.router.upstream_idle)
        if conn is not None:
            self._attach(conn)
        else:
            self.client.pause(_WAIT)
            self.connect_task = self.router.loop.create_task(self._connect(up))

    async def _connect(self, up: Upstream) -> None:
        try:
            conn = await open_connection(up, self.router.connect_timeout, self.router.upstream_header_timeout)
        except TimeoutError:
            self._connect_failed(up, 504, "connect_timeout", "did not accept the connection in time")
            return
        except OSError as exc:
            self._connect_failed(up, 502, "connect_refused", f"refused the connection ({exc.strerror})")
            return
        finally:
            self.connect_task = None
        if self.done:  # the client went away meanwhile: keep the connection for someone else
            up.give_back(conn, self.router.loop.time())
            return
        self._attach(conn)

    def _connect_failed(self, up: Upstream, status: int, reason: str, why: str) -> None:
        self._log_error(up, reason, why)
        self.cstats.upstream_error(up.addr, reason)
        self.router.health.failed(up)
        if self.done:
            return
        # Nothing was sent yet (the body waits in `pending` or in the client socket): safe to move.
        if self._fail_over(up):
            return
        self._release_upstream()
        self.fail(status, f"{self.color} upstream {up.addr} {why}")

    def _fail_over(self, up: Upstream) -> bool:
        """Move the request, once, to another upstream of the same color; False if none can take it."""
        if self.failed_over:
            return False
        other = self.router.pools[self.color].pick(exclude=up)
        if other is None:
            return False
        self.failed_over = True
        self._release_upstream()
        self._use(other)
        return True

    def _attach(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        conn.ex = self
        self.reused = conn.served > 0
        transport = conn.transport
        assert transport is not None
        if self.client.write_paused:
            transport.pause_reading()
        if self.pending:
            transport.writelines([self.head, *self.pending])
            self.pending = []
        else:
            transport.write(self.head)
        if self.request_done:  # else the wait for the answer starts once the body is all sent
            conn.deadline.arm_at(self.started + conn.header_timeout)
        self.client.resume(_WAIT)

    def request_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        limit = self.router.max_body_bytes
        if limit is not None and self.body_bytes > limit:
            raise Refusal(413, f"request body larger than {limit} bytes")
        conn = self.conn
        if self.chunked:
            if conn is not None:
                conn.transport.writelines(chunk(body))  # type: ignore[union-attr]
            else:
                self.pending.extend(chunk(body))
        elif conn is not None:
            conn.transport.write(body)  # type: ignore[union-attr]
        else:
            self.pending.append(body)

    def request_complete(self) -> None:
        self.request_done = True
        conn = self.conn
        if self.chunked:
            if conn is not None:
                conn.transport.write(LAST_CHUNK)  # type: ignore[union-attr]
            else:
                self.pending.append(LAST_CHUNK)
        if conn is not None and self.has_body and not self.response_started:
            # Like Envoy's route timeout: a long upload does not eat into the wait for the answer.
            conn.deadline.arm(conn.header_timeout)

    # -- response side ----------------------------------------------------------------------------
    def response_head(self, conn: UpstreamConnection, status: int, upstream_keep_alive: bool) -> None:
        client = self.client
        if status < 200:
            if status == 101:
                if not self.upgrade:
                    raise httptools.HttpParserError("101 Switching Protocols without an Upgrade request")
                head, _, _ = build_response_head(
                    101, conn.reason, conn.headers, True, True, False, self.router.via, self.upgrade
                )
                conn.deadline.disarm()
                self.status = 101
                self.response_started = True
                client.send(head)
            elif not self.http10:
                client.send(interim_head(status, conn.reason, conn.headers))
            return
        router = self.router
        now = router.loop.time()
        self.stream_progress(conn, now)  # the header deadline becomes the body's inactivity deadline
        up = conn.upstream
        if status >= 500:
            router.health.failed(up)
        elif up.failures:
            up.failures = 0
        self.cstats.upstream_header(now - self.started)
        self.status = status
        keep = (
            self.keep_alive
            and self.request_done
            and not self.upgrade
            and not client.closing
            and not router.closing
        )
        head, self.framing, self.keep = build_response_head(
            status,
            conn.reason,
            conn.headers,
            self.is_head or status in _BODILESS,
            keep,
            self.http10,
            router.via,
        )
        self.response_started = True
        client.send(head)
        if self.is_head:
            # llhttp cannot be told the response is to HEAD: finish here and give the
            # connection a fresh parser, or it would wait for a body that never comes.
            conn.reset_parser = True
            self.response_complete(conn, upstream_keep_alive)

    def stream_progress(self, conn: UpstreamConnection, now: float) -> None:
        """The upstream sent part of the response: it may now stay silent for stream_idle, no longer."""
        idle = self.router.stream_idle_timeout
        if idle and not self.client.write_paused and self.tunnel is None:  # tunnels have no such limit
            conn.deadline.arm_at(now + idle)
        else:
            conn.deadline.disarm()  # off, or the client is not reading: its pace is not the upstream's

    def upstream_timed_out(self, conn: UpstreamConnection) -> None:
        if self.response_started:
            idle = self.router.stream_idle_timeout
            self.upstream_failed(conn, "stream_idle_timeout", f"sent nothing for {idle:g}s mid-response")
        else:
            self.upstream_failed(
                conn, "response_timeout", f"sent no response head within {conn.header_timeout:g}s"
            )

    def response_body(self, body: bytes) -> None:
        if self.framing == ResponseFraming.CHUNKED:
            self.client.send_many(chunk(body))
        else:
            self.client.send(body)

    def response_complete(self, conn: UpstreamConnection, upstream_keep_alive: bool) -> None:
        if self.status < 200 or self.done:
            return  # end of an interim (1xx) response, or the tail of a HEAD answer
        if self.framing == ResponseFraming.CHUNKED:
            self.client.send(LAST_CHUNK)
        conn.served += 1
        now = self.router.loop.time()
        self._release_upstream(upstream_keep_alive and self.request_done, now)
        self.finish(now)

    def upgraded(self, conn: UpstreamConnection, leftover: bytes) -> None:
        """The upstream switched protocols: from here on, splice bytes both ways."""
        tunnel = Tunnel(self, conn, websocket=self.upgrade == b"websocket")
        self.tunnel = conn.tunnel = self.client.tunnel = tunnel
        early, self.early = self.early, b""
        tunnel.start(early, leftover)
        self.client.upgrade_started()

    def tunnel_ended(self) -> None:
        """Either side closed the upgraded connection: the exchange is over."""
        self._release_upstream()
        self.finish()

    # -- failures ---------------------------------------------------------------------------------
    def upstream_failed(self, conn: UpstreamConnection, reason: str, why: str) -> None:
        """The upstream broke the exchange: 502/504 if we can still say so, else cut the client."""
        up = conn.upstream
        self._log_error(up, reason, why)
        self.cstats.upstream_error(up.addr, reason)
        self.broken = True
        self._release_upstream()
        if self.response_started:
            self.client.abort()
            self.finish()
        else:
            status = 504 if reason == "response_timeout" else 502
            self.fail(status, f"{self.color} upstream {up.addr} {why}")

    def upstream_lost(self, conn: UpstreamConnection) -> None:
        """The upstream connection closed while serving us."""
        if self.response_started:
            if self.framing in (ResponseFraming.CHUNKED, ResponseFraming.CLOSE) and self._close_delimited(
                conn
            ):
                self.response_complete(conn, False)
            else:
                self.upstream_failed(conn, "reset_after_headers", "closed the connection mid-response")
            return
        up = conn.upstream
        if not self.got_response_bytes and not self.has_body:
            # Nothing was answered and there is no body to replay: safe to send the request again.
            if self.reused and not self.retried:
                # The classic keep-alive race: the upstream closed an idle connection just as we
                # reused it. Try the same upstream on a fresh connection (a connect failure there
                # still fails over to another upstream).
                self.retried = True
                self._release_upstream()
                self._use(up)
                return
            if self._fail_over(up):
                self.cstats.upstream_error(up.addr, "reset_before_headers")
                self.router.health.failed(up)
                return
        self.upstream_failed(conn, "reset_before_headers", "closed the connection before answering")

    def _log_error(self, up: Upstream, reason: str, why: str) -> None:
        self.router.error_log.warning(
            (up.addr, reason), "upstream error", color=self.color, upstream=up.addr, reason=reason, why=why
        )

    @staticmethod
    def _close_delimited(conn: UpstreamConnection) -> bool:
        """Whether the response had no length framing, so EOF is its proper end."""
        for name, value in conn.headers:
            lname = name.lower()
            if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
                return False
        return True

    def fail(self, status: int, why: str) -> None:
        """Answer the client ourselves (no response byte was sent yet)."""
        self.status = status
        self.keep = self.keep_alive and self.request_done and not self.upgrade and not self.router.closing
        self.client.send(error_response(status, why, via=self.router.via, close=not self.keep))
        self.finish()

    def close_at_deadline(self, grace: float) -> None:
        """A drain or shutdown deadline passed: end this exchange now, as cleanly as its kind allows."""
        if self.done or self.closed_at_deadline:
            return
        self.closed_at_deadline = True
        if self.tunnel is not None:
            self.tunnel.close_going_away()  # 1001 at frame boundaries, then TCP after the grace
            self.router.loop.call_later(grace, self.tunnel.force_close)
        elif self.response_started:
            self._release_upstream()
            self.client.abort()  # a cut stream must not look complete
            self.finish()
        else:
            self._release_upstream()
            self.fail(503, f"{self.color} drained: its deadline passed before the upstream answered")

    def client_gone(self) -> None:
        """The client disconnected: close the upstream side too, it cannot be reused safely."""
        if self.connect_task is not None:
            self.connect_task.cancel()
        self._release_upstream()
        if not self.status or not self.response_started:
            self.status = 499  # nginx's "client closed request"
        self.finish()

    def _release_upstream(self, reusable: bool = False, now: float = 0.0) -> None:
        """Give the upstream connection back to its pool (if reusable) or close it."""
        conn, up = self.conn, self.upstream
        if up is not None:
            up.outstanding -= 1
            self.upstream = None
        if conn is None:
            return
        self.conn = None
        conn.ex = None
        conn.deadline.when = 0.0  # disarm
        if reusable and not conn.closed and up is not None:
            if self.client.write_paused:
                conn.transport.resume_reading()  # type: ignore[union-attr]
            up.give_back(conn, now or self.router.loop.time())
        else:
            conn.close()

    def finish(self, now: float = 0.0) -> None:
        """Account for the exchange and let the client connection move on."""
        if self.done:
            return
        self.done = True
        router = self.router
        self.cstats.in_flight -= 1
        router.active[self.color].discard(self)
        if self.closed_at_deadline or self.color in router.draining:
            router.drain_progress(self)
        now = now or router.loop.time()
        self.cstats.response(self.status, now - self.started, now, self.broken)
        if router.access_log:
            log.info("%s %d %s", self.color, self.status, self.client.peer_ip)
        self.client.exchange_done(self, now)


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
        "parser",
        "paused",
        "peer_ip",
        "peer_ip_b",
        "queue",
        "reading",
        "refusal",
        "router",
        "to_start",
        "transport",
        "trusted",
        "tunnel",
        "upgrading",
        "url",
        "wbuf",
        "write_paused",
    )

    def __init__(self, router: Router) -> None:
        self.router = router
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
        self.idle = True  # between requests: a timeout closes silently instead of answering 408
        self.deadline = Deadline(router.loop, self._timed_out)

    # -- the asyncio.Protocol interface -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        router = self.router
        peer = transport.get_extra_info("peername")
        self.peer_ip = str(peer[0]) if peer else "unknown"
        self.peer_ip_b = self.peer_ip.encode()
        self.trusted = router.is_trusted(self.peer_ip)
        router.connections.add(self)
        if len(router.connections) > router.max_connections:
            self._refuse_now(Refusal(503, "too many client connections"))
            return
        self.deadline.arm(router.client_header_timeout)

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
        self.deadline.cancel()
        self.router.connections.discard(self)
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
        ex = self.current
        if ex is not None and ex.conn is not None:
            ex.conn.transport.pause_reading()  # type: ignore[union-attr]
            if ex.response_started:
                ex.conn.deadline.disarm()  # stream_idle: a slow reader is not a silent upstream

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.current
        if ex is not None and ex.conn is not None:
            ex.conn.transport.resume_reading()  # type: ignore[union-attr]
            if ex.response_started:
                ex.stream_progress(ex.conn, self.router.loop.time())

    # -- httptools callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.header_bytes = 0
        if self.idle:
            self.idle = False
            self.deadline.arm(self.router.client_header_timeout)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.router.max_header_bytes:
            raise Refusal(431, f"request head larger than {self.router.max_header_bytes} bytes")
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        router = self.router
        self.deadline.when = 0.0  # disarm: the head is in
        parser = self.parser
        method = parser.get_method()
        http_version = parser.get_http_version()
        req = build_request_head(
            method, self.url, http_version, self.headers, self.peer_ip_b, self.trusted, router.via
        )
        limit = router.max_body_bytes
        length = req[3]
        if limit is not None and length > limit:
            raise Refusal(413, f"request body of {length} bytes is over the {limit} limit")
        if req[5] and req[2]:  # an Upgrade with a body
            raise Refusal(400, "an Upgrade request cannot carry a body")
        color = router.switchboard.choose()
        ex = Exchange(
            self,
            req,
            color,
            method == b"HEAD",
            http_version == "1.0",
            parser.should_keep_alive(),
            router.loop.time(),
        )
        ex.cstats.in_flight += 1
        router.active[color].add(ex)
        self.reading = ex
        if ex.has_body:
            self.deadline.arm(router.idle_timeout)  # the body must keep coming
        if self.current is None:
            self.current = self.to_start = ex
        else:
            self.queue.append(ex)
            self.pause(_WAIT)

    def on_body(self, body: bytes) -> None:
        if self.reading is not None:
            self.deadline.arm(self.router.idle_timeout)  # inactivity while the body arrives
            self.reading.request_body(body)

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

    def pause_reading_for_backpressure(self) -> None:
        self.pause(_BACKPRESSURE)

    def resume_reading_after_backpressure(self) -> None:
        self.resume(_BACKPRESSURE)

    def exchange_done(self, ex: Exchange, now: float) -> None:
        """An answer is complete: close, start the next pipelined request, or wait idle."""
        if ex is not self.current or self.transport is None:
            return
        self.current = None
        if not ex.keep:
            self._close()
            return
        if self.queue:
            nxt = self.current = self.queue.popleft()
            nxt.start()
            return
        if self.refusal is not None:
            self._refuse_now(self.refusal)
            return
        if self.closing or self.router.closing:
            self._close()
            return
        self.resume(_WAIT)
        if self.reading is None:
            self.idle = True
            self.deadline.arm_at(now + self.router.idle_timeout)

    def upgrade_started(self) -> None:
        self.upgrading = None
        self.deadline.cancel()
        self.resume(_WAIT)

    def close_if_idle(self) -> None:
        """Shutdown: a keep-alive connection between requests is closed now (no request is lost)."""
        if self.idle and self.current is None and self.tunnel is None and not self.queue:
            self._close()

    def abort(self) -> None:
        """Cut the connection: a truncated response must never look complete."""
        self.closing = True
        self.wbuf = None
        if self.transport is not None:
            self.transport.abort()

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
        self.router.stats.colors[NONE_COLOR].response(refusal.status, 0.0, self.router.loop.time())
        self.send(error_response(refusal.status, refusal.why, via=self.router.via, close=True))
        self._close()

    def _timed_out(self) -> None:
        if self.reading is not None:  # the body stalled: free the upstream connection it holds
            self._refuse(Refusal(408, f"request body stalled for {self.router.idle_timeout:g}s"))
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
