"""Flips under load: keep-alive clients hammer bgproxy while the admin API flips blue <-> green.

python -m bench.flip_under_load [--seconds 10] [--flips 20] [--connections 50] [--drain-timeout 5]

Blue and green are two distinct upstreams (nginx, else the Python fallback) answering "blue\\n" and
"green\\n". A Python load client (aiohttp, CONNECTIONS keep-alive connections, one request at a time on
each) runs for SECONDS while FLIPS flips are spread evenly over the run. Every flip must lose nothing:
requests, non-2xx, socket errors, unknown bodies and misrouted answers (a request sent after a flip was
acknowledged, answered by the old color) are printed, and the exit status is 1 unless all the error
counts are 0 and every flip succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from bench.harness import (
    ServiceError,
    bench_session,
    format_table,
    log,
    pin_load_client,
    run_async,
    run_main,
    start_bgproxy,
    start_upstream,
    wait_serving,
)

BODIES = {"blue": b"blue\n", "green": b"green\n"}
REQUEST_TIMEOUT_S = 5.0
SLACK_S = 20.0  # the whole load phase is cancelled this long after its planned end


@dataclass
class Tally:
    requests: int = 0  # answered, whatever the status
    non2xx: int = 0
    socket_errors: int = 0
    bad_body: int = 0  # 2xx with a body that is neither color's
    misrouted: int = 0  # sent after a flip was acknowledged, answered by the old color
    checked: int = 0  # requests whose color could be checked (not sent while a flip was in flight)
    by_color: Counter[str] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)
    flips_ok: int = 0
    flip_failures: list[str] = field(default_factory=list)
    flip_ms: list[float] = field(default_factory=list)
    connections_opened: int = 0
    elapsed_s: float = 0.0

    @property
    def failed(self) -> bool:
        return bool(
            self.non2xx or self.socket_errors or self.bad_body or self.misrouted or self.flip_failures
        )


class Routing:
    """What color a request sent now must get: None while a flip is on its way (either is correct)."""

    def __init__(self) -> None:
        self.expected: str | None = "blue"


async def worker(
    session: aiohttp.ClientSession, url: str, stop_at: float, routing: Routing, t: Tally
) -> None:
    loop = asyncio.get_running_loop()
    color_of = {body: color for color, body in BODIES.items()}
    while loop.time() < stop_at:
        expected = routing.expected
        try:
            async with session.get(url) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as err:
            t.socket_errors += 1
            t.error_kinds[type(err).__name__] += 1
            continue
        t.requests += 1
        if not 200 <= status < 300:
            t.non2xx += 1
            t.error_kinds[f"HTTP {status}"] += 1
            continue
        color = color_of.get(body)
        if color is None:
            t.bad_body += 1
            continue
        t.by_color[color] += 1
        if expected is not None:
            t.checked += 1
            if color != expected:
                t.misrouted += 1


async def flipper(
    admin_url: str, start: float, seconds: float, flips: int, drain_timeout: float, routing: Routing, t: Tally
) -> None:
    loop = asyncio.get_running_loop()
    interval = seconds / (flips + 1)
    target = "green"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as admin:
        for i in range(flips):
            await asyncio.sleep(max(0.0, start + (i + 1) * interval - loop.time()))
            routing.expected = None
            sent = loop.time()
            try:
                async with admin.post(
                    f"{admin_url}/v1/flip", json={"to": target, "drain_timeout": drain_timeout}
                ) as resp:
                    body = await resp.json()
                    ok = resp.status == 200 and body.get("active") == target
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as err:
                body, ok = {"error": repr(err)}, False
            if not ok:
                t.flip_failures.append(f"flip {i + 1} to {target}: {json.dumps(body)[:200]}")
                return  # the routing expectation is unknown from here on
            t.flips_ok += 1
            t.flip_ms.append((loop.time() - sent) * 1000)
            routing.expected = target
            target = "blue" if target == "green" else "green"


async def run_load(
    url: str, admin_url: str, seconds: float, flips: int, connections: int, drain: float
) -> Tally:
    t = Tally()
    routing = Routing()
    trace = aiohttp.TraceConfig()

    async def opened(*_: object) -> None:
        t.connections_opened += 1

    trace.on_connection_create_end.append(opened)
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trace_configs=[trace]) as session:
        start = loop.time()
        stop_at = start + seconds
        tasks = [asyncio.create_task(worker(session, url, stop_at, routing, t)) for _ in range(connections)]
        tasks.append(asyncio.create_task(flipper(admin_url, start, seconds, flips, drain, routing, t)))
        done, pending = await asyncio.wait(tasks, timeout=seconds + SLACK_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        t.elapsed_s = loop.time() - start
        for task in done:
            error = task.exception()
            if error is not None:
                raise error  # a bug in the client, not a proxy error: let it show
        if pending:
            t.flip_failures.append(f"{len(pending)} task(s) still running {SLACK_S:.0f} s after the end")
    return t


def report(t: Tally, args: argparse.Namespace) -> str:
    rows = [
        ["requests", t.requests],
        ["req/s", f"{t.requests / t.elapsed_s:.0f}" if t.elapsed_s else "-"],
        ["non-2xx", t.non2xx],
        ["socket errors", t.socket_errors],
        ["unknown bodies", t.bad_body],
        ["misrouted after flip ack", f"{t.misrouted} of {t.checked} checked"],
        ["flips ok", f"{t.flips_ok} of {args.flips}"],
        ["flip latency ms (median/max)", _median_max(t.flip_ms)],
        ["answers blue/green", f"{t.by_color['blue']}/{t.by_color['green']}"],
        ["client connections opened", f"{t.connections_opened} (for {args.connections} workers)"],
    ]
    text = format_table(["flip under load", "value"], rows)
    for kind, n in t.error_kinds.most_common():
        text += f"\nerror: {kind} x{n}"
    for failure in t.flip_failures:
        text += f"\nFAILED: {failure}"
    return text


def _median_max(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[(len(ordered) - 1) // 2]:.1f}/{ordered[-1]:.1f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flip_under_load", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration (default 10)")
    parser.add_argument("--flips", type=int, default=20, help="flips spread over the run (default 20)")
    parser.add_argument(
        "--connections", type=int, default=50, help="keep-alive client connections (default 50)"
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=5.0, help="drain_timeout of each flip (default 5)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 600 or args.flips < 0 or not 0 < args.connections <= 5000:
        parser.error("need 0 < --seconds <= 600, --flips >= 0, 0 < --connections <= 5000")
    if args.drain_timeout <= 0:
        parser.error("--drain-timeout must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with bench_session("bgproxy-flip-") as (workdir, services):
        try:
            blue = start_upstream(services, workdir, BODIES["blue"].decode(), name="blue")
            green = start_upstream(services, workdir, BODIES["green"].decode(), name="green")
            proxy = start_bgproxy(services, workdir / "bgproxy", [blue.address], [green.address])
            wait_serving(proxy.url, BODIES["blue"].decode(), proxy.service)
        except ServiceError as err:
            log(f"FAILED to start: {err}")
            return 1
        log(f"upstreams: {blue.kind} blue {blue.address}, green {green.address}; bgproxy {proxy.url}")
        if not pin_load_client():
            log("warning: taskset or a second CPU is missing; running unpinned")
        log(f"load: {args.connections} connections for {args.seconds:g} s, {args.flips} flips")
        began = time.monotonic()
        tally = run_async(
            lambda: run_load(
                proxy.url, proxy.admin_url, args.seconds, args.flips, args.connections, args.drain_timeout
            )
        )
        if not proxy.service.alive():
            tally.flip_failures.append(f"bgproxy exited during the run:\n{proxy.service.log_tail()}")
        log(f"done in {time.monotonic() - began:.1f} s")
    print(report(tally, args))
    return 1 if tally.failed or tally.requests == 0 else 0


if __name__ == "__main__":
    run_main(main)
