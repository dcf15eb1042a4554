"""Issue 6: active health checks, passive outlier ejection, connect retries and the guarded flip.

Everything runs for real: origins from upstreams.py on 127.0.0.1, bgproxy from conftest on the same
event loop, probes every 0.1 s. Every wait polls against a deadline, so a regression fails the test
in seconds instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from conftest import MakeProxy, RunningProxy
from rawclient import exchange
from upstreams import (
    Origin,
    RawServer,
    closed_port,
    cut_after_headers_server,
    reset_before_headers_server,
    silent_server,
)

from bgproxy.core.timefmt import parse_rfc3339

INTERVAL = 0.1  # probe interval of every health-checked pool below
UNHEALTHY = 2  # unhealthy_threshold
HEALTHY = 3  # healthy_threshold
# A probe runs every INTERVAL * U(0.9, 1.1) after a first jittered sleep of up to INTERVAL.
PROBE_GAP = INTERVAL * 1.1
SLACK = 0.5  # scheduling noise allowed on top of a computed bound (loaded CI machines)


def check(**overrides: Any) -> dict[str, Any]:
    """A fast health_check section."""
    return {
        "interval": INTERVAL,
        "timeout": INTERVAL,
        "unhealthy_threshold": UNHEALTHY,
        "healthy_threshold": HEALTHY,
        **overrides,
    }


def pool(addrs: list[str], *, health: dict[str, Any] | None = None, **outlier: Any) -> dict[str, Any]:
    section: dict[str, Any] = {"upstreams": addrs}
    if health is not None:
        section["health_check"] = health
    if outlier:
        section["outlier"] = outlier
    return section


async def eventually(cond: Callable[[], bool], within: float, what: str) -> float:
    """Poll `cond` until true; returns the seconds it took, fails the test after `within`."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > within:
            pytest.fail(f"not within {within:.2f}s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def ups(proxy: RunningProxy, color: str) -> dict[str, Any]:
    """The live Upstream objects of a color, by address (what /v1/pools renders)."""
    return {u.addr: u for u in proxy.app.runtime.pools[color].upstreams}


async def admin(
    session: aiohttp.ClientSession, proxy: RunningProxy, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with session.request(method, proxy.admin_url + path, json=body) as resp:
        return resp.status, await resp.json()


async def health_view(session: aiohttp.ClientSession, proxy: RunningProxy, color: str) -> dict[str, Any]:
    status, body = await admin(session, proxy, "GET", "/v1/pools")
    assert status == 200
    return {u["upstream"]: u for u in body[color]}


class JournalOrigin(Origin):
    """An origin that also records the order of probes and requests it received."""

    def __init__(self, color: str, name: str | None = None) -> None:
        super().__init__(color, name)
        self.journal: list[str] = []

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.journal.append("probe" if request.path == "/healthz" else "request")
        return await super()._count(request, handler)


@asynccontextmanager
async def origins(color: str, n: int, kind: type[Origin] = Origin) -> AsyncIterator[list[Any]]:
    """n origins named color-0, color-1, ... (what they put in X-Upstream)."""
    async with AsyncExitStack() as stack:
        servers = []
        for i in range(n):
            srv = kind(color, f"{color}-{i}")
            await srv.start()
            stack.push_async_callback(srv.stop)
            servers.append(srv)
        yield servers


class Load:
    """Workers sending GET /echo through the proxy back to back until stopped, recording every outcome."""

    def __init__(self, session: aiohttp.ClientSession, url: str, workers: int = 8) -> None:
        self.session = session
        self.url = url
        self.results: list[tuple[float, int, str]] = []  # (monotonic time, status or 0, upstream or error)
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._work()) for _ in range(workers)]

    async def _work(self) -> None:
        while not self._stop.is_set():
            try:
                async with self.session.get(self.url + "/echo") as resp:
                    await resp.read()
                    text = "" if resp.status == 200 else (await resp.text())[:120]
                    outcome = (resp.status, resp.headers.get("X-Upstream", text))
            except aiohttp.ClientError as exc:
                outcome = (0, repr(exc))
            self.results.append((time.monotonic(), *outcome))

    def since(self, t: float) -> list[tuple[float, int, str]]:
        return [r for r in self.results if r[0] >= t]

    async def stop(self) -> None:
        self._stop.set()
        async with asyncio.timeout(5):
            await asyncio.gather(*self._tasks)


