"""Idle keep-alive HTTP clients through bgproxy: memory per connection, and a fresh request meanwhile.

python -m bench.http_idle [--count 9900] [--batch 500]

An nginx upstream and bgproxy are started with RLIMIT_NOFILE at its hard limit. COUNT clients each
send one GET through bgproxy, read the answer and then stay connected, idle, the way browsers and
connection pools keep keep-alive connections. bgproxy's VmRSS (/proc/PID/status) is read before and
after, giving KB per idle keep-alive connection; then one more client must still be answered. The
count must fit bgproxy's connection cap: min(limits.max_connections, (open-file limit - 64) / 2),
since each proxied connection may hold an upstream one too. Exit status 1 if a client failed.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.harness import (
    bench_session,
    format_table,
    log,
    pin_load_client,
    run_async,
    run_main,
    start_bgproxy,
    start_upstream,
)
from bench.ws_idle import SETTLE_S, open_fds, raise_nofile, vm_rss_kb

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


async def one_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"unexpected answer {head[:40]!r}")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    return reader, writer


async def scenario(port: int, pid: int, count: int, batch: int) -> dict[str, float]:
    _, warm = await one_client(port)  # first-use allocations are not per-connection cost
    warm.close()
    await asyncio.sleep(SETTLE_S)
    before = vm_rss_kb(pid)
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    began = time.monotonic()
    try:
        for start in range(0, count, batch):
            clients += await asyncio.gather(*(one_client(port) for _ in range(min(batch, count - start))))
        opened = time.monotonic() - began
        await asyncio.sleep(SETTLE_S)
        after = vm_rss_kb(pid)
        fds = open_fds(pid)
        t0 = time.monotonic()
        _, fresh = await one_client(port)
        fresh_ms = (time.monotonic() - t0) * 1000
        fresh.close()
    finally:
        for _, writer in clients:
            writer.close()
    return {
        "clients": len(clients),
        "open_s": opened,
        "rss_before_kb": before,
        "rss_after_kb": after,
        "kb_per_conn": (after - before) / len(clients),
        "fds": fds,
        "fresh_request_ms": fresh_ms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_idle", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=9900, help="idle keep-alive clients (default 9900)")
    parser.add_argument("--batch", type=int, default=500, help="opened concurrently per batch (default 500)")
    args = parser.parse_args(argv)
    nofile = raise_nofile()
    with bench_session("bgproxy-http-idle-") as (workdir, services):
        upstream = start_upstream(services, workdir)
        proxy = start_bgproxy(services, workdir / "bgproxy", [f"127.0.0.1:{upstream.port}"], [])
        pin_load_client()
        log(f"RLIMIT_NOFILE {nofile}; opening {args.count} keep-alive clients via {proxy.url}")
        res = run_async(lambda: scenario(proxy.port, proxy.service.proc.pid, args.count, args.batch))
    rows = [[k, f"{v:.1f}" if isinstance(v, float) else v] for k, v in res.items()]
    print(format_table(["measure", "value"], rows))
    return 0


if __name__ == "__main__":
    run_main(main)
