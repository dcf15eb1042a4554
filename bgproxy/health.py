"""Upstream health: active HTTP probes and passive outlier ejection (after Envoy's outlier_detection).

Both end in one flag the hot path reads, `Upstream.available`, so a request pays nothing for
health beyond one attribute check when it picks an upstream and one counter when it is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import TYPE_CHECKING

from .config import HealthCheckConfig, OutlierConfig

if TYPE_CHECKING:
    from .pool import Upstream
    from .router import Router

log = logging.getLogger("bgproxy.health")


async def probe(up: Upstream, check: HealthCheckConfig) -> tuple[bool, str]:
    """One active check: GET the health path on a fresh connection. Returns (ok, what happened)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(up.host, up.port)
            host = up.addr.encode()
            writer.write(
                b"GET " + check.path.encode() + b" HTTP/1.1\r\nHost: " + host
                + b"\r\nUser-Agent: bgproxy-health\r\nConnection: close\r\n\r\n"
            )  # fmt: skip
            line = await reader.readline()
    except TimeoutError:
        return False, f"no answer within {check.timeout:g}s"
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
    """Runs the active probes and applies passive ejections for every pool."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._tasks: list[asyncio.Task[None]] = []
        self._outlier: dict[str, OutlierConfig] = {}
        self._checks: dict[str, HealthCheckConfig | None] = {}
        for color in router.pools:
            pool_cfg = router.config.pools.get(color)
            self._outlier[color] = pool_cfg.outlier
            self._checks[color] = pool_cfg.health_check

    def start(self) -> None:
        loop = self._router.loop
        for color, pool in self._router.pools.items():
            check = self._checks[color]
            if check is None:
                continue
            for up in pool.upstreams:
                self._tasks.append(loop.create_task(self._probe_loop(up, check)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def _probe_loop(self, up: Upstream, check: HealthCheckConfig) -> None:
        # Spread the probes over the interval so a big pool is not checked all at once.
        await asyncio.sleep(random.uniform(0, check.interval))
        while True:
            ok, detail = await probe(up, check)
            self.record_check(up, check, ok, detail)
            await asyncio.sleep(check.interval * random.uniform(0.9, 1.1))

    def record_check(self, up: Upstream, check: HealthCheckConfig, ok: bool, detail: str) -> None:
        up.last_check = (time.time(), ok, detail)
        if ok:
            up.check_passes += 1
            up.check_fails = 0
            if not up.healthy and up.check_passes >= check.healthy_threshold:
                up.healthy = True
                log.info("upstream healthy", extra={"color": up.color, "upstream": up.addr, "check": detail})
        else:
            up.check_fails += 1
            up.check_passes = 0
            if up.healthy and up.check_fails >= check.unhealthy_threshold:
                up.healthy = False
                log.warning(
                    "upstream unhealthy", extra={"color": up.color, "upstream": up.addr, "check": detail}
                )
        up.refresh()

    # -- passive (called by the data plane) -------------------------------------------------------
    def failed(self, up: Upstream) -> None:
        """A connect failure or a 5xx answer from `up`."""
        up.failures += 1
        if up.failures >= self._outlier[up.color].consecutive_failures and not up.ejected_until:
            self._eject(up)

    def _eject(self, up: Upstream) -> None:
        outlier = self._outlier[up.color]
        pool = self._router.pools[up.color].upstreams
        ejected = sum(1 for u in pool if u.ejected_until)
        if (ejected + 1) * 100 > len(pool) * outlier.max_ejection_percent:
            log.warning(
                "ejection skipped: max_ejection_percent reached",
                extra={"color": up.color, "upstream": up.addr, "ejected": ejected, "pool": len(pool)},
            )
            return
        up.ejections += 1
        seconds = min(outlier.base_ejection_time * up.ejections, outlier.max_ejection_time)
        up.ejected_until = time.time() + seconds
        up.failures = 0
        up.refresh()
        self._router.loop.call_later(seconds, self._readmit, up)
        log.warning(
            "upstream ejected",
            extra={"color": up.color, "upstream": up.addr, "seconds": seconds, "ejections": up.ejections},
        )

    def _readmit(self, up: Upstream) -> None:
        up.ejected_until = 0.0
        up.refresh()
        log.info("upstream returned from ejection", extra={"color": up.color, "upstream": up.addr})
