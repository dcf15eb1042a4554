"""What counting costs: bgproxy with metrics on vs off, same upstream, same pinning, interleaved runs.

python -m bench.metrics_cost [--duration 10] [--runs 5] [--connections 50,10] [--quick]

Two figures: end-to-end req/s under wrk (target: on within 10 % of off), and the per-request cost of
the counting calls alone in nanoseconds, which is what the end-to-end figure hides in its noise.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

from bench.harness import (
    HELLO,
    READY_TIMEOUT_S,
    REPO_ROOT,
    Bgproxy,
    ServiceError,
    WrkOptions,
    WrkResult,
    bench_session,
    format_table,
    http_get,
    log,
    median_run,
    pinning_available,
    run_main,
    run_wrk,
    spread_pct,
    start_bgproxy,
    start_upstream,
    wait_serving,
    wait_until,
    write_report,
    wrk_ready,
)
from bgproxy.config import MetricsConfig
from bgproxy.dataplane.stats import Stats

OPTIONS = WrkOptions(
    per="variant", runs=5, quick_runs=2, output=REPO_ROOT / "bench" / "results" / "metrics_cost.json"
)
TARGET_PCT = 10.0
VARIANTS = {"metrics-on": True, "metrics-off": False}


def counting_ns(calls: int = 200_000) -> dict[str, float]:
    """Nanoseconds per proxied request spent in the stats calls the data plane makes (best of 5)."""
    out: dict[str, float] = {}
    for name, enabled in VARIANTS.items():
        cs = Stats(MetricsConfig().latency_buckets, enabled=enabled).colors["blue"]
        timer = timeit.Timer(
            "cs.in_flight += 1; cs.upstream_header(0.0012); "
            "cs.in_flight -= 1; cs.response(200, 0.0031, 1234.5)",
            globals={"cs": cs},
        )
        out[name] = min(timer.repeat(5, calls)) / calls * 1e9
    return out


def check_variant(proxy: Bgproxy, enabled: bool) -> None:
    """Refuse to compare two identical proxies: the 'off' one must really not count requests."""
    url = f"{proxy.admin_url}/metrics"
    # The admin listener starts just after the proxy port that start_bgproxy may have waited for.
    wait_until(lambda: http_get(url)[0] == 200, proxy.service, url, READY_TIMEOUT_S)
    counts = b"bgproxy_requests_total" in http_get(url)[1]
    if counts != enabled:
        raise ServiceError(
            f"{url}: metrics.enabled={enabled} but requests are {'' if counts else 'not '}counted"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__.splitlines()[0])
    OPTIONS.add(parser)
    return OPTIONS.parse(parser, argv)


def measure(urls: dict[str, str], args: argparse.Namespace) -> list[dict[str, object]]:
    """Alternate the variants run by run (on/off, off/on, ...) so drift on the box hits both alike."""
    rows: list[dict[str, object]] = []
    for connections in args.connections:
        if args.warmup:
            for url in urls.values():
                run_wrk(url, connections, args.warmup)
        runs: dict[str, list[WrkResult]] = {name: [] for name in urls}
        for i in range(args.runs):
            order = list(urls) if i % 2 == 0 else list(reversed(urls))
            for name in order:
                result = run_wrk(urls[name], connections, args.duration)
                runs[name].append(result)
                log(
                    f"  {name:<11} c={connections:<3} run {i + 1}/{args.runs}: "
                    f"{result.requests_per_sec:>8.0f} req/s"
                )
        medians = {name: median_run(r) for name, r in runs.items()}
        on, off = medians["metrics-on"].requests_per_sec, medians["metrics-off"].requests_per_sec
        # Each on run next to its off run: the median of these ratios shrugs off slow drift on the box.
        paired = [
            100.0 * (a.requests_per_sec - b.requests_per_sec) / b.requests_per_sec
            for a, b in zip(runs["metrics-on"], runs["metrics-off"], strict=True)
            if b.requests_per_sec
        ]
        rows.append(
            {
                "connections": connections,
                "median": {name: m.as_dict() for name, m in medians.items()},
                "spread_pct": {name: round(spread_pct(r), 1) for name, r in runs.items()},
                "on_vs_off_pct": round(100.0 * (on - off) / off, 1) if off else None,
                "paired_on_vs_off_pct": round(statistics.median(paired), 1) if paired else None,
                "errors_total": {name: sum(x.errors for x in r) for name, r in runs.items()},
                "runs": {name: [x.as_dict() for x in r] for name, r in runs.items()},
            }
        )
    return rows


def render(rows: list[dict[str, object]], micro: dict[str, float]) -> str:
    table = []
    for row in rows:
        median, spread, errors = row["median"], row["spread_pct"], row["errors_total"]
        assert isinstance(median, dict) and isinstance(spread, dict) and isinstance(errors, dict)
        for name in VARIANTS:
            latency = median[name]["latency_ms"]
            table.append(
                [
                    name,
                    row["connections"],
                    f"{median[name]['requests_per_sec']:.0f}",
                    f"{latency.get('p50', float('nan')):.3f}",
                    f"{latency.get('p99', float('nan')):.3f}",
                    errors[name],
                    f"{spread[name]}%",
                    f"{row['on_vs_off_pct']:+.1f}%" if name == "metrics-on" else "",
                    f"{row['paired_on_vs_off_pct']:+.1f}%" if name == "metrics-on" else "",
                ]
            )
    headers = ["variant", "conns", "req/s", "p50 ms", "p99 ms", "errors", "spread", "on vs off", "paired"]
    text = format_table(headers, table)
    extra_ns = micro["metrics-on"] - micro["metrics-off"]
    text += (
        f"\ncounting per request: {micro['metrics-on']:.0f} ns on, {micro['metrics-off']:.0f} ns off"
        f" (in_flight, upstream_header, response)"
    )
    for row in rows:
        median = row["median"]
        assert isinstance(median, dict)
        share = extra_ns * median["metrics-off"]["requests_per_sec"] / 1e9 * 100.0
        text += f"\nc={row['connections']}: at the metrics-off rate, counting takes {share:.2f}% of one core"
    worst = max((abs(float(str(r["paired_on_vs_off_pct"]))) for r in rows), default=0.0)
    verdict = "within" if worst <= TARGET_PCT else "OUTSIDE"
    return text + f"\nlargest paired on/off difference {worst:.1f}%: {verdict} the {TARGET_PCT:.0f}% target"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not wrk_ready():
        return 2
    micro = counting_ns()
    with bench_session("bgproxy-metrics-cost-") as (workdir, services):
        upstream = start_upstream(services, workdir, HELLO)
        log(f"upstream: {upstream.kind} on {upstream.address}")
        urls: dict[str, str] = {}
        try:
            for name, enabled in VARIANTS.items():
                address = [upstream.address]
                proxy = start_bgproxy(services, workdir / name, address, address, metrics=enabled, name=name)
                wait_serving(proxy.url, upstream.body, proxy.service)
                check_variant(proxy, enabled)
                urls[name] = proxy.url
            rows = measure(urls, args)
        except (ServiceError, RuntimeError, ValueError) as err:
            log(f"FAILED: {err}")
            return 1
    print(render(rows, micro))
    report: dict[str, object] = {
        "meta": {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pinned": pinning_available(),
            "upstream": upstream.kind,
            "duration_s": args.duration,
            "runs": args.runs,
            "warmup_s": args.warmup,
            "target_pct": TARGET_PCT,
        },
        "counting_ns_per_request": {k: round(v, 1) for k, v in micro.items()},
        "results": rows,
    }
    write_report(args.output, report)
    return 0


if __name__ == "__main__":
    run_main(main)
