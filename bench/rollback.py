"""Rollback under load: how fast a guarded rollout takes traffic off a failing candidate, and at what cost.

python -m bench.rollback [--runs 3] [--rate 1000] [--faults always-503,500-10pct,latency-300ms]

Blue (stable) is a fixed-body upstream (nginx, else the Python fallback); green (the candidate) is a
small asyncio server in this process that can be told to misbehave. A paced open-loop client sends
RATE GET/s through a fresh bgproxy (new temp dir and state file every run), then
``POST /v1/rollouts {"to": "green", "steps": [5, 100], "step_pause": "1h", ...}``. Once the rollout
answers "running" at 5%, the fault is switched on in green and the wall-clock time of the first bad
response green actually sends is kept. The load goes on until the rollout has rolled back (or
--max-seconds passed), plus a short tail, and per run the bench reports:

- **to stable-only**: from green's first bad response to the switch event that set blue 100 / green 0
  (``GET /v1/events``; the same clock, both processes on this box), and to the last request that
  still reached green (the data plane's side of the same moment);
- **failed**: client-visible failures (status >= 500 or a connection error) over the whole run, and
  those received before the switch event; blue never fails, so all of them come from the candidate;
- **slow**: answers slower than 250 ms (the latency fault's client-visible cost);
- **judged**: the candidate requests (and errors) in the rollout's evidence when the rule fired.

Faults: ``always-503`` (every answer 503), ``500-10pct`` (each answer 500 with probability 0.1),
``latency-300ms`` (every answer 300 ms late; ``max_p99: 100ms`` lets the p99 rule fire). Medians and
maxima over the runs are printed, with the target for ``always-503``: every run under 1 s to
stable-only weights and under 20 failed requests. Exit status 1 if a run did not roll back, rolled
back before the fault, or the target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import (
    REPO_ROOT,
    FixedResponse,
    ServiceError,
    Services,
    bench_session,
    format_table,
    log,
    pin_load_client,
    pinning_available,
    run_async,
    run_main,
    start_bgproxy,
    start_upstream,
    wait_serving,
    write_report,
)
from bgproxy.core.timefmt import parse_rfc3339

FAULTS = {
    "always-503": "candidate answers 503 always",
    "500-10pct": "10% of the candidate's answers are 500",
    "latency-300ms": "candidate answers 300 ms late",
}
BLUE_BODY = "blue\n"
GREEN_BODY = b"green\n"
EXTRA_LATENCY_S = 0.3
ERROR_SHARE = 0.1
SLOW_S = 0.25  # a client-visible slow answer, reported apart from failures
STEP = 5  # the candidate's share while the fault is on
# The rollout every run starts: one 5% step held for an hour, so only a rule can end it in the run.
ROLLOUT = {
    "to": "green",
    "steps": [STEP, 100],
    "step_pause": "1h",
    "min_requests": 200,
    "bake": "5m",
    "max_error_ratio": 0.005,
    "max_p99": "100ms",  # raised to the next latency bucket bound, 0.1 s with the default buckets
    "reason": "bench.rollback",
}
TARGET_MS = 1000.0
TARGET_FAILED = 20
REQUEST_TIMEOUT_S = 5.0
POLL_S = 0.05
TERMINAL = ("promoted", "rolled_back", "aborted")
OUTPUT = REPO_ROOT / "bench" / "results" / "rollback.json"


# --------------------------------------------------------------------------- the candidate


def _response(status: int, reason: str) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(GREEN_BODY)}\r\n\r\n"
    )
    return head.encode() + GREEN_BODY


OK = _response(200, "OK")
ERROR_500 = _response(500, "Internal Server Error")
ERROR_503 = _response(503, "Service Unavailable")


class Candidate:
    """Green: answers 200 until ``fault_on``, then misbehaves as ``fault`` says; records what it sent.

    Bodiless GETs only (what bgproxy forwards here): a request is a head ending in a blank line.
    """

    def __init__(self, fault: str, seed: int) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}: expected one of {', '.join(FAULTS)}")
        self.fault = fault
        self.rng = random.Random(seed)
        self.fault_on = False
        self.requests = 0  # arrived after the fault was switched on
        self.bad = 0  # bad answers sent
        self.first_bad: float | None = None  # time.time() of the first bad answer sent
        self.last_request: float | None = None  # time.time() of the last request after fault_on
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _CandidateConnection(self), "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def on_request(self, transport: asyncio.Transport) -> None:
        if not self.fault_on:
            transport.write(OK)
            return
        self.requests += 1
        self.last_request = time.time()
        if self.fault == "always-503":
            self._send(transport, ERROR_503, bad=True)
        elif self.fault == "500-10pct":
            bad = self.rng.random() < ERROR_SHARE
            self._send(transport, ERROR_500 if bad else OK, bad=bad)
        else:  # latency-300ms: every answer late; bgproxy sends one request at a time per connection
            asyncio.get_running_loop().call_later(EXTRA_LATENCY_S, self._send, transport, OK, True)

    def _send(self, transport: asyncio.Transport, response: bytes, bad: bool) -> None:
        if transport.is_closing():
            return
        if bad:
            self.bad += 1
            if self.first_bad is None:
                self.first_bad = time.time()
        transport.write(response)


class _CandidateConnection(FixedResponse):
    """The harness's fixed-answer origin, answering as the candidate's fault says."""

    def __init__(self, candidate: Candidate) -> None:
        super().__init__(b"")
        self.candidate = candidate

    def answer(self, transport: asyncio.Transport, heads: int) -> None:
        for _ in range(heads):
            self.candidate.on_request(transport)


# --------------------------------------------------------------------------- the load


@dataclass
class Answer:
    sent: float  # time.time()
    received: float
    status: int  # 0: connection error or timeout
    color: str | None  # from the body; None when it is neither color's

    @property
    def failed(self) -> bool:
        return self.status == 0 or self.status >= 500


@dataclass
class Load:
    """Open loop: request i is sent at start + i / rate whether or not earlier ones have been answered."""

    url: str
    rate: float
    limit: int  # requests at most
    connections: int
    answers: list[Answer] = field(default_factory=list)
    sent: int = 0
    max_lag_s: float = 0.0  # how late the pacer sent a request, at worst
    elapsed_s: float = 0.0
    stopped: bool = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=self.connections)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            interval = 1.0 / self.rate
            start = loop.time()
            while self.sent < self.limit and not self.stopped:
                due = start + self.sent * interval
                now = loop.time()
                if due > now:
                    await asyncio.sleep(due - now)
                    continue
                self.max_lag_s = max(self.max_lag_s, now - due)
                task = loop.create_task(self._one(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                self.sent += 1
            self.elapsed_s = loop.time() - start
            if tasks:
                await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 1)

    async def _one(self, session: aiohttp.ClientSession) -> None:
        sent = time.time()
        try:
            async with session.get(self.url) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError):
            self.answers.append(Answer(sent, time.time(), 0, None))
            return
        color = "blue" if body == BLUE_BODY.encode() else "green" if body == GREEN_BODY else None
        self.answers.append(Answer(sent, time.time(), status, color))


# --------------------------------------------------------------------------- one run


@dataclass
class Options:
    rate: float = 1000.0
    max_seconds: float = 20.0  # after the fault is switched on
    warmup: float = 1.0  # load before the rollout starts
    tail: float = 1.0  # load after the rollback was seen
    connections: int = 64


async def _admin(session: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> tuple[int, Any]:
    async with session.request(method, url, json=body) as resp:
        return resp.status, await resp.json()


async def one_run(
    fault: str, seed: int, blue: str, services: Services, workdir: Path, opts: Options
) -> dict[str, Any]:
    """Fresh bgproxy and candidate, load, rollout at 5%, fault on, until rolled back; the run's figures."""
    candidate = Candidate(fault, seed)
    await candidate.start()
    try:
        proxy = await asyncio.to_thread(start_bgproxy, services, workdir, [blue], [candidate.address])
        try:
            await asyncio.to_thread(wait_serving, proxy.url, BLUE_BODY, proxy.service)
            return await _drive(fault, candidate, proxy.url, proxy.admin_url, opts)
        finally:
            await asyncio.to_thread(services.stop, proxy.service)
    finally:
        candidate.close()


