"""Process wiring: the proxy listener, the switching state, the housekeeping timers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from typing import cast

from aiohttp import web

from . import proxy
from .admin import build_admin_app
from .config import Config, ConfigError
from .control import Controller
from .drain import Drainer
from .proxy import ClientConnection
from .router import Router
from .state_store import PersistedState, StateStore
from .stats import Stats
from .switching import COLORS, Switchboard, SwitchError, SwitchResult, Weights

log = logging.getLogger("bgproxy")


def dataplane_build() -> str:
    """ "mypyc" when the data plane runs compiled (setup.py), "interpreted" for a BGPROXY_PURE=1 build.

    Logged at start: the two behave the same, but an operator comparing throughput needs to know.
    """
    return "interpreted" if (proxy.__file__ or "").endswith(".py") else "mypyc"


class App:
    """One running bgproxy: start() binds the listeners, stop() closes everything."""

    def __init__(self, config: Config, *, reset_state: bool = False) -> None:
        """``reset_state``: ignore the state file (even a corrupt one) and seed it from the config."""
        _check_admin_exposure(config)
        self.config = config
        self.switchboard = Switchboard(
            Weights(config.weights.blue, config.weights.green),
            drain_timeout=config.drain_timeout,
            updated_at=time.time(),
        )
        self.state_store = StateStore(config.state_file)
        self._reset_state = reset_state
        self.controller = Controller(self.switchboard, self.state_store, drain_timeout=config.drain_timeout)
        self.controller.observers.append(self._on_switch)
        self.controller.guard = self._refuse_dead_colors
        metrics = config.metrics
        self.stats = Stats(
            metrics.latency_buckets, enabled=metrics.enabled, error_window=metrics.error_window
        )
        self.router: Router | None = None
        self.drainer: Drainer | None = None
        self._server: asyncio.Server | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._admin_runner: web.AppRunner | None = None
        self._admin_site: web.TCPSite | None = None
        self.shutting_down = False
        self._stopped = False

    @property
    def admin_port(self) -> int:
        assert self._admin_runner is not None
        addrs = self._admin_runner.addresses
        return int(addrs[0][1])

    def readiness(self) -> tuple[bool, str]:
        """Whether to take traffic, and why not (for /readyz)."""
        if self.shutting_down:
            return False, "shutting down"
        router = self.router
        if router is None:
            return False, "starting"
        weights = self.switchboard.weights
        live = [color for color in router.pools if weights.of(color)]  # type: ignore[arg-type]
        if not any(router.pools[color].serving for color in live):
            return False, f"no healthy upstream for live traffic ({', '.join(live)})"
        return True, "serving"

    @property
    def proxy_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def _restore_state(self) -> None:
        """The state file wins over the config, whose weights only seed a missing file.

        Raises StateFileError for a corrupt or unwritable file: guessing could route to the wrong color.
        """
        saved = None if self._reset_state else self.state_store.load()
        if saved is not None:
            self.switchboard.restore(saved.weights, saved.version, saved.updated_at)
            return
        if self._reset_state:
            log.warning(
                "state file reset: seeding it from the config's weights",
                extra={"state_file": str(self.state_store.path)},
            )
        board = self.switchboard
        # Written now, so an unwritable state file stops the start instead of failing the first flip.
        self.state_store.save(PersistedState(board.weights, board.version, board.updated_at))

    def _refuse_dead_colors(self, before: Weights, after: Weights) -> None:
        """Controller guard: no weight goes to a color that has no healthy upstream to take it."""
        if self.router is None:
            return
        for color in COLORS:
            if after.of(color) > before.of(color):
                pool = self.router.pools[color]
                if not pool.serving:
                    down = ", ".join(up.addr for up in pool.upstreams) or "none configured"
                    raise SwitchError(
                        f"{color} has no healthy upstream (down: {down}); nothing changed. "
                        'Send "force": true to apply anyway.'
                    )

    def _on_switch(self, result: SwitchResult) -> None:
        """Controller observer: start or cancel drains for colors that lost or regained weight."""
        if self.drainer is not None:
            self.drainer.on_switch(result)

    async def start(self) -> None:
        self._restore_state()
        loop = asyncio.get_running_loop()
        router = self.router = Router(self.config, self.switchboard, self.stats)
        self.drainer = Drainer(router, self.switchboard)
        router.health.start()
        listen = self.config.listen
        self._server = await loop.create_server(
            lambda: cast(asyncio.Protocol, ClientConnection(router)),
            listen.host,
            listen.port,
            reuse_address=True,
            backlog=4096,
        )
        self._housekeeping = loop.create_task(self._tick())
        admin = self.config.admin.listen
        self._admin_runner = web.AppRunner(build_admin_app(self), access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        self._admin_site = web.TCPSite(self._admin_runner, admin.host, admin.port, reuse_address=True)
        await self._admin_site.start()
        log.info(
            "bgproxy listening",
            extra={
                "listen": f"{listen.host}:{self.proxy_port}",
                "weights": self.switchboard.weights.as_dict(),
                "dataplane": dataplane_build(),
            },
        )

    async def _tick(self) -> None:
        """Once a second: expire idle upstream connections."""
        while True:
            await asyncio.sleep(1.0)
            if self.router is not None:
                self.router.expire_idle()

    async def shutdown(self) -> None:
        """Graceful stop: unready at once, accept nothing new, let exchanges finish, then stop.

        Streams still open at `shutdown_timeout` are closed the way a drain closes them.
        """
        self.shutting_down = True
        log.info("shutting down", extra={"within": self.config.shutdown_timeout})
        if self._server is not None:
            self._server.close()
        if self.drainer is not None:
            await self.drainer.shutdown(self.config.shutdown_timeout)
        await self.stop()

    async def stop(self) -> None:
        """Close everything now (idempotent: the CLI calls it again after a graceful shutdown)."""
        if self._stopped:
            return
        self._stopped = True
        self.shutting_down = True
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self._server is not None:
            self._server.close()
        if self.router is not None:
            await self.router.health.stop()
            for conn in list(self.router.connections):
                conn.abort()
            for pool in self.router.pools.values():
                pool.close_idle()
        if self._server is not None:
            await self._server.wait_closed()
        log.info("bgproxy stopped")


def _check_admin_exposure(config: Config) -> None:
    """Anyone who can reach the admin API can move all traffic: off loopback, it needs a token."""
    if config.admin.tokens:
        return
    host = config.admin.listen.host
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConfigError(
            [
                f"admin.listen: {config.admin.listen} is not a loopback address and admin.tokens is empty; "
                "set a token (e.g. BGPROXY_ADMIN_TOKEN) or listen on 127.0.0.1"
            ]
        )
