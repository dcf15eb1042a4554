"""Upgraded connections through bgproxy: WebSocket echo, pings, close codes, frame tracking."""

from __future__ import annotations

import asyncio

import pytest
from rawclient import exchange
from upstreams import origin
from websockets.frames import CloseCode

from bgproxy.dataplane.websocket import FrameTracker, close_frame


async def test_websocket_echo_text_binary_ping_and_close_code(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        async with proxy.websocket() as ws:
            await ws.send("whoami")
            assert await ws.recv() == "blue"
            await ws.send("hello")
            assert await ws.recv() == "hello"
            blob = bytes(range(256)) * 1000  # 256 KB: several TCP reads, extended length header
            await ws.send(blob)
            assert await ws.recv() == blob
            pong = await ws.ping(b"p1")
            await asyncio.wait_for(pong, 2)
            await ws.close(code=4001, reason="bye")
        assert ws.close_code == 4001
        assert ws.close_reason == "bye"


async def test_websocket_to_the_live_color(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr], weights=(0, 1))
        async with proxy.websocket() as ws:
            await ws.send("whoami")
            assert await ws.recv() == "green"
            await ws.close(CloseCode.NORMAL_CLOSURE)


async def test_upgrade_declined_by_upstream_is_relayed_then_closed(make_proxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr])
        [resp] = await exchange(
            proxy.port,
            b"GET /status/200 HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
    assert resp.status == 200
    assert resp.header("Connection") == "close"


def _frame(payload: bytes, opcode: int = 1, mask: bool = True) -> bytes:
    n = len(payload)
    head = bytes([0x80 | opcode])
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([mbit | 127]) + n.to_bytes(8, "big")
    return head + (b"\x01\x02\x03\x04" if mask else b"") + payload


@pytest.mark.parametrize("split", [1, 2, 3, 7, 100, 10_000])
def test_frame_tracker_finds_boundaries_across_any_split(split: int) -> None:
    frames = [_frame(b"a" * 5), _frame(b"b" * 300, 2), _frame(b"c" * 70_000, 2, mask=False), _frame(b"")]
    stream = b"".join(frames)
    tracker = FrameTracker()
    boundaries = []
    pos = 0
    for i in range(0, len(stream), split):
        piece = stream[i : i + split]
        offset = 0
        while offset < len(piece):
            used = tracker.feed(piece[offset:], stop_at_boundary=True)
            if used == 0:  # at a boundary already: step over it
                used = tracker.feed(piece[offset : offset + 1])
            offset += used
            if tracker.at_boundary:
                boundaries.append(pos + offset)
        pos += len(piece)
    expected, acc = [], 0
    for f in frames:
        acc += len(f)
        expected.append(acc)
    assert sorted(set(boundaries)) == expected


def test_close_frame_shapes() -> None:
    plain = close_frame(1001, "going away", masked=False)
    assert plain[:2] == bytes([0x88, 12]) and plain[2:4] == (1001).to_bytes(2, "big")
    masked = close_frame(1001, "going away", masked=True)
    assert masked[1] == 0x80 | 12
    key, body = masked[2:6], masked[6:]
    assert bytes(b ^ key[i % 4] for i, b in enumerate(body)) == plain[2:]
    tracker = FrameTracker()
    assert tracker.feed(masked) == len(masked)
    assert tracker.saw_close and tracker.at_boundary