# -------------------------------------------------------------------------------------------------- active


async def test_killed_upstream_under_load_costs_no_request_and_rejoins_after_healthy_threshold(
    make_proxy: MakeProxy,
) -> None:
    async with origins("blue", 2, JournalOrigin) as (a, b), aiohttp.ClientSession() as session:
        proxy = await make_proxy(
            pools={
                "blue": pool([a.addr, b.addr], health=check(), base_ejection_time=0.2),
                "green": pool([a.addr]),
            }
        )
        up_b = ups(proxy, "blue")[b.addr]
        load = Load(session, proxy.url)
        try:
            await asyncio.sleep(0.3)
            assert {r[2] for r in load.results} == {"blue-0", "blue-1"}  # both serve before the kill

            killed = time.monotonic()
            await b.stop()
            took = await eventually(lambda: not up_b.healthy, 5, "the killed upstream is marked unhealthy")
            # The first failing probe comes within one jittered interval, then one per interval.
            assert took < UNHEALTHY * PROBE_GAP + SLACK
            marked = time.monotonic()
            await asyncio.sleep(0.3)
            survivor_only = load.since(marked)
            assert len(survivor_only) > 20
            assert {r[2] for r in survivor_only} == {"blue-0"}

            before_restart = b.requests
            b.journal.clear()
            await b.start()  # same port
            took = await eventually(lambda: up_b.available, 5, "the restarted upstream rejoins")
            # HEALTHY passing probes in a row: at least HEALTHY - 1 gaps of 0.9 * INTERVAL.
            assert (HEALTHY - 1) * INTERVAL * 0.9 - 0.01 <= took < HEALTHY * PROBE_GAP + SLACK
            await eventually(lambda: b.requests > before_restart + 10, 5, "traffic returns to the upstream")
        finally:
            await load.stop()
        failed = [r for r in load.since(killed) if r[1] != 200]
        assert failed == [], f"{len(failed)} requests failed after the kill, e.g. {failed[:3]}"
        assert all(r[1] == 200 for r in load.results)
        # No traffic until it passed HEALTHY probes in a row (it answered every probe since its restart).
        first_request = b.journal.index("request")
        assert first_request >= HEALTHY and set(b.journal[:first_request]) == {"probe"}


async def test_unhealthy_upstream_gets_no_requests_and_its_state_is_visible(make_proxy: MakeProxy) -> None:
    """Probes mark an upstream that is up but answers /healthz 503 unhealthy: it gets no traffic."""
    async with origins("blue", 2) as (a, b), aiohttp.ClientSession() as session:
        proxy = await make_proxy(
            pools={"blue": pool([a.addr, b.addr], health=check()), "green": pool([a.addr])}
        )
        await eventually(lambda: a.health_checks >= 1 and b.health_checks >= 1, 2, "first probes")
        b.healthy = False
        await eventually(lambda: not ups(proxy, "blue")[b.addr].healthy, 2, "b is unhealthy")
        served = b.requests
        for _ in range(10):
            async with session.get(proxy.url + "/echo") as resp:
                assert (resp.status, resp.headers["X-Upstream"]) == (200, "blue-0")
        assert b.requests == served

        view = await health_view(session, proxy, "blue")
        assert view[b.addr]["state"] == "unhealthy"
        assert view[b.addr]["last_check"]["ok"] is False
        assert view[b.addr]["last_check"]["detail"] == "HTTP 503"
        assert abs(parse_rfc3339(view[b.addr]["last_check"]["at"]) - time.time()) < 2
        assert view[a.addr]["state"] == "healthy"
        assert view[a.addr]["last_check"]["ok"] is True
        assert view[a.addr]["last_check"]["detail"] == "HTTP 200"
        status, state = await admin(session, proxy, "GET", "/v1/state")
        assert status == 200
        in_state = {u["upstream"]: u for u in state["pools"]["blue"]["upstream_health"]}
        assert in_state[b.addr]["state"] == "unhealthy"
        assert in_state[b.addr]["last_check"]["detail"] == "HTTP 503"
        assert [u["last_check"] for u in (await health_view(session, proxy, "green")).values()] == [None]


