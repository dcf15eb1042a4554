"""Hot changes under load: SIGHUP reloads, pool membership changes and takeover upgrades under wrk.

python -m bench.hot_changes [--duration 40] [--reloads 20] [--changes 20] [--takeovers 5]

Four fixed-body upstreams (nginx, else the Python fallback) on the load core: blue starts with two,
a third is the spare that membership changes rotate in and out, green (weight 0) has the fourth. One
``bgproxy run --config FILE`` (``runtime_socket`` set, ``shutdown_timeout: 2``) on the proxy core, as
is every process that takes over from it; wrk on the load core. This process, the driver, is left
unpinned (it mostly sleeps).

wrk (``-t2 -c50 --latency --timeout 2s``, keep-alive) runs three times for the same duration: with
nothing changing (the baseline), then while a driver in this process performs, interleaved and spread
over the run, one at a time, the changes below, then with nothing changing again on the process that
took over last (the baseline after: how far this box drifted meanwhile, and that the last process
serves as well as the first):

- **reload**: rewrite the config (``drain_timeout`` alternating 30 / 31) and ``kill -HUP`` the current
  process; done when ``GET /v1/state`` shows a new ``last_reload`` with ``ok`` and ``changed:
  [drain_timeout]``;
- **membership change**: on blue, in turn ``POST`` (add the spare), ``DELETE`` (the oldest member),
  ``PUT`` (members + spare), ``PUT`` (members without the oldest), so blue keeps two or three
  upstreams; done when the API answers 200 with the expected list;
- **takeover**: ``bgproxy run --config FILE --takeover RUNTIME_SOCKET``; done when the old process has
  exited with 0 (it drains like on SIGTERM); the next SIGHUP goes to the new process, the next
  takeover waits for its runtime socket and its ``/readyz``.

Printed: requests, req/s, p50/p99 and errors of the three wrk runs, each kind of change done / planned with
its median and max time, and the verdict: PASS needs 0 non-2xx and 0 socket errors in the run with
changes and every change done and ok before wrk ended. JSON in bench/results/hot_changes.json; exit
status 1 on FAIL. Everything listens on 127.0.0.1; every child is killed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import (
    LOAD_CORE,
    PROXY_CORE,
    REPO_ROOT,
    Bgproxy,
    Service,
    ServiceError,
    Services,
    WrkResult,
    bench_session,
    bgproxy_executable,
    format_table,
    http_get,
    log,
    parse_wrk,
    pinned,
    pinning_available,
    run_main,
    start_bgproxy,
    start_upstream,
    tool_version,
    wait_serving,
    wait_until,
    write_report,
    wrk_ready,
)

OUTPUT = REPO_ROOT / "bench" / "results" / "hot_changes.json"
KINDS = ("reload", "membership", "takeover")
SHUTDOWN_TIMEOUT_S = 2.0
DRAIN_TIMEOUTS = (30, 31)  # what each reload alternates: harmless, and visible in last_reload.changed
API_TIMEOUT_S = 5.0
RELOAD_WAIT_S = 5.0
EXIT_WAIT_S = SHUTDOWN_TIMEOUT_S + 10.0  # the old process must be gone by then
POLL_S = 0.01
WRK_TIMEOUT = "2s"  # a stall longer than this is a socket timeout error, not just a slow answer
REASON = "bench.hot_changes"
# What the new process logs once the old one confirmed the handover ("took over the listeners", "took
# over: this process takes changes now"): only for the handover time, never for pass or fail.
TOOK_OVER = "took over"


# --------------------------------------------------------------------------- plan


def plan(counts: dict[str, int]) -> list[str]:
    """The changes in the order they run: each kind spread evenly over the sequence, interleaved.

    Slot i goes to the kind furthest behind its even share at the middle of the slot (ties in KINDS
    order), so 20/20/5 gives reload, membership, reload, ... with a takeover about every ninth slot.
    """
    total = sum(counts.values())
    done = dict.fromkeys(counts, 0)
    order: list[str] = []
    for slot in range(total):
        behind = {k: n * (slot + 0.5) / total - done[k] for k, n in counts.items() if done[k] < n}
        kind = max(behind, key=lambda k: (behind[k], -KINDS.index(k)))
        done[kind] += 1
        order.append(kind)
    return order


# --------------------------------------------------------------------------- the admin API


def api(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    """Status and JSON body of one admin API call (status 0 and the error when nothing answered)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=API_TIMEOUT_S) as resp:
            return int(resp.status), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        try:
            return int(err.code), json.loads(err.read() or b"null")
        except ValueError:
            return int(err.code), None
    except (OSError, ValueError) as err:
        return 0, {"error": repr(err)}