async def _drive(fault: str, candidate: Candidate, url: str, admin: str, opts: Options) -> dict[str, Any]:
    budget = opts.warmup + opts.max_seconds + opts.tail + 2.0
    load = Load(url, opts.rate, limit=math.ceil(opts.rate * budget), connections=opts.connections)
    load_task = asyncio.create_task(load.run())
    problems: list[str] = []
    fault_at: float | None = None
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as api:
        try:
            await asyncio.sleep(opts.warmup)
            status, started = await _admin(api, "POST", f"{admin}/v1/rollouts", ROLLOUT)
            if status != 201 or started.get("state") != "running" or started["weights"]["green"] != STEP:
                problems.append(f"rollout did not start at {STEP}%: {status} {started}")
            else:
                candidate.fault_on = True
                fault_at = time.time()
                while time.time() - fault_at < opts.max_seconds:
                    _, current = await _admin(api, "GET", f"{admin}/v1/rollouts/current")
                    if current.get("state") in TERMINAL:
                        break
                    await asyncio.sleep(POLL_S)
                await asyncio.sleep(opts.tail)
        finally:
            load.stopped = True
            await load_task
        _, rollout = await _admin(api, "GET", f"{admin}/v1/rollouts/current")
        _, events = await _admin(api, "GET", f"{admin}/v1/events")
        events = {"events": [e for e in events["events"] if e["kind"] == "switch"]}
    return figures(fault, candidate, load, rollout, events["events"], fault_at, problems)


