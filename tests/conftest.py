"""Shared fixtures: a real bgproxy started in-process on ephemeral 127.0.0.1 ports.

The proxy runs on the test's own event loop (uvloop, like production), so a test drives real
sockets end to end: client -> bgproxy -> origin servers from upstreams.py.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import uvloop
import websockets
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # `from upstreams import ...` in every test module

from bgproxy.app import App
from bgproxy.config import load_config

# Real Redis and etcd servers (tests/stores.py) for the fleet tests; loaded here, once, before any
# test module imports it, so its asserts are rewritten like every test helper's.
pytest_plugins = ("stores",)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test stale compiled modules: a .so older than its .py would shadow the edit."""
    package = Path(__file__).parent.parent / "bgproxy"
    stale = [
        str(so.relative_to(package))
        for so in package.rglob("*.so")
        if so.stat().st_mtime < (so.parent / f"{so.name.split('.')[0]}.py").stat().st_mtime
    ]
    if stale:
        pytest.exit(f"compiled modules older than their source: {', '.join(stale)}; run `make test`", 2)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Every async test runs on uvloop, the loop bgproxy runs on in production."""
    return {"uvloop": uvloop.new_event_loop}


class RunningProxy:
    """A started App plus the addresses a test needs."""

    def __init__(self, app: App, config_path: Path) -> None:
        self.app = app
        self.config_path = config_path

    @property
    def port(self) -> int:
        return self.app.proxy_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def websocket(self, path: str = "/ws") -> websockets.asyncio.client.connect:
        """A WebSocket client through the proxy (ignoring any proxy set in the environment)."""
        return websockets.connect(f"ws://127.0.0.1:{self.port}{path}", proxy=None)

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.app.admin_port}"


def proxy_config(
    blue: Sequence[str], green: Sequence[str], weights: tuple[int, int] = (100, 0), **extra: Any
) -> dict[str, Any]:
    """A config dict for a test proxy; `extra` keys replace or add top-level sections."""
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "pools": {"blue": {"upstreams": list(blue)}, "green": {"upstreams": list(green)}},
        "weights": {"blue": weights[0], "green": weights[1]},
        "timeouts": {"connect": 1, "upstream_header": 2, "client_header": 2, "idle": 5},
    }
    cfg.update(extra)
    return cfg


MakeProxy = Callable[..., Awaitable[RunningProxy]]


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[MakeProxy]:
    """Start bgproxy from a real YAML file: make_proxy(blue=[addr], green=[addr], weights=(90, 10))."""
    started: list[App] = []

    async def make(
        blue: Sequence[str] = (), green: Sequence[str] = (), weights: tuple[int, int] = (100, 0), **extra: Any
    ) -> RunningProxy:
        cfg = proxy_config(blue, green, weights, **extra)
        cfg.setdefault("state_file", str(tmp_path / f"state-{len(started)}.json"))
        path = tmp_path / f"bgproxy-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        app = App(load_config(path, environ={}), config_path=path)
        await app.start()
        started.append(app)
        return RunningProxy(app, path)

    yield make
    for app in started:
        await app.stop()
