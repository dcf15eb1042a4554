"""The `bgproxy` command: run the proxy, check a config, run the demo."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

import uvloop

from .app import App
from .config import Config, ConfigError, dump_config, load_config
from .demo import banner, start_demo_upstreams
from .logs import setup_logging

EXIT_USAGE = 2


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


async def _serve(config: Config, *, demo: bool) -> None:
    upstreams = None
    if demo:
        upstreams = await start_demo_upstreams(
            {c: [(u.host, u.port) for u in config.pools.get(c).upstreams] for c in ("blue", "green")}
        )
    app = App(config)
    await app.start()
    if demo:
        admin = config.admin.listen
        print(banner(f"http://{config.listen.host}:{app.proxy_port}", f"http://{admin}"), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await app.stop()
        if upstreams is not None:
            await upstreams.close()


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    setup_logging(config.logging)
    uvloop.run(_serve(config, demo=args.command == "demo"))
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    print(dump_config(_load(args.config)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bgproxy", description="Blue-green traffic-switching reverse proxy."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", required=True, help="YAML config file")
    run.set_defaults(func=_cmd_run)
    demo = sub.add_parser("demo", help="run the proxy with built-in blue and green demo upstreams")
    demo.add_argument("--config", default="config/bgproxy.yaml", help="YAML config file")
    demo.set_defaults(func=_cmd_run)
    check = sub.add_parser("check-config", help="validate a config and print it normalized")
    check.add_argument("config", help="YAML config file")
    check.set_defaults(func=_cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
