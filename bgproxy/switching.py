"""The switching core: weights, smooth weighted round robin, the versioned switchboard.

Pure state and no I/O (modelled on h11): the current time is always passed in as ``now``, so the
data plane, the admin API and the tests drive the same code with whatever clock they have. Every
method either fully applies or raises before touching anything, so a refused change leaves the
state exactly as it was.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Color = Literal["blue", "green"]
COLORS: tuple[Color, Color] = ("blue", "green")


class SwitchError(ValueError):
    """A refused change; message is shown to API users. The state is untouched."""


class VersionConflict(SwitchError):
    """If-Match/expected_version was stale."""

    def __init__(self, expected: int, current: int) -> None:
        super().__init__(f"version conflict: expected version {expected}, current version is {current}")
        self.expected = expected
        self.current = current


def check_color(value: object) -> Color:
    """Narrow untrusted input (JSON, CLI) to a Color, since typing cannot vouch for it at runtime."""
    if value == "blue":
        return "blue"
    if value == "green":
        return "green"
    raise SwitchError(f"unknown color {value!r}: expected 'blue' or 'green'")


def other(color: Color) -> Color:
    """The color that is not ``color``; strict, so a typo can never silently mean green."""
    return "green" if check_color(color) == "blue" else "blue"


def _check_weight(color: str, value: object) -> int:
    # bool is an int subclass, but {"blue": true} is a client bug, not a weight of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SwitchError(f"weight for {color} must be an integer, got {value!r}")
    if value < 0:
        raise SwitchError(f"weight for {color} must be >= 0, got {value}")
    return value


def _check_seconds(name: str, value: object, *, positive: bool) -> float:
    # NaN or inf here would give a drain that never ends, so reject them up front.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SwitchError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise SwitchError(f"{name} must be > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Weights:
    """Relative traffic shares of the two colors; validated on construction so none can be invalid."""

    blue: int
    green: int

    def __post_init__(self) -> None:
        _check_weight("blue", self.blue)
        _check_weight("green", self.green)
        if self.blue == 0 and self.green == 0:
            raise SwitchError("at least one color needs a weight > 0 (got blue=0, green=0)")

    @classmethod
    def from_mapping(cls, m: Mapping[str, object]) -> Weights:
        """Build from untrusted input (a JSON body, a state file), naming the first bad key."""
        if not isinstance(m, Mapping):
            raise SwitchError(f"weights must be a mapping with keys 'blue' and 'green', got {m!r}")
        for key in m:
            if key not in COLORS:
                raise SwitchError(f"unknown key {key!r} in weights: expected exactly 'blue' and 'green'")
        for color in COLORS:
            if color not in m:
                raise SwitchError(f"missing key {color!r} in weights: expected exactly 'blue' and 'green'")
        return cls(blue=_check_weight("blue", m["blue"]), green=_check_weight("green", m["green"]))

    def of(self, color: Color) -> int:
        return self.blue if check_color(color) == "blue" else self.green

    def as_dict(self) -> dict[str, int]:
        return {"blue": self.blue, "green": self.green}

    @property
    def total(self) -> int:
        return self.blue + self.green

    @property
    def active(self) -> Color | None:
        """The only color with weight > 0, or None while both have weight."""
        if self.green == 0:
            return "blue"
        if self.blue == 0:
            return "green"
        return None


class SmoothWRR:
    """nginx's smooth weighted round robin over the two colors: exact ratios, evenly interleaved.

    With two colors the two ``current`` values always sum to zero, so one integer is enough;
    it is kept doubled so that the "is blue's current the max?" test needs no multiplication.
    Ties go to blue, as in nginx (first peer wins).
    """

    __slots__ = ("_d", "_only", "_t", "_t2", "_w2")

    def __init__(self, weights: Weights) -> None:
        self._only: Color | None = weights.active
        self._d = 0  # 2 * current_blue; current_green == -current_blue
        self._w2 = 2 * weights.blue
        self._t = weights.total
        self._t2 = 2 * weights.total

    def pick(self) -> Color:
        """Hot path, called once per proxied request."""
        only = self._only
        if only is not None:
            return only
        d = self._d + self._w2
        if d >= self._t:
            self._d = d - self._t2
            return "blue"
        self._d = d
        return "green"


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
class Drain:
    """A color that lost all its weight: its open streams may finish until ``deadline``."""

    color: Color
    started_at: float
    deadline: float


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

    __slots__ = ("_drain_timeout", "_drains", "_events", "_swrr", "_updated_at", "_version", "_weights")

    _weights: Weights
    _version: int
    _updated_at: float
    _swrr: SmoothWRR

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
    def version(self) -> int:
        return self._version

    @property
    def updated_at(self) -> float:
        return self._updated_at

    def choose(self) -> Color:
        """Hot path: the color for the next request."""
        return self._swrr.pick()

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
        return [d for d in self._drains.values() if d.deadline <= now]

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
        self._swrr = SmoothWRR(weights)
        self._drains.clear()

    def _check_version(self, expected: int | None) -> None:
        if expected is not None and expected != self._version:
            raise VersionConflict(expected, self._version)

    def _apply(
        self, new: Weights, *, now: float, actor: str, reason: str | None, drain_timeout: float | None
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
        started = tuple(
            Drain(color=c, started_at=at, deadline=at + timeout)
            for c in COLORS
            if old.of(c) > 0 and new.of(c) == 0
        )
        cancelled = tuple(c for c in COLORS if c in self._drains and new.of(c) > 0)
        event = SwitchEvent(
            version=self._version + 1, at=at, from_weights=old, to_weights=new, actor=actor, reason=reason
        )
        self._weights = new
        self._version = event.version
        self._updated_at = at
        self._swrr = SmoothWRR(new)
        for c in cancelled:
            del self._drains[c]
        for d in started:
            self._drains[d.color] = d
        self._events.append(event)
        return SwitchResult(changed=True, event=event, started_draining=started, cancelled_draining=cancelled)
