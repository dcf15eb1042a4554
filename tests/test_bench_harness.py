"""The bench's wrk parser and median pick: every figure in bench/results comes through them.

The outputs are wrk 4.1 `--latency` runs captured against local servers (nginx 200 and 404, an asyncio
server that answers slowly or resets connections); units follow wrk's src/units.c: latencies in us,
then ms from 850 us, s from 1 s, m from 51 s; Requests/sec is a plain number, only the per-thread
Req/Sec line uses k.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench.harness import WrkResult, cpu_seconds, median_run, parse_wrk
from bench.run import paired_ratio

NGINX_200 = """\
Running 2s test @ http://127.0.0.1:34589/
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    64.95us   44.68us   1.86ms   98.01%
    Req/Sec   132.45k    17.36k  154.35k    52.38%
  Latency Distribution
     50%   59.00us
     75%   79.00us
     90%   88.00us
     99%  146.00us
  275629 requests in 2.10s, 40.22MB read
Requests/sec: 131247.34
Transfer/sec:     19.15MB
"""

NGINX_200_C400 = """\
Running 2s test @ http://127.0.0.1:34589/
  1 threads and 400 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.15ms  771.25us   5.67ms   65.91%
    Req/Sec   129.11k    15.29k  148.41k    90.00%
  Latency Distribution
     50%    2.09ms
     75%    2.74ms
     90%    3.15ms
     99%    4.15ms
  256818 requests in 2.02s, 37.47MB read
Requests/sec: 127140.14
Transfer/sec:     18.55MB
"""

NGINX_404 = """\
Running 2s test @ http://127.0.0.1:34589/missing
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    58.74us   55.15us   1.95ms   98.75%
    Req/Sec   138.70k    17.76k  157.47k    66.67%
  Latency Distribution
     50%   54.00us
     75%   61.00us
     90%   79.00us
     99%  125.00us
  288934 requests in 2.10s, 84.87MB read
  Non-2xx or 3xx responses: 288934
Requests/sec: 137628.78
Transfer/sec:     40.43MB
"""

# wrk pads the one-letter "s" unit to two columns: the trailing blank (\x20) is in its output.
SLOW_1S = """\
Running 4s test @ http://127.0.0.1:40759/
  1 threads and 5 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20s   568.22us   1.20s    66.67%
    Req/Sec     3.67      0.58     4.00     66.67%
  Latency Distribution
     50%    1.20s\x20
     75%    1.20s\x20
     90%    1.20s\x20
     99%    1.20s\x20
  15 requests in 4.01s, 615.00B read
Requests/sec:      3.74
Transfer/sec:     153.46B
"""

RESETS = """\
Running 2s test @ http://127.0.0.1:58879/
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   213.78us  146.04us   4.51ms   94.73%
    Req/Sec    44.27k     7.74k   54.52k    61.90%
  Latency Distribution
     50%  178.00us
     75%  243.00us
     90%  314.00us
     99%  639.00us
  92436 requests in 2.10s, 3.61MB read
  Socket errors: connect 0, read 4864, write 0, timeout 0
Requests/sec:  44022.84
Transfer/sec:      1.72MB
"""

# Nothing answered: wrk still prints the distribution (all zero) and "-nan%" for the spreads.
NO_ANSWERS = """\
Running 3s test @ http://127.0.0.1:59899/
  1 threads and 5 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 3.01s, 0.00B read
Requests/sec:      0.00
Transfer/sec:       0.00B
"""

# Both error lines, in wrk's order (socket errors first), with every socket error kind set.
BOTH_ERRORS = """\
Running 10s test @ http://127.0.0.1:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   501.19ms  262.84us   1.99s    80.00%
    Req/Sec     1.20k   310.00     1.90k    70.00%
  Latency Distribution
     50%  501.05ms
     75%  501.10ms
     90%  701.70ms
     99%    1.99s\x20
  11990 requests in 10.01s, 1.00MB read
  Socket errors: connect 3, read 12, write 1, timeout 40
  Non-2xx or 3xx responses: 7
