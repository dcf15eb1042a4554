"""The two colors, one definition for every layer."""

from __future__ import annotations

from typing import Literal

from .errors import SwitchError

Color = Literal["blue", "green"]
COLORS: tuple[Color, Color] = ("blue", "green")


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
