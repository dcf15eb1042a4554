"""The data plane wired to in-memory transports: bytes in, bytes out, no sockets and no kernel.

Shared by bench.hotpath (CPU per request without the kernel) and the sans-io protocol tests
(tests/test_dataplane_memory.py), so both drive the real protocol classes the same way. The parts
are the real ones (Runtime, pools, route table, HealthMonitor as the Reporter); only the transport
is a stand-in that keeps what is written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import cast

from bgproxy.control.health import HealthMonitor
from bgproxy.core.colors import COLORS
from bgproxy.core.health import OutlierPolicy
from bgproxy.dataplane.client import ClientConnection
from bgproxy.dataplane.pool import ColorPool, Upstream
from bgproxy.dataplane.routing import RouteTable
from bgproxy.dataplane.runtime import Runtime
from bgproxy.dataplane.settings import Settings
from bgproxy.dataplane.stats import Stats
from bgproxy.dataplane.upstream import UpstreamConnection

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
OUTLIER = OutlierPolicy(consecutive_failures=5, base_ejection_time=30.0, max_ejection_time=300.0,
                        max_ejection_percent=50)  # fmt: skip


class MemoryTransport(asyncio.Transport):
    """Just enough of an asyncio transport for the protocols: writes are kept, flow control recorded."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 50000)) -> None:
        super().__init__()
        self.out: list[bytes] = []
        self.peer = peer
        self.reading = True
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.append(bytes(data))

    def writelines(self, data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.out.extend(bytes(d) for d in data)

    def take(self) -> bytes:
        """Everything written since the last take()."""
        data = b"".join(self.out)
        self.out.clear()
        return data

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def make_runtime(
    settings: Settings | None = None,
    weights: tuple[int, int] = (100, 0),
    upstreams: Sequence[int] = (9001, 9002),
    metrics: bool = True,
) -> Runtime:
    """A Runtime with one upstream per color (127.0.0.1:PORT), routing by ``weights``.

    Call it with the event loop running (the Runtime keeps it).
    """
    pools = {
        color: ColorPool(color, [Upstream(color, "127.0.0.1", port, 64)], "round_robin")
        for color, port in zip(COLORS, upstreams, strict=True)
    }
    health = HealthMonitor(pools, checks=dict.fromkeys(COLORS), policies=dict.fromkeys(COLORS, OUTLIER))
    stats = Stats(BUCKETS, enabled=metrics)
    return Runtime(settings or Settings(), pools, stats, RouteTable(0, *weights), health)


def pooled_connection(runtime: Runtime, color: str) -> tuple[UpstreamConnection, MemoryTransport]:
    """An idle keep-alive connection to ``color``'s upstream, so the next request of that color uses it."""
    upstream = runtime.pools[color].upstreams[0]
    conn = UpstreamConnection(upstream, runtime.loop, runtime.settings.upstream_header_timeout)
    transport = MemoryTransport(peer=(upstream.host, upstream.port))
    conn.connection_made(transport)
    upstream.give_back(conn, runtime.loop.time())
    return conn, transport


def client_connection(runtime: Runtime) -> tuple[ClientConnection, MemoryTransport]:
    """An accepted client connection, as the listener's protocol factory makes it."""
    client = ClientConnection(runtime)
    transport = MemoryTransport()
    client.connection_made(transport)
    return client, transport


def as_protocol(proto: ClientConnection | UpstreamConnection) -> asyncio.Protocol:
    """The compiled protocols are asyncio Protocols by structure, not by inheritance."""
    return cast(asyncio.Protocol, proto)
