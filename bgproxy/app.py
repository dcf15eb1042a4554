"""Process wiring: the proxy listener, the switching state, the housekeeping timers."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time

from aiohttp import web

from .admin import build_admin_app
from .config import Config, ConfigError
from .control import Controller
from .proxy import ClientConnection
from .router import Router
from .state_store import PersistedState, StateStore
from .stats import Stats
from .switching import Switchboard, SwitchResult, Weights

log = logging.getLogger("bgproxy")


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
        self.controller.observers.append(self._close_idle_of_drained)
        self.stats = Stats(config.metrics.latency_buckets)
        self.router: Router | None = None
        self._server: asyncio.Server | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._admin_runner: web.AppRunner | None = None
        self._admin_site: web.TCPSite | None = None
        self.shutting_down = False

    @property
    def admin_port(self) -> int:
        assert self._admin_runner is not None
        addrs = self._admin_runner.addresses
        return int(addrs[0][1])

    def readiness(self) -> tuple[bool, str]:
        """Whether to take traffic, and why not (for /readyz)."""
        if self.shutting_down:
            return False, "shutting down"
        if self.router is None:
            return False, "starting"
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

    def _close_idle_of_drained(self, result: SwitchResult) -> None:
        """A color that lost its weight gets no new requests: its pooled idle connections are useless."""
        if self.router is not None:
            for drain in result.started_draining:
                self.router.close_idle(drain.color)

    async def start(self) -> None:
        self._restore_state()
        loop = asyncio.get_running_loop()
        router = self.router = Router(self.config, self.switchboard, self.stats)
        listen = self.config.listen
        self._server = await loop.create_server(
            lambda: ClientConnection(router), listen.host, listen.port, reuse_address=True, backlog=4096
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
            },
        )

    async def _tick(self) -> None:
        """Once a second: expire idle upstream connections."""
        while True:
            await asyncio.sleep(1.0)
            if self.router is not None:
                self.router.expire_idle()

    async def stop(self) -> None:
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
