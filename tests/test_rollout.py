"""Guarded rollouts end to end: real upstreams, real traffic through bgproxy, the real admin API.

Traffic is bounded (each test sends at most a few thousand requests to 127.0.0.1) and every wait is
on the rollout's own state, polled by `eventually`, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from upstreams import closed_port, origin
from waiting import eventually

from bgproxy.app import App
from bgproxy.config import load_config
from bgproxy.core.weights import Weights

SECRET = "webhook-secret-0123456789"


async def api(proxy: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, f"{proxy.admin_url}{path}", json=body) as r,
    ):
        return r.status, await r.json()


class Traffic:
    """Keeps requests flowing through the proxy (4 at a time) until stopped; counts what clients saw."""

    def __init__(self, url: str, path: str = "/echo") -> None:
        self.url = url
        self.path = path
        self.sent = 0
        self.failed = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _worker(self, session: aiohttp.ClientSession, limit: int) -> None:
        while not self._stop.is_set() and self.sent < limit:
            self.sent += 1
            async with session.get(f"{self.url}{self.path}") as r:
                await r.read()
                if r.status >= 500:
                    self.failed += 1

    @contextlib.asynccontextmanager
    async def running(self, limit: int = 20_000) -> AsyncIterator[Traffic]:
        async with aiohttp.ClientSession() as session:
            self._tasks = [asyncio.create_task(self._worker(session, limit)) for _ in range(4)]
            try:
                yield self
            finally:
                self._stop.set()
                await asyncio.gather(*self._tasks)


async def until_done(proxy: Any, *, within: float = 20.0, states: tuple[str, ...] = ()) -> dict[str, Any]:
    """Poll the current rollout until it is finished (or in one of ``states``)."""
    wanted = states or ("promoted", "rolled_back", "aborted")
    deadline = asyncio.get_running_loop().time() + within
    while True:
        status, body = await api(proxy, "GET", "/v1/rollouts/current")
        assert status == 200, body
        if body["state"] in wanted:
            return body
        assert asyncio.get_running_loop().time() < deadline, (
            f"rollout still {body['state']}: {body['decisions']}"
        )
        await asyncio.sleep(0.05)


FAST = {"step_pause": "100ms", "min_requests": 30, "bake": "200ms"}


async def test_a_candidate_answering_500_for_10_percent_is_rolled_back(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        green.fail_ratio = 0.1
        proxy = await make_proxy([blue.addr], [green.addr])
        async with Traffic(proxy.url).running() as traffic:
            status, body = await api(
                proxy, "POST", "/v1/rollouts", {"to": "green", "steps": [50, 100], **FAST}
            )
            assert status == 201, body
            assert body["state"] == "running" and body["weights"] == {"blue": 50, "green": 50}
            done = await until_done(proxy)
        assert done["state"] == "rolled_back" and done["rule"] == "error_ratio", done["decisions"]
        assert proxy.app.switchboard.weights == Weights(100, 0)
        assert (
            done["steps"][0]["status"] == "done" and done["steps"][0]["evidence"]["candidate"]["errors"] > 0
        )
        assert traffic.failed > 0  # the fault was real; rolled back on the evidence of it
        metrics = await _metrics(proxy)
        assert 'bgproxy_rollbacks_total{rule="error_ratio"} 1.0' in metrics
        assert 'bgproxy_rollouts_total{outcome="rolled_back"} 1.0' in metrics


async def test_a_healthy_candidate_is_promoted_through_every_step(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        async with Traffic(proxy.url).running():
            status, body = await api(
                proxy, "POST", "/v1/rollouts", {"to": "green", "steps": [10, 50, 100], **FAST}
            )
            assert status == 201, body
            done = await until_done(proxy)
        assert done["state"] == "promoted", done["decisions"]
        assert [s["status"] for s in done["steps"]] == ["done", "done", "done"]
        assert all(s["evidence"]["candidate"]["requests"] >= 30 for s in done["steps"][:2])
        assert proxy.app.switchboard.weights == Weights(0, 100)
        weights = [e.to_weights for e in proxy.app.switchboard.events()]
        assert weights == [Weights(90, 10), Weights(50, 50), Weights(0, 100)]


async def test_a_slow_candidate_is_rolled_back_on_its_p99(make_proxy) -> None:
    """Every answer takes 200 ms against max_p99 100 ms: the latency rule fires, not the error rules."""
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        async with Traffic(proxy.url, "/slow?delay=0.2").running():
            body = {"to": "green", "steps": [50, 100], **FAST, "max_p99": "100ms"}
            status, _ = await api(proxy, "POST", "/v1/rollouts", body)
            assert status == 201
            done = await until_done(proxy)
    assert done["state"] == "rolled_back" and done["rule"] == "p99", done["decisions"]
    assert "slower than 0.1s" in done["decisions"][-1]["reason"]


async def test_a_trickle_of_traffic_waits_and_is_never_failed(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        status, _ = await api(
            proxy, "POST", "/v1/rollouts", {"to": "green", "steps": [50, 100], **FAST, "min_requests": 1000}
        )
        assert status == 201
        async with aiohttp.ClientSession() as s:
            for _ in range(20):
                async with s.get(f"{proxy.url}/echo") as r:
                    assert r.status == 200
        body = await until_done(proxy, states=("waiting",))
        assert "candidate requests" in body["decisions"][-1]["reason"]
        assert proxy.app.switchboard.weights == Weights(50, 50)


async def test_a_flip_during_a_rollout_needs_force_which_aborts_it(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        status, _ = await api(proxy, "POST", "/v1/rollouts", {"to": "green", **FAST, "min_requests": 10**6})
        assert status == 201
        status, body = await api(proxy, "POST", "/v1/rollouts", {"to": "green"})
        assert status == 409 and "promote or abort it" in body["error"]
        version = proxy.app.switchboard.version
        status, body = await api(proxy, "POST", "/v1/flip", {"to": "blue"})
        assert status == 409 and "force" in body["detail"][0]
        assert proxy.app.switchboard.version == version  # refused: nothing changed
        status, _ = await api(proxy, "POST", "/v1/flip", {"to": "blue", "force": True})
        assert status == 200
        done = await until_done(proxy)
        assert done["state"] == "aborted" and "forced change" in done["decisions"][-1]["reason"]
        assert proxy.app.switchboard.weights == Weights(100, 0)


async def test_a_target_failing_the_flip_probe_is_refused(make_proxy) -> None:
    async with origin("blue") as blue:
        proxy = await make_proxy([blue.addr], [f"127.0.0.1:{closed_port()}"])
        status, body = await api(proxy, "POST", "/v1/rollouts", {"to": "green"})
        assert status == 409 and "flip probe" in body["error"]
        status, _ = await api(proxy, "GET", "/v1/rollouts/current")
        assert status == 404


async def test_operator_actions(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        await api(
            proxy, "POST", "/v1/rollouts", {"to": "green", "steps": [20, 100], **FAST, "min_requests": 0}
        )
        status, body = await api(proxy, "POST", "/v1/rollouts/current/pause", {"reason": "look at logs"})
        assert status == 200 and body["state"] == "paused" and "look at logs" in body["paused_by"]
        status, body = await api(proxy, "POST", "/v1/rollouts/current/pause")
        assert status == 409
        status, body = await api(proxy, "POST", "/v1/rollouts/current/resume")
        assert status == 200 and body["state"] in ("running", "waiting", "baking", "promoted")
        status, body = await api(proxy, "POST", "/v1/rollouts/current/abort")
        if body["state"] != "promoted":
            assert status == 200 and body["state"] == "aborted"
            assert proxy.app.switchboard.weights == Weights(100, 0)
        status, body = await api(proxy, "POST", "/v1/rollouts/current/resume")
        assert status == 409 and "already" in body["error"]
        status, body = await api(proxy, "GET", "/v1/rollouts")
        assert status == 200 and len(body["rollouts"]) == 1


async def test_promote_by_hand_skips_the_steps(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        await api(proxy, "POST", "/v1/rollouts", {"to": "green", "step_pause": "1h"})
        status, body = await api(proxy, "POST", "/v1/rollouts/current/promote")
        assert status == 200 and body["state"] == "promoted"
        assert body["step"] == 3 and body["weights"] == {"blue": 0, "green": 100}
        assert [s["status"] for s in body["steps"]] == ["done", "pending", "pending", "done"]
        assert proxy.app.switchboard.weights == Weights(0, 100)
        assert [e.to_weights for e in proxy.app.switchboard.events()] == [Weights(95, 5), Weights(0, 100)]


async def test_a_rollback_while_baking(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        status, _ = await api(proxy, "POST", "/v1/rollouts", {"to": "green", "steps": [100], "bake": "1h"})
        assert status == 201
        body = await until_done(proxy, states=("baking",))
        assert body["weights"] == {"blue": 0, "green": 100}
        green.fail_ratio = 1
        async with Traffic(proxy.url).running(limit=2000):
            done = await until_done(proxy)
        assert done["state"] == "rolled_back" and done["rule"] == "error_ratio"
        assert proxy.app.switchboard.weights == Weights(100, 0)


async def test_a_restart_mid_rollout_resumes_at_the_same_step(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        await api(proxy, "POST", "/v1/rollouts", {"to": "green", "steps": [10, 60, 100], "step_pause": "1h"})
        await proxy.app.stop()
        again = App(load_config(proxy.config_path, environ={}))
        await again.start()
        try:
            assert again.controller.holder is not None  # operators need force from the first moment
            await eventually(lambda: again.rollouts.current.decisions[-1].action == "restart")  # type: ignore[union-attr]
            r = again.rollouts.current
            assert r is not None and r.state == "running" and r.step == 0
            assert again.switchboard.weights == Weights(90, 10)
            assert again.controller.holder == r.id
        finally:
            await again.stop()


class Hooks:
    """A real webhook receiver: records every call and answers with a status chosen per type."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes, dict[str, str]]] = []
        self.status: dict[str, int] = {}
        self.port = 0
        self.seen = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        kind = json.loads(body)["type"]
        self.calls.append((kind, body, dict(request.headers)))
        self.seen.set()
        return web.Response(status=self.status.get(kind, 200), text="no" if self.status.get(kind) else "ok")

    def url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.port}/{kind}"

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.calls]


