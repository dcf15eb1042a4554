"""Throughput/latency benchmark: bgproxy vs HAProxy vs nginx vs no proxy, same upstream, same pinning.

python -m bench.run [--duration 10] [--runs 3] [--connections 50,10] [--only bgproxy,haproxy] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    HELLO,
    LOAD_CORE,
    PROXY_CORE,
    REPO_ROOT,
    ServiceError,
    Services,
    Upstream,
    WrkOptions,
    WrkResult,
    bench_session,
    format_table,
    free_port,
    interpreted_copy,
    log,
    median_run,
    pinning_available,
    run_main,
    run_wrk,
    spread_pct,
    start_bgproxy,
    start_nginx,
    start_upstream,
    tool_version,
    wait_serving,
    write_report,
    wrk_ready,
)
from bgproxy.core.sticky import StickyPolicy, cookie_value

OPTIONS = WrkOptions(per="cell", runs=3, quick_runs=1, output=REPO_ROOT / "bench" / "results" / "latest.json")
TARGETS = (
    "direct",
    "haproxy",
    "nginx",
    "bgproxy",
    "bgproxy-nometrics",
    "bgproxy-interpreted",
    "bgproxy-sticky",
    "bgproxy-sticky-new",
    "bgproxy-sticky-off",
)
# Sticky sessions on, at a 90/10 split: "bgproxy-sticky" sends a valid pin (a returning user, the
# common case), "bgproxy-sticky-new" none (every request a new user: assigned and given a cookie).
# "bgproxy-sticky-off" is the same split and the same Cookie header with sticky sessions off: the
# baseline that shows what the feature itself costs.
STICKY_KEY = "bench-sticky-key-0123456789"
STICKY = f"sticky: {{key: {STICKY_KEY}}}\n"

# A target starter brings its proxy up in front of the upstream and returns the URL to load and the
# proxy's pid (whose CPU time is read around each run), or None when there is no proxy.
Starter = Callable[[Services, Path, Upstream], "Target"]


@dataclass
class Target:
    url: str
    pid: int | None
    headers: tuple[str, ...] = ()  # sent with every request ("Name: value")


def start_direct(_services: Services, _workdir: Path, upstream: Upstream) -> Target:
    return Target(upstream.url, None)


def start_haproxy(services: Services, workdir: Path, upstream: Upstream) -> Target:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "haproxy.cfg"
    conf.write_text(
        f"""global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 2s
    timeout client 30s
    timeout server 30s

frontend bench
    bind 127.0.0.1:{port}
    default_backend upstream

backend upstream
    server up1 {upstream.address}
"""
    )
    service = services.start("haproxy", ["haproxy", "-db", "-f", str(conf)], PROXY_CORE)
    url = f"http://127.0.0.1:{port}/"
    wait_serving(url, upstream.body, service)
    return Target(url, service.proc.pid)


def start_nginx_proxy(services: Services, workdir: Path, upstream: Upstream) -> Target:
    port = free_port()
    http_body = f"""    upstream backend {{
        server {upstream.address};
        keepalive 64;
        keepalive_requests 100000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    service = start_nginx(services, "nginx-proxy", workdir, http_body, PROXY_CORE)
    url = f"http://127.0.0.1:{port}/"
    wait_serving(url, upstream.body, service)
    return Target(url, service.proc.pid)


def sticky_pin() -> str:
    """The Cookie header of a user pinned to blue under switch version 0 (a fresh state file)."""
    policy = StickyPolicy(b"bgproxy-color", 3600.0, "auto", True, "Lax", "follow", STICKY_KEY.encode())
    return "Cookie: bgproxy-color=" + cookie_value(policy, "blue", 0, time.time()).decode()


def bgproxy_starter(
    name: str,
    metrics: bool = True,
    interpreted: bool = False,
    sticky: bool = False,
    pinned: bool = False,
    split: bool = False,
) -> Starter:
    """bgproxy as installed, or from an interpreted copy of its sources (what mypyc buys, end to end)."""

    def start(services: Services, workdir: Path, upstream: Upstream) -> Target:
        workdir.mkdir(parents=True, exist_ok=True)
        pythonpath = interpreted_copy(workdir / "src") if interpreted else None
        proxy = start_bgproxy(
            services,
            workdir,
            [upstream.address],
            [upstream.address],
            metrics=metrics,
            name=name,
            pythonpath=pythonpath,
            extra=STICKY if sticky else "",
            weights=(90, 10) if split else (100, 0),
        )
        wait_serving(proxy.url, upstream.body, proxy.service)
        return Target(proxy.url, proxy.service.proc.pid, (sticky_pin(),) if pinned else ())

    return start


STARTERS: dict[str, Starter] = {
    "direct": start_direct,
    "haproxy": start_haproxy,
    "nginx": start_nginx_proxy,
    "bgproxy": bgproxy_starter("bgproxy"),
    "bgproxy-nometrics": bgproxy_starter("bgproxy-nometrics", metrics=False),
    "bgproxy-interpreted": bgproxy_starter("bgproxy-interpreted", interpreted=True),
    "bgproxy-sticky": bgproxy_starter("bgproxy-sticky", sticky=True, pinned=True, split=True),
    "bgproxy-sticky-new": bgproxy_starter("bgproxy-sticky-new", sticky=True, split=True),
    "bgproxy-sticky-off": bgproxy_starter("bgproxy-sticky-off", pinned=True, split=True),
}
REQUIRED_TOOL = {"haproxy": "haproxy", "nginx": "nginx"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])

    def add_only(p: argparse.ArgumentParser) -> None:
        help_text = f"comma list of targets from {', '.join(TARGETS)}; 'bgproxy' means both"
        p.add_argument("--only", default="", help=help_text)

    def selects(word: str, target: str) -> bool:
        return target == word or target.startswith(f"{word}-")

    def choose_targets(args: argparse.Namespace) -> None:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if not any(selects(w, t) for t in TARGETS)]
        if unknown:
            parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
        args.targets = [t for t in TARGETS if not wanted or any(selects(w, t) for w in wanted)]

    OPTIONS.add(parser, add_only)
    return OPTIONS.parse(parser, argv, choose_targets)