# --------------------------------------------------------------------------- the driver


@dataclass
class Done:
    kind: str
    index: int  # 1-based within its kind
    at_s: float  # seconds after wrk started
    ms: float
    ok: bool
    detail: str = ""
    handover_ms: float | None = None  # takeovers: until the new process accepted on the listeners

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "index": self.index,
            "at_s": round(self.at_s, 3),
            "ms": round(self.ms, 1),
            "ok": self.ok,
            "detail": self.detail,
            "handover_ms": None if self.handover_ms is None else round(self.handover_ms, 1),
        }


@dataclass
class Driver:
    """Performs the changes on the running bgproxy, one at a time, and records each one."""

    services: Services
    workdir: Path
    config: Path
    runtime_socket: Path
    admin_url: str
    current: Service  # the process that accepts now: SIGHUP and the next takeover go to it
    members: list[str]  # blue's upstreams, oldest first
    spares: list[str]  # upstreams that can be added to blue
    env: dict[str, str]
    started: float = 0.0  # time.monotonic() when wrk started
    done: list[Done] = field(default_factory=list)
    generation: int = 1
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    processes: list[dict[str, object]] = field(default_factory=list)  # every bgproxy: pid, log, exit
    handover_ms: float | None = None  # set by takeover() for the record of that change:
    exit_ms: float | None = None  # its time is until the old process exited, not until /readyz

    def run(self, order: list[str], start_s: float, end_s: float, deadline_s: float) -> list[str]:
        """Slot i starts at start_s + i * step (or when slot i - 1 is done); none starts after deadline_s.

        Returns the kinds that did not run.
        """
        step = (end_s - start_s) / max(len(order) - 1, 1)
        for i, kind in enumerate(order):
            wait = self.started + start_s + i * step - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            if time.monotonic() - self.started > deadline_s:
                return order[i:]
            self.counts[kind] += 1
            began = time.monotonic()
            ok, detail = {"reload": self.reload, "membership": self.membership, "takeover": self.takeover}[
                kind
            ]()
            took = (time.monotonic() - began) * 1000 if self.exit_ms is None else self.exit_ms
            record = Done(kind, self.counts[kind], began - self.started, took, ok, detail, self.handover_ms)
            self.handover_ms = self.exit_ms = None
            self.done.append(record)
            if not ok:
                log(f"  {kind} {record.index} FAILED after {record.ms:.0f} ms: {detail}")
        return []

    # -- reload --------------------------------------------------------------------------------------
    def reload(self) -> tuple[bool, str]:
        """Rewrite drain_timeout, SIGHUP the current process, wait for a new last_reload in /v1/state."""
        drain = DRAIN_TIMEOUTS[(self.counts["reload"] - 1) % 2]  # 30, 31, 30, ...: the file starts at 31
        text = re.sub(r"(?m)^drain_timeout: .*$", f"drain_timeout: {drain}", self.config.read_text())
        status, state = api("GET", f"{self.admin_url}/v1/state")
        if status != 200 or not isinstance(state, dict) or "last_reload" not in state:
            return False, f"GET /v1/state before, no last_reload: {status} {json.dumps(state)[:300]}"
        before = state["last_reload"]
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config)  # atomic: the reload never reads half a file
        os.kill(self.current.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_WAIT_S
        while time.monotonic() < deadline:
            status, state = api("GET", f"{self.admin_url}/v1/state")
            last = state.get("last_reload") if status == 200 and isinstance(state, dict) else None
            if last is not None and last != before:
                ok = last.get("ok") is True and last.get("changed") == ["drain_timeout"]
                return ok, "" if ok else f"last_reload {json.dumps(last)}"
            time.sleep(POLL_S)
        return False, f"no new last_reload in /v1/state {RELOAD_WAIT_S:.0f} s after SIGHUP"

    # -- membership ----------------------------------------------------------------------------------
    def membership(self) -> tuple[bool, str]:
        """Add, remove, grow by PUT, shrink by PUT, in turn: blue keeps 2 or 3 upstreams, all rotating."""
        base = f"{self.admin_url}/v1/pools/blue/upstreams"
        members = self.members
        grow = len(members) < 3  # from what blue has, so a refused change does not shift the pattern
        by_put = (self.counts["membership"] - 1) // 2 % 2 == 1  # POST, DELETE, PUT, PUT, POST, ...
        if grow and not by_put:
            spare = self.spares[0]
            expected = [*members, spare]
            what = f"POST {spare}"
            status, body = api("POST", base, {"upstream": spare, "reason": REASON})
        elif not grow and not by_put:
            oldest = members[0]
            expected = members[1:]
            what = f"DELETE {oldest}"
            status, body = api("DELETE", f"{base}/{oldest}", {"reason": REASON})
        elif grow:
            expected = [*members, self.spares[0]]
            what = f"PUT {expected}"
            status, body = api("PUT", base, {"upstreams": expected, "reason": REASON})
        else:
            expected = members[1:]
            what = f"PUT {expected}"
            status, body = api("PUT", base, {"upstreams": expected, "reason": REASON})
        if status != 200 or not isinstance(body, dict) or body.get("upstreams") != expected:
            return False, f"{what}: {status} {json.dumps(body)[:300]}"
        self.spares = [
            *[m for m in members if m not in expected],
            *[s for s in self.spares if s not in expected],
        ]
        self.members = expected
        return True, what

    # -- takeover ------------------------------------------------------------------------------------
    def takeover(self) -> tuple[bool, str]:
        """Start the next bgproxy with --takeover; done once the old one has exited (0 expected)."""
        old = self.current
        self.generation += 1
        name = f"bgproxy-{self.generation}"
        argv = [
            bgproxy_executable(),
            "run",
            "--config",
            str(self.config),
            "--takeover",
            str(self.runtime_socket),
        ]
        began = time.monotonic()
        new = self.services.start(name, argv, PROXY_CORE, env=self.env, cwd=self.workdir)
        handed_ms: float | None = None
        deadline = began + EXIT_WAIT_S
        while old.alive():
            if not new.alive():
                return False, f"{name} exited {new.proc.returncode}:\n{new.log_tail()}"
            if time.monotonic() > deadline:
                return False, f"{old.name} still running {EXIT_WAIT_S:.0f} s after the takeover began"
            if handed_ms is None and TOOK_OVER in _read(new.log_path):
                handed_ms = (time.monotonic() - began) * 1000
            time.sleep(POLL_S)
        exit_ms = (time.monotonic() - began) * 1000
        code = old.proc.returncode
        self.processes.append({"name": old.name, "pid": old.proc.pid, "exit": code, "log": old.log_path.name})
        self.services.stop(old)  # reaped already; only forget it
        self.current = new
        if not new.alive():
            return False, f"{name} exited {new.proc.returncode}:\n{new.log_tail()}"
        if handed_ms is None and TOOK_OVER in _read(new.log_path):
            handed_ms = exit_ms  # logged while the old one exited: no better bound
        self.handover_ms, self.exit_ms = handed_ms, exit_ms  # handed_ms None: the line was not found
        try:  # ready for the next change: the runtime socket is the new one's, /readyz answers
            wait_until(
                lambda: self.runtime_socket.exists() and http_get(f"{self.admin_url}/readyz")[0] == 200,
                new,
                f"{name} runtime socket and /readyz",
                5.0,
            )
        except ServiceError as err:
            return False, str(err)
        handed = "handover not logged" if handed_ms is None else f"handed over after {handed_ms:.0f} ms"
        detail = f"{handed}, {old.name} exited {code} after {exit_ms:.0f} ms"
        if code != 0:
            detail += f":\n{old.log_tail(8)}"
        return code == 0, detail


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------- wrk


@dataclass
class Load:
    """One wrk run in the background (pinned to the load core with the upstreams)."""

    url: str
    duration_s: int
    connections: int
    threads: int
    proc: subprocess.Popen[str] | None = None
    started: float = 0.0

    def start(self) -> None:
        argv = [
            "wrk",
            f"-t{self.threads}",
            f"-c{self.connections}",
            f"-d{self.duration_s}s",
            "--timeout",
            WRK_TIMEOUT,
            "--latency",
            self.url,
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            pinned(argv, LOAD_CORE), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def result(self) -> WrkResult:
        assert self.proc is not None
        try:
            out, err = self.proc.communicate(timeout=self.duration_s + 15)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"wrk still running {self.duration_s + 15} s after start; killed") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"wrk exited {self.proc.returncode}: {err.strip() or out[-400:]}")
        return parse_wrk(out)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def run_wrk_for(url: str, duration_s: int, connections: int, threads: int) -> WrkResult:
    load = Load(url, duration_s, connections, threads)
    load.start()
    try:
        return load.result()
    finally:
        load.kill()


