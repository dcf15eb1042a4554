"""Shared benchmark plumbing: children that always die, a fast upstream, bgproxy start-up, wrk runs, tables.

Every bench module (throughput, metrics cost, flip-under-load, WebSocket counts) imports from here so they
all pin, time-bound, report and clean up the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

REPO_ROOT = Path(__file__).resolve().parents[1]
HELLO = "hello, world\n"
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
PROXY_CORE = 0
LOAD_CORE = 1  # wrk and the upstream share it, identically for every target

T = TypeVar("T")


class ServiceError(RuntimeError):
    """A child failed to start or to become ready; the message carries its log tail."""


def log(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the result table."""
    print(message, file=sys.stderr, flush=True)


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run main() under uvloop when installed (less client/server overhead in the figures), else asyncio."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())


# --------------------------------------------------------------------------- processes

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Runs in the child before exec: if the bench is SIGKILLed no finally block runs, the kernel kills it."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def pinned(argv: Sequence[str], core: int | None) -> list[str]:
    """Prefix argv with taskset so proxy, load generator and upstream don't steal each other's CPU."""
    if core is None or shutil.which("taskset") is None or core not in os.sched_getaffinity(0):
        return list(argv)
    return ["taskset", "-c", str(core), *argv]


def pinning_available() -> bool:
    return shutil.which("taskset") is not None and {PROXY_CORE, LOAD_CORE} <= os.sched_getaffinity(0)


def pin_load_client() -> bool:
    """Move this process, the load client, to the load core beside the upstreams; False if unpinned."""
    if not pinning_available():
        return False
    os.sched_setaffinity(0, {LOAD_CORE})
    return True


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (/proc/PID/stat), threads included.

    Around a wrk run it gives the proxy's CPU per request, and with req/s how busy its core was:
    near 100% means the proxy was the bottleneck, so its req/s is its capacity on that core.
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted after comm
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A port the kernel just handed out; the tiny reuse race is acceptable on a bench box."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(eq=False)  # identity semantics: services go in sets
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the process group, SIGKILL it after timeout, then reap the leader.

        The leader is reaped last: until then its pid, which is the group id, cannot be reused, so the
        signals can only reach processes this harness started.
        """
        if self.proc.returncode is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                if self._exited_within(timeout):
                    break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers the leader left behind, if any
        self.proc.wait(timeout)

    def _exited_within(self, timeout: float) -> bool:
        """Wait for the leader to exit without reaping it (WNOWAIT keeps the zombie, and so the pid)."""
        deadline = time.monotonic() + timeout
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        while os.waitid(os.P_PID, self.proc.pid, flags) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True


class Services(contextlib.AbstractContextManager["Services"]):
    """Owns every long-running child; leaving the with-block (return, exception, Ctrl-C) stops them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._running: list[Service] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        core: int | None = None,
        env: dict[str, str] | None = None,
        cwd: Path = REPO_ROOT,
    ) -> Service:
        """Start argv (pinned to core) with output in log_dir/NAME.log; env replaces os.environ if given."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                pinned(argv, core),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=os.environ.copy() if env is None else env,
                start_new_session=True,  # own process group: killpg reaches its workers, Ctrl-C does not
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded parent, prctl only
            )
        service = Service(name, proc, log_path)
        self._running.append(service)
        return service

    def running(self) -> list[Service]:
        return list(self._running)

    def stop(self, service: Service) -> None:
        if service in self._running:
            self._running.remove(service)
        service.stop()

    def __exit__(self, *exc: object) -> None:
        while self._running:
            self._running.pop().stop()


def wait_until(check: Callable[[], bool], service: Service | None, what: str, timeout: float) -> None:
    """Poll check() until true; fail fast with the log tail if the service dies meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service is not None and not service.alive():
            raise ServiceError(f"{service.name} exited ({service.proc.returncode}):\n{service.log_tail()}")
        if check():
            return
        time.sleep(0.05)
    tail = f":\n{service.log_tail()}" if service is not None else ""
    raise ServiceError(f"{what} not ready after {timeout:.0f} s{tail}")


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """Status and body, or (0, b"") when nothing answers; for readiness probes, not for load."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as err:
        return int(err.code), b""
    except (OSError, ValueError):
        return 0, b""


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_serving(url: str, body: str, service: Service | None, timeout: float = READY_TIMEOUT_S) -> None:
    """Ready means the full path answers 200 with the upstream's body, not merely that a port is open."""
    wait_until(lambda: http_get(url) == (200, body.encode()), service, url, timeout)


