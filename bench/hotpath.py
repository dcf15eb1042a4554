"""Per-request CPU cost of bgproxy's own code, compiled (mypyc) vs interpreted, without sockets.

python -m bench.hotpath [--requests 100000] [--runs 5]

The real ClientConnection and UpstreamConnection are driven over in-memory transports: a wrk-style
GET goes in, an nginx-style 200 comes back, and the time per request is everything bgproxy does in
between (parsing, routing, head rewriting, pooling, counting) minus the kernel. The interpreted
variant runs from a copy of the sources without the compiled modules, in a child process, so both
variants are measured in the same minutes; runs alternate and the medians are compared.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from bench.harness import REPO_ROOT, format_table, interpreted_copy, log, run_main
from bench.memory import client_connection, make_runtime, pooled_connection

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 01:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nhello, world\n"
)


def measure_here(requests: int) -> float:
    """Microseconds per request for whichever bgproxy this interpreter imports."""

    async def run() -> float:
        runtime = make_runtime()
        stats = runtime.stats
        uconn, utransport = pooled_connection(runtime, "blue")
        client, ctransport = client_connection(runtime)

        def batch(n: int) -> None:
            for _ in range(n):
                client.data_received(REQUEST)
                uconn.data_received(RESPONSE)
            if not ctransport.out[-1].endswith(b"hello, world\n"):
                raise RuntimeError(f"unexpected answer: {ctransport.out[-1]!r}")
            ctransport.out.clear()
            utransport.out.clear()

        batch(2000)  # warm caches and the keep-alive pool
        start = time.process_time()
        batch(requests)
        elapsed = time.process_time() - start
        if sum(stats.colors["blue"].codes.values()) != requests + 2000:
            raise RuntimeError("not every request was counted")
        return elapsed / requests * 1e6

    return uvloop.run(run())


def one_run(pythonpath: Path | None, requests: int) -> tuple[float, bool]:
    """(µs per request, compiled?) measured in a fresh child process."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    code = (
        "from bgproxy.app import dataplane_build; import bench.hotpath as h; "
        f"print(h.measure_here({requests}), dataplane_build() == 'mypyc')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=pythonpath or REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), out[1] == "True"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests per run (default 100000)")
    parser.add_argument("--runs", type=int, default=5, help="runs per variant; medians are compared")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        pure = interpreted_copy(Path(tmp))
        shutil.copytree(
            REPO_ROOT / "bench", pure / "bench", ignore=shutil.ignore_patterns("__pycache__", "results")
        )
        times: dict[str, list[float]] = {"installed": [], "interpreted": []}
        compiled = False
        for i in range(args.runs):
            us, compiled = one_run(None, args.requests)
            times["installed"].append(us)
            us, was_compiled = one_run(pure, args.requests)
            if was_compiled:
                raise RuntimeError("the interpreted copy imported compiled modules")
            times["interpreted"].append(us)
            installed_us = times["installed"][-1]
            log(f"  run {i + 1}/{args.runs}: installed {installed_us:.2f} us, interpreted {us:.2f} us")
    installed = statistics.median(times["installed"])
    interpreted = statistics.median(times["interpreted"])
    kind = "compiled (mypyc)" if compiled else "interpreted (BGPROXY_PURE=1 build)"
    print(
        format_table(
            ["variant", "us/request (median)", "min", "max", "vs interpreted"],
            [
                [
                    f"installed: {kind}",
                    f"{installed:.2f}",
                    f"{min(times['installed']):.2f}",
                    f"{max(times['installed']):.2f}",
                    f"{interpreted / installed:.2f}x faster",
                ],
                [
                    "interpreted sources",
                    f"{interpreted:.2f}",
                    f"{min(times['interpreted']):.2f}",
                    f"{max(times['interpreted']):.2f}",
                    "1.00x",
                ],
            ],
        )
    )
    return 0


if __name__ == "__main__":
    run_main(main)
