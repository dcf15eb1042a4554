"""Pool membership at run time: add, remove or replace a color's upstreams without dropping a request.

A change swaps the pool's list whole (the data plane picks from the old list or the new one, never a
mix). Upstreams that stay keep their balancer and health state; an added one answers the flip probe
first; a removed one gets no new request, its in-flight exchanges finish, its streams drain until the
color's drain_timeout like a drained color's, then its connections close. Every change is one more
switch-state version (If-Match covers it) and is persisted with the weights.

The most recent intent wins. The state file keeps, per changed color, the list set at run time and
the config's list it replaced. At start and on reload a color whose list in the file changed since is
taken from the file (it is the newer intent); one whose file list is unchanged keeps the run-time list.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..config import HostPort
from ..core.colors import COLORS, Color, check_color
from ..core.errors import SwitchError
from ..dataplane.pool import Upstream
from ..dataplane.runtime import Runtime
from .audit import audit_event
from .controller import Controller, PoolPlan
from .drain import Drainer
from .health import FlipGuard, HealthMonitor

log = logging.getLogger("bgproxy.pools")

Lists = dict[str, list[str]]


class NotMember(LookupError):
    """DELETE of an upstream the color does not have (answered 404)."""


@dataclass(frozen=True, slots=True)
class How:
    """Who asks for a membership change and on what terms."""

    actor: str
    reason: str | None = None
    expected_version: int | None = None  # If-Match
    force: bool = False  # skip the probe of new upstreams and the last-upstream check
    source: str = "api"


@dataclass(frozen=True, slots=True)
class Change:
    """What a membership change did, for the answer and the audit log."""

    color: Color
    added: tuple[str, ...]
    removed: tuple[str, ...]
    upstreams: tuple[str, ...]
    version: int


def parse_upstreams(addrs: Sequence[str]) -> list[HostPort]:
    """host:port strings to addresses; ValueError naming the bad one, or a repeated one."""
    out: list[HostPort] = []
    for addr in addrs:
        try:
            hp = HostPort.parse(addr, "upstream")
        except ValueError as exc:
            raise ValueError(f"{addr!r}: {exc}") from None
        if hp.port == 0:
            raise ValueError(f"{addr!r}: port must be 1..65535")
        if str(hp) in (str(h) for h in out):
            raise ValueError(f"{addr!r} is listed twice")
        out.append(hp)
    return out


def reconcile(config_lists: Lists, saved: Mapping[str, Any] | None) -> tuple[Lists, dict[str, Any] | None]:
    """The membership to run with, and the run-time changes still in force, by "most recent intent wins".

    Raises ValueError for a malformed saved record (the caller names the state file).
    """
    effective: Lists = {c: list(config_lists[c]) for c in COLORS}
    kept: dict[str, Any] = {}
    for color, entry in (saved or {}).items():
        check_color(color)
        if not isinstance(entry, dict) or set(entry) != {"upstreams", "config"}:
            raise ValueError(f"pools.{color} must be an object with upstreams and config")
        lists = [entry["upstreams"], entry["config"]]
        if not all(isinstance(x, list) and all(isinstance(a, str) for a in x) for x in lists):
            raise ValueError(f"pools.{color}: upstreams and config must be lists of host:port")
        parse_upstreams(entry["upstreams"])
        if entry["config"] == config_lists[color]:
            effective[color] = list(entry["upstreams"])
            kept[color] = entry
        else:
            log.warning(
                "the config changed this pool since it was changed at run time: the config wins",
                extra={"color": color, "config": config_lists[color], "was": entry["upstreams"]},
            )
    return effective, kept or None


class Membership:
    """Changes the live pools; one per process, through the Controller's lock and version."""

    def __init__(
        self,
        controller: Controller,
        runtime: Runtime,
        health: HealthMonitor,
        guard: FlipGuard,
        drainer: Drainer,
        *,
        config_lists: Lists,
        max_idle: Mapping[str, int],
        drain_timeout: float,
    ) -> None:
        self._controller = controller
        self.runtime = runtime
        self._health = health
        self._guard = guard
        self._drainer = drainer
        self.config_lists = config_lists
        self.max_idle = dict(max_idle)
        self.drain_timeout = drain_timeout

    def members(self, color: Color) -> list[str]:
        return [up.addr for up in self.runtime.pools[color].upstreams]

    async def add(self, color: Color, addr: str, how: How) -> Change:
        key = str(parse_upstreams([addr])[0])

        def edit(live: list[str]) -> list[str]:
            if key in live:
                raise SwitchError(f"{addr} is already an upstream of {color}; nothing changed")
            return [*live, key]

        return await self._change(color, edit, how)

    async def remove(self, color: Color, addr: str, how: How) -> Change:
        key = str(parse_upstreams([addr])[0])

        def edit(live: list[str]) -> list[str]:
            if key not in live:
                raise NotMember(f"{addr} is not an upstream of {color}")
            return [a for a in live if a != key]

        return await self._change(color, edit, how)

    async def replace(
        self, color: Color, addrs: Sequence[str], how: How, *, config_list: list[str] | None = None
    ) -> Change:
        """Make ``addrs`` the color's upstreams. SwitchError (409) if refused; nothing changes then.

        ``config_list``: the file's list this change is measured against (a reload's new one).
        """
        wanted = [str(hp) for hp in parse_upstreams(addrs)]
        return await self._change(color, lambda live: wanted, how, config_list)

    def adopt(self, intent: Mapping[str, Any] | None) -> None:
        """Another node's membership change (it probed the new upstreams): same swap, no probe."""
        try:
            lists, _ = reconcile(self.config_lists, intent)
        except ValueError as exc:
            log.error("the shared state's pools do not read; keeping these: %s", exc)
            return
        for color in COLORS:
            pool = self.runtime.pools[color]
            by_addr = {up.addr: up for up in pool.upstreams}
            wanted = lists[color]
            if wanted == list(by_addr):
                continue
            fresh = {a: _upstream(color, a, self.max_idle[color]) for a in wanted if a not in by_addr}
            removed = [up for up in pool.upstreams if up.addr not in wanted]
            self._swap(color, wanted, by_addr, fresh, removed)
            log.info("pool membership changed by another node", extra={"color": color, "upstreams": wanted})

    def _swap(
        self,
        color: Color,
        wanted: list[str],
        by_addr: Mapping[str, Upstream],
        fresh: Mapping[str, Upstream],
        removed: Sequence[Upstream],
    ) -> None:
        """Install the new list whole; removed upstreams drain, new ones are health-checked."""
        self.runtime.pools[color].replace([by_addr.get(a) or fresh[a] for a in wanted])
        for up in removed:
            up.retire()
            self._health.unwatch(up)
            self._drainer.drain_upstream(up, self.drain_timeout)
        for up in fresh.values():
            self._health.watch(up)

    async def _change(
        self,
        color: Color,
        edit: Callable[[list[str]], list[str]],
        how: How,
        config_list: list[str] | None = None,
    ) -> Change:
        """Plan from the live list under the Controller's lock, so concurrent changes compose."""
        color = check_color(color)
        pool = self.runtime.pools[color]
        planned: list[Change] = []

        async def plan() -> PoolPlan | None:
            by_addr = {up.addr: up for up in pool.upstreams}
            wanted = edit(list(by_addr))
            added = [a for a in wanted if a not in by_addr]
            removed = [up for up in pool.upstreams if up.addr not in wanted]
            planned.append(Change(color, tuple(added), tuple(u.addr for u in removed), tuple(wanted), 0))
            if not added and not removed:
                return None
            fresh = {a: _upstream(color, a, self.max_idle[color]) for a in added}
            if fresh and not how.force:
                await self._guard.admit(color, list(fresh.values()))
            weight = self._controller.switchboard.weights.of(color)
            if not wanted and weight and not how.force:
                raise SwitchError(
                    f"{color} has weight {weight}: removing its last upstream would fail its traffic; "
                    'nothing changed. Send "force": true to remove it anyway.'
                )

            def apply() -> None:
                self._swap(color, wanted, by_addr, fresh, removed)

            file_list = self.config_lists[color] if config_list is None else config_list
            intent = dict(self._controller.pools or {})
            if wanted == file_list:
                intent.pop(color, None)  # back to what the file says: nothing to remember
            else:
                intent[color] = {"upstreams": wanted, "config": file_list}
            event = audit_event(
                "pool",
                at=time.time(),
                actor=how.actor,
                reason=how.reason,
                color=color,
                added=added,
                removed=[up.addr for up in removed],
                upstreams=wanted,
                source=how.source,
            )
            return PoolPlan(intent or None, apply, event)

        version = await self._controller.commit_pools(plan, expected_version=how.expected_version)
        change = replace(planned[-1], version=version)
        if change.added or change.removed:
            log.info(
                "pool membership changed",
                extra={
                    "color": color,
                    "added": list(change.added),
                    "removed": list(change.removed),
                    "upstreams": list(change.upstreams),
                    "version": version,
                    "actor": how.actor,
                    "reason": how.reason,
                    "source": how.source,
                },
            )
        return change


def _upstream(color: str, addr: str, max_idle: int) -> Upstream:
    hp = HostPort.parse(addr, "upstream")
    return Upstream(color, hp.host, hp.port, max_idle)