# --------------------------------------------------------------------------- upstream


@dataclass
class Upstream:
    kind: str  # "nginx" or "python"
    port: int
    body: str
    service: Service

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/"


def _nginx_quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + '"'


def nginx_conf(workdir: Path, http_body: str) -> str:
    """A self-contained single-process nginx config: every path under workdir, nothing in /var."""
    temps = "\n".join(
        f"    {kind}_temp_path {workdir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
daemon off;
master_process off;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000;
    keepalive_timeout 60s;
{temps}
{http_body}
}}
"""


def start_nginx(services: Services, name: str, workdir: Path, http_body: str, core: int | None) -> Service:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, http_body))
    argv = ["nginx", "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)]
    return services.start(name, argv, core)


def start_upstream(
    services: Services, workdir: Path, body: str = HELLO, name: str = "upstream", core: int | None = LOAD_CORE
) -> Upstream:
    """A fixed-body 200 server, nginx when installed (fast enough never to be the bottleneck)."""
    port = free_port()
    if shutil.which("nginx"):
        server = f"""    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 {_nginx_quote(body)}; }}
    }}"""
        service = start_nginx(services, name, workdir / name, server, core)
        kind = "nginx"
    else:
        argv = [sys.executable, "-m", "bench.harness", "upstream", "--port", str(port), "--body", body]
        service = services.start(name, argv, core)
        kind = "python"
    upstream = Upstream(kind, port, body, service)
    wait_serving(upstream.url, body, service)
    return upstream


class FixedResponse(asyncio.Protocol):
    """Answers every request head with the same response; enough for bodiless GETs from wrk."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's TCPTransport does not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.pending += data
        heads = self.pending.count(b"\r\n\r\n")
        if heads and self.transport is not None:
            self.pending = self.pending[self.pending.rfind(b"\r\n\r\n") + 4 :]
            self.answer(self.transport, heads)

    def answer(self, transport: asyncio.Transport, heads: int) -> None:
        """Answer ``heads`` complete request heads, in order (a subclass may answer otherwise)."""
        transport.write(self.response * heads)


def serve_fixed(port: int, body: str) -> None:
    """Fallback upstream when nginx is missing; runs until SIGTERM."""
    payload = body.encode()
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: FixedResponse(response), "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    run_async(main)


# --------------------------------------------------------------------------- bgproxy


@dataclass
class Bgproxy:
    service: Service
    port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"


