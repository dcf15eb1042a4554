"""Idle WebSockets through bgproxy: memory per connection, then how long a flip takes to drain them all.

python -m bench.ws_idle [--count 5000] [--batch 250] [--drain-timeout 5]

An echo WebSocket upstream (a separate `websockets` process, serving both pools) and bgproxy are started
with RLIMIT_NOFILE raised to its hard limit. COUNT WebSockets are opened through bgproxy in batches;
each must echo one message before it counts as open. bgproxy's VmRSS (/proc/PID/status) is read before
and after, giving KB per idle connection (target < 30 KB). Then traffic flips to green with the given
drain_timeout: the blue WebSockets must all stay open until the deadline, then all get close code 1001.
Drain time is measured from the flip to the last client seeing its close. Exit status 1 if a connection
failed to open, a close was early or not 1001, one stayed open, or the memory target was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bench.harness import (
    LOAD_CORE,
    Bgproxy,
    ServiceError,
    bench_session,
    format_table,
    free_port,
    log,
    pin_load_client,
    run_async,
    run_main,
    start_bgproxy,
    tcp_open,
    wait_until,
)

RSS_TARGET_KB = 30.0
MAX_CONNECTIONS = 10_000  # bgproxy's default limits.max_connections, which start_bgproxy keeps
STEP_TIMEOUT_S = 10.0  # one connect, one echo, one admin call
CLOSE_SLACK_S = 30.0  # how long after the drain deadline the closes may take before we give up
SETTLE_S = 1.0  # pause before reading RSS, so the last batch's buffers are in place


# --------------------------------------------------------------------------- echo upstream


def serve_echo(port: int) -> None:
    """The upstream: echo every message; runs until SIGTERM."""

    async def echo(ws: ServerConnection) -> None:
        try:
            async for message in ws:
                await ws.send(message)
        except ConnectionClosed:
            pass

    async def main() -> None:
        async with serve(
            echo, "127.0.0.1", port, ping_interval=None, compression=None, max_queue=4, backlog=4096
        ) as server:
            await server.serve_forever()

    run_async(main)


# --------------------------------------------------------------------------- measuring


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; children started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def admin_call(
    url: str, body: dict[str, object] | None = None, socket_timeout: float = STEP_TIMEOUT_S
) -> object:
    """One admin request in a thread (urllib, no proxy from the environment); raises on non-2xx."""
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call() -> object:
        with opener.open(request, timeout=socket_timeout) as resp:
            return json.load(resp)

    return await asyncio.to_thread(call)


def get_state(proxy: Bgproxy) -> dict[str, object]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{proxy.admin_url}/v1/state", timeout=STEP_TIMEOUT_S) as resp:
        state: dict[str, object] = json.load(resp)
    return state


@dataclass
class Result:
    opened: int = 0
    open_errors: Counter[str] = field(default_factory=Counter)
    open_s: float = 0.0
    rss_before_kb: int = 0
    rss_after_kb: int = 0
    rss_drained_kb: int = 0
    fds_open: int = 0
    closed_before_flip: int = 0
    closed_early: int = 0  # closed before the drain deadline
    still_open: int = 0
    close_codes: Counter[int] = field(default_factory=Counter)
    first_close_s: float = 0.0
    drain_s: float = 0.0  # flip -> last client saw its close
    drain_wait_s: float | None = None  # flip -> POST /v1/drain/wait answered (the proxy's view)
    drained: dict[str, int] = field(default_factory=dict)

    @property
    def kb_per_conn(self) -> float:
        return (self.rss_after_kb - self.rss_before_kb) / self.opened if self.opened else float("nan")


async def open_one(uri: str, i: int) -> ClientConnection:
    """A WebSocket through bgproxy that has echoed one message; closed again if anything fails."""
    ws = await connect(
        uri, ping_interval=None, compression=None, proxy=None, open_timeout=STEP_TIMEOUT_S, max_queue=4
    )
    try:
        await ws.send(f"hello {i}")
        reply = await asyncio.wait_for(ws.recv(), STEP_TIMEOUT_S)
        if reply != f"hello {i}":
            raise RuntimeError(f"echo mismatch: {reply!r}")
    except BaseException:
        await ws.close()
        raise
    return ws


async def open_all(uri: str, count: int, batch: int, budget_s: float, res: Result) -> list[ClientConnection]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    sockets: list[ClientConnection] = []
    for first in range(0, count, batch):
        if loop.time() - start > budget_s:
            res.open_errors[f"open budget of {budget_s:.0f} s spent"] += count - first
            break
        outcomes = await asyncio.gather(
            *(open_one(uri, i) for i in range(first, min(first + batch, count))), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                res.open_errors[f"{type(outcome).__name__}: {outcome}"[:120]] += 1
            else:
                sockets.append(outcome)
        if res.open_errors:
            break  # the rest would only pile up the same failure
    res.opened = len(sockets)
    res.open_s = loop.time() - start
    return sockets


async def scenario(proxy: Bgproxy, args: argparse.Namespace) -> Result:
    res = Result()
    loop = asyncio.get_running_loop()
    pid = proxy.service.proc.pid
    uri = f"ws://127.0.0.1:{proxy.port}/ws"
    warm = await open_one(uri, -1)  # first-use imports and allocations are not per-connection cost
    await warm.close()
    await asyncio.sleep(SETTLE_S)
    res.rss_before_kb = vm_rss_kb(pid)
    sockets: list[ClientConnection] = []
    try:
        sockets = await open_all(uri, args.count, args.batch, args.open_timeout, res)
        await asyncio.sleep(SETTLE_S)
        res.rss_after_kb = vm_rss_kb(pid)
        res.fds_open = open_fds(pid)
        rss = f"{res.rss_before_kb} -> {res.rss_after_kb} KB"
        log(f"opened {res.opened} in {res.open_s:.1f} s; bgproxy RSS {rss}")
        if res.open_errors:
            return res
        res.closed_before_flip = sum(1 for ws in sockets if ws.close_code is not None)

        closes: list[tuple[float, int | None]] = []

        async def watch(ws: ClientConnection) -> None:
            await ws.wait_closed()
            closes.append((loop.time(), ws.close_code))

        watchers = [asyncio.create_task(watch(ws)) for ws in sockets]
        flipped = loop.time()
        await admin_call(f"{proxy.admin_url}/v1/flip", {"to": "green", "drain_timeout": args.drain_timeout})
        wait_url = f"{proxy.admin_url}/v1/drain/wait?color=blue&timeout={args.drain_timeout + CLOSE_SLACK_S}"

        async def proxy_drained() -> float:
            await admin_call(wait_url, socket_timeout=args.drain_timeout + CLOSE_SLACK_S + 5)
            return loop.time() - flipped

        drain_wait = asyncio.create_task(proxy_drained())
        _, pending = await asyncio.wait(watchers, timeout=args.drain_timeout + CLOSE_SLACK_S)
        for task in pending:
            task.cancel()
        try:
            res.drain_wait_s = await asyncio.wait_for(drain_wait, STEP_TIMEOUT_S)
        except (OSError, TimeoutError) as err:  # urllib's HTTPError (408: not drained) is an OSError
            log(f"/v1/drain/wait failed: {err!r}")
        res.still_open = len(pending)
        res.close_codes = Counter(code if code is not None else -1 for _, code in closes)
        times = sorted(t - flipped for t, _ in closes)
        if times:
            res.first_close_s, res.drain_s = times[0], times[-1]
        res.closed_early = sum(1 for t in times if t < args.drain_timeout - 0.05)
        await asyncio.sleep(SETTLE_S)
        res.rss_drained_kb = vm_rss_kb(pid)
        blue = get_state(proxy)["pools"]["blue"]  # type: ignore[index]
        res.drained = dict(blue["drained"])
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return res


def report(res: Result, args: argparse.Namespace) -> tuple[str, bool]:
    per_conn = res.kb_per_conn
    memory_ok = per_conn < RSS_TARGET_KB
    codes = ", ".join(f"{code} x{n}" for code, n in sorted(res.close_codes.items())) or "-"
    rows = [
        ["WebSockets open (echoed once)", f"{res.opened} of {args.count}"],
        ["open time s", f"{res.open_s:.1f}"],
        ["bgproxy open fds", res.fds_open],
        ["bgproxy VmRSS before / after KB", f"{res.rss_before_kb} / {res.rss_after_kb}"],
        [
            "RSS per connection KB",
            f"{per_conn:.1f} (target < {RSS_TARGET_KB:.0f}: {'met' if memory_ok else 'MISSED'})",
        ],
        ["flip drain_timeout s", f"{args.drain_timeout:g}"],
        ["first close after flip s", f"{res.first_close_s:.2f}"],
        ["drain time s (flip -> last close)", f"{res.drain_s:.2f}"],
        ["/v1/drain/wait answered after s", "-" if res.drain_wait_s is None else f"{res.drain_wait_s:.2f}"],
        ["close codes", codes],
        ["closed before the deadline", res.closed_early + res.closed_before_flip],
        ["still open", res.still_open],
        [
            "blue drained (ended/deadline)",
            f"{res.drained.get('ended', '-')}/{res.drained.get('deadline', '-')}",
        ],
        ["bgproxy VmRSS after drain KB", res.rss_drained_kb],
    ]
    text = format_table(["idle WebSockets", "value"], rows)
    for error, n in res.open_errors.most_common(5):
        text += f"\nopen error x{n}: {error}"
    ok = (
        memory_ok
        and not res.open_errors
        and res.opened == args.count
        and res.close_codes == Counter({1001: args.count})
        and not (res.closed_early or res.closed_before_flip or res.still_open)
    )
    return text, ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ws_idle", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="idle WebSockets to open (default 5000)")
    parser.add_argument("--batch", type=int, default=250, help="opened concurrently per batch (default 250)")
    parser.add_argument(
        "--drain-timeout", type=float, default=5.0, help="drain_timeout of the flip (default 5)"
    )
    parser.add_argument("--open-timeout", type=float, default=120.0, help="budget for opening them all (s)")
    parser.add_argument("--serve-echo", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the upstream
    args = parser.parse_args(argv)
    if args.serve_echo is None:
        if not 0 < args.count < MAX_CONNECTIONS or args.batch < 1:
            parser.error(f"need 0 < --count < {MAX_CONNECTIONS} (bgproxy's max_connections) and --batch >= 1")
        if args.drain_timeout <= 0 or args.open_timeout <= 0:
            parser.error("--drain-timeout and --open-timeout must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_echo is not None:
        serve_echo(args.serve_echo)
        return 0
    nofile = raise_nofile()
    need = 2 * args.count + 200  # bgproxy holds a client and an upstream socket per WebSocket
    if nofile < need:
        log(f"RLIMIT_NOFILE hard limit {nofile} is below the {need} fds bgproxy needs; lower --count")
        return 2
    with bench_session("bgproxy-ws-") as (workdir, services):
        try:
            port = free_port()
            echo = services.start(
                "ws-echo", [sys.executable, "-m", "bench.ws_idle", "--serve-echo", str(port)], LOAD_CORE
            )
            wait_until(lambda: tcp_open(port), echo, "ws-echo", 10)
            upstream = f"127.0.0.1:{port}"
            proxy = start_bgproxy(services, workdir / "bgproxy", [upstream], [upstream])
        except ServiceError as err:
            log(f"FAILED to start: {err}")
            return 1
        pin_load_client()  # clients share core 1 with the upstream; bgproxy has core 0
        log(
            f"RLIMIT_NOFILE {nofile}; opening {args.count} WebSockets via {proxy.url}, {args.batch} at a time"
        )
        began = time.monotonic()
        res = run_async(lambda: scenario(proxy, args))
        log(f"done in {time.monotonic() - began:.1f} s")
    text, ok = report(res, args)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