def _stable_only_at(events: list[dict[str, Any]]) -> float | None:
    """When the weights went back to blue 100 / green 0 after the candidate's step, from the audit log."""
    stepped = False
    for event in events:
        green = event["to_weights"]["green"]
        if green > 0:
            stepped = True
        elif stepped and event["to_weights"]["blue"] > 0:
            return parse_rfc3339(event["time"])
    return None


def _ms(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else round((later - earlier) * 1000.0, 1)


def figures(
    fault: str,
    candidate: Candidate,
    load: Load,
    rollout: dict[str, Any],
    events: list[dict[str, Any]],
    fault_at: float | None,
    problems: list[str],
) -> dict[str, Any]:
    stable_at = _stable_only_at(events)
    decisions = rollout.get("decisions", [])
    last = decisions[-1] if decisions else None
    decided_at = parse_rfc3339(last["at"]) if last and rollout.get("state") == "rolled_back" else None
    first_bad = candidate.first_bad
    answers = load.answers
    failed = [a for a in answers if a.failed]
    green_seen = [a.received for a in answers if a.color == "green" and fault_at and a.sent >= fault_at]
    # A finished step keeps the evidence it ended with; a step still running shows it as the rollout's.
    step = next((s["evidence"] for s in rollout.get("steps", []) if s["index"] == 0), None)
    evidence = step or rollout.get("evidence") or {}
    judged = evidence.get("candidate", {})
    rolled_back = rollout.get("state") == "rolled_back"
    if not rolled_back:
        problems.append(f"not rolled back: state {rollout.get('state')}")
    if decided_at is not None and fault_at is not None and decided_at < fault_at:
        problems.append("rolled back before the fault was switched on")
    return {
        "fault": fault,
        "state": rollout.get("state"),
        "rule": rollout.get("rule"),
        "rolled_back": rolled_back,
        "to_stable_only_ms": _ms(stable_at, first_bad),
        "to_decision_ms": _ms(decided_at, first_bad),
        "to_last_candidate_request_ms": _ms(candidate.last_request, first_bad),
        "to_last_candidate_answer_ms": _ms(max(green_seen, default=None), first_bad),
        "fault_on_to_first_bad_ms": _ms(first_bad, fault_at),
        "failed": len(failed),
        "failed_before_stable_only": sum(
            1 for a in failed if stable_at is not None and a.received <= stable_at
        ),
        "connection_errors": sum(1 for a in answers if a.status == 0),
        "failed_blue": sum(1 for a in failed if a.color == "blue"),
        "slow": sum(1 for a in answers if a.received - a.sent > SLOW_S),
        "candidate_requests_after_fault": candidate.requests,
        "candidate_bad_answers": candidate.bad,
        "judged_requests": judged.get("requests"),
        "judged_errors": judged.get("errors"),
        "judged_p99": judged.get("p99"),
        "requests": load.sent,
        "answered": len(answers),
        "rate": round(load.sent / load.elapsed_s, 1) if load.elapsed_s else None,
        "max_pacer_lag_ms": round(load.max_lag_s * 1000.0, 1),
        "decisions": decisions,
        "problems": problems,
    }


# --------------------------------------------------------------------------- the bench


def run_bench(faults: Sequence[str], runs: int, opts: Options, seed: int = 1) -> dict[str, Any]:
    """Every fault ``runs`` times, each on a fresh bgproxy; the report (summary per fault and every run)."""
    results: dict[str, list[dict[str, Any]]] = {fault: [] for fault in faults}
    with bench_session("bgproxy-rollback-") as (workdir, services):
        blue = start_upstream(services, workdir, BLUE_BODY, name="blue")
        log(f"blue: {blue.kind} on {blue.address}; {opts.rate:g} req/s, candidate at {STEP}%")
        for i in range(runs):
            for fault in faults:  # interleaved: run i of every fault before run i + 1 of any
                run_dir = workdir / f"run-{i + 1}-{fault}"
                result = run_async(
                    functools.partial(one_run, fault, seed + i, blue.address, services, run_dir, opts)
                )
                results[fault].append(result)
                log(_run_line(i + 1, runs, result))
                if result["problems"] or _slow_rollback(result):
                    for d in result["decisions"]:
                        log(f"    decision {d['at']} step {d['step']} {d['action']}: {d['reason']}")
    return {
        "meta": {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "pinned": pinning_available(),
            "blue": blue.kind,
            "rate": opts.rate,
            "runs": runs,
            "max_seconds": opts.max_seconds,
            "warmup_s": opts.warmup,
            "tail_s": opts.tail,
            "rollout": ROLLOUT,
            "targets": {"always-503": {"to_stable_only_ms": TARGET_MS, "failed": TARGET_FAILED}},
        },
        "summary": {fault: summarize(rs) for fault, rs in results.items()},
        "runs": results,
    }


def _slow_rollback(result: dict[str, Any]) -> bool:
    took = result["to_stable_only_ms"]
    return took is None or took >= TARGET_MS


def _run_line(i: int, runs: int, r: dict[str, Any]) -> str:
    line = (
        f"  run {i}/{runs} {r['fault']:<13} {r['state']} ({r['rule']}): stable-only "
        f"{r['to_stable_only_ms']} ms after the first bad answer, last candidate request "
        f"{r['to_last_candidate_request_ms']} ms, failed {r['failed']}, slow {r['slow']}, judged "
        f"{r['judged_errors']}/{r['judged_requests']}, {r['rate']} req/s "
        f"(pacer lag <= {r['max_pacer_lag_ms']} ms)"
    )
    return line + "".join(f"\n    PROBLEM: {p}" for p in r["problems"])


def _stats(values: list[Any]) -> dict[str, float | None]:
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(present), 1), "max": round(max(present), 1)}


