"""Process wiring: builds the four layers from a config, starts the listeners, stops them.

core (decisions) <- dataplane (traffic) <- control (the only writer of switch state) <- admin (API)
<- this module and the CLI. Nothing below reaches up; this is where the pieces meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import cast

from aiohttp import web

from .admin.server import build_admin_app
from .config import Config, ConfigError, HealthCheckConfig, load_config
from .control import reload
from .control.audit import AuditLog, audit_event
from .control.configure import (
    color_pools,
    config_lists,
    dataplane_settings,
    outlier_policy,
    preview_policy,
    sticky_policy,
)
from .control.controller import Controller, route_table
from .control.drain import Drainer
from .control.fleet import Fleet
from .control.health import FlipGuard, HealthMonitor, readiness
from .control.membership import Membership, reconcile
from .control.reload import ReloadResult
from .control.rollout import RolloutRunner
from .control.shared import SharedStore, StoreConflict, Stored, StoreUnavailable, encode_document
from .control.state import FileStateBackend, PersistedState, StateFileError
from .control.stores import open_store
from .core.address import host_port, is_loopback, is_unspecified
from .core.colors import COLORS
from .core.switchboard import Switchboard
from .core.weights import Weights
from .dataplane import client
from .dataplane.client import ClientConnection
from .dataplane.runtime import Runtime
from .dataplane.stats import Stats

log = logging.getLogger("bgproxy")


def dataplane_build() -> str:
    """ "mypyc" when the data plane runs compiled (setup.py), "interpreted" for a BGPROXY_PURE=1 build.

    Logged at start: the two behave the same, but an operator comparing throughput needs to know.
    """
    return "interpreted" if (client.__file__ or "").endswith(".py") else "mypyc"


class _Started:
    """What exists only while the process runs: it needs the event loop."""

    def __init__(
        self,
        runtime: Runtime,
        health: HealthMonitor,
        drainer: Drainer,
        controller: Controller,
        rollouts: RolloutRunner,
        membership: Membership,
    ) -> None:
        self.runtime = runtime
        self.health = health
        self.drainer = drainer
        self.controller = controller
        self.rollouts = rollouts
        self.membership = membership


class App:
    """One running bgproxy: start() binds the listeners, stop() closes everything.

    Once started it is the admin side's read model (admin.readmodel.Process).
    """

    def __init__(self, config: Config, *, reset_state: bool = False, config_path: Path | None = None) -> None:
        """``reset_state``: ignore the state file (even a corrupt one) and seed it from the config.
        ``config_path``: the file reload reads again (none: reload is refused)."""
        _check_admin_exposure(config)
        self.config = config
        self.config_path = config_path
        self.last_reload: ReloadResult | None = None
        assert config.events_file is not None, "load_config sets it"
        self.audit = AuditLog(config.events_file)
        self.switchboard = Switchboard(
            Weights(config.weights.blue, config.weights.green),
            drain_timeout=config.drain_timeout,
            updated_at=time.time(),
        )
        self.state_store = FileStateBackend(config.state_file)
        self.shared = open_store(config, os.environ)
        self._store_error: str | None = None
        self.fleet: Fleet | None = None
        self._reset_state = reset_state
        metrics = config.metrics
        self.stats = Stats(
            metrics.latency_buckets, enabled=metrics.enabled, error_window=metrics.error_window
        )
        self._started: _Started | None = None
        self._server: asyncio.Server | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._admin_runner: web.AppRunner | None = None
        self.shutting_down = False
        self._stopped = False
        self._reload_lock = asyncio.Lock()
        self.listeners: dict[str, socket.socket] = {}  # what a takeover hands over
        self._admin_site: web.SockSite | None = None
        self.handed_over = False  # a new bgproxy accepts on our listeners now
        self._socket_activated = False

    # -- the read model (admin.readmodel.Process) -----------------------------------------------------
    @property
    def started(self) -> _Started:
        assert self._started is not None, "App.start() has not run"
        return self._started

    @property
    def runtime(self) -> Runtime:
        return self.started.runtime

    @property
    def controller(self) -> Controller:
        return self.started.controller

    @property
    def drainer(self) -> Drainer:
        return self.started.drainer

    @property
    def rollouts(self) -> RolloutRunner:
        return self.started.rollouts

    @property
    def membership(self) -> Membership:
        return self.started.membership

    def readiness(self) -> tuple[bool, str]:
        """Whether to take traffic, and why not (for /readyz)."""
        if self.shutting_down:
            return False, "shutting down"
        if self._started is None:
            return False, "starting"
        return readiness(self._started.runtime.pools, self.switchboard.weights)

    @property
    def admin_port(self) -> int:
        assert self._admin_runner is not None
        return int(self._admin_runner.addresses[0][1])

    @property
    def proxy_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _restore_shared(self, shared: SharedStore, node: str) -> tuple[PersistedState, int | None]:
        """The fleet's state, with the store's revision of it (None: the store is down at start).

        A store that cannot be reached is not a reason to refuse to start: the node starts from its
        last-known-good copy (the state file) and says so; with no copy either, it does refuse.
        """
        local = self.state_store
        board = self.switchboard
        try:
            stored = await shared.read()
            if stored is None:
                # The first node (or a store that lost its data): seed it with our copy or the config.
                seed = None if self._reset_state else local.load()
                if seed is None:
                    seed = PersistedState(board.weights, board.version, board.updated_at)
                try:
                    revision = await shared.swap(None, encode_document(seed, {"node": node, "actor": "seed"}))
                    stored = Stored(seed, revision, {})
                except StoreConflict:
                    stored = await shared.read()
                    assert stored is not None, "a conflict means a document is there"
        except StoreUnavailable as exc:
            saved = local.load()
            if saved is None:
                raise StateFileError(
                    local.path,
                    f"no local copy of the shared state to start from, and {exc}",
                ) from None
            log.warning(
                "state store unreachable at start: serving this node's last-known-good copy, "
                "refusing changes until the store answers",
                extra={"store": shared.where, "error": str(exc), "version": saved.version},
            )
            board.restore(saved.weights, saved.version, saved.updated_at)
            self._store_error = str(exc)
            return saved, None
        state = stored.state
        board.restore(state.weights, state.version, state.updated_at)
        local.save(state)
        return state, stored.revision

    def _restore_state(self) -> PersistedState:
        """The saved state wins over the config, whose weights only seed a missing one.

        Raises StateFileError for a corrupt or unwritable file: guessing could route to the wrong color.
        """
        saved = None if self._reset_state else self.state_store.load()
        if saved is not None:
            self.switchboard.restore(saved.weights, saved.version, saved.updated_at)
            return saved
        if self._reset_state:
            log.warning(
                "state file reset: seeding it from the config's weights",
                extra={"state_file": self.state_store.where},
            )
        board = self.switchboard
        # Written now, so an unwritable state file stops the start instead of failing the first flip.
        state = PersistedState(board.weights, board.version, board.updated_at)
        self.state_store.save(state)
        return state

    async def start(
        self, inherited: Mapping[str, socket.socket] | None = None, *, taking_over: bool = False
    ) -> None:
        """``inherited``: listening sockets from a takeover or systemd ("proxy", "admin"), used instead
        of binding; they win over the config's addresses (another bind would strand their backlog).
        ``taking_over``: they come from a running bgproxy, which still owns the state until it confirms
        the handover; no change is taken (nor a rollout driven) before ``took_over()``."""
        config = self.config
        admin_sock = (inherited or {}).get("admin")
        if admin_sock is not None:
            _check_admin_exposure(config, admin_sock.getsockname()[0])
        self.audit.load()
        self.audit.open()
        # Bound first: a fleet node is named by it unless node_name says otherwise.
        admin_sock = admin_sock or _bind(config.admin.listen.host, config.admin.listen.port)
        node = config.node_name or f"{socket.gethostname()}:{admin_sock.getsockname()[1]}"
        revision = None
        if self.shared is None:
            saved = self._restore_state()
        else:
            saved, revision = await self._restore_shared(self.shared, node)
        loop = asyncio.get_running_loop()
        try:
            lists, intent = reconcile(config_lists(config), saved.pools)
        except ValueError as exc:
            raise StateFileError(config.state_file, str(exc)) from None
        pools = color_pools(config, lists)
        checks: dict[str, HealthCheckConfig | None] = {c: config.pools.get(c).health_check for c in COLORS}
        health = HealthMonitor(
            pools,
            checks=checks,
            policies={c: outlier_policy(config, c) for c in COLORS},
        )
        sticky, preview = sticky_policy(config), preview_policy(config)
        table = route_table(self.switchboard, sticky, preview)
        runtime = Runtime(dataplane_settings(config), pools, self.stats, table, health)
        guard = FlipGuard(pools, checks, config.flip_probe)
        drainer = Drainer(
            runtime, self.switchboard, full_term=sticky is not None and sticky.on_zero_weight == "drain"
        )
        controller = Controller(
            self.switchboard,
            self.state_store,
            runtime,
            drainer,
            guard=guard,
            sticky=sticky,
            preview=preview,
            rollouts=saved.rollouts,
            pools=intent,
            audit=self.audit,
            shared=self.shared,
            node=node,
        )
        controller.revision = revision
        controller.store_error = self._store_error
        try:
            rollouts = RolloutRunner(controller, self.stats, config.rollout)
        except ValueError as exc:
            raise StateFileError(self.config.state_file, f"rollouts: {exc}") from None
        membership = Membership(
            controller,
            runtime,
            health,
            guard,
            drainer,
            config_lists=config_lists(config),
            max_idle={c: config.pools.get(c).max_idle_per_upstream for c in COLORS},
            drain_timeout=config.drain_timeout,
        )
        if self.shared is not None:
            self.fleet = Fleet(
                controller,
                self.shared,
                self.stats,
                node=node,
                admin_url=_advertised(admin_sock),
            )
            rollouts.join(self.fleet)
            controller.on_pools = membership.adopt
        self._started = _Started(runtime, health, drainer, controller, rollouts, membership)
        self._reload_parts = reload.Parts(controller, health, guard, membership, rollouts)
        health.start()
        listen = config.listen
        inherited = dict(inherited or {})
        self._socket_activated = bool(inherited) and not taking_over
        if taking_over:
            controller.frozen = "this bgproxy is still taking over from the running one"
        self._server, self.listeners["proxy"] = await self._listen(config, inherited.pop("proxy", None))
        self._housekeeping = loop.create_task(self._tick())
        await rollouts.start_loop()
        admin = config.admin
        self._admin_runner = web.AppRunner(
            build_admin_app(self, admin.tokens), access_log=None, handle_signals=False
        )
        await self._admin_runner.setup()
        inherited.pop("admin", None)
        self.listeners["admin"] = admin_sock
        self._admin_site = web.SockSite(self._admin_runner, admin_sock)
        await self._admin_site.start()
        if self.fleet is not None:
            self.fleet.start()
        log.info(
            "bgproxy listening",
            extra={
                "listen": f"{listen.host}:{self.proxy_port}",
                "weights": self.switchboard.weights.as_dict(),
                "dataplane": dataplane_build(),
            },
        )

    def took_over(self) -> None:
        """The old process confirmed the handover: the state is ours now."""
        self.controller.frozen = None
        log.info("took over: this process takes changes now")

    async def reload(self, *, actor: str) -> ReloadResult:
        """Read the config file again; apply it whole, or keep the running config and say why.

        One reload at a time; a listen address that changed is bound before the old one is closed.
        """
        async with self._reload_lock:
            result = await self._reload(actor)
            self.last_reload = result
            await self.controller.record(
                audit_event(
                    "reload",
                    at=result.at,
                    actor=actor,
                    reason=None,
                    ok=result.ok,
                    errors=list(result.errors),
                    changed=list(result.changed),
                    restart_required=list(result.restart_required),
                )
            )
            return result

    async def _reload(self, actor: str) -> ReloadResult:
        def refused(*problems: str) -> ReloadResult:
            for problem in problems:
                log.error("reload refused: %s", problem, extra={"config": str(self.config_path)})
            return ReloadResult(time.time(), False, problems)

        if self.config_path is None:
            return refused("bgproxy was started without a config file")
        if self.controller.frozen is not None:
            return refused(f"{self.controller.frozen}; the running config stays")
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
            _check_admin_exposure(new)
        except ConfigError as exc:
            return refused(*exc.problems)
        old = self.config
        server: asyncio.Server | None = None
        sock: socket.socket | None = None
        if new.listen != old.listen:
            if self._socket_activated:
                return refused(
                    f"listen: the listening socket comes from systemd; change ListenStream in the .socket "
                    f"unit instead (got {str(new.listen)!r})"
                )
            try:
                server, sock = await self._listen(new)
            except OSError as exc:
                return refused(
                    f"listen: cannot bind {new.listen}: {exc.strerror or exc} (got {str(new.listen)!r})"
                )
        try:
            result = await reload.apply(old, new, self._reload_parts, actor=actor)
        except Exception as exc:  # a pool change could not be saved: nothing else was swapped
            if server is not None:
                server.close()
            return refused(f"not applied: {exc}")
        if server is not None and sock is not None:
            assert self._server is not None
            self._server.close()  # open connections go on; only the old listening socket goes
            self._server = server
            self.listeners["proxy"] = sock
        restart_only = {name: getattr(old, name) for name in result.restart_required}
        self.config = new.model_copy(update=restart_only)  # what runs, not what the file says
        log.info("config reloaded", extra={"changed": list(result.changed), "by": actor})
        return result

    async def _listen(
        self, config: Config, sock: socket.socket | None = None
    ) -> tuple[asyncio.Server, socket.socket]:
        """Accept client connections on ``sock`` (inherited) or on a new socket bound to ``listen``."""
        runtime = self.runtime
        if sock is None:
            sock = _bind(config.listen.host, config.listen.port)
        elif sock.getsockname()[:2] != (config.listen.host, config.listen.port):
            log.warning(
                "serving on the inherited listening socket, not the config's listen address",
                extra={"inherited": str(sock.getsockname()[:2]), "listen": str(config.listen)},
            )
        server = await asyncio.get_running_loop().create_server(
            lambda: cast(asyncio.Protocol, ClientConnection(runtime)), sock=sock, backlog=BACKLOG
        )
        return server, sock

    async def _tick(self) -> None:
        """Once a second: expire idle upstream connections."""
        while True:
            await asyncio.sleep(1.0)
            self.runtime.expire_idle()

    async def shutdown(self) -> None:
        """Graceful stop: unready at once, accept nothing new, let exchanges finish, then stop.

        Streams still open at `shutdown_timeout` are closed the way a drain closes them.
        """
        self.shutting_down = True
        log.info("shutting down", extra={"within": self.config.shutdown_timeout})
        if self._started is not None:
            self.controller.frozen = self.controller.frozen or "bgproxy is shutting down"
        if self.fleet is not None:
            await self.fleet.step_down()  # another node takes rollouts over; this one still follows
        if self.handed_over and self._admin_site is not None:
            # The new process answers the admin API on the same socket: leave it all of it.
            await self._admin_site.stop()
        if self._server is not None:
            self._server.close()
        if self._started is not None:
            await self._started.drainer.shutdown(self.config.shutdown_timeout)
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
        started = self._started
        if started is not None:
            await started.rollouts.stop()
        if self.fleet is not None:  # after the rollouts: nothing writes to the store once it is closed
            await self.fleet.stop()
        elif self.shared is not None:
            await self.shared.close()
        if started is not None:
            await started.health.stop()
            started.drainer.close()
            for conn in list(started.runtime.connections):
                conn.abort()
            for pool in started.runtime.pools.values():
                pool.close_idle()
        if self._server is not None:
            await self._server.wait_closed()
        self.audit.close()
        log.info("bgproxy stopped")


BACKLOG = 4096


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; a raw one, so a takeover can pass it to the next bgproxy."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    sock.setblocking(False)
    return sock


def _advertised(sock: socket.socket) -> str:
    """The admin URL other nodes reach: this host's name for a wildcard bind (0.0.0.0, ::)."""
    host, port = sock.getsockname()[:2]
    return f"http://{host_port(socket.gethostname() if is_unspecified(host) else host, port)}"


def _check_admin_exposure(config: Config, host: str | None = None) -> None:
    """Anyone who can reach the admin API can move all traffic: off loopback, it needs a token.

    ``host``: the address an inherited admin socket really listens on (it wins over the config's).
    """
    if config.admin.tokens:
        return
    where = f"admin.listen: {config.admin.listen}" if host is None else f"the inherited admin socket ({host})"
    host = config.admin.listen.host if host is None else host
    if not is_loopback(host):
        raise ConfigError(
            [
                f"{where} is not a loopback address and admin.tokens is empty; "
                "set a token (e.g. BGPROXY_ADMIN_TOKEN) or listen on 127.0.0.1"
            ]
        )