@pytest.fixture
async def hooks() -> AsyncIterator[Hooks]:
    receiver = Hooks()
    app = web.Application()
    app.router.add_post("/{kind}", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield receiver
    await runner.cleanup()


def hook(receiver: Hooks, kind: str, **extra: Any) -> dict[str, Any]:
    return {"name": kind, "type": kind, "url": receiver.url(kind), "timeout": 1, "retries": 0, **extra}


async def test_a_failing_gate_aborts_before_any_weight_moves(make_proxy, hooks: Hooks) -> None:
    hooks.status["pre_rollout"] = 500
    async with origin("blue") as blue, origin("green") as green:
        rollout = {"webhooks": [hook(hooks, "pre_rollout")]}
        proxy = await make_proxy([blue.addr], [green.addr], rollout=rollout)
        status, body = await api(proxy, "POST", "/v1/rollouts", {"to": "green"})
        assert status == 201 and body["state"] == "pending" and body["gates_left"] == ["pre_rollout"]
        done = await until_done(proxy)
    assert done["state"] == "aborted" and "pre_rollout" in done["decisions"][-1]["reason"]
    assert proxy.app.switchboard.version == 0  # no weight ever moved


async def test_webhooks_are_called_and_signed(make_proxy, hooks: Hooks) -> None:
    async with origin("blue") as blue, origin("green") as green:
        rollout = {
            "webhooks": [
                hook(hooks, kind, secret=SECRET)
                for kind in ("pre_rollout", "step", "confirm_promotion", "event")
            ]
            + [hook(hooks, "post_rollout", secret=SECRET)],
            **FAST,
            "min_requests": 0,
        }
        proxy = await make_proxy([blue.addr], [green.addr], rollout=rollout)
        status, _ = await api(proxy, "POST", "/v1/rollouts", {"to": "green", "steps": [50, 100]})
        assert status == 201
        done = await until_done(proxy)
        assert done["state"] == "promoted", done["decisions"]
        async with asyncio.timeout(5):
            while "post_rollout" not in hooks.kinds():
                hooks.seen.clear()
                await hooks.seen.wait()
    kinds = hooks.kinds()
    gates = [k for k in kinds if k in ("pre_rollout", "step", "confirm_promotion")]
    assert gates == ["pre_rollout", "step", "step", "confirm_promotion"]
    assert "event" in kinds
    for kind, body, headers in hooks.calls:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Bgproxy-Signature"], expected), kind
        payload = json.loads(body)
        assert payload["from"] == "blue" and payload["to"] == "green" and payload["id"] == done["id"]


async def _metrics(proxy: Any) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{proxy.admin_url}/metrics") as r:
        return await r.text()


async def test_rollout_metrics(make_proxy) -> None:
    async with origin("blue") as blue, origin("green") as green:
        proxy = await make_proxy([blue.addr], [green.addr])
        await api(proxy, "POST", "/v1/rollouts", {"to": "green", "steps": [30, 100], "step_pause": "1h"})
        text = await _metrics(proxy)
    assert "bgproxy_rollout_step 0.0" in text
    assert 'bgproxy_rollout_state{state="running"} 1.0' in text
    assert 'bgproxy_rollout_state{state="waiting"} 0.0' in text
