"""The `bgproxy` command: run the proxy, check a config, run the demo, and drive a running proxy.

The operator commands (status, flip, weights, events, rollout) are thin clients of the admin API over
plain urllib: one request each (``rollout start --wait`` and ``rollout status --watch`` poll), no event
loop. Exit status: 0 done, 1 the server refused (its message is printed) or a waited-for rollout was not
promoted, 2 usage error or the admin API cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop

from .app import App
from .config import Config, ConfigError, HostPort, dump_config, load_config
from .control.audit import AuditLogError
from .control.state import StateFileError
from .control.takeover import (
    Ready,
    SocketActivationError,
    TakeoverError,
    TakeoverServer,
    receive_sockets,
    systemd_sockets,
)
from .core.colors import COLORS
from .core.rollout import TERMINAL
from .core.timefmt import parse_rfc3339
from .demo import banner, start_demo_upstreams
from .logs import setup_logging

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
DEFAULT_ADMIN = "http://127.0.0.1:9901"
TOKEN_ENV = "BGPROXY_TOKEN"
_TIMEOUT = 10.0
_UNREACHABLE_FOR = 60.0  # seconds `rollout start --wait` keeps polling an admin API that does not answer
_POLL_INTERVAL = 0.5  # seconds between looks at the rollout under `rollout start --wait`
_WATCH_INTERVAL = 1.0  # seconds between frames of `rollout status --watch`
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen


class _Failed(Exception):
    """Ends a client command with an exit status, after its message is printed."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