# --------------------------------------------------------------------------- the bench


@dataclass
class Options:
    duration: int = 40
    baseline: int | None = None  # seconds of the baseline run; None: same as duration, 0: none
    warmup: int = 2
    reloads: int = 20
    changes: int = 20
    takeovers: int = 5
    connections: int = 50
    threads: int = 2

    @property
    def baseline_s(self) -> int:
        return self.duration if self.baseline is None else self.baseline

    def window(self) -> tuple[float, float, float]:
        """When the first and last change are due and after when none starts (s after wrk started)."""
        lead = min(2.0, self.duration * 0.1)
        deadline = self.duration - 0.5
        last = max(lead, self.duration - min(5.0, self.duration * 0.3))
        return lead, last, deadline


def run_bench(opts: Options) -> dict[str, Any]:
    """Start everything, run the baselines and the run with changes; the report (see the docstring)."""
    counts = {"reload": opts.reloads, "membership": opts.changes, "takeover": opts.takeovers}
    order = plan(counts)
    with bench_session("bgproxy-hot-") as (workdir, services):
        ups = [start_upstream(services, workdir, name=f"up{i}") for i in range(1, 5)]
        blue, spare, green = [u.address for u in ups[:2]], ups[2].address, ups[3].address
        proxy = _start_first(services, workdir, blue, [green])
        wait_serving(proxy.url, ups[0].body, proxy.service)
        log(f"upstreams: {ups[0].kind} blue {blue}, spare {spare}, green {green}; bgproxy {proxy.url}")
        if opts.warmup:
            log(f"warm-up {opts.warmup} s")
            run_wrk_for(proxy.url, opts.warmup, opts.connections, opts.threads)
        baseline = None
        if opts.baseline_s:
            log(f"baseline: wrk {opts.baseline_s} s, no changes")
            baseline = run_wrk_for(proxy.url, opts.baseline_s, opts.connections, opts.threads)
        driver = Driver(
            services,
            workdir,
            workdir / "bgproxy-1.yaml",  # every process runs the config start_bgproxy wrote
            workdir / "runtime.sock",
            proxy.admin_url,
            proxy.service,
            list(blue),
            [spare],
            _env(),
        )
        lead, last, deadline = opts.window()
        log(
            f"with changes: wrk {opts.duration} s; {opts.reloads} reloads, {opts.changes} membership "
            f"changes, {opts.takeovers} takeovers between {lead:g} s and {last:g} s"
        )
        load = Load(proxy.url, opts.duration, opts.connections, opts.threads)
        load.start()
        try:
            driver.started = load.started
            skipped = driver.run(order, lead, last, deadline)
            finished_s = time.monotonic() - load.started
            during = load.result()
        finally:
            load.kill()
        final = driver.current
        after = None
        if opts.baseline_s and final.alive():
            log(f"baseline after: wrk {opts.baseline_s} s, no changes (the last process)")
            after = run_wrk_for(proxy.url, opts.baseline_s, opts.connections, opts.threads)
        alive = final.alive()
        processes = [*driver.processes, {"name": final.name, "pid": final.proc.pid, "exit": None}]
        problems = _problems(driver, skipped, finished_s, opts.duration, alive, during)
        for name, run in (("baseline before", baseline), ("baseline after", after)):
            if run is not None and run.errors:
                problems.append(f"{name}: {run.non2xx} non-2xx, socket errors {run.socket_errors}")
        report: dict[str, Any] = {
            "meta": {
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "pinned": pinning_available(),
                "upstream": ups[0].kind,
                "wrk": tool_version(["wrk", "--version"]),
                "duration_s": opts.duration,
                "baseline_s": opts.baseline_s,
                "warmup_s": opts.warmup,
                "connections": opts.connections,
                "threads": opts.threads,
                "wrk_timeout": WRK_TIMEOUT,
                "shutdown_timeout_s": SHUTDOWN_TIMEOUT_S,
                "planned": counts,
                "window_s": [lead, last, deadline],
            },
            "baseline": baseline.as_dict() if baseline else None,
            "baseline_after": after.as_dict() if after else None,
            "during": during.as_dict(),
            "changes": summarize(driver.done, counts),
            "changes_done_s": round(finished_s, 2),
            "events": [d.as_dict() for d in driver.done],
            "processes": processes,
            "problems": problems,
            "passed": not problems,
        }
        if problems:
            report["final_log_tail"] = final.log_tail(40)
    return report


