"""One request and its response through the proxy: the Exchange, from parsed head to last byte.

It sends the request to an upstream of the color ``pick()`` chose (connecting, retrying and
failing over as needed), relays the response with the framing the client needs, and answers the
client itself (502/503/504) when the upstream cannot. Bodies stream both ways; nothing is buffered
whole.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import httptools

from .http1 import (
    HEAD_BYTES,
    HEAD_CHUNKED,
    HEAD_HAS_BODY,
    HEAD_UPGRADE,
    LAST_CHUNK,
    Refusal,
    RequestHead,
    ResponseFraming,
    build_response_head,
    chunk,
    error_response,
    interim_head,
)
from .pool import Upstream
from .settings import Settings
from .stats import ColorStats
from .tunnel import Tunnel
from .upstream import UpstreamConnection, open_connection

if TYPE_CHECKING:
    from .client import ClientConnection

log = logging.getLogger("bgproxy.proxy")

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
        "runtime",
        "set_cookie",
        "settings",
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
        runtime = client.runtime
        self.client = client
        self.runtime = runtime
        self.settings: Settings = runtime.settings  # an exchange keeps the settings it started with
        self.color = color
        self.cstats: ColorStats = runtime.stats.colors[color]
        self.head = req[HEAD_BYTES]
        self.chunked = req[HEAD_CHUNKED]
        self.has_body = req[HEAD_HAS_BODY]
        self.upgrade = req[HEAD_UPGRADE]
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
        self.set_cookie = b""  # a sticky session's Set-Cookie line, added to the final response head

    @property
    def is_stream(self) -> bool:
        """A long-lived exchange: upgraded, or a response body still streaming without a length."""
        return self.tunnel is not None or (
            self.response_started and self.framing in (ResponseFraming.CHUNKED, ResponseFraming.CLOSE)
        )

    # -- request side -----------------------------------------------------------------------------
    def start(self) -> None:
        """Pick an upstream of our color and send the request head (connecting if needed)."""
        up = self.runtime.pools[self.color].pick()
        if up is None:
            self.fail(503, f"no {self.color} upstream available")
            return
        self._use(up)

    def _use(self, up: Upstream) -> None:
        self.upstream = up
        up.outstanding += 1
        conn = up.take_idle(self.runtime.loop.time(), self.settings.upstream_idle)
        if conn is not None:
            self._attach(conn)
        else:
            self.client.wait_for_upstream()
            self.connect_task = self.runtime.loop.create_task(self._connect(up))

    async def _connect(self, up: Upstream) -> None:
        try:
            settings = self.settings
            conn = await open_connection(up, settings.connect_timeout, settings.upstream_header_timeout)
        except TimeoutError:
            self._connect_failed(up, 504, "connect_timeout", "did not accept the connection in time")
            return
        except OSError as exc:
            self._connect_failed(up, 502, "connect_refused", f"refused the connection ({exc.strerror})")
            return
        finally:
            self.connect_task = None
        if self.done:  # the client went away meanwhile: keep the connection for someone else
            up.give_back(conn, self.runtime.loop.time())
            return
        self._attach(conn)

    def _connect_failed(self, up: Upstream, status: int, reason: str, why: str) -> None:
        self._log_error(up, reason, why)
        self.cstats.upstream_error(up.addr, reason)
        self.runtime.reporter.upstream_failed(up)
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
        other = self.runtime.pools[self.color].pick(exclude=up)
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
        self.client.upstream_ready()

    def request_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        limit = self.settings.max_body_bytes
        if limit >= 0 and self.body_bytes > limit:
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
                    101, conn.reason, conn.headers, True, True, False, self.settings.via, self.upgrade
                )
                conn.deadline.disarm()
                self.status = 101
                self.response_started = True
                client.send(head)
            elif not self.http10:
                client.send(interim_head(status, conn.reason, conn.headers))
            return
        runtime = self.runtime
        now = runtime.loop.time()
        self.stream_progress(conn, now)  # the header deadline becomes the body's inactivity deadline
        up = conn.upstream
        if status >= 500:
            runtime.reporter.upstream_failed(up)
        elif up.failures:
            up.failures = 0
        self.cstats.upstream_header(now - self.started)
        self.status = status
        keep = (
            self.keep_alive
            and self.request_done
            and not self.upgrade
            and not client.closing
            and not runtime.closing
        )
        head, self.framing, self.keep = build_response_head(
            status,
            conn.reason,
            conn.headers,
            self.is_head or status in _BODILESS,
            keep,
            self.http10,
            self.settings.via,
        )
        if self.set_cookie and not self._upstream_sets_cookie(conn.headers):
            head = head[:-2] + self.set_cookie + b"\r\n"
        self.response_started = True
        client.send(head)
        if self.is_head:
            # llhttp cannot be told the response is to HEAD: the head is all of it, and the
            # connection gets a fresh parser, or it would wait for a body that never comes.
            conn.reset_parser = True
            conn.finish_response(upstream_keep_alive)

    def stream_progress(self, conn: UpstreamConnection, now: float) -> None:
        """The upstream sent part of the response: it may now stay silent for stream_idle, no longer."""
        idle = self.settings.stream_idle_timeout
        if idle and not self.client.write_paused and self.tunnel is None:  # tunnels have no such limit
            conn.deadline.arm_at(now + idle)
        else:
            conn.deadline.disarm()  # off, or the client is not reading: its pace is not the upstream's

    def upstream_timed_out(self, conn: UpstreamConnection) -> None:
        if self.response_started:
            idle = self.settings.stream_idle_timeout
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
        now = self.runtime.loop.time()
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

    def response_overrun(self, conn: UpstreamConnection) -> None:
        """Bytes came after the complete response: this client has all of its own, but the
        connection is out of sync (they would become the next exchange's answer), so it goes."""
        up = conn.upstream
        self._log_error(up, "protocol_error", "sent bytes past the end of its response")
        self.cstats.upstream_error(up.addr, "protocol_error")
        self.response_complete(conn, False)

    def upstream_lost(self, conn: UpstreamConnection, clean: bool) -> None:
        """The upstream connection closed while serving us; ``clean``: a FIN, not a reset."""
        if self.response_started:
            if (
                clean
                and self.framing in (ResponseFraming.CHUNKED, ResponseFraming.CLOSE)
                and self._close_delimited(conn)
            ):
                self.response_complete(conn, False)
            else:
                # A reset is never the end of a body: the client must see the cut (client.abort).
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
                self.runtime.reporter.upstream_failed(up)
                return
        self.upstream_failed(conn, "reset_before_headers", "closed the connection before answering")

    def _log_error(self, up: Upstream, reason: str, why: str) -> None:
        self.runtime.error_log.warning(
            (up.addr, reason), "upstream error", color=self.color, upstream=up.addr, reason=reason, why=why
        )

    def _upstream_sets_cookie(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether the upstream sets our sticky cookie itself: its own choice is left alone."""
        line = self.set_cookie
        prefix = line[12 : line.index(b"=") + 1]  # "Set-Cookie: " is 12 bytes; then "name="
        return any(n.lower() == b"set-cookie" and v.lstrip().startswith(prefix) for n, v in headers)

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
        self.keep = self.keep_alive and self.request_done and not self.upgrade and not self.runtime.closing
        self.client.send(error_response(status, why, via=self.settings.via, close=not self.keep))
        self.finish()

    def close_at_deadline(self, grace: float) -> None:
        """A drain or shutdown deadline passed: end this exchange now, as cleanly as its kind allows."""
        if self.done or self.closed_at_deadline:
            return
        self.closed_at_deadline = True
        if self.client.current is not self:
            return  # still queued behind another answer: refused with 503 when its turn comes
        if self.tunnel is not None:
            self.tunnel.close_going_away()  # 1001 at frame boundaries, then TCP after the grace
            self.runtime.loop.call_later(grace, self.tunnel.force_close)
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
        conn.deadline.disarm()
        if reusable and not conn.closed and up is not None:
            if self.client.write_paused:
                conn.transport.resume_reading()  # type: ignore[union-attr]
            up.give_back(conn, now or self.runtime.loop.time())
        else:
            conn.close()

    def finish(self, now: float = 0.0) -> None:
        """Account for the exchange and let the client connection move on."""
        if self.done:
            return
        self.done = True
        runtime = self.runtime
        self.cstats.in_flight -= 1
        runtime.active[self.color].discard(self)
        if self.closed_at_deadline or runtime.draining or runtime.watching:
            runtime.exchange_ended(self)
        now = now or runtime.loop.time()
        self.cstats.response(self.status, now - self.started, now, self.broken)
        if self.settings.access_log:
            log.info("%s %d %s", self.color, self.status, self.client.peer_ip)
        self.client.exchange_done(self, now)