def interpreted_copy(directory: Path) -> Path:
    """Copy the package's sources, without compiled modules, into directory; put it on PYTHONPATH.

    PYTHONPATH comes before the editable install's finder, so a child started with it runs the
    interpreted data plane: the BGPROXY_PURE=1 build, side by side with the installed one.
    """
    shutil.copytree(
        REPO_ROOT / "bgproxy", directory / "bgproxy", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    return directory


def bgproxy_executable() -> str:
    """The console script next to the running interpreter (the repo venv), else whatever is on PATH."""
    local = Path(sys.executable).parent / "bgproxy"
    return str(local) if local.exists() else (shutil.which("bgproxy") or str(local))


def start_bgproxy(
    services: Services,
    workdir: Path,
    blue: Sequence[str],
    green: Sequence[str],
    *,
    weights: tuple[int, int] = (100, 0),
    metrics: bool = True,
    name: str = "bgproxy",
    core: int | None = PROXY_CORE,
    pythonpath: Path | None = None,
    extra: str = "",
) -> Bgproxy:
    """Write a config, start `bgproxy run`, and wait until the admin /healthz (or the proxy port) answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    port, admin_port = free_port(), free_port()
    config = workdir / f"{name}.yaml"
    config.write_text(
        f"""listen: 127.0.0.1:{port}
admin: {{listen: 127.0.0.1:{admin_port}}}
pools:
  blue: {{upstreams: [{", ".join(f'"{u}"' for u in blue)}]}}
  green: {{upstreams: [{", ".join(f'"{u}"' for u in green)}]}}
weights: {{blue: {weights[0]}, green: {weights[1]}}}
state_file: {workdir / f"{name}-state.json"}
metrics: {{enabled: {"true" if metrics else "false"}}}
{extra}"""
    )
    # BGPROXY_LISTEN would override our listen address; the container sets it, a developer shell might.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGPROXY_")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    argv = [bgproxy_executable(), "run", "--config", str(config)]
    service = services.start(name, argv, core, env=env, cwd=workdir)
    handle = Bgproxy(service, port, admin_port)
    wait_until(
        lambda: http_get(f"{handle.admin_url}/healthz")[0] == 200 or tcp_open(port),
        service,
        f"{name} admin /healthz",
        READY_TIMEOUT_S,
    )
    return handle


# --------------------------------------------------------------------------- wrk

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)


@dataclass
class WrkResult:
    requests_per_sec: float
    latency_ms: dict[str, float]  # p50/p75/p90/p99 from wrk --latency
    requests: int
    non2xx: int  # wrk's "Non-2xx or 3xx responses" (it counts status >= 400)
    socket_errors: dict[str, int] = field(default_factory=dict)  # connect/read/write/timeout
    # CPU (user + system) the proxy process used per request during the run; None without a proxy.
    proxy_cpu_us: float | None = None

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "requests_per_sec": self.requests_per_sec,
            "latency_ms": self.latency_ms,
            "requests": self.requests,
            "non2xx": self.non2xx,
            "socket_errors": self.socket_errors,
            "proxy_cpu_us_per_request": self.proxy_cpu_us,
            "errors": self.errors,
        }


def parse_wrk(text: str) -> WrkResult:
    """Parse `wrk --latency` output; raise ValueError if it isn't there (wrk failed or was cut short)."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in ", text, re.M)
    if rps is None or total is None:
        raise ValueError(f"not wrk output:\n{text[-800:]}")
    latency = {f"p{pct}": float(value) * _UNITS_MS[unit] for pct, value, unit in _PERCENTILE.findall(text)}
    missing = ", ".join(p for p in ("p50", "p75", "p90", "p99") if p not in latency)
    if missing:  # else the table would show nan and the JSON lack latencies, with no hint why
        raise ValueError(f"wrk output has no {missing} latency (was --latency given?):\n{text[-800:]}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
        if sock
        else {}
    )
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return WrkResult(
        requests_per_sec=float(rps.group(1)),
        latency_ms=latency,
        requests=int(total.group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=socket_errors,
    )


def wrk_ready() -> bool:
    """The preflight of the wrk benches: False (and how to install it) without wrk; warns if unpinned."""
    if shutil.which("wrk") is None:
        log("wrk is not installed (bash .ci/system-deps installs it)")
        return False
    if not pinning_available():
        log("warning: taskset or a second CPU is missing; running unpinned, expect more noise")
    return True


@dataclass(frozen=True)
class WrkOptions:
    """The options every wrk bench takes, so their names, help, --quick and bounds mean the same in each."""

    per: str  # what gets warmed up and run repeatedly, for the help texts: "cell", "variant"
    runs: int
    quick_runs: int
    output: Path

    def add(
        self,
        parser: argparse.ArgumentParser,
        own: Callable[[argparse.ArgumentParser], object] | None = None,
    ) -> None:
        """Add the options; own(parser) adds the script's own ones between --connections and --quick."""
        parser.add_argument("--duration", type=int, default=10, help="seconds per measured run (default 10)")
        parser.add_argument(
            "--runs", type=int, default=self.runs, help=f"measured runs per {self.per}; the median is kept"
        )
        parser.add_argument(
            "--warmup", type=int, default=2, help=f"seconds of discarded warm-up per {self.per}"
        )
        parser.add_argument("--connections", default="50,10", help="comma list of wrk -c values")
        if own is not None:
            own(parser)
        runs = f"{self.quick_runs} run{'s' if self.quick_runs != 1 else ''}"
        parser.add_argument("--quick", action="store_true", help=f"smoke test: {runs} of 3 s, 1 s warm-up")
        parser.add_argument("--output", type=Path, default=self.output, help="JSON results path")

    def parse(
        self,
        parser: argparse.ArgumentParser,
        argv: list[str] | None,
        own: Callable[[argparse.Namespace], object] | None = None,
    ) -> argparse.Namespace:
        """Parse argv, apply --quick, split --connections, check own(args), then the shared bounds."""
        args = parser.parse_args(argv)
        if args.quick:
            args.duration, args.runs, args.warmup = 3, self.quick_runs, 1
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
        if own is not None:
            own(args)
        if args.duration < 1 or args.runs < 1 or args.warmup < 0 or not args.connections:
            parser.error("--duration and --runs must be >= 1, --warmup >= 0, --connections non-empty")
        return args


def run_wrk(
    url: str,
    connections: int,
    duration_s: int,
    core: int | None = LOAD_CORE,
    proxy_pid: int | None = None,
    headers: Sequence[str] = (),
) -> WrkResult:
    """One single-threaded wrk run; killed if it outlives its duration by 15 s.

    With proxy_pid, the result also carries that process's CPU per request during the run; each of
    ``headers`` ("Name: value") is sent with every request.
    """
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "2s", "--latency"]
    argv += [arg for header in headers for arg in ("-H", header)] + [url]
    cpu_before = cpu_seconds(proxy_pid) if proxy_pid else 0.0
    try:
        done = subprocess.run(
            pinned(argv, core), capture_output=True, text=True, timeout=duration_s + 15, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"wrk still running {err.timeout:.0f} s after start; killed") from None
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout[-400:]}")
    result = parse_wrk(done.stdout)
    if proxy_pid and result.requests:
        result.proxy_cpu_us = (cpu_seconds(proxy_pid) - cpu_before) / result.requests * 1e6
    return result


