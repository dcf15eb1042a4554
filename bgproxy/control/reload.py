"""Config reload (SIGHUP, POST /v1/reload): read and check the file again, then swap what changed.

Nothing is applied unless the whole file is valid. New requests use the new settings at once;
exchanges already running keep the settings they started with (each holds its own copy). Upstreams
that stay keep their balancer and health state; pools follow the "most recent intent wins" rule of
control.membership. The listeners are the caller's (the App binds a new listen address first).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, HealthCheckConfig
from ..core.colors import COLORS
from .configure import config_lists, dataplane_settings, outlier_policy, preview_policy, sticky_policy
from .controller import Controller, route_table
from .health import FlipGuard, HealthMonitor
from .membership import How, Membership
from .rollout import RolloutRunner

log = logging.getLogger("bgproxy.reload")

# Sections a running process cannot take over: they are reported, and apply at the next start.
RESTART_ONLY = (
    "admin",
    "metrics",
    "state_file",
    "state_store",
    "state_store_tls",
    "node_name",
    "events_file",
    "runtime_socket",
    "logging",
)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What the last reload did, as /v1/state shows it under last_reload."""

    at: float
    ok: bool
    errors: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    restart_required: tuple[str, ...] = ()
    pools: dict[str, list[str]] = field(default_factory=dict)  # colors whose membership the file replaced

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": list(self.errors),
            "changed": list(self.changed),
            "restart_required": list(self.restart_required),
            "pools": self.pools,
        }


def changed_sections(old: Config, new: Config) -> list[str]:
    """Top-level config keys whose value differs."""
    return [name for name in type(new).model_fields if getattr(old, name) != getattr(new, name)]


@dataclass(frozen=True, slots=True)
class Parts:
    """The running pieces a reload reconfigures."""

    controller: Controller
    health: HealthMonitor
    guard: FlipGuard
    membership: Membership
    rollouts: RolloutRunner


async def apply(old: Config, new: Config, parts: Parts, *, actor: str) -> ReloadResult:
    """Swap every section that changed (but the restart-only ones).

    Pools go first, since only they can fail (each is persisted): a failure there raises before any
    other setting has changed. Membership changes the file makes are forced: the file is the
    operator's newest intent, and a reload refused halfway would be worse.
    """
    changed = changed_sections(old, new)
    controller, membership = parts.controller, parts.membership
    runtime = membership.runtime
    replaced: dict[str, list[str]] = {}
    lists = config_lists(new)
    for color in COLORS:
        if lists[color] != membership.config_lists[color]:
            how = How(actor, "config reload", force=True, source="reload")
            change = await membership.replace(color, lists[color], how, config_list=lists[color])
            membership.config_lists[color] = lists[color]
            replaced[color] = list(change.upstreams)
    runtime.settings = dataplane_settings(new)
    if new.sticky != old.sticky:
        controller.sticky = sticky_policy(new)
    if new.preview != old.preview:
        controller.preview = preview_policy(new)
    controller.switchboard.drain_timeout = new.drain_timeout
    membership.drain_timeout = new.drain_timeout
    checks: dict[str, HealthCheckConfig | None] = {c: new.pools.get(c).health_check for c in COLORS}
    parts.health.reconfigure(checks, {c: outlier_policy(new, c) for c in COLORS})
    parts.guard.reconfigure(checks, new.flip_probe)
    parts.rollouts.reconfigure(new.rollout)
    for color in COLORS:
        pc = new.pools.get(color)
        pool = runtime.pools[color]
        pool.balance = pc.balance
        membership.max_idle[color] = pc.max_idle_per_upstream
        for up in pool.upstreams:
            up.max_idle = pc.max_idle_per_upstream
    runtime.install(route_table(controller.switchboard, controller.sticky, controller.preview))
    restart = [name for name in changed if name in RESTART_ONLY]
    if restart:
        log.warning("these settings apply at the next start, not on reload", extra={"sections": restart})
    return ReloadResult(
        time.time(), True, changed=tuple(changed), restart_required=tuple(restart), pools=replaced
    )