def measure(
    live: dict[str, Target], order: list[str], connections: int, seconds: int, failures: dict[str, str]
) -> dict[str, WrkResult]:
    """One wrk run per target in order; a target whose run fails is reported and dropped from live."""
    results: dict[str, WrkResult] = {}
    for target in order:
        try:
            spec = live[target]
            results[target] = run_wrk(
                spec.url, connections, seconds, proxy_pid=spec.pid, headers=spec.headers
            )
        except (RuntimeError, ValueError, OSError) as err:
            failures[target] = f"wrk at c={connections}: {err}"
            log(f"  {target} FAILED: {err}")
            del live[target]
    return results


def bench(urls: dict[str, Target], args: argparse.Namespace, failures: dict[str, str]) -> list[Cell]:
    """Interleave the targets run by run, rotating the order, so a burst of background load on a shared
    box hits every target alike instead of sinking one target's whole block of runs."""
    live = dict(urls)
    cells: list[Cell] = []
    for connections in args.connections:
        if args.warmup:
            log(f"c={connections}: warm-up {args.warmup} s per target")
            measure(live, list(live), connections, args.warmup, failures)
        runs: dict[str, list[WrkResult]] = {target: [] for target in live}
        for i in range(args.runs):
            names = list(live)
            shift = i % len(names) if names else 0
            order = names[shift:] + names[:shift]
            for target, result in measure(live, order, connections, args.duration, failures).items():
                runs[target].append(result)
                log(
                    f"  {target:<18} c={connections:<3} run {i + 1}/{args.runs}: "
                    f"{result.requests_per_sec:>10.0f} req/s  p99 {result.latency_ms.get('p99', 0):.2f} ms"
                    f"  errors {result.errors}"
                    + (f"  cpu {result.proxy_cpu_us:.1f} us/req" if result.proxy_cpu_us else "")
                )
        base = runs.get("haproxy", [])
        cells += [
            Cell(target, connections, results, paired_ratio(results, base) if base else None)
            for target, results in runs.items()
            if target in live
        ]
    return cells


@dataclass
class Cell:
    """All measured runs of one target at one connection count; reported through the median run."""

    target: str
    connections: int
    runs: list[WrkResult]
    paired_vs_haproxy: float | None = None  # see paired_ratio

    @property
    def median(self) -> WrkResult:
        return median_run(self.runs)

    @property
    def cpu_us(self) -> float | None:
        """Median CPU per request of the proxy over the runs (None for direct)."""
        values = [r.proxy_cpu_us for r in self.runs if r.proxy_cpu_us is not None]
        return statistics.median(values) if values else None

    def as_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "connections": self.connections,
            "median": self.median.as_dict(),
            "spread_pct": round(spread_pct(self.runs), 1),
            "errors_total": sum(r.errors for r in self.runs),
            "paired_vs_haproxy": self.paired_vs_haproxy,
            "proxy_cpu_us_per_request": self.cpu_us,
            "runs": [r.as_dict() for r in self.runs],
        }


