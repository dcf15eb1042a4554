"""Upstream health: active HTTP probes and passive outlier ejection (after Envoy's outlier_detection).

Both end in one flag the hot path reads, `Upstream.available`, so a request pays nothing for
health beyond one attribute check when it picks an upstream and one counter when it is answered.
The decisions (when an upstream turns, when it is ejected and for how long) are core.health's; this
module runs the probes, keeps the clocks and applies the verdicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from ..config import HealthCheckConfig
from ..core.colors import COLORS
from ..core.errors import SwitchError
from ..core.health import CheckState, OutlierPolicy, after_check, after_failure
from ..core.weights import Weights
from ..dataplane.pool import ColorPool, Upstream

log = logging.getLogger("bgproxy.health")

FLIP_PROBE_TIMEOUT = 1.0  # seconds a flip probe's TCP connect may take


async def probe(up: Upstream, check: HealthCheckConfig | None) -> tuple[bool, str]:
    """One probe on a fresh connection: GET the health path, or with no check only connect.

    Returns (ok, what happened). Without a check the connect has FLIP_PROBE_TIMEOUT.
    """
    timeout = FLIP_PROBE_TIMEOUT if check is None else check.timeout
    writer: asyncio.StreamWriter | None = None
    line = b""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(up.host, up.port)
            if check is None:
                return True, "connected"
            host = up.addr.encode()  # Host: host:port, IPv6 in brackets
            writer.write(
                b"GET " + check.path.encode() + b" HTTP/1.1\r\nHost: " + host
                + b"\r\nUser-Agent: bgproxy-health\r\nConnection: close\r\n\r\n"
            )  # fmt: skip
            line = await reader.readline()
    except TimeoutError:
        return False, f"no {'connection' if check is None else 'answer'} within {timeout:g}s"
    except OSError as exc:
        return False, f"connect failed: {exc.strerror or exc}"
    finally:
        if writer is not None:
            writer.close()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return False, f"not an HTTP response: {line[:40]!r}"
    status = int(parts[1])
    return check.accepts(status), f"HTTP {status}"


class HealthMonitor:
    """Runs the active probes and applies passive ejections for every pool.

    It is the data plane's Reporter: the data plane calls upstream_failed() for each connect
    failure or 5xx answer.
    """

    def __init__(
        self,
        pools: dict[str, ColorPool],
        checks: dict[str, HealthCheckConfig | None],
        policies: dict[str, OutlierPolicy],
    ) -> None:
        self._pools = pools
        self.checks = checks
        self.policies = policies
        self._tasks: dict[Upstream, asyncio.Task[None]] = {}

    def start(self) -> None:
        for pool in self._pools.values():
            for up in pool.upstreams:
                self.watch(up)

    def watch(self, up: Upstream) -> None:
        """Probe ``up`` from now on, if its color has active checks."""
        check = self.checks[up.color]
        if check is not None and up not in self._tasks:
            self._tasks[up] = asyncio.get_running_loop().create_task(self._probe_loop(up, check))

    def unwatch(self, up: Upstream) -> None:
        task = self._tasks.pop(up, None)
        if task is not None:
            task.cancel()

    def reconfigure(
        self, checks: dict[str, HealthCheckConfig | None], policies: dict[str, OutlierPolicy]
    ) -> None:
        """New checks and outlier policies (a reload); probes restart only where the check changed."""
        changed = [c for c in COLORS if checks[c] != self.checks[c]]
        self.checks, self.policies = checks, policies
        for up in [u for u in self._tasks if u.color in changed]:
            self.unwatch(up)
        for color in changed:
            pool = self._pools[color]
            for up in pool.upstreams:
                if checks[color] is None and not up.healthy:
                    up.healthy = True  # no checks any more: nothing can say it is unhealthy
                    up.refresh()
                self.watch(up)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _probe_loop(self, up: Upstream, check: HealthCheckConfig) -> None:
        # Spread the probes over the interval so a big pool is not checked all at once.
        await asyncio.sleep(random.uniform(0, check.interval))
        while True:
            ok, detail = await probe(up, check)
            self.record_check(up, check, ok, detail)
            await asyncio.sleep(check.interval * random.uniform(0.9, 1.1))

    def record_check(self, up: Upstream, check: HealthCheckConfig, ok: bool, detail: str) -> None:
        up.last_check = (time.time(), ok, detail)
        state = after_check(
            CheckState(up.healthy, up.check_passes, up.check_fails),
            ok,
            check.healthy_threshold,
            check.unhealthy_threshold,
        )
        turned = state.healthy != up.healthy
        up.healthy, up.check_passes, up.check_fails = state.healthy, state.passes, state.fails
        if turned:
            fields = {"color": up.color, "upstream": up.addr, "check": detail}
            if up.healthy:
                log.info("upstream healthy", extra=fields)
            else:
                log.warning("upstream unhealthy", extra=fields)
        up.refresh()

    # -- passive (the data plane's Reporter) ------------------------------------------------------
    def upstream_failed(self, up: Upstream) -> None:
        """A connect failure or a 5xx answer from `up`."""
        pool = self._pools[up.color].upstreams
        pool_ejected = sum(1 for u in pool if u.ejected_until)
        verdict = after_failure(
            self.policies[up.color],
            failures=up.failures,
            ejected=bool(up.ejected_until),
            ejections=up.ejections,
            pool_ejected=pool_ejected,
            pool_size=len(pool),
            now=time.time(),
        )
        up.failures = verdict.failures
        if verdict.action == "spare":
            log.warning(
                "ejection skipped: max_ejection_percent reached",
                extra={"color": up.color, "upstream": up.addr, "ejected": pool_ejected, "pool": len(pool)},
            )
        elif verdict.action == "eject":
            up.ejections = verdict.ejections
            up.ejected_until = verdict.until
            up.refresh()
            asyncio.get_running_loop().call_later(verdict.seconds, self._readmit, up)
            log.warning(
                "upstream ejected",
                extra={
                    "color": up.color,
                    "upstream": up.addr,
                    "seconds": verdict.seconds,
                    "ejections": up.ejections,
                },
            )

    def _readmit(self, up: Upstream) -> None:
        up.ejected_until = 0.0
        up.refresh()
        log.info("upstream returned from ejection", extra={"color": up.color, "upstream": up.addr})


def readiness(pools: dict[str, ColorPool], weights: Weights) -> tuple[bool, str]:
    """Whether live traffic has an upstream to go to, and if not, which colors lack one."""
    live = [color for color in COLORS if weights.of(color)]
    if not any(pools[color].serving for color in live):
        return False, f"no healthy upstream for live traffic ({', '.join(live)})"
    return True, "serving"


class FlipGuard:
    """The Controller's guard: weight goes only to a color that can take it, checked right then.

    For each color gaining weight: refused at once when health already knows it has no healthy
    upstream; then, unless ``flip_probe: off``, every upstream is probed concurrently (the health
    check's GET when ``http`` and the pool has a health_check, else a TCP connect) and the color is
    refused when none answers, naming each one and why. ``force`` skips the guard.
    """

    def __init__(
        self, pools: dict[str, ColorPool], checks: dict[str, HealthCheckConfig | None], mode: str
    ) -> None:
        self._pools = pools
        self._checks = checks
        self._mode = mode

    async def __call__(self, before: Weights, after: Weights) -> None:
        for color in COLORS:
            if after.of(color) > before.of(color):
                pool = self._pools[color]
                if not pool.serving:
                    down = ", ".join(up.addr for up in pool.upstreams) or "none configured"
                    raise SwitchError(
                        f"{color} has no healthy upstream (down: {down}); nothing changed. "
                        'Send "force": true to apply anyway.'
                    )
                if self._mode != "off":
                    await self._probe(color)

    def reconfigure(self, checks: dict[str, HealthCheckConfig | None], mode: str) -> None:
        """A reload's checks and flip_probe mode."""
        self._checks, self._mode = checks, mode

    async def _failures(self, color: str, ups: list[Upstream]) -> list[str] | None:
        """Probe ``ups`` concurrently: None if any answered, else each one's failure."""
        check = self._checks[color] if self._mode == "http" else None
        results = await asyncio.gather(*(probe(up, check) for up in ups))
        if any(ok for ok, _ in results):
            return None
        return [f"{up.addr}: {why}" for up, (_, why) in zip(ups, results, strict=True)]

    async def _probe(self, color: str) -> None:
        failed = await self._failures(color, self._pools[color].upstreams)
        if failed is not None:
            raise SwitchError(
                f"{color}: no upstream answered the flip probe ({'; '.join(failed) or 'none configured'}); "
                'nothing changed. Send "force": true to apply anyway.'
            )

    async def admit(self, color: str, ups: list[Upstream]) -> None:
        """Upstreams about to join a pool: each must answer the probe (unless flip_probe: off)."""
        if self._mode == "off":
            return
        results = await asyncio.gather(*(self._failures(color, [up]) for up in ups))
        failed = [line for lines in results if lines for line in lines]
        if failed:
            raise SwitchError(
                f"{color}: an upstream to add did not answer the probe ({'; '.join(failed)}); "
                'nothing changed. Send "force": true to add it anyway.'
            )