def median_run(runs: Sequence[WrkResult]) -> WrkResult:
    """The run with the median req/s (lower middle for even counts), so its latencies belong to one run."""
    ordered = sorted(runs, key=lambda r: r.requests_per_sec)
    return ordered[(len(ordered) - 1) // 2]


def spread_pct(runs: Sequence[WrkResult]) -> float:
    """(max - min) / median of req/s: how noisy this cell was; above ~10 % treat ratios with care."""
    values = [r.requests_per_sec for r in runs]
    mid = statistics.median(values)
    return 100.0 * (max(values) - min(values)) / mid if mid else 0.0


# --------------------------------------------------------------------------- reporting


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain aligned text: first column left, the rest right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def tool_version(argv: Sequence[str]) -> str:
    """First line a tool prints about its version, for the results' provenance; '' if it won't say."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else ""


def write_report(path: Path, report: dict[str, object]) -> None:
    """The JSON results next to the printed table: every run, not only the medians."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {path}")


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so with/finally blocks stop the children, as Ctrl-C already does."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def bench_session(prefix: str) -> Iterator[tuple[Path, Services]]:
    """A temp workdir and the children started in it; both gone on return, exception, Ctrl-C or SIGTERM."""
    with (
        sigterm_as_exit(),
        tempfile.TemporaryDirectory(prefix=prefix) as tmp,
        Services(Path(tmp)) as services,
    ):
        yield Path(tmp), services


def run_main(main: Callable[[], int]) -> NoReturn:
    """A bench's `__main__`: exit with main()'s status, or 130 on Ctrl-C once the children are stopped."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; children stopped")
        sys.exit(130)


def main() -> None:
    """`python -m bench.harness upstream --port N`: the pure-Python fallback upstream."""
    parser = argparse.ArgumentParser(prog="python -m bench.harness")
    sub = parser.add_subparsers(dest="command", required=True)
    upstream = sub.add_parser("upstream", help="fixed-body HTTP/1.1 server on 127.0.0.1")
    upstream.add_argument("--port", type=int, required=True)
    upstream.add_argument("--body", default=HELLO)
    args = parser.parse_args()
    serve_fixed(args.port, args.body)


if __name__ == "__main__":
    main()