SUMMARIZED = (
    "to_stable_only_ms",
    "to_last_candidate_request_ms",
    "to_last_candidate_answer_ms",
    "failed",
    "failed_before_stable_only",
    "slow",
    "judged_requests",
    "rate",
)


def summarize(rs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {name: _stats([r[name] for r in rs]) for name in SUMMARIZED}
    summary["runs"] = len(rs)
    summary["rolled_back"] = sum(1 for r in rs if r["rolled_back"] and not r["problems"])
    summary["rules"] = sorted({r["rule"] for r in rs if r["rule"]})
    if rs and rs[0]["fault"] == "always-503":
        summary["target_met"] = all(
            r["rolled_back"]
            and not r["problems"]
            and r["to_stable_only_ms"] is not None
            and r["to_stable_only_ms"] < TARGET_MS
            and r["failed"] < TARGET_FAILED
            for r in rs
        )
    return summary


def _cell(stat: dict[str, float | None], digits: int = 0) -> str:
    if stat["median"] is None or stat["max"] is None:
        return "-"
    return f"{stat['median']:.{digits}f} / {stat['max']:.{digits}f}"


def render(report: dict[str, Any]) -> str:
    rows = []
    for fault, s in report["summary"].items():
        rows.append(
            [
                fault,
                f"{s['rolled_back']}/{s['runs']}",
                ",".join(s["rules"]) or "-",
                _cell(s["to_stable_only_ms"]),
                _cell(s["to_last_candidate_request_ms"]),
                _cell(s["failed"]),
                _cell(s["failed_before_stable_only"]),
                _cell(s["slow"]),
                _cell(s["judged_requests"]),
                _cell(s["rate"]),
            ]
        )
    headers = [
        "fault (median / max)",
        "rolled back",
        "rule",
        "stable-only ms",
        "last cand. req ms",
        "failed",
        "failed before",
        f"slow >{SLOW_S * 1000:.0f}ms",
        "judged",
        "req/s",
    ]
    text = format_table(headers, rows)
    target = report["summary"].get("always-503", {}).get("target_met")
    if target is not None:
        verdict = "PASS" if target else "FAIL"
        text += (
            f"\nalways-503 target (every run < {TARGET_MS:.0f} ms to stable-only weights and "
            f"< {TARGET_FAILED} failed requests): {verdict}"
        )
    return text


def failed(report: dict[str, Any]) -> bool:
    runs = [r for rs in report["runs"].values() for r in rs]
    return (
        any(r["problems"] for r in runs) or report["summary"].get("always-503", {}).get("target_met") is False
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.rollback", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per fault; medians and maxima (default 3)")
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="requests per second, paced (default 1000)"
    )
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma list of {', '.join(FAULTS)} (default all)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=20.0, help="give up this long after the fault is on (default 20)"
    )
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the rollout")
    parser.add_argument("--tail", type=float, default=1.0, help="seconds of load after the rollback")
    parser.add_argument("--connections", type=int, default=64, help="client keep-alive connections at most")
    parser.add_argument("--seed", type=int, default=1, help="seed of the 10%% fault's draws (+ run index)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="JSON results path")
    args = parser.parse_args(argv)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown or not args.faults:
        parser.error(f"--faults: unknown {unknown}; choose from {', '.join(FAULTS)}")
    if args.runs < 1 or not 0 < args.rate <= 20_000 or not 0 < args.max_seconds <= 600:
        parser.error("need --runs >= 1, 0 < --rate <= 20000, 0 < --max-seconds <= 600")
    if args.warmup < 0 or args.tail < 0 or args.connections < 1:
        parser.error("need --warmup >= 0, --tail >= 0, --connections >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not pin_load_client():
        log("warning: taskset or a second CPU is missing; running unpinned")
    opts = Options(args.rate, args.max_seconds, args.warmup, args.tail, args.connections)
    try:
        report = run_bench(args.faults, args.runs, opts, args.seed)
    except ServiceError as err:
        log(f"FAILED to start: {err}")
        return 1
    print(render(report))
    write_report(args.output, report)
    return 1 if failed(report) else 0


if __name__ == "__main__":
    run_main(main)