async def test_probe_failure_details_for_refused_and_silent_upstreams(make_proxy: MakeProxy) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    async with silent_server() as silent, origins("blue", 1) as (a,), aiohttp.ClientSession() as session:
        proxy = await make_proxy(
            pools={"blue": pool([a.addr, dead, silent.addr], health=check()), "green": pool([a.addr])}
        )
        blue = ups(proxy, "blue")
        await eventually(
            lambda: not blue[dead].healthy and not blue[silent.addr].healthy, 3, "both marked unhealthy"
        )
        view = await health_view(session, proxy, "blue")
    assert view[dead]["last_check"]["detail"].startswith("connect failed: ")
    assert view[silent.addr]["last_check"]["detail"] == f"no answer within {INTERVAL:g}s"
    assert silent.connections >= UNHEALTHY
    assert b"GET /healthz HTTP/1.1\r\n" in silent.received
    assert view[a.addr]["state"] == "healthy"


async def test_health_path_and_expected_status_are_configurable(make_proxy: MakeProxy) -> None:
    async with origins("blue", 1) as (a,), origins("green", 1) as (g,):
        proxy = await make_proxy(
            pools={
                # /status/418 answers 418: healthy only because expected_status says so
                "blue": pool([a.addr], health=check(path="/status/418", expected_status="418")),
                # /status/204 answers 204, outside the expected 200-200
                "green": pool([g.addr], health=check(path="/status/204", expected_status=200)),
            }
        )
        green = ups(proxy, "green")[g.addr]
        blue = ups(proxy, "blue")[a.addr]
        # Waiting for the expected last result (not just any) keeps a probe timeout on a busy machine
        # from failing the test, while a wrong verdict still never arrives.
        await eventually(
            lambda: (
                not green.healthy
                and green.last_check is not None
                and green.last_check[1:] == (False, "HTTP 204")
            ),
            2,
            "green fails its check with HTTP 204",
        )
        await eventually(
            lambda: blue.last_check is not None and blue.last_check[1:] == (True, "HTTP 418"),
            2,
            "blue passes its check with HTTP 418",
        )
    assert blue.healthy
    assert a.health_checks == 0 and g.health_checks == 0  # /healthz was never asked for


