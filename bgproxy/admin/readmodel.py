"""What the admin side sees of a running bgproxy: a narrow, typed view instead of the App itself."""

from __future__ import annotations

from typing import Protocol

from ..control.audit import AuditLog
from ..control.controller import Controller
from ..control.drain import Drainer
from ..control.fleet import Fleet
from ..control.membership import Membership
from ..control.reload import ReloadResult
from ..control.rollout import RolloutRunner
from ..core.switchboard import Switchboard
from ..dataplane.runtime import Runtime
from ..dataplane.stats import Stats


class Process(Protocol):
    """A started bgproxy process, as the admin handlers, metrics and probes read it."""

    @property
    def switchboard(self) -> Switchboard:
        """The switch state; read only here, changed through ``controller``."""

    @property
    def controller(self) -> Controller: ...

    @property
    def drainer(self) -> Drainer: ...

    @property
    def rollouts(self) -> RolloutRunner:
        """Guarded rollouts: the running one, the recent ones; changed only through its methods."""

    @property
    def runtime(self) -> Runtime:
        """The data plane: live pools, exchanges in flight, its clock."""

    @property
    def stats(self) -> Stats: ...

    @property
    def membership(self) -> Membership:
        """Pool membership; changed only through its methods."""

    @property
    def fleet(self) -> Fleet | None:
        """This node's part in a fleet (state_store etcd or Redis); None for a single instance."""

    @property
    def last_reload(self) -> ReloadResult | None: ...

    @property
    def audit(self) -> AuditLog:
        """The audit log GET /v1/events reads."""

    async def reload(self, *, actor: str) -> ReloadResult:
        """Read the config file again and apply it whole, or keep the running one."""

    def readiness(self) -> tuple[bool, str]:
        """Whether to take traffic, and why not (for /readyz)."""
