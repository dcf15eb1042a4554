"""GET /v1/watch over real HTTP: the event stream's framing, timing, counts, auth and shutdown."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from conftest import MakeProxy, RunningProxy
from upstreams import origin
from waiting import eventually

from bgproxy.admin import watch
from bgproxy.admin.watch import HUB_KEY, frame, quantile

TOKEN = "watch-test-token-0123456789"


class Stream:
    """A /v1/watch reader: parses the text/event-stream framing by hand, as a browser's fetch() would."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.comments: list[str] = []
        self.fields: list[str] = []  # every field name seen, to check nothing unexpected is sent

    async def next(self, timeout: float = 3.0) -> tuple[str, Any]:
        """The next event as (name, data); comments are collected on the way."""
        name, data = "message", []
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.resp.content.readline()
                if not raw:
                    raise EOFError("the stream ended")
                assert raw.endswith(b"\n"), raw
                line = raw.decode()[:-1]
                if not line:
                    if data:
                        return name, json.loads("\n".join(data))
                    continue
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                field, _, value = line.partition(": ")
                self.fields.append(field)
                if field == "event":
                    name = value
                elif field == "data":
                    data.append(value)

    async def until(self, name: str, check: Any = None, timeout: float = 3.0) -> dict[str, Any]:
        """Skip events until one called ``name`` (for which ``check(data)`` holds, if given)."""
        async with asyncio.timeout(timeout):
            while True:
                got, data = await self.next(timeout)
                if got == name and (check is None or check(data)):
                    return dict(data)


@asynccontextmanager
async def watching(
    http: aiohttp.ClientSession, proxy: RunningProxy, query: str = "", token: str | None = None
) -> AsyncIterator[Stream]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(f"{proxy.admin_url}/v1/watch{query}", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.content_type == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-store"
        yield Stream(resp)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def test_frame_and_quantile() -> None:
    """One event is two fields and a blank line; latency percentiles interpolate like Prometheus."""
    assert frame("state", {"a": [1, "x y"]}) == b'event: state\ndata: {"a":[1,"x y"]}\n\n'
    assert b"\n" not in frame("x", {"text": "two\nlines"}).removesuffix(b"\n\n").split(b"data: ")[1]
    bounds = (0.1, 0.2, 0.4)
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [10, 0, 0, 0]) == pytest.approx(0.05)
    assert quantile(0.5, bounds, [0, 10, 10, 0]) == pytest.approx(0.2)
    assert quantile(0.99, bounds, [0, 0, 50, 50]) == 0.4  # in +Inf: the last bound, as Prometheus says


async def test_first_events_then_a_flip_within_a_second_and_counters_every_second(
    make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy(blue=[blue.addr], green=[green.addr])
        async with watching(http, proxy) as stream:
            assert [(await stream.next())[0] for _ in range(3)] == ["state", "history", "counters"]
            assert stream.comments[0].startswith("bgproxy watch")
            assert set(stream.fields) == {"retry", "event", "data"}

            started = time.monotonic()
            async with http.post(f"{proxy.admin_url}/v1/flip", json={"to": "green"}) as r:
                assert r.status == 200
            state = await stream.until("state", lambda d: d["state"]["active"] == "green", timeout=1.0)
            assert time.monotonic() - started < 1.0
            assert state["state"]["version"] == 1
            assert state["state"]["weights"] == {"blue": 0, "green": 100}

            stamps = []
            for _ in range(3):
                await stream.until("counters")
                stamps.append(time.monotonic())
            gaps = [b - a for a, b in itertools.pairwise(stamps)]
            assert all(0.5 < gap < 1.6 for gap in gaps), gaps


async def test_counters_count_live_traffic_like_the_state_does(
    make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        blue.fail_ratio = 0.25
        proxy = await make_proxy(blue=[blue.addr], green=[green.addr])
        async with watching(http, proxy) as stream:
            await stream.until("counters")
            for _ in range(20):
                async with http.get(f"{proxy.url}/echo") as r:
                    await r.read()
            seen = {"requests": 0, "errors": 0}
            last: dict[str, Any] = {}

            def counted(data: dict[str, Any]) -> bool:
                for key in seen:
                    seen[key] += data["colors"]["blue"][key]
                last.update(data["colors"]["blue"])
                return last["requests_total"] == 20

            await stream.until("counters", counted)
            assert seen == {"requests": 20, "errors": 5}  # the per-second points add up to the traffic
            assert last["errors_total"] == 5
            async with http.get(f"{proxy.admin_url}/v1/state") as r:
                state = await r.json()
            assert last["error_window"] == state["pools"]["blue"]["error_window"]
            assert last["error_window"]["error_ratio"] == 0.25
            assert last["p50"] is not None and last["p99"] is not None and last["p50"] <= last["p99"]
            assert [u["upstream"] for u in last["upstream_health"]] == [blue.addr]

        # A new watcher gets those seconds back as history (the ring began before any traffic).
        async with watching(http, proxy) as stream:
            await stream.until("state")
            history = await stream.until("history")
            assert history["interval"] == 1.0
            assert sum(history["blue"]["requests"]) == 20
            assert sum(history["blue"]["errors"]) == 5
            assert sum(history["green"]["requests"]) == 0


async def test_state_only_with_a_heartbeat(
    make_proxy: MakeProxy, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch, "HEARTBEAT", 0.3)
    proxy = await make_proxy()
    async with watching(http, proxy, "?counters=0") as stream:
        assert (await stream.next())[0] == "state"
        async with asyncio.timeout(2):
            while "keep-alive" not in stream.comments:
                line = await stream.resp.content.readline()
                assert not line.startswith(b"event:"), line  # no counters, no history
                if line.startswith(b":"):
                    stream.comments.append(line[1:].decode().strip())
    async with http.get(f"{proxy.admin_url}/v1/watch?counters=yes") as r:
        assert r.status == 422
        assert (await r.json())["detail"] == ["counters: must be 1 or 0 (got 'yes')"]


async def test_token_needed(make_proxy: MakeProxy, http: aiohttp.ClientSession) -> None:
    proxy = await make_proxy(admin={"listen": "127.0.0.1:0", "tokens": {"ops": TOKEN}})
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with http.get(f"{proxy.admin_url}/v1/watch", headers=headers) as r:
            assert r.status == 401
            assert r.content_type == "application/json"
            assert (await r.json())["error"] == "unauthorized"
    async with watching(http, proxy, token=TOKEN) as stream:
        assert (await stream.next())[0] == "state"


async def test_a_watcher_that_leaves_is_dropped_and_shutdown_ends_every_stream(
    make_proxy: MakeProxy, http: aiohttp.ClientSession
) -> None:
    proxy = await make_proxy()
    runner = proxy.app._admin_runner
    assert runner is not None
    hub = runner.app[HUB_KEY]
    async with watching(http, proxy) as stream:
        await stream.next()
        assert hub.watchers == 1
    await eventually(lambda: hub.watchers == 0, timeout=1.0)

    streams = [await http.get(f"{proxy.admin_url}/v1/watch") for _ in range(3)]
    for resp in streams:
        assert (await Stream(resp).next())[0] == "state"
    started = time.monotonic()
    await proxy.app.stop()
    assert time.monotonic() - started < 1.0  # the admin runner does not wait on open watches
    for resp in streams:
        async with asyncio.timeout(1):
            rest = await resp.content.read()
        assert b"event: state" not in rest
        resp.release()