def paired_ratio(runs: list[WrkResult], base: list[WrkResult]) -> float | None:
    """Median over rounds of req/s divided by the baseline's req/s in the same round.

    Runs of one round are back to back, so a slow spell on a shared box mostly hits both; the median
    of per-round ratios shrugs off such spells better than a ratio of medians taken from different
    minutes.
    """
    if len(runs) != len(base):
        return None  # a failed run broke the pairing
    ratios = [
        a.requests_per_sec / b.requests_per_sec for a, b in zip(runs, base, strict=True) if b.requests_per_sec
    ]
    return statistics.median(ratios) if ratios else None


def render(cells: list[Cell], failures: dict[str, str], skipped: dict[str, str]) -> str:
    """The table: medians, total errors, run-to-run spread, and req/s relative to haproxy and direct."""

    def baseline(target: str) -> dict[int, float]:
        return {c.connections: c.median.requests_per_sec for c in cells if c.target == target}

    def ratio(value: float, base: float | None) -> str:
        return f"{value / base:.2f}" if base else "-"

    haproxy, direct = baseline("haproxy"), baseline("direct")

    def cpu_columns(c: Cell) -> list[str]:
        """CPU per request, and how busy that made the proxy's core (req/s x CPU per request)."""
        if c.cpu_us is None:
            return ["-", "-"]
        return [f"{c.cpu_us:.1f}", f"{c.cpu_us * c.median.requests_per_sec / 1e4:.0f}%"]

    rows = []
    for c in cells:
        median = c.median
        rows.append(
            [
                c.target,
                c.connections,
                f"{median.requests_per_sec:.0f}",
                f"{median.latency_ms.get('p50', float('nan')):.3f}",
                f"{median.latency_ms.get('p99', float('nan')):.3f}",
                sum(r.errors for r in c.runs),
                f"{spread_pct(c.runs):.1f}%",
                ratio(median.requests_per_sec, haproxy.get(c.connections)),
                "-" if c.paired_vs_haproxy is None else f"{c.paired_vs_haproxy:.2f}",
                ratio(median.requests_per_sec, direct.get(c.connections)),
                *cpu_columns(c),
            ]
        )
    headers = [
        "target", "conns", "req/s", "p50 ms", "p99 ms", "errors", "spread",
        "vs haproxy", "paired vs haproxy", "vs direct", "cpu us/req", "core busy",
    ]  # fmt: skip
    text = format_table(headers, rows)
    for target, reason in skipped.items():
        text += f"\n{target}: skipped - {reason}"
    for target, error in failures.items():
        lines = error.strip().splitlines() or ["unknown error"]
        summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1].strip()}"
        text += f"\n{target}: FAILED - {summary}"
    return text


def metadata(args: argparse.Namespace, upstream_kind: str) -> dict[str, object]:
    return {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pinned": pinning_available(),
        "proxy_core": PROXY_CORE,
        "load_core": LOAD_CORE,
        "upstream": upstream_kind,
        "duration_s": args.duration,
        "runs": args.runs,
        "warmup_s": args.warmup,
        "connections": args.connections,
        "wrk": "wrk -t1 -cC -dDs --timeout 2s --latency",
        "versions": {
            "wrk": tool_version(["wrk", "-v"]),
            "haproxy": tool_version(["haproxy", "-v"]),
            "nginx": tool_version(["nginx", "-v"]),
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not wrk_ready():
        return 2
    failures: dict[str, str] = {}
    skipped: dict[str, str] = {}
    with bench_session("bgproxy-bench-") as (workdir, services):
        try:
            upstream = start_upstream(services, workdir, HELLO)
        except ServiceError as err:
            log(f"upstream FAILED to start: {err}")
            return 1
        log(f"upstream: {upstream.kind} on {upstream.address}")
        urls: dict[str, Target] = {}
        for target in args.targets:
            tool = REQUIRED_TOOL.get(target)
            if tool and shutil.which(tool) is None:
                skipped[target] = f"{tool} not installed"
                continue
            try:
                urls[target] = STARTERS[target](services, workdir / target, upstream)
                log(f"{target}: serving at {urls[target].url}")
            except ServiceError as err:
                failures[target] = str(err)
                log(f"{target} FAILED to start: {err}")
        # All proxies stay up together; idle ones cost core 0 nothing while another is loaded.
        cells = bench(urls, args, failures)
        meta = metadata(args, upstream.kind)
    print(render(cells, failures, skipped))
    results = [c.as_dict() for c in cells]
    write_report(args.output, {"meta": meta, "results": results, "failures": failures, "skipped": skipped})
    return 1 if failures else 0


if __name__ == "__main__":
    run_main(main)