async def _serve(
    config: Config,
    *,
    demo: bool,
    reset_state: bool,
    config_path: str | None = None,
    inherited: dict[str, socket.socket] | None = None,
    ready: Ready | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, or until a new bgproxy took the listeners over (then drain the same way).

    ``inherited``/``ready``: the listening sockets of a takeover (or systemd) and how to tell the old
    process this one accepts on them.
    """
    app = App(config, reset_state=reset_state, config_path=Path(config_path) if config_path else None)
    takeover: TakeoverServer | None = None
    upstreams = None
    try:
        if demo:
            upstreams = await start_demo_upstreams(
                {c: [(u.host, u.port) for u in config.pools.get(c).upstreams] for c in COLORS}
            )
        try:
            await app.start(inherited, taking_over=ready is not None)
        except BaseException as exc:
            if ready is not None:
                ready.abort(f"the new bgproxy failed to start: {exc}")
            raise
        stop = asyncio.Event()
        if ready is not None:
            try:
                await asyncio.to_thread(ready)
                app.took_over()
            except TakeoverError as exc:
                # The old process keeps (or took back) the state: drain what we accepted and leave.
                logging.getLogger("bgproxy").error("takeover not confirmed, stopping: %s", exc)
                stop.set()
        if demo:
            admin = config.admin.listen
            print(banner(f"http://{config.listen.host}:{app.proxy_port}", f"http://{admin}"), flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _second_signal_exits, stop)
        reloads: set[asyncio.Task[Any]] = set()

        def on_sighup() -> None:
            task = loop.create_task(app.reload(actor="SIGHUP"))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        if config.runtime_socket is not None and not stop.is_set():
            takeover = _takeover_server(app, config.runtime_socket, stop)
            try:
                await takeover.start()
            except TakeoverError as exc:
                logging.getLogger("bgproxy").error("no runtime socket: %s", exc)
                takeover = None
        await stop.wait()
        if takeover is not None:
            await takeover.close()
        await app.shutdown()
    finally:
        await app.stop()
        if upstreams is not None:
            await upstreams.close()


def _takeover_server(app: App, path: Path, stop: asyncio.Event) -> TakeoverServer:
    """Hands this process's listeners to `bgproxy run --takeover`; from the moment the new process
    starts reading the state file this one takes no change, and once it accepts, this one drains."""

    async def begin() -> None:
        await app.controller.freeze("a new bgproxy is taking over; make changes on it")

    def abandoned() -> None:
        app.controller.frozen = None

    def handed_over() -> None:
        app.handed_over = True
        stop.set()

    return TakeoverServer(
        path, lambda: dict(app.listeners), handed_over, on_begin=begin, on_abandoned=abandoned
    )


def _second_signal_exits(stop: asyncio.Event) -> None:
    """The first SIGTERM/SIGINT starts a graceful shutdown; a second one means now."""
    if stop.is_set():
        logging.getLogger("bgproxy").warning("second signal: exiting at once")
        os._exit(1)
    stop.set()


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    setup_logging(config.logging.format, config.logging.level)
    ready: Ready | None = None
    try:
        if getattr(args, "takeover", None):
            inherited, ready = receive_sockets(Path(args.takeover))
        else:
            inherited = systemd_sockets()
        unknown = sorted(set(inherited) - {"proxy", "admin"})
        if unknown:  # a listener nobody serves would leave its connections hanging in the backlog
            raise SocketActivationError(f"unknown listening sockets {unknown}: name them proxy and admin")
    except (TakeoverError, SocketActivationError) as exc:
        if ready is not None:
            ready.abort(str(exc))
        print(f"bgproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        uvloop.run(
            _serve(
                config,
                demo=args.command == "demo",
                reset_state=args.reset_state,
                config_path=args.config,
                inherited=inherited,
                ready=ready,
            )
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except AuditLogError as exc:
        print(f"{exc}\nfix its permissions or set events_file to a writable path", file=sys.stderr)
        return EXIT_USAGE
    except StateFileError as exc:
        print(
            f"{exc}\nbgproxy will not guess the live color: fix or remove the file, or start with "
            "--reset-state to seed it from the config's weights",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return EXIT_OK


def _cmd_check_config(args: argparse.Namespace) -> int:
    print(dump_config(_load(args.config)), end="")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- client


def _admin_url(args: argparse.Namespace) -> str:
    if args.admin:
        return str(args.admin).rstrip("/")
    if args.config:
        listen = _load(args.config).admin.listen
        # A wildcard listen address is reachable on loopback, which needs no route.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
        return f"http://{HostPort(host, listen.port)}"
    return DEFAULT_ADMIN


# No HTTP proxy from the environment: the bearer token goes straight to bgproxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(
    args: argparse.Namespace, method: str, path: str, body: Any = None, accept: str = "application/json"
) -> urllib.request.Request:
    headers = {"Accept": accept}
    token = args.token or os.environ.get(TOKEN_ENV)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if getattr(args, "if_match", None) is not None:
        headers["If-Match"] = str(args.if_match)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    return urllib.request.Request(_admin_url(args) + path, data=data, headers=headers, method=method)


def _failed(args: argparse.Namespace, url: str, exc: Exception) -> _Failed:
    """Print why a call failed: the server's refusal (exit 1) or why it could not be reached (exit 2)."""
    if isinstance(exc, urllib.error.HTTPError):
        _print_refusal(args, exc.code, exc.read())
        return _Failed(EXIT_REFUSED)
    why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    print(f"bgproxy: cannot use the admin API at {url}: {why}", file=sys.stderr)
    return _Failed(EXIT_USAGE)


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One admin API request; prints the refusal and raises _Failed unless it answered 2xx."""
    request = _request(args, method, path, body)
    try:
        with _OPENER.open(request, timeout=_TIMEOUT) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _failed(args, request.full_url, exc) from None


def _print_refusal(args: argparse.Namespace, status: int, raw: bytes) -> None:
    try:
        body = json.loads(raw)
        error, detail = str(body["error"]), [str(line) for line in body.get("detail", [])]
    except (ValueError, KeyError, TypeError):
        print(f"bgproxy: refused ({status}): {raw[:200].decode('utf-8', 'replace')}", file=sys.stderr)
        return
    if args.json:
        print(json.dumps(body, indent=2))
        return
    print(f"bgproxy: refused ({status}): {error}", file=sys.stderr)
    for line in detail:
        print(f"  {line}", file=sys.stderr)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in row] for row in (header, *rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _show_state(state: dict[str, Any]) -> str:
    weights = state["weights"]
    total = sum(weights.values())
    rows = []
    for color, pool in state["pools"].items():
        share = f"{100 * pool['weight'] / total:.0f}%"
        rows.append([color, pool["weight"], share, pool["in_flight"], ", ".join(pool["upstreams"]) or "-"])
    head = (
        f"active: {state['active'] or 'split'}  version: {state['version']}  updated: {state['updated_at']}"
    )
    return head + "\n" + _table(["COLOR", "WEIGHT", "SHARE", "IN-FLIGHT", "UPSTREAMS"], rows)


def _what(event: dict[str, Any]) -> str:
    """One audit event's change in a few words."""
    kind = event["kind"]
    if kind == "switch":
        before, after = event["from_weights"], event["to_weights"]
        return f"weights {before['blue']}/{before['green']} -> {after['blue']}/{after['green']} (blue/green)"
    if kind == "pool":
        moves = [f"+{a}" for a in event["added"]] + [f"-{a}" for a in event["removed"]]
        return f"pool {event['color']}: {' '.join(moves)} (by {event['source']})"
    if kind == "rollout":
        return f"rollout {event['id']} {event['state']} at step {event['step'] + 1} ({event['weight']}%)"
    if event["ok"]:
        return f"config reloaded: {', '.join(event['changed']) or 'no change'}"
    return f"config reload refused: {'; '.join(event['errors'])}"


def _show_events(body: dict[str, Any]) -> str:
    events = body["events"]
    if not events:
        return "no changes recorded"
    rows = [[e.get("version", ""), e["time"], e["actor"], _what(e), e["reason"] or ""] for e in events]
    return _table(["VERSION", "TIME", "ACTOR", "CHANGE", "REASON"], rows)


def _print(args: argparse.Namespace, body: Any, human: str) -> None:
    print(json.dumps(body, indent=2) if args.json else human)


def _cmd_status(args: argparse.Namespace) -> int:
    if args.watch:
        return _watch_state(args)
    state = _call(args, "GET", "/v1/state")
    _print(args, state, _show_state(state))
    return EXIT_OK


def _watch_state(args: argparse.Namespace) -> int:
    """Print the state at once and again on every change, from the /v1/watch event stream, until Ctrl-C."""
    request = _request(args, "GET", "/v1/watch?counters=0", accept="text/event-stream")
    try:
        # No read timeout: the stream sends a heartbeat comment at least every 15 s.
        with _OPENER.open(request) as stream:
            event = ""
            for raw in stream:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "state":
                    state = json.loads(line[5:])["state"]
                    print(json.dumps(state) if args.json else f"{_show_state(state)}\n", flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise _failed(args, request.full_url, exc) from None
    print("bgproxy: the admin API closed the stream (shutting down?)", file=sys.stderr)
    return EXIT_USAGE


def _change_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.drain_timeout is not None:
        body["drain_timeout"] = args.drain_timeout
    if args.reason is not None:
        body["reason"] = args.reason
    if args.force:
        body["force"] = True
    return body


def _waited(args: argparse.Namespace, path: str) -> str:
    """``--wait``: the API answers once every fleet node runs the change (or names those that do not)."""
    if not args.wait:
        return path
    return f"{path}?wait=all&wait_timeout={args.wait_timeout}"


def _changed(args: argparse.Namespace, state: dict[str, Any]) -> int:
    """Print the state a change left; with --wait, exit 1 if some fleet node did not run it in time."""
    fleet = state.get("fleet")
    human = _show_state(state)
    if fleet is not None:
        if fleet["complete"]:
            human += f"\nevery live node runs version {fleet['version']} ({fleet['waited']:.3f} s)"
        else:
            human += (
                f"\nnot yet running version {fleet['version']} after {fleet['waited']:.1f} s: "
                + ", ".join(fleet["pending"])
            )
    _print(args, state, human)
    return EXIT_OK if fleet is None or fleet["complete"] else EXIT_REFUSED


def _cmd_flip(args: argparse.Namespace) -> int:
    body = _change_body(args)
    if args.to is not None:
        body["to"] = args.to
    return _changed(args, _call(args, "POST", _waited(args, "/v1/flip"), body))


def _parse_weights(parser: argparse.ArgumentParser, pairs: Sequence[str]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for pair in pairs:
        color, sep, value = pair.partition("=")
        if not sep or color not in COLORS or color in weights:
            parser.error(f"expected blue=N green=N, got {pair!r}")
        try:
            weights[color] = int(value)
        except ValueError:
            parser.error(f"weight of {color} must be an integer, got {value!r}")
    if len(weights) != 2:
        parser.error("give both weights: blue=N green=N")
    return weights


def _cmd_weights(args: argparse.Namespace) -> int:
    body = {**_parse_weights(args.parser, args.pairs), **_change_body(args)}
    return _changed(args, _call(args, "PUT", _waited(args, "/v1/weights"), body))


def _cmd_fleet(args: argparse.Namespace) -> int:
    body = _call(args, "GET", "/v1/fleet")
    store = body["store"]
    head = f"store: {store['backend']} {store['where']} ({store['status']})  version: {body['version']}"
    if store["error"]:
        head += f"\n  {store['error']}"
    rows = [
        [
            n["node"] + (" *" if n["leader"] else ""),
            n["version"],
            n["behind"],
            "-" if n["lag"] is None else f"{1000 * n['lag']:.0f} ms",
            f"{n['seen_ago']:.1f} s ago",
            n["store"],
            n["admin"],
        ]
        for n in body["nodes"]
    ]
    table = _table(["NODE (* leads)", "VERSION", "BEHIND", "LAG", "SEEN", "STORE", "ADMIN"], rows)
    _print(args, body, head + ("\n" + table if rows else "\n(a single instance: no fleet)"))
    return EXIT_OK


def _cmd_events(args: argparse.Namespace) -> int:
    body = _call(args, "GET", "/v1/events")
    _print(args, body, _show_events(body))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- rollout

_CURRENT = "/v1/rollouts/current"


def _pct(ratio: float) -> str:
    """0.005 -> "0.5%"; 0.21428 -> "21.4%"."""
    return f"{ratio * 100:.3g}%"


def _duration(seconds: float) -> str:
    """0.25 -> "0.25s", 12.345 -> "12.35s", 30 -> "30s", 300 -> "5m00s", 5400 -> "1h30m"."""
    if seconds < 60:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def _bar(done: float, total: float, width: int = 20) -> str:
    """``[#####...............]``: full only once ``done`` reaches ``total`` (a zero total is full)."""
    filled = width if total <= 0 else int(width * min(max(done / total, 0.0), 1.0))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _clock(timestamp: str) -> str:
    """The time of day of an API timestamp: "2024-05-01T12:00:00.250000Z" -> "12:00:00"."""
    return timestamp[11:19]


def _p99(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def _show_decision(decision: dict[str, Any]) -> str:
    return f"{_clock(decision['at'])} {decision['action']}: {decision['reason']}"


def _headline(body: dict[str, Any]) -> str:
    """``rollout r-...: blue -> green, running, step 1/2 at 50%``, then who paused it or the rule fired."""
    n, step = len(body["spec"]["steps"]), body["step"]
    where = f"step {step + 1}/{n}" if step >= 0 else f"before step 1/{n}"
    line = (
        f"rollout {body['id']}: {body['from']} -> {body['to']}, {body['state']}, "
        f"{where} at {body['weights'][body['to']]}%"
    )
    if body["paused_by"]:
        line += f" (paused by {body['paused_by']})"
    if body["rule"]:
        line += f" (rule {body['rule']})"
    return line


def _step_progress(body: dict[str, Any], step: dict[str, Any], now: float) -> str:
    """What a step has done (done), is doing (current, with progress bars) or will do (pending)."""
    spec = body["spec"]
    last = step["index"] == len(spec["steps"]) - 1
    if step["status"] == "pending":
        return f"bake {_duration(spec['bake'])}" if last and spec["bake"] > 0 else ""
    started = parse_rfc3339(step["started_at"])
    if step["status"] == "done":
        took = _duration(max(parse_rfc3339(step["ended_at"]) - started, 0.0))
        evidence = step["evidence"]
        if evidence is None:
            return took
        candidate = evidence["candidate"]
        return f"{candidate['errors']}/{candidate['requests']} errors in {took}"
    elapsed = max(now - started, 0.0)
    if last:
        bake = spec["bake"]
        if bake <= 0:
            return "no bake"
        return f"bake {_bar(elapsed, bake)} {_duration(min(elapsed, bake))}/{_duration(bake)}"
    evidence = body["evidence"]
    requests = evidence["candidate"]["requests"] if evidence else 0
    wanted, pause = spec["min_requests"], spec["step_pause"]
    return (
        f"requests {_bar(requests, wanted)} {requests}/{wanted}  "
        f"pause {_bar(elapsed, pause)} {_duration(min(elapsed, pause))}/{_duration(pause)}"
    )


def _verdict(color: dict[str, Any], threshold: float, proven: bool) -> str:
    if color["error_ratio_low"] > threshold:
        return "above"
    if proven or color["error_ratio_high"] < threshold:
        return "below"
    return "not yet known"


def _show_evidence(body: dict[str, Any]) -> str:
    evidence = body["evidence"]
    if evidence is None:
        return "no evidence yet"
    threshold = evidence["threshold"]
    rows = []
    for role, color in (("candidate", body["to"]), ("stable", body["from"])):
        ev = evidence[role]
        ratio = "-" if ev["error_ratio"] is None else _pct(ev["error_ratio"])
        proven = evidence["proven"] if role == "candidate" else False
        rows.append(
            [
                color,
                role,
                ev["requests"],
                ev["errors"],
                ratio,
                f"{_pct(ev['error_ratio_low'])} .. {_pct(ev['error_ratio_high'])}",
                _p99(ev["p99"]),
                _verdict(ev, threshold, proven),
            ]
        )
    header = ["COLOR", "ROLE", "REQUESTS", "ERRORS", "RATIO", "BOUNDS", "P99", f"VS {_pct(threshold)}"]
    return f"evidence at step {body['step'] + 1}:\n" + _table(header, rows)


def _show_rollout(body: dict[str, Any], now: float | None = None) -> str:
    """A rollout for people: headline, steps with progress, both colors' error ratios, the last decision."""
    now = time.time() if now is None else now
    lines = [_headline(body)]
    started = f"started {body['created_at']} by {body['actor']}"
    lines.append(started + (f": {body['reason']}" if body["reason"] else ""))
    if body["gates_left"]:
        lines.append(f"waiting for gates: {', '.join(body['gates_left'])}")
    rows = [
        [s["index"] + 1, f"{s['weight']}%", s["status"], _step_progress(body, s, now)] for s in body["steps"]
    ]
    lines.append(_table(["STEP", "WEIGHT", "STATUS", "PROGRESS"], rows))
    lines.append(_show_evidence(body))
    if body["decisions"]:
        lines.append("last decision: " + _show_decision(body["decisions"][-1]))
    return "\n".join(lines)


def _show_action(body: dict[str, Any]) -> str:
    """After pause, resume, promote or abort: where the rollout is now, and why."""
    lines = [_headline(body)]
    if body["decisions"]:
        lines.append("last decision: " + _show_decision(body["decisions"][-1]))
    return "\n".join(lines)


def _new_decisions(decisions: list[dict[str, Any]], last: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The decisions after ``last`` (the server keeps the newest 200, so count from the end)."""
    if last is None:
        return decisions
    for i in range(len(decisions) - 1, -1, -1):
        if decisions[i] == last:
            return decisions[i + 1 :]
    return [d for d in decisions if d["at"] > last["at"]]


def _error_ratio(text: str) -> float:
    """--max-error-ratio: "0.5%" or "0.005"; between 0 and 1 exclusive."""
    raw = text.strip()
    percent = raw.endswith("%")
    try:
        value = float(raw.removesuffix("%"))
    except ValueError:
        value = float("nan")
    ratio = value / 100 if percent else value
    if not 0 < ratio < 1:  # also false for nan
        raise argparse.ArgumentTypeError(
            f"expected a percentage like 0.5% or a ratio like 0.005, between 0 and 1 (got {text!r})"
        )
    return ratio


def _percentages(text: str) -> list[int]:
    """--steps: "5,25,100"; the server checks that they increase and end at 100."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected candidate percentages like 5,25,100 (got {text!r})"
        ) from None


def _cmd_rollout_start(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"to": args.to}
    for name, value in (
        ("steps", args.steps),
        ("step_pause", args.pause),
        ("bake", args.bake),
        ("max_error_ratio", args.max_error_ratio),
        ("min_requests", args.min_requests),
        ("reason", args.reason),
    ):
        if value is not None:
            body[name] = value
    if args.force:
        body["force"] = True
    started = _call(args, "POST", "/v1/rollouts", body)
    if not args.wait:
        _print(args, started, _show_rollout(started))
        return EXIT_OK
    if not args.json:
        print(_show_rollout(started), flush=True)
    try:
        final = _wait_for(args, started)
    except KeyboardInterrupt:
        print(
            f"bgproxy: stopped waiting; rollout {started['id']} goes on (see bgproxy rollout status)",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    reason = final["decisions"][-1]["reason"] if final["decisions"] else ""
    if args.json:
        print(json.dumps(final, indent=2))
    elif final["state"] == "promoted":
        print(f"rollout {final['id']} promoted: {reason}")
    if final["state"] == "promoted":
        return EXIT_OK
    if not args.json:
        print(f"bgproxy: rollout {final['id']} {final['state']}: {reason}", file=sys.stderr)
    return EXIT_REFUSED


def _poll(args: argparse.Namespace, path: str) -> Any:
    """GET for a waiting pipeline: the admin API may be away for a while (a restart or a takeover of
    bgproxy mid-rollout) without the rollout being over, so unreachable is retried for a bound."""
    deadline = time.monotonic() + _UNREACHABLE_FOR
    request = _request(args, "GET", path)
    while True:
        try:
            with _OPENER.open(request, timeout=_TIMEOUT) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise _failed(args, request.full_url, exc) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise _failed(args, request.full_url, exc) from None
            time.sleep(_POLL_INTERVAL)


def _wait_for(args: argparse.Namespace, started: dict[str, Any]) -> dict[str, Any]:
    """Poll until the rollout ``started`` is finished, printing each decision as it is made."""
    body = started
    last = body["decisions"][-1] if body["decisions"] else None
    while body["state"] not in TERMINAL:
        time.sleep(_POLL_INTERVAL)
        body = _poll(args, _CURRENT)
        if body["id"] != started["id"]:  # it finished and another started: find it in the history
            history = _call(args, "GET", "/v1/rollouts")["rollouts"]
            found = next((r for r in history if r["id"] == started["id"]), None)
            if found is None:
                print(f"bgproxy: rollout {started['id']} is no longer known to the server", file=sys.stderr)
                raise _Failed(EXIT_REFUSED)
            body = found
        new = _new_decisions(body["decisions"], last)
        if body["state"] in TERMINAL:
            new = new[:-1]  # the final one is printed with the outcome
        if not args.json:
            for decision in new:
                print(_show_decision(decision), flush=True)
        if body["decisions"]:
            last = body["decisions"][-1]
    return body


def _cmd_rollout_status(args: argparse.Namespace) -> int:
    if not args.watch:
        body = _call(args, "GET", _CURRENT)
        _print(args, body, _show_rollout(body))
        return EXIT_OK
    tty = sys.stdout.isatty() and not args.json
    frames = 0
    try:
        while True:
            body = _call(args, "GET", _CURRENT)
            if args.json:  # one JSON document per line and frame
                print(json.dumps(body), flush=True)
            elif tty:
                footer = f"\n\nevery {_WATCH_INTERVAL:g}s; Ctrl-C to stop watching"
                done = body["state"] in TERMINAL
                sys.stdout.write(_CLEAR + _show_rollout(body) + ("\n" if done else footer))
                sys.stdout.flush()
            else:
                print(("\n" if frames else "") + _show_rollout(body), flush=True)
            frames += 1
            if body["state"] in TERMINAL:
                return EXIT_OK
            time.sleep(_WATCH_INTERVAL)
    except KeyboardInterrupt:
        if tty:
            print()
        return EXIT_OK


def _cmd_rollout_action(args: argparse.Namespace) -> int:
    body = {} if args.reason is None else {"reason": args.reason}
    rollout = _call(args, "POST", f"{_CURRENT}/{args.action}", body)
    _print(args, rollout, _show_action(rollout))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- pools


def _show_members(body: dict[str, Any]) -> str:
    lines = [
        f"{body['color']}: {', '.join(body['upstreams']) or '(no upstreams)'}  (version {body['version']})"
    ]
    lines += [f"  added {addr}" for addr in body["added"]] + [f"  removed {addr}" for addr in body["removed"]]
    return "\n".join(lines)


def _cmd_pool_list(args: argparse.Namespace) -> int:
    colors = [args.color] if args.color else list(COLORS)
    bodies = [_call(args, "GET", f"/v1/pools/{color}/upstreams") for color in colors]
    _print(args, bodies if len(bodies) > 1 else bodies[0], "\n".join(_show_members(b) for b in bodies))
    return EXIT_OK


def _cmd_pool_change(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {} if args.reason is None else {"reason": args.reason}
    if args.force:
        body["force"] = True
    path = f"/v1/pools/{args.color}/upstreams"
    if args.pool_command == "add":
        answer = _call(args, "POST", path, {"upstream": args.upstream, **body})
    else:
        answer = _call(args, "DELETE", f"{path}/{urllib.parse.quote(args.upstream, safe=':[]')}", body)
    _print(args, answer, _show_members(answer))
    return EXIT_OK


def _cmd_reload(args: argparse.Namespace) -> int:
    result = _call(args, "POST", "/v1/reload")
    lines = [f"config reloaded at {result['at']}: changed {', '.join(result['changed']) or 'nothing'}"]
    if result["restart_required"]:
        lines.append(f"applies at the next start only: {', '.join(result['restart_required'])}")
    lines += [
        f"pool {color} replaced by the file: {', '.join(ups)}" for color, ups in result["pools"].items()
    ]
    _print(args, result, "\n".join(lines))
    return EXIT_OK


def _add_pool_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], client: argparse.ArgumentParser
) -> None:
    pool = sub.add_parser("pool", help="pool membership at run time: list, add, remove")
    commands = pool.add_subparsers(dest="pool_command", required=True)
    listing = commands.add_parser("list", parents=[client], help="each color's upstreams")
    listing.add_argument("color", nargs="?", choices=COLORS)
    listing.set_defaults(func=_cmd_pool_list)
    change = _change_options("skip the probe / allow emptying a color that has weight", drain=False)
    for name, helptext in (
        ("add", "add an upstream (probed before it takes traffic)"),
        ("remove", "remove an upstream (its exchanges finish; streams drain)"),
    ):
        command = commands.add_parser(name, parents=[client, change], help=helptext)
        command.add_argument("color", choices=COLORS)
        command.add_argument("upstream", metavar="HOST:PORT")
        command.set_defaults(func=_cmd_pool_change)


def _client_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--admin",
        metavar="URL",
        help=f"admin API base URL (default: admin.listen of --config, else {DEFAULT_ADMIN})",
    )
    options.add_argument("--config", help="bgproxy config file to take the admin address from")
    options.add_argument("--token", help=f"admin bearer token (default: ${TOKEN_ENV})")
    options.add_argument("--json", action="store_true", help="print the API's JSON answer")
    return options


def _change_options(
    force: str = "apply even if a color given weight has no healthy upstream", *, drain: bool = True
) -> argparse.ArgumentParser:
    """--reason, --if-match, --force (``force`` says what it overrides) and, for switches, --drain-timeout."""
    options = argparse.ArgumentParser(add_help=False)
    if drain:
        options.add_argument(
            "--drain-timeout", metavar="S", help="how long the old color may drain, e.g. 10 or 30s"
        )
    options.add_argument("--reason", metavar="TEXT", help="recorded in the audit log")
    options.add_argument(
        "--if-match", metavar="VERSION", type=int, help="apply only if the state is still at this version"
    )
    options.add_argument("--force", action="store_true", help=force)
    return options


def _add_rollout_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], client: argparse.ArgumentParser
) -> None:
    rollout = sub.add_parser("rollout", help="guarded rollouts: start, status, pause, resume, promote, abort")
    commands = rollout.add_subparsers(dest="rollout_command", required=True)
    start = commands.add_parser(
        "start", parents=[client], help="move traffic to a color step by step, rolling back on errors"
    )
    start.add_argument("--to", choices=COLORS, required=True, help="the candidate color")
    start.add_argument(
        "--steps", type=_percentages, metavar="P,P,...", help="candidate percentages, e.g. 5,25,100"
    )
    start.add_argument("--pause", metavar="DURATION", help="minimum time at each step, e.g. 30s")
    start.add_argument("--bake", metavar="DURATION", help="watch time at 100%% before promoting, e.g. 5m")
    start.add_argument(
        "--max-error-ratio",
        type=_error_ratio,
        metavar="RATIO",
        help="roll back above this error ratio: 0.5%% or 0.005",
    )
    start.add_argument("--min-requests", type=int, metavar="N", help="candidate requests needed per step")
    start.add_argument("--reason", metavar="TEXT", help="recorded in the audit log")
    start.add_argument(
        "--force", action="store_true", help="start even if the candidate fails the flip probe"
    )
    start.add_argument(
        "--wait",
        action="store_true",
        help="wait until the rollout ends: exit 0 if promoted, 1 if rolled back or aborted",
    )
    start.set_defaults(func=_cmd_rollout_start)
    status = commands.add_parser("status", parents=[client], help="show the current (or last) rollout")
    status.add_argument(
        "--watch", action="store_true", help="redraw every second until the rollout ends (Ctrl-C stops)"
    )
    status.set_defaults(func=_cmd_rollout_status)
    for action, helptext in (
        ("pause", "hold the rollout at its step"),
        ("resume", "continue a paused rollout"),
        ("promote", "send all traffic to the candidate now, skipping what is left"),
        ("abort", "send all traffic back to the stable color"),
    ):
        act = commands.add_parser(action, parents=[client], help=helptext)
        act.add_argument("--reason", metavar="TEXT", help="recorded with the decision")
        act.set_defaults(func=_cmd_rollout_action, action=action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bgproxy", description="Blue-green traffic-switching reverse proxy."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, default_config, helptext in (
        ("run", None, "run the proxy"),
        ("demo", "config/bgproxy.yaml", "run the proxy with built-in blue and green demo upstreams"),
    ):
        run = sub.add_parser(name, help=helptext)
        if default_config is None:
            run.add_argument("--config", required=True, help="YAML config file")
        else:
            run.add_argument("--config", default=default_config, help="YAML config file")
        run.add_argument(
            "--takeover",
            metavar="SOCKET",
            help="take the listening sockets over from the bgproxy running with this runtime_socket",
        )
        run.add_argument(
            "--reset-state",
            action="store_true",
            help="ignore the state file, even a corrupt one, and seed it from the config's weights",
        )
        run.set_defaults(func=_cmd_run)
    check = sub.add_parser("check-config", help="validate a config and print it normalized")
    check.add_argument("config", help="YAML config file")
    check.set_defaults(func=_cmd_check_config)

    client, change = _client_options(), _change_options()
    status = sub.add_parser("status", parents=[client], help="show weights, live color and pools")
    status.add_argument("--watch", action="store_true", help="print it again on every change, until Ctrl-C")
    status.set_defaults(func=_cmd_status)
    flip = sub.add_parser("flip", parents=[client, change], help="send all traffic to the other color")
    flip.add_argument("--to", choices=COLORS, help="color to send all traffic to")
    flip.set_defaults(func=_cmd_flip)
    weights = sub.add_parser("weights", parents=[client, change], help="split traffic: blue=90 green=10")
    weights.add_argument("pairs", nargs="+", metavar="COLOR=WEIGHT")
    weights.set_defaults(func=_cmd_weights, parser=weights)
    for command in (flip, weights):
        command.add_argument(
            "--wait", action="store_true", help="return once every node of the fleet runs it (exit 1 if not)"
        )
        command.add_argument(
            "--wait-timeout", default="5s", metavar="DURATION", help="how long --wait waits (default 5s)"
        )
    fleet = sub.add_parser("fleet", parents=[client], help="the nodes sharing the switch: version, lag")
    fleet.set_defaults(func=_cmd_fleet)
    events = sub.add_parser("events", parents=[client], help="show the audit log: switches, pools, reloads")
    events.set_defaults(func=_cmd_events)
    _add_rollout_parser(sub, client)
    _add_pool_parser(sub, client)
    reload = sub.add_parser("reload", parents=[client], help="reload the config file (as SIGHUP does)")
    reload.set_defaults(func=_cmd_reload)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except _Failed as exc:
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