async def test_probes_are_spread_over_the_interval(make_proxy: MakeProxy) -> None:
    """Ten upstreams are not all probed at the same instant (the first probe is jittered)."""
    first_probe: dict[int, float] = {}

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first_probe.setdefault(writer.get_extra_info("sockname")[1], time.monotonic())
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()

    servers = [await asyncio.start_server(answer, "127.0.0.1", 0) for _ in range(10)]
    try:
        addrs = [f"127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
        await make_proxy(pools={"blue": pool(addrs, health=check(interval=0.5)), "green": pool(addrs[:1])})
        await eventually(lambda: len(first_probe) == 10, 2, "every upstream probed once")
    finally:
        for srv in servers:
            srv.close()
    times = sorted(first_probe.values())
    # Ten uniform draws over 0.5 s all within 0.1 s of each other has a probability below 1e-5.
    assert times[-1] - times[0] > 0.1


# ----------------------------------------------------------------------------- readiness and the guarded flip


async def test_readyz_follows_the_health_of_the_live_color(make_proxy: MakeProxy) -> None:
    async with origins("blue", 2) as (a, b), origins("green", 1) as (g,), aiohttp.ClientSession() as session:
        proxy = await make_proxy(
            pools={"blue": pool([a.addr, b.addr], health=check()), "green": pool([g.addr], health=check())}
        )

        async def readyz() -> tuple[int, Any]:
            return await admin(session, proxy, "GET", "/readyz")

        assert await readyz() == (200, {"ready": True, "reason": "serving"})
        a.healthy = b.healthy = False
        blue = list(ups(proxy, "blue").values())
        await eventually(lambda: not any(u.available for u in blue), 2, "all of blue unhealthy")
        assert await readyz() == (
            503,
            {"ready": False, "reason": "no healthy upstream for live traffic (blue)"},
        )
        started = time.monotonic()
        async with session.get(proxy.url + "/echo") as resp:
            assert resp.status == 503
            assert "no blue upstream available" in await resp.text()
        assert time.monotonic() - started < 0.5

        b.healthy = True
        await eventually(lambda: blue[1].available, 2, "b recovers")
        assert await readyz() == (200, {"ready": True, "reason": "serving"})
        async with session.get(proxy.url + "/echo") as resp:
            assert (resp.status, resp.headers["X-Upstream"]) == (200, "blue-1")
        # Green (no weight) being down does not make the proxy unready.
        g.healthy = False
        await eventually(lambda: not ups(proxy, "green")[g.addr].available, 2, "green unhealthy")
        assert (await readyz())[0] == 200


async def test_flip_to_a_dead_color_is_refused_unless_forced(make_proxy: MakeProxy) -> None:
    dead = [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"]
    async with origins("blue", 1) as (a,), aiohttp.ClientSession() as session:
        proxy = await make_proxy(
            pools={"blue": pool([a.addr], health=check()), "green": pool(dead, health=check())}
        )
        green = list(ups(proxy, "green").values())
        await eventually(lambda: not any(u.healthy for u in green), 2, "all of green unhealthy")
        _, before = await admin(session, proxy, "GET", "/v1/state")

        for method, path, body in (
            ("POST", "/v1/flip", {"to": "green"}),
            ("POST", "/v1/flip", None),  # "the other color" is green too
            ("PUT", "/v1/weights", {"blue": 90, "green": 10}),
        ):
            status, answer = await admin(session, proxy, method, path, body)
            assert status == 409, answer
            assert answer["error"].startswith("green has no healthy upstream (down: ")
            assert all(addr in answer["error"] for addr in dead)
            assert '"force": true' in answer["error"]
            _, after = await admin(session, proxy, "GET", "/v1/state")
            assert (after["version"], after["weights"]) == (before["version"], before["weights"])
        _, events = await admin(session, proxy, "GET", "/v1/events")
        assert events == {"events": []}

        # Taking weight away from the dead color is always allowed.
        status, _ = await admin(session, proxy, "PUT", "/v1/weights", {"blue": 50, "green": 0})
        assert status == 200

        status, state = await admin(session, proxy, "POST", "/v1/flip", {"to": "green", "force": True})
        assert status == 200
        assert (state["active"], state["version"]) == ("green", before["version"] + 2)
        for _ in range(5):
            started = time.monotonic()
            async with session.get(proxy.url + "/echo") as resp:
                assert resp.status == 503
                assert "no green upstream available" in await resp.text()
            assert time.monotonic() - started < 0.5  # refused at once, not after a connect timeout
        assert a.requests == 0

        status, state = await admin(
            session, proxy, "PUT", "/v1/weights", {"blue": 100, "green": 0, "reason": "back"}
        )
        assert status == 200  # blue is healthy: no force needed
        status, state = await admin(
            session, proxy, "PUT", "/v1/weights", {"blue": 50, "green": 50, "force": True}
        )
        assert (status, state["weights"]) == (200, {"blue": 50, "green": 50})


async def test_flip_to_a_color_whose_upstreams_are_all_ejected_is_refused(make_proxy: MakeProxy) -> None:
    """The guard reads availability, so passive ejection counts as well as active checks."""
    async with origins("blue", 1) as (a,), origins("green", 1) as (g,), aiohttp.ClientSession() as session:
        g.fail_ratio = 1
        proxy = await make_proxy(
            pools={
                "blue": pool([a.addr]),
                "green": pool(
                    [g.addr], consecutive_failures=2, base_ejection_time=5, max_ejection_percent=100
                ),
            },
            weights=(50, 50),
        )
        gu = ups(proxy, "green")[g.addr]
        for _ in range(10):
            if gu.ejected_until:
                break
            async with session.get(proxy.url + "/echo") as resp:
                await resp.read()
        assert gu.ejected_until
        status, answer = await admin(session, proxy, "POST", "/v1/flip", {"to": "green"})
        assert status == 409
        assert answer["error"].startswith(f"green has no healthy upstream (down: {g.addr})")


# ------------------------------------------------------------------------------------------------- retries


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_post_body_is_retried_intact_on_the_other_upstream(
    make_proxy: MakeProxy, chunked: bool
) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    body = os.urandom(1024 * 1024 + 17)

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 100_000):
            yield body[i : i + 100_000]

    async with origins("blue", 1) as (a,), aiohttp.ClientSession() as session:
        # Round robin puts `dead` first for every request; the outlier stays out of the way (no ejection).
        proxy = await make_proxy(
            pools={"blue": pool([dead, a.addr], consecutive_failures=100), "green": pool([a.addr])}
        )
        for _ in range(3):
            data: Any = pieces() if chunked else body
            async with session.post(proxy.url + "/echo", data=data) as resp:
                assert resp.status == 200
                echo = await resp.json()
            assert (echo["upstream"], echo["method"]) == ("blue-0", "POST")
            assert (echo["body_len"], echo["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
            framing = {k.lower(): v for k, v in echo["headers"]}
            assert ("transfer-encoding" in framing) is chunked
        assert ups(proxy, "blue")[dead].failures == 3  # each request did try the dead one first
        assert a.requests == 3


class DiesOnSecondRequest(RawServer):
    """Answers one request keep-alive; on the next one it stops listening and closes: a crash mid-reuse."""

    async def behave(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Upstream: dying\r\n\r\nok")
        await writer.drain()
        await self._read_head(reader)
        assert self._server is not None
        self._server.close()  # new connections are refused from now on


async def test_upstream_dying_under_a_reused_connection_is_retried_on_another(make_proxy: MakeProxy) -> None:
    """The keep-alive race retry (same upstream) must not use up the retry on another upstream.

    The upstream dies as a reused connection carries a GET: reconnecting to it is refused, and the
    request must then go to the healthy upstream instead of answering 502.
    """
    async with origins("blue", 1) as (a,), DiesOnSecondRequest() as dying, aiohttp.ClientSession() as session:
        proxy = await make_proxy(pools={"blue": pool([dying.addr, a.addr]), "green": pool([a.addr])})
        seen = []
        for _ in range(3):  # round robin: dying, a, dying again (on the kept-alive connection)
            async with session.get(proxy.url + "/echo") as resp:
                text = await resp.text()
                seen.append((resp.status, resp.headers.get("X-Upstream", text)))
        assert dying.connections == 1
    assert seen == [(200, "dying"), (200, "blue-0"), (200, "blue-0")]


async def test_reset_before_answering_fails_over_only_without_a_body(make_proxy: MakeProxy) -> None:
    """A GET whose fresh connection is reset before any response byte goes to the other upstream;
    a POST whose body already went out is not replayed."""
    async with origins("blue", 1) as (a,), reset_before_headers_server() as reset:
        proxy = await make_proxy(
            pools={"blue": pool([reset.addr, a.addr], consecutive_failures=100), "green": pool([a.addr])}
        )
        # Round robin sends each request to `reset` first.
        [got] = await exchange(proxy.port, b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (got.status, got.header("X-Upstream")) == (200, "blue-0")
        [post] = await exchange(
            proxy.port, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        )
        assert post.status == 502
        assert b"closed the connection before answering" in post.body
        assert reset.connections == 2
        assert a.requests == 1


async def test_retry_happens_once_then_the_client_gets_the_error(make_proxy: MakeProxy) -> None:
    dead = [f"127.0.0.1:{closed_port()}" for _ in range(3)]
    async with aiohttp.ClientSession() as session:
        proxy = await make_proxy(
            pools={"blue": pool(dead, consecutive_failures=100), "green": pool(dead[:1])}
        )
        async with session.post(proxy.url + "/echo", data=b"x" * 1000) as resp:
            assert resp.status == 502
        assert sum(u.failures for u in ups(proxy, "blue").values()) == 2  # first try and one retry


async def test_no_retry_once_response_bytes_reached_the_client(make_proxy: MakeProxy) -> None:
    """A response cut after its head is not replayed elsewhere: the client sees the truncation."""
    async with origins("blue", 1) as (a,):
        async with cut_after_headers_server() as cut:
            proxy = await make_proxy(pools={"blue": pool([cut.addr, a.addr]), "green": pool([a.addr])})
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            try:
                writer.write(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
                got = b""
                async with asyncio.timeout(5):
                    with contextlib.suppress(ConnectionResetError):  # bgproxy cuts with a reset
                        while chunk := await reader.read(65536):
                            got += chunk
            finally:
                writer.close()
        assert got.startswith(b"HTTP/1.1 200 OK\r\n")
        assert got.endswith(bytes(range(10)))  # the 10 bytes the upstream sent, then the cut
        assert a.requests == 0


# ---------------------------------------------------------------------------------------- passive ejection


async def test_five_500s_in_a_row_eject_for_a_time_that_grows(
    make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bgproxy.health")
    base = 0.3
    async with origins("blue", 2) as (bad, good), aiohttp.ClientSession() as session:
        bad.fail_ratio = 1  # every /echo answers 500
        proxy = await make_proxy(
            pools={
                "blue": pool([bad.addr, good.addr], base_ejection_time=base, max_ejection_time=10),
                "green": pool([good.addr]),
            }
        )
        up = ups(proxy, "blue")[bad.addr]

        async def until_ejected() -> tuple[Counter[int], float]:
            """Send requests until `bad` is ejected; (statuses, when). How long: core.health's tables."""
            statuses: Counter[int] = Counter()
            for _ in range(40):
                async with session.get(proxy.url + "/echo") as resp:
                    await resp.read()
                    statuses[resp.status] += 1
                if up.ejected_until:
                    return statuses, time.monotonic()
            pytest.fail(f"never ejected: {statuses}")

        statuses, ejected_at = await until_ejected()
        assert statuses[500] == 5  # five in a row, no sooner

        view = await health_view(session, proxy, "blue")
        assert view[bad.addr]["state"] == "ejected"
        assert view[bad.addr]["ejections"] == 1
        assert abs(parse_rfc3339(view[bad.addr]["ejected_until"]) - up.ejected_until) < 1e-5
        assert view[good.addr]["state"] == "healthy" and view[good.addr]["ejected_until"] is None

        served, late = bad.requests, 0
        while up.ejected_until:  # no traffic while ejected
            async with session.get(proxy.url + "/echo") as resp:
                await resp.read()
            if resp.headers["X-Upstream"] == "blue-0":
                assert not up.ejected_until, "an ejected upstream got a request"
                late += 1  # routed a moment after it returned (a slow machine)
            assert bad.requests - served == late
        assert time.monotonic() - ejected_at < 2
        first_out = time.monotonic() - ejected_at
        assert (await health_view(session, proxy, "blue"))[bad.addr]["state"] == "healthy"

        statuses, ejected_at = await until_ejected()  # back in rotation, it fails again
        assert statuses[500] + late == 5
        assert bad.requests == served + 5
        assert (await health_view(session, proxy, "blue"))[bad.addr]["ejections"] == 2
        await eventually(lambda: not up.ejected_until, 2, "bad returns again")
        second_out = time.monotonic() - ejected_at
    assert base - 0.1 < first_out < second_out - base / 2

    ejected = [r for r in caplog.records if r.getMessage() == "upstream ejected"]
    returned = [r for r in caplog.records if r.getMessage() == "upstream returned from ejection"]
    assert [(r.upstream, r.seconds, r.ejections) for r in ejected] == [  # type: ignore[attr-defined]
        (bad.addr, base, 1),
        (bad.addr, 2 * base, 2),
    ]
    assert [r.upstream for r in returned] == [bad.addr, bad.addr]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("n", "percent", "most"),
    [(2, 50, 1), (3, 50, 1), (4, 50, 2), (2, 100, 2), (2, 0, 0)],
)
async def test_ejection_is_limited_by_max_ejection_percent(
    make_proxy: MakeProxy, n: int, percent: int, most: int
) -> None:
    async with origins("blue", n) as bad, aiohttp.ClientSession() as session:
        for o in bad:
            o.fail_ratio = 1
        addrs = [o.addr for o in bad]
        proxy = await make_proxy(
            pools={
                "blue": pool(
                    addrs, consecutive_failures=2, base_ejection_time=10, max_ejection_percent=percent
                ),
                "green": pool(addrs[:1]),
            }
        )
        statuses: Counter[int] = Counter()
        for _ in range(12 * n):
            async with session.get(proxy.url + "/echo") as resp:
                await resp.read()
                statuses[resp.status] += 1
        view = await health_view(session, proxy, "blue")
    states = Counter(u["state"] for u in view.values())
    assert states == Counter({"ejected": most, "healthy": n - most})
    if most < n:
        assert set(statuses) == {500}  # the ones left in keep answering (and keep failing)
        assert all(u["consecutive_failures"] >= 2 for u in view.values() if u["state"] == "healthy")
    else:
        assert statuses[503] > 0  # everything ejected: answered at once
