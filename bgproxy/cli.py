"""The `bgproxy` command: run the proxy, check a config, run the demo, and drive a running proxy.

The operator commands (status, flip, weights, events) are thin clients of the admin API over plain
urllib: one request each, no event loop. Exit status: 0 done, 1 the server refused (its message is
printed), 2 usage error or the admin API cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

import uvloop

from .app import App
from .config import Config, ConfigError, HostPort, dump_config, load_config
from .control.state import StateFileError
from .core.colors import COLORS
from .demo import banner, start_demo_upstreams
from .logs import setup_logging

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
DEFAULT_ADMIN = "http://127.0.0.1:9901"
TOKEN_ENV = "BGPROXY_TOKEN"
_TIMEOUT = 10.0


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


async def _serve(config: Config, *, demo: bool, reset_state: bool) -> None:
    app = App(config, reset_state=reset_state)
    upstreams = None
    try:
        if demo:
            upstreams = await start_demo_upstreams(
                {c: [(u.host, u.port) for u in config.pools.get(c).upstreams] for c in COLORS}
            )
        await app.start()
        if demo:
            admin = config.admin.listen
            print(banner(f"http://{config.listen.host}:{app.proxy_port}", f"http://{admin}"), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _second_signal_exits, stop)
        await stop.wait()
        await app.shutdown()
    finally:
        await app.stop()
        if upstreams is not None:
            await upstreams.close()


def _second_signal_exits(stop: asyncio.Event) -> None:
    """The first SIGTERM/SIGINT starts a graceful shutdown; a second one means now."""
    if stop.is_set():
        logging.getLogger("bgproxy").warning("second signal: exiting at once")
        os._exit(1)
    stop.set()


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    setup_logging(config.logging.format, config.logging.level)
    try:
        uvloop.run(_serve(config, demo=args.command == "demo", reset_state=args.reset_state))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
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


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """One admin API request; prints the refusal and raises _Failed unless it answered 2xx."""
    url = _admin_url(args) + path
    headers = {"Accept": "application/json"}
    token = args.token or os.environ.get(TOKEN_ENV)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if getattr(args, "if_match", None) is not None:
        headers["If-Match"] = str(args.if_match)
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    # No HTTP proxy from the environment: the bearer token goes straight to bgproxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=_TIMEOUT) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        _print_refusal(args, exc.code, exc.read())
        raise _Failed(EXIT_REFUSED) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"bgproxy: cannot use the admin API at {url}: {why}", file=sys.stderr)
        raise _Failed(EXIT_USAGE) from None


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


def _show_events(body: dict[str, Any]) -> str:
    events = body["events"]
    if not events:
        return "no switches since bgproxy started"

    def split(w: dict[str, int]) -> str:
        return f"{w['blue']}/{w['green']}"

    rows = [
        [
            e["version"],
            e["time"],
            e["actor"],
            split(e["from_weights"]),
            split(e["to_weights"]),
            e["reason"] or "",
        ]
        for e in events
    ]
    return _table(["VERSION", "TIME", "ACTOR", "FROM B/G", "TO B/G", "REASON"], rows)


def _print(args: argparse.Namespace, body: Any, human: str) -> None:
    print(json.dumps(body, indent=2) if args.json else human)


def _cmd_status(args: argparse.Namespace) -> int:
    state = _call(args, "GET", "/v1/state")
    _print(args, state, _show_state(state))
    return EXIT_OK


def _change_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.drain_timeout is not None:
        body["drain_timeout"] = args.drain_timeout
    if args.reason is not None:
        body["reason"] = args.reason
    if args.force:
        body["force"] = True
    return body


def _cmd_flip(args: argparse.Namespace) -> int:
    body = _change_body(args)
    if args.to is not None:
        body["to"] = args.to
    state = _call(args, "POST", "/v1/flip", body)
    _print(args, state, _show_state(state))
    return EXIT_OK


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
    state = _call(args, "PUT", "/v1/weights", body)
    _print(args, state, _show_state(state))
    return EXIT_OK


def _cmd_events(args: argparse.Namespace) -> int:
    body = _call(args, "GET", "/v1/events")
    _print(args, body, _show_events(body))
    return EXIT_OK


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


def _change_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--drain-timeout", metavar="S", help="how long the old color may drain, e.g. 10 or 30s"
    )
    options.add_argument("--reason", metavar="TEXT", help="recorded in the audit log")
    options.add_argument(
        "--if-match", metavar="VERSION", type=int, help="apply only if the state is still at this version"
    )
    options.add_argument(
        "--force", action="store_true", help="apply even if a color given weight has no healthy upstream"
    )
    return options


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
    status.set_defaults(func=_cmd_status)
    flip = sub.add_parser("flip", parents=[client, change], help="send all traffic to the other color")
    flip.add_argument("--to", choices=COLORS, help="color to send all traffic to")
    flip.set_defaults(func=_cmd_flip)
    weights = sub.add_parser("weights", parents=[client, change], help="split traffic: blue=90 green=10")
    weights.add_argument("pairs", nargs="+", metavar="COLOR=WEIGHT")
    weights.set_defaults(func=_cmd_weights, parser=weights)
    events = sub.add_parser("events", parents=[client], help="show the audit log of switches")
    events.set_defaults(func=_cmd_events)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except _Failed as exc:
        return exc.status


if __name__ == "__main__":
    sys.exit(main())
