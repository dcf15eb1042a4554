"""Upgraded connections (WebSocket and any other Upgrade) as a two-way byte splice.

Bytes go through untouched. For WebSocket the tunnel also follows frame boundaries in each
direction, so that a drain can end the connection with a proper close frame (code 1001) placed
between frames, never inside one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .deadline import Deadline
from .websocket import FrameTracker, close_frame

if TYPE_CHECKING:
    import asyncio

    from .exchange import Exchange
    from .upstream import UpstreamConnection


class Tunnel:
    """Splices one client connection to one upstream connection after a 101."""

    __slots__ = ("_closing", "_idle", "_idle_deadline", "client_frames", "conn", "ex", "upstream_frames")

    def __init__(self, ex: Exchange, conn: UpstreamConnection, *, websocket: bool) -> None:
        self.ex = ex
        self.conn = conn
        self.client_frames = FrameTracker() if websocket else None  # client -> upstream direction
        self.upstream_frames = FrameTracker() if websocket else None  # upstream -> client
        self._closing: tuple[int, str] | None = None  # a close frame waiting for frame boundaries
        # timeouts.tunnel (HAProxy's `timeout tunnel`): no byte either way for that long ends it.
        self._idle = ex.settings.tunnel_timeout
        self._idle_deadline = Deadline(ex.runtime.loop, self.force_close)

    @property
    def _client(self) -> asyncio.Transport:
        transport = self.ex.client.transport
        assert transport is not None
        return transport

    @property
    def _upstream(self) -> asyncio.Transport:
        transport = self.conn.transport
        assert transport is not None
        return transport

    def start(self, early_from_client: bytes, early_from_upstream: bytes) -> None:
        if self._idle:
            self._idle_deadline.arm(self._idle)
        if early_from_client:
            self.from_client(early_from_client)
        if early_from_upstream:
            self.from_upstream(early_from_upstream)

    def from_client(self, data: bytes) -> None:
        self._relay(self.client_frames, data, self._upstream, masked=True)

    def from_upstream(self, data: bytes) -> None:
        self._relay(self.upstream_frames, data, self._client, masked=False)

    def _relay(
        self, frames: FrameTracker | None, data: bytes, out: asyncio.Transport, *, masked: bool
    ) -> None:
        """Pass bytes on, following frame boundaries for WebSocket (the same rule both ways)."""
        if self._idle:
            self._idle_deadline.arm(self._idle)
        if frames is None:
            out.write(data)
        elif self._closing is None:
            frames.feed(data)
            out.write(data)
        else:
            self._forward_until_boundary(frames, data, out, masked=masked)

    def close_going_away(self, code: int = 1001, reason: str = "going away") -> None:
        """End the tunnel: a close frame to each side at its next frame boundary, then close.

        A non-WebSocket tunnel has no frames to respect and is closed at once.
        """
        if self.client_frames is None or self.upstream_frames is None:
            self._client.close()
            self._upstream.close()
            return
        if self._closing is not None:
            return
        self._closing = (code, reason)
        for frames, transport, masked in (
            (self.client_frames, self._upstream, True),
            (self.upstream_frames, self._client, False),
        ):
            if frames.at_boundary and not frames.saw_close:
                transport.write(close_frame(code, reason, masked=masked))
                frames.saw_close = True

    def _forward_until_boundary(
        self, frames: FrameTracker, data: bytes, out: asyncio.Transport, *, masked: bool
    ) -> None:
        """While closing: pass the rest of the current frame, then the close frame, then nothing."""
        if frames.saw_close and frames.at_boundary:
            return  # a close frame went out in this direction: nothing may follow it
        used = frames.feed(data, stop_at_boundary=True)
        out.write(data[:used])
        if frames.at_boundary and not frames.saw_close and self._closing is not None:
            code, reason = self._closing
            out.write(close_frame(code, reason, masked=masked))
            frames.saw_close = True

    def force_close(self) -> None:
        """Close both TCP connections: a close handshake had its grace, or timeouts.tunnel passed."""
        self._client.close()
        self._upstream.close()

    def client_lost(self) -> None:
        self.conn.close()
        self._end()

    def upstream_lost(self) -> None:
        transport = self.ex.client.transport
        if transport is not None:
            transport.close()
        self._end()

    def _end(self) -> None:
        self._idle_deadline.cancel()
        self.conn.tunnel = None
        self.ex.tunnel_ended()
