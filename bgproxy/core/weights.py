"""Traffic weights: the rules every way of setting them (config, API, state file) shares."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .colors import COLORS, Color, check_color
from .errors import SwitchError
from .jsontext import exact_keys

NO_TRAFFIC = "at least one color needs a weight > 0"


def check_weight(color: str, value: object) -> int:
    """A weight is an integer >= 0; raises SwitchError naming the color otherwise."""
    # bool is an int subclass, but {"blue": true} is a client bug, not a weight of 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise SwitchError(f"weight for {color} must be an integer, got {value!r}")
    if value < 0:
        raise SwitchError(f"weight for {color} must be >= 0, got {value}")
    return value


def check_some_traffic(blue: int, green: int) -> None:
    """Both weights at 0 would route nothing anywhere: refused wherever weights are set."""
    if blue == 0 and green == 0:
        raise SwitchError(NO_TRAFFIC)


@dataclass(frozen=True, slots=True)
class Weights:
    """Relative traffic shares of the two colors; validated on construction so none can be invalid."""

    blue: int
    green: int

    def __post_init__(self) -> None:
        check_weight("blue", self.blue)
        check_weight("green", self.green)
        check_some_traffic(self.blue, self.green)

    @classmethod
    def from_mapping(cls, m: Mapping[str, object]) -> Weights:
        """Build from untrusted input (a JSON body, a state file), naming the first bad key."""
        if not isinstance(m, Mapping):
            raise SwitchError(f"weights must be a mapping with keys 'blue' and 'green', got {m!r}")
        try:
            exact_keys(m, COLORS, "weights")
        except ValueError as exc:
            raise SwitchError(str(exc)) from None
        return cls(blue=check_weight("blue", m["blue"]), green=check_weight("green", m["green"]))

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
