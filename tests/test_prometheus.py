"""A real Prometheus server scrapes a running bgproxy and computes the per-color error ratio.

The ratio is evaluated over exactly the span between two scrapes: the one just before the measured
traffic and the first one after it. With samples at both ends of the range Prometheus neither
extrapolates nor misses anything, so rate() and increase() are exact and must match what was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import MakeProxy
from process import free_port
from upstreams import origin

DEADLINE_S = 30.0
RATIO = (
    'sum by (color) (rate(bgproxy_requests_total{{code=~"5.."}}[{r}])) '
    "/ sum by (color) (rate(bgproxy_requests_total[{r}]))"
)


@contextlib.asynccontextmanager
async def prometheus(tmp: Path, target: str) -> AsyncIterator[str]:
    """A Prometheus scraping `target` every second; yields its URL, always killed on exit."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: `bash .ci/system-deps` installs Debian's package")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "bgproxy", "static_configs": [{"targets": [target]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    except BaseException as exc:
        exc.add_note("prometheus log tail:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        raise
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def query(session: aiohttp.ClientSession, url: str, expr: str, at: float | None = None) -> Any:
    params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
    async with session.get(f"{url}/api/v1/query", params=params) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


async def scraped_totals(session: aiohttp.ClientSession, url: str) -> list[tuple[float, int]]:
    """(scrape time, total proxied requests) for every scrape Prometheus holds, oldest first."""
    per_scrape: Counter[float] = Counter()
    for series in await query(session, url, 'bgproxy_requests_total{color!="none"}[5m]'):
        for at, value in series["values"]:
            per_scrape[float(at)] += int(float(value))
    return sorted(per_scrape.items())


async def scrape_with_total(session: aiohttp.ClientSession, url: str, total: int, after: float) -> float:
    """Time of the first scrape later than `after` that saw `total` requests; waits for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while loop.time() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            for at, seen in await scraped_totals(session, url):
                if at > after and seen == total:
                    return at
        await asyncio.sleep(0.2)
    pytest.fail(f"Prometheus did not scrape {total} requests within {DEADLINE_S:.0f} s")


async def send(session: aiohttp.ClientSession, url: str, n: int) -> Counter[tuple[str, bool]]:
    """n requests; counts (color, is 5xx) as the client saw them."""
    seen: Counter[tuple[str, bool]] = Counter()
    for _ in range(n):
        async with session.get(f"{url}/echo") as resp:
            await resp.read()
            seen[(resp.headers["X-Color"], resp.status >= 500)] += 1
    return seen


async def test_prometheus_computes_the_error_ratio_that_was_sent(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        blue.fail_ratio = 0.05
        proxy = await make_proxy(blue=[blue.addr], green=[green.addr], weights=(50, 50))
        async with (
            prometheus(tmp_path, f"127.0.0.1:{proxy.app.admin_port}") as prom,
            aiohttp.ClientSession() as session,
        ):
            # Every series must exist before the measured traffic: rate() cannot count a counter's
            # first appearance. 40 requests give blue its 20th /echo, the first to fail.
            primed = await send(session, proxy.url, 40)
            assert primed[("blue", True)] == 1
            before = await scrape_with_total(session, prom, 40, after=0.0)

            blue.fail_ratio = 0.05  # restarts the count: exactly 5 % of blue's next requests fail
            sent = await send(session, proxy.url, 400)
            after = await scrape_with_total(session, prom, 440, after=before)

            span = f"{round((after - before) * 1000)}ms"
            ratio = await query(session, prom, RATIO.format(r=span), at=after)
            increase = await query(
                session, prom, f"sum by (color) (increase(bgproxy_requests_total[{span}]))", at=after
            )

    assert sent == {("blue", False): 190, ("blue", True): 10, ("green", False): 200}
    got_ratio = {r["metric"]["color"]: float(r["value"][1]) for r in ratio}
    got_requests = {r["metric"]["color"]: float(r["value"][1]) for r in increase}
    # Green answered no 5xx, so it has no numerator series and drops out of the division.
    assert got_ratio.keys() == {"blue"}
    assert got_ratio["blue"] == pytest.approx(10 / 200, abs=1 / 200)
    assert got_requests == {"blue": pytest.approx(200, abs=1), "green": pytest.approx(200, abs=1)}
