"""WebSocket frame boundaries (RFC 6455 §5.2) for a byte tunnel that must stay splice-fast.

The tunnel forwards bytes untouched; this tracker only follows frame headers and payload
lengths, so the proxy knows where one frame ends and the next begins. That is what lets a drain
put a close frame on the wire without cutting a frame in half.
"""

from __future__ import annotations

import struct

_HEADER = 0
_PAYLOAD = 1


class FrameTracker:
    """Follows frame boundaries in one direction of a WebSocket connection."""

    __slots__ = ("_head", "_remaining", "_state", "saw_close")

    def __init__(self) -> None:
        self._state = _HEADER
        self._head = b""  # a frame header split across reads
        self._remaining = 0  # payload bytes left in the current frame
        self.saw_close = False  # a close frame (opcode 8) went by

    @property
    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly between two frames."""
        return self._state == _HEADER and not self._head

    def feed(self, data: bytes, *, stop_at_boundary: bool = False) -> int:
        """Account for `data`; return how many bytes were consumed.

        With stop_at_boundary, stop at the first frame boundary reached inside `data` (so the
        caller can forward data[:n], inject a frame, and hold back the rest).
        """
        pos = 0
        end = len(data)
        if stop_at_boundary and self.at_boundary:
            return 0
        while pos < end:
            if self._state == _PAYLOAD:
                take = min(self._remaining, end - pos)
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._frame_done()
                    if stop_at_boundary:
                        return pos
                continue
            need = self._header_length(self._head + data[pos : pos + 14])
            have = len(self._head)
            if need < 0 or have + (end - pos) < need:
                self._head += data[pos:]
                return end
            header = self._head + data[pos : pos + need - have]
            pos += need - have
            self._head = b""
            self._start_frame(header)
            if self._remaining == 0:
                self._frame_done()
                if stop_at_boundary:
                    return pos
        return pos

    @staticmethod
    def _header_length(prefix: bytes) -> int:
        """Length of the frame header starting `prefix`, or -1 if not yet known."""
        if len(prefix) < 2:
            return -1
        size = 2
        len7 = prefix[1] & 0x7F
        if len7 == 126:
            size += 2
        elif len7 == 127:
            size += 8
        if prefix[1] & 0x80:
            size += 4
        return size

    def _start_frame(self, header: bytes) -> None:
        len7 = header[1] & 0x7F
        if len7 == 126:
            length = int(struct.unpack_from("!H", header, 2)[0])
        elif len7 == 127:
            length = int(struct.unpack_from("!Q", header, 2)[0])
        else:
            length = len7
        if header[0] & 0x0F == 0x8:
            self.saw_close = True
        self._remaining = length
        self._state = _PAYLOAD

    def _frame_done(self) -> None:
        self._state = _HEADER


def close_frame(code: int, reason: str, *, masked: bool) -> bytes:
    """A close frame; frames toward a server must be masked (RFC 6455 §5.3)."""
    payload = struct.pack("!H", code) + reason.encode()[:123]
    if not masked:
        return bytes([0x88, len(payload)]) + payload
    key = b"\x5a\x3c\x96\xe1"  # any 4 bytes do: masking defends caches, not secrecy
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x88, 0x80 | len(payload)]) + key + body
