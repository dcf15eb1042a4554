"""Where a request chooses its color: the route table the control plane installs, and ``pick()``.

The control plane validates every change (bgproxy.core) and then installs a fresh, immutable
RouteTable; the data plane only ever reads the one installed when a request's head is complete. So
a flip is seen by the very next request, and no request sees half a change.
"""

from __future__ import annotations

from typing import Final, final


@final
class SmoothWRR:
    """nginx's smooth weighted round robin over the two colors: exact ratios, evenly interleaved.

    With two colors the two ``current`` values always sum to zero, so one integer is enough;
    it is kept doubled so that the "is blue's current the max?" test needs no multiplication.
    Ties go to blue, as in nginx (first peer wins). The weights come validated from the control
    plane (integers >= 0, not both 0), which is why this can be compiled without its own checks.
    """

    __slots__ = ("_d", "_only", "_t", "_t2", "_w2")

    def __init__(self, blue: int, green: int) -> None:
        self._only = "blue" if green == 0 else ("green" if blue == 0 else "")
        self._d = 0  # 2 * current_blue; current_green == -current_blue
        self._w2 = 2 * blue
        self._t = blue + green
        self._t2 = 2 * (blue + green)

    def pick(self) -> str:
        """The color for the next request."""
        only = self._only
        if only:
            return only
        d = self._d + self._w2
        if d >= self._t:
            self._d = d - self._t2
            return "blue"
        self._d = d
        return "green"


@final
class RouteTable:
    """How new requests are routed, as of one switch version. Replaced whole, never edited.

    The picker inside advances as requests are routed (that is what makes the split exact); a new
    table starts it afresh, as nginx does when its upstream weights change.
    """

    __slots__ = ("blue", "green", "swrr", "version")

    def __init__(self, version: int, blue: int, green: int) -> None:
        self.version: Final = version
        self.blue: Final = blue
        self.green: Final = green
        self.swrr: Final = SmoothWRR(blue, green)

    def weight(self, color: str) -> int:
        return self.blue if color == "blue" else self.green


def pick(table: RouteTable) -> str:
    """The color of the next request: the one decision every proxied request makes."""
    return table.swrr.pick()