def _start_first(services: Services, workdir: Path, blue: list[str], green: list[str]) -> Bgproxy:
    """The first bgproxy: start_bgproxy with the runtime socket and a short shutdown_timeout."""
    extra = (
        f"runtime_socket: {workdir / 'runtime.sock'}\n"
        f"shutdown_timeout: {SHUTDOWN_TIMEOUT_S:g}\n"
        f"drain_timeout: {DRAIN_TIMEOUTS[1]}\n"
    )
    proxy = start_bgproxy(services, workdir, blue, green, name="bgproxy-1", extra=extra)
    wait_until((workdir / "runtime.sock").exists, proxy.service, "runtime socket", 5.0)
    return proxy


def _env() -> dict[str, str]:
    """As start_bgproxy: BGPROXY_* from the shell (BGPROXY_LISTEN ...) would override the config."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BGPROXY_")}


def _problems(
    driver: Driver, skipped: list[str], finished_s: float, duration: int, alive: bool, during: WrkResult
) -> list[str]:
    problems = [f"{d.kind} {d.index}: {d.detail}" for d in driver.done if not d.ok]
    if skipped:
        problems.append(f"{len(skipped)} change(s) did not fit in the run: {', '.join(skipped)}")
    if finished_s > duration:
        problems.append(
            f"the last change ended {finished_s:.1f} s after wrk started, after wrk's {duration} s"
        )
    if not alive:
        problems.append(f"{driver.current.name} is not running at the end:\n{driver.current.log_tail()}")
    if during.non2xx:
        problems.append(f"wrk saw {during.non2xx} non-2xx responses")
    if sum(during.socket_errors.values()):
        problems.append(f"wrk saw socket errors {during.socket_errors}")
    if during.requests == 0:
        problems.append("wrk got no answer at all")
    return problems


def summarize(done: list[Done], counts: dict[str, int]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [d for d in done if d.kind == kind]
        times = [d.ms for d in mine if d.ok]
        handovers = [d.handover_ms for d in mine if d.ok and d.handover_ms is not None]
        summary[kind] = {
            "planned": counts[kind],
            "done": len(mine),
            "ok": sum(1 for d in mine if d.ok),
            "median_ms": round(statistics.median(times), 1) if times else None,
            "max_ms": round(max(times), 1) if times else None,
        }
        if kind == "takeover":
            summary[kind]["handover_median_ms"] = (
                round(statistics.median(handovers), 1) if handovers else None
            )
            summary[kind]["handover_max_ms"] = round(max(handovers), 1) if handovers else None
    return summary


# --------------------------------------------------------------------------- output

WHAT = {
    "reload": "SIGHUP reload (signal -> outcome ok)",
    "membership": "membership change (API call)",
    "takeover": "takeover (start -> old process exited)",
}


def render(report: dict[str, Any]) -> str:
    def row(name: str, r: dict[str, Any]) -> list[object]:
        sock = r["socket_errors"]
        return [
            name,
            f"{r['requests']:,}",
            f"{r['requests_per_sec']:,.0f}",
            f"{r['latency_ms']['p50']:.2f}",
            f"{r['latency_ms']['p99']:.2f}",
            r["non2xx"],
            "/".join(str(sock.get(k, 0)) for k in ("connect", "read", "write", "timeout")),
        ]

    meta = report["meta"]
    headers = ["wrk run", "requests", "req/s", "p50 ms", "p99 ms", "non-2xx", "socket c/r/w/t"]
    runs = [
        (f"baseline before ({meta['baseline_s']} s)", report["baseline"]),
        (f"with changes ({meta['duration_s']} s)", report["during"]),
        (f"baseline after ({meta['baseline_s']} s)", report["baseline_after"]),
    ]
    text = format_table(headers, [row(name, r) for name, r in runs if r is not None])  # --baseline 0: none

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    changes = [
        [WHAT[kind], f"{s['ok']}/{s['planned']}", ms(s["median_ms"]), ms(s["max_ms"])]
        for kind, s in report["changes"].items()
    ]
    takeover = report["changes"]["takeover"]
    if takeover["done"]:
        changes.append(
            [
                "  of which: start -> new process accepting",
                "",
                ms(takeover["handover_median_ms"]),
                ms(takeover["handover_max_ms"]),
            ]
        )
    text += "\n\n" + format_table(["change", "ok/planned", "median ms", "max ms"], changes)
    bases = [b for b in (report["baseline"], report["baseline_after"]) if b]
    during = report["during"]
    if bases:
        base_rps = statistics.mean(b["requests_per_sec"] for b in bases)
        base_p99 = statistics.mean(b["latency_ms"]["p99"] for b in bases)
        rps = during["requests_per_sec"] / base_rps
        p99 = during["latency_ms"]["p99"] / base_p99
        text += f"\n\nwith changes vs the mean of the baselines: req/s x{rps:.2f}, p99 x{p99:.2f}"
        if len(bases) == 2:
            drift = bases[1]["requests_per_sec"] / bases[0]["requests_per_sec"]
            text += f" (baseline after / before, req/s: x{drift:.2f}: this box's drift)"
    verdict = "PASS" if report["passed"] else "FAIL"
    text += f"\n0 non-2xx and 0 socket errors with every change done: {verdict}"
    for problem in report["problems"]:
        text += f"\nPROBLEM: {problem}"
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.hot_changes", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=40, help="seconds of each wrk run (default 40)")
    parser.add_argument(
        "--baseline",
        type=int,
        default=None,
        help="seconds of each baseline run, before and after (default: --duration; 0: none)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="seconds of discarded warm-up (default 2)")
    parser.add_argument("--reloads", type=int, default=20, help="SIGHUP reloads (default 20)")
    parser.add_argument("--changes", type=int, default=20, help="membership changes (default 20)")
    parser.add_argument("--takeovers", type=int, default=5, help="takeover upgrades (default 5)")
    parser.add_argument("--connections", type=int, default=50, help="wrk -c (default 50)")
    parser.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="JSON results path")
    args = parser.parse_args(argv)
    if not 3 <= args.duration <= 600 or (args.baseline is not None and not 0 <= args.baseline <= 600):
        parser.error("need 3 <= --duration <= 600 and 0 <= --baseline <= 600")
    if min(args.reloads, args.changes, args.takeovers, args.warmup) < 0:
        parser.error("--reloads, --changes, --takeovers and --warmup must be >= 0")
    if not 1 <= args.threads <= args.connections <= 5000:
        parser.error("need 1 <= --threads <= --connections <= 5000")
    args.options = Options(
        args.duration,
        args.baseline,
        args.warmup,
        args.reloads,
        args.changes,
        args.takeovers,
        args.connections,
        args.threads,
    )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not wrk_ready():
        return 1
    # This process (the driver, mostly asleep) is deliberately not pinned: pin_load_client() would
    # narrow its affinity to the load core, and every bgproxy it starts later (the takeovers) would
    # inherit that instead of being pinned to the proxy core. wrk_ready() warns if pinning is missing.
    try:
        report = run_bench(args.options)
    except (ServiceError, RuntimeError, ValueError) as err:
        log(f"FAILED: {err}")
        return 1
    print(render(report))
    write_report(args.output, report)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    run_main(main)