Requests/sec:   1197.80
Transfer/sec:    102.30KB
"""


def distribution(p50: str, p75: str, p90: str, p99: str) -> str:
    """NGINX_200 with its Latency Distribution values replaced."""
    lines = NGINX_200.splitlines(keepends=True)
    first = lines.index("  Latency Distribution\n") + 1
    for i, (pct, value) in enumerate(zip((50, 75, 90, 99), (p50, p75, p90, p99), strict=True)):
        lines[first + i] = f"     {pct}%  {value:>8}\n"
    return "".join(lines)


@pytest.mark.parametrize(
    ("text", "rps", "requests", "latency_ms", "non2xx", "socket_errors"),
    [
        (NGINX_200, 131247.34, 275629, (0.059, 0.079, 0.088, 0.146), 0, {}),
        (NGINX_200_C400, 127140.14, 256818, (2.09, 2.74, 3.15, 4.15), 0, {}),
        (NGINX_404, 137628.78, 288934, (0.054, 0.061, 0.079, 0.125), 288934, {}),
        (SLOW_1S, 3.74, 15, (1200.0, 1200.0, 1200.0, 1200.0), 0, {}),
        (
            RESETS,
            44022.84,
            92436,
            (0.178, 0.243, 0.314, 0.639),
            0,
            {"connect": 0, "read": 4864, "write": 0, "timeout": 0},
        ),
        (NO_ANSWERS, 0.0, 0, (0.0, 0.0, 0.0, 0.0), 0, {}),
        (
            BOTH_ERRORS,
            1197.80,
            11990,
            (501.05, 501.10, 701.70, 1990.0),
            7,
            {"connect": 3, "read": 12, "write": 1, "timeout": 40},
        ),
    ],
    ids=["200-us", "200-ms", "404", "seconds", "resets", "no-answers", "both-error-lines"],
)
def test_parse_wrk_outputs(
    text: str,
    rps: float,
    requests: int,
    latency_ms: tuple[float, float, float, float],
    non2xx: int,
    socket_errors: dict[str, int],
) -> None:
    result = parse_wrk(text)
    assert result.requests_per_sec == pytest.approx(rps)  # Requests/sec, not the k-suffixed Req/Sec
    assert result.requests == requests
    expected = dict(zip(("p50", "p75", "p90", "p99"), latency_ms, strict=True))
    assert result.latency_ms == pytest.approx(expected)
    assert result.non2xx == non2xx
    assert result.socket_errors == socket_errors
    assert result.errors == non2xx + sum(socket_errors.values())


@pytest.mark.parametrize(
    ("printed", "ms"),
    [
        ("0.00us", 0.0),
        ("59.00us", 0.059),
        ("849.00us", 0.849),  # the last us value: from 850 us wrk switches to ms
        ("0.94ms", 0.94),
        ("999.99ms", 999.99),
        ("1.00s", 1000.0),
        ("50.99s", 50990.0),  # the last s value: from 51 s wrk switches to m
        ("0.85m", 51000.0),
        ("2.50m", 150000.0),
    ],
)
def test_parse_wrk_latency_units(printed: str, ms: float) -> None:
    result = parse_wrk(distribution("59.00us", "79.00us", "88.00us", printed))
    assert result.latency_ms["p99"] == pytest.approx(ms)
    assert result.latency_ms["p50"] == pytest.approx(0.059)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not wrk output"),
        ("unable to connect to 127.0.0.1:48679 Connection refused\n", "not wrk output"),
        (NGINX_200.replace("Requests/sec: 131247.34\n", ""), "not wrk output"),  # cut short
        (NGINX_200.replace("  275629 requests in 2.10s, 40.22MB read\n", ""), "not wrk output"),
        (NGINX_200.replace("     99%  146.00us\n", ""), "wrk output has no p99 latency"),
        (
            NGINX_200.replace("     50%   59.00us\n", "").replace("     90%   88.00us\n", ""),
            "wrk output has no p50, p90 latency",
        ),
        (  # run without --latency: no distribution at all
            "".join(line for line in NGINX_200.splitlines(keepends=True) if not line.startswith("     ")),
            "wrk output has no p50, p75, p90, p99 latency (was --latency given?)",
        ),
        (NGINX_200.replace("146.00us", "146.00xs"), "wrk output has no p99 latency"),  # unknown unit
    ],
    ids=["empty", "stderr-only", "no-rps", "no-total", "no-p99", "no-p50-p90", "no-latency-flag", "bad-unit"],
)
def test_parse_wrk_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_wrk(text)


def run(rps: float, p99: float = 1.0) -> WrkResult:
    return WrkResult(requests_per_sec=rps, latency_ms={"p99": p99}, requests=int(rps), non2xx=0)


@pytest.mark.parametrize(
    ("rates", "picked"),
    [
        ([5.0], 5.0),
        ([3.0, 1.0, 2.0], 2.0),
        ([4.0, 1.0, 3.0, 2.0], 2.0),  # even count: the lower middle, a run that really happened
        ([2.0, 2.0, 1.0], 2.0),
        ([9.0, 1.0, 8.0, 2.0, 7.0], 7.0),
    ],
)
def test_median_run_picks_the_middle_run(rates: list[float], picked: float) -> None:
    runs = [run(rate) for rate in rates]
    chosen = median_run(runs)
    assert chosen.requests_per_sec == picked
    assert any(chosen is r for r in runs)  # one of the runs itself, not an average of several


def test_median_run_keeps_that_runs_latencies() -> None:
    runs = [run(100.0, p99=9.0), run(300.0, p99=1.0), run(200.0, p99=5.0)]
    assert median_run(runs).latency_ms == {"p99": 5.0}


@pytest.mark.parametrize(
    ("rates", "base", "expected"),
    [
        ([30.0, 10.0, 20.0], [40.0, 40.0, 40.0], 0.5),  # median of 0.75, 0.25, 0.5
        # A slow spell in round 2 sinks both targets: the per-round ratio stays 0.8.
        ([40.0, 8.0, 40.0], [50.0, 10.0, 50.0], 0.8),
        ([10.0, 20.0], [10.0, 10.0, 10.0], None),  # a failed run breaks the pairing
        ([10.0], [0.0], None),  # no usable baseline
    ],
)
def test_paired_ratio_compares_runs_of_the_same_round(
    rates: list[float], base: list[float], expected: float | None
) -> None:
    got = paired_ratio([run(r) for r in rates], [run(r) for r in base])
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_cpu_seconds_counts_this_process_work() -> None:
    pid = os.getpid()
    before = cpu_seconds(pid)
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    spent = cpu_seconds(pid) - before
    assert 0.1 <= spent < 5.0  # clock ticks are 10 ms: 0.2 s of spinning shows up as about 0.2 s
