"""The versioned switchboard: weights, version, audit events and drains, changed only whole.

Pure state and no I/O (modelled on h11): the current time is always passed in as ``now``, so the
control plane and the tests drive the same code with whatever clock they have. Every method either
fully applies or raises before touching anything, so a refused change leaves the state exactly as it
was. The data plane never reads this object: the control plane turns each applied change into a
route table (bgproxy.dataplane.routing) and installs that.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .colors import Color, check_color, other
from .drain import Drain, drains_cancelled, drains_started, due
from .errors import SwitchError, VersionConflict
from .weights import Weights


def _check_seconds(name: str, value: object, *, positive: bool) -> float:
    # NaN or inf here would give a drain that never ends, so reject them up front.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SwitchError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise SwitchError(f"{name} must be > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class SwitchEvent:
    """One applied change, for the audit log."""

    version: int
    at: float
    from_weights: Weights
    to_weights: Weights
    actor: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class SwitchResult:
    """What a change did, so the caller can act on drains without diffing state itself."""

    changed: bool
    event: SwitchEvent | None
    started_draining: tuple[Drain, ...]
    cancelled_draining: tuple[Color, ...]


_UNCHANGED = SwitchResult(changed=False, event=None, started_draining=(), cancelled_draining=())


class Switchboard:
    """The versioned switching state: weights, version, audit events, drains.

    Invariant: only a color with weight 0 can be draining.
    """

    __slots__ = ("_drain_timeout", "_drains", "_events", "_updated_at", "_version", "_weights")

    _weights: Weights
    _version: int
    _updated_at: float

    def __init__(
        self,
        weights: Weights,
        *,
        drain_timeout: float,
        version: int = 0,
        updated_at: float = 0.0,
        max_events: int = 1000,
    ) -> None:
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 0:
            raise SwitchError(f"max_events must be an integer >= 0, got {max_events!r}")
        self._drain_timeout = _check_seconds("drain_timeout", drain_timeout, positive=True)
        self._events: deque[SwitchEvent] = deque(maxlen=max_events)
        self._drains: dict[Color, Drain] = {}
        self.restore(weights, version, updated_at)

    @property
    def weights(self) -> Weights:
        return self._weights

    @property
    def drain_timeout(self) -> float:
        """The default drain deadline for changes that do not name one."""
        return self._drain_timeout

    @drain_timeout.setter
    def drain_timeout(self, seconds: float) -> None:
        self._drain_timeout = _check_seconds("drain_timeout", seconds, positive=True)

    @property
    def version(self) -> int:
        return self._version

    @property
    def updated_at(self) -> float:
        return self._updated_at

    def set_weights(
        self,
        new: Weights,
        *,
        now: float,
        actor: str = "local",
        reason: str | None = None,
        expected_version: int | None = None,
        drain_timeout: float | None = None,
    ) -> SwitchResult:
        self._check_version(expected_version)
        return self._apply(new, now=now, actor=actor, reason=reason, drain_timeout=drain_timeout)

    def flip(
        self,
        to: Color | None = None,
        *,
        now: float,
        actor: str = "local",
        reason: str | None = None,
        expected_version: int | None = None,
        drain_timeout: float | None = None,
    ) -> SwitchResult:
        """Send all traffic to one color; ``to=None`` means away from the live one."""
        # A stale client must hear about the conflict first: its view of what is live is outdated.
        self._check_version(expected_version)
        current = self._weights
        if to is None:
            active = current.active
            if active is None:
                raise SwitchError(
                    f"weights are split (blue={current.blue}, green={current.green}): "
                    "say which color to flip to"
                )
            target = other(active)
        else:
            target = check_color(to)
        total = current.total
        new = Weights(blue=total, green=0) if target == "blue" else Weights(blue=0, green=total)
        return self._apply(new, now=now, actor=actor, reason=reason, drain_timeout=drain_timeout)

    def touch(self, now: float, expected_version: int | None = None) -> int:
        """A change beside the weights (pool membership): one more version, so If-Match covers it too."""
        self._check_version(expected_version)
        at = _check_seconds("now", now, positive=False)
        self._version += 1
        self._updated_at = at
        return self._version

    def events(self) -> list[SwitchEvent]:
        """Applied changes, oldest first; only the newest ``max_events`` are kept."""
        return list(self._events)

    def drains(self) -> dict[Color, Drain]:
        return dict(self._drains)

    def drain_of(self, color: Color) -> Drain | None:
        return self._drains.get(check_color(color))

    def due_drains(self, now: float) -> list[Drain]:
        """Drains whose deadline has passed.

        They stay registered: the data plane closes their streams, then calls finish_drain.
        """
        return due(self._drains, now)

    def finish_drain(self, color: Color) -> None:
        """End a drain. Idempotent: the deadline and the last stream closing may both report it."""
        self._drains.pop(check_color(color), None)

    def restore(self, weights: Weights, version: int, updated_at: float) -> None:
        """Load the persisted state: it records no drains, so none survive; no event is logged."""
        if not isinstance(weights, Weights):
            raise SwitchError(f"weights must be Weights, got {weights!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise SwitchError(f"version must be an integer >= 0, got {version!r}")
        updated = _check_seconds("updated_at", updated_at, positive=False)
        self._weights = weights
        self._version = version
        self._updated_at = updated
        self._drains.clear()

    def adopt(
        self,
        weights: Weights,
        version: int,
        updated_at: float,
        *,
        now: float,
        actor: str,
        reason: str | None = None,
        drain_timeout: float | None = None,
    ) -> SwitchResult:
        """Take a version another node of the fleet wrote: its weights (draining what lost weight, as
        a local change would) under its version number, so every node shows the same version."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise SwitchError(f"version must be an integer >= 0, got {version!r}")
        updated = _check_seconds("updated_at", updated_at, positive=False)
        result = self._apply(
            weights, now=now, actor=actor, reason=reason, drain_timeout=drain_timeout, version=version
        )
        self._version = version
        self._updated_at = updated
        return result

    def _check_version(self, expected: int | None) -> None:
        if expected is not None and expected != self._version:
            raise VersionConflict(expected, self._version)

    def _apply(
        self,
        new: Weights,
        *,
        now: float,
        actor: str,
        reason: str | None,
        drain_timeout: float | None,
        version: int | None = None,
    ) -> SwitchResult:
        """Validate everything, then mutate: nothing below the checks can raise."""
        if not isinstance(new, Weights):
            raise SwitchError(f"weights must be Weights, got {new!r}")
        at = _check_seconds("now", now, positive=False)
        timeout = (
            self._drain_timeout
            if drain_timeout is None
            else _check_seconds("drain_timeout", drain_timeout, positive=True)
        )
        old = self._weights
        if new == old:
            return _UNCHANGED
        started = drains_started(old, new, at, timeout)
        cancelled = drains_cancelled(self._drains, new)
        event = SwitchEvent(
            version=self._version + 1 if version is None else version,
            at=at,
            from_weights=old,
            to_weights=new,
            actor=actor,
            reason=reason,
        )
        self._weights = new
        self._version = event.version
        self._updated_at = at
        for c in cancelled:
            del self._drains[c]
        for d in started:
            self._drains[d.color] = d
        self._events.append(event)
        return SwitchResult(changed=True, event=event, started_draining=started, cancelled_draining=cancelled)
