"""A fleet of real bgproxy processes sharing one switch through a real etcd or Redis.

Every test runs for both stores. Waits poll the nodes' own answers (`eventually`), never fixed sleeps;
the only timed assertions are the issue's own bounds, with room for a loaded CI box.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator
from process import BgproxyProcess
from stores import StoreServer, make_store
from upstreams import Origin, origin
from waiting import until

from bgproxy.admin.openapi import openapi_document
from bgproxy.control.controller import RolloutHolds
from bgproxy.control.membership import How
from bgproxy.control.shared import encode_document
from bgproxy.control.state import PersistedState
from bgproxy.core.errors import VersionConflict
from bgproxy.core.weights import Weights

pytestmark = pytest.mark.timeout(90)

DONE = {"promoted", "rolled_back", "aborted"}
FAST = {"step_pause": "100ms", "min_requests": 30, "bake": "200ms"}


class Fleet:
    """n bgproxy processes on one store prefix, each with its own state file (its local copy)."""

    def __init__(self, tmp: Path, store_url: str, blue: Origin, green: Origin, n: int) -> None:
        self.nodes: list[BgproxyProcess] = []
        for i in range(n):
            where = tmp / f"node{i}"
            where.mkdir()
            self.nodes.append(
                BgproxyProcess(
                    where,
                    blue.addr,
                    green.addr,
                    5.0,
                    extra={"state_store": store_url, "node_name": f"node{i}", "flip_probe": "off"},
                )
            )

    async def api(
        self,
        session: aiohttp.ClientSession,
        node: int,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        url = self.nodes[node].admin_url + path
        async with session.request(method, url, json=body, headers=headers or {}) as r:
            return r.status, await r.json()

    async def states(self, session: aiohttp.ClientSession) -> list[dict[str, Any]]:
        return [(await self.api(session, i, "GET", "/v1/state"))[1] for i in range(len(self.nodes))]


@asynccontextmanager
async def fleet(
    tmp_path: Path, store: StoreServer, n: int = 3
) -> AsyncIterator[tuple[Fleet, aiohttp.ClientSession, Origin, Origin]]:
    async with AsyncExitStack() as stack:
        blue = await stack.enter_async_context(origin("blue"))
        green = await stack.enter_async_context(origin("green"))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        f = Fleet(tmp_path, store.url(f"/t-{tmp_path.name}/"), blue, green, n)
        for node in f.nodes:
            stack.callback(node.kill)
        await asyncio.gather(*(node.start(session) for node in f.nodes))

        async def all_listed() -> bool:  # each node's first record is out a moment after it is ready
            _, view = await f.api(session, 0, "GET", "/v1/fleet")
            return len(view["nodes"]) == n

        await until(all_listed, timeout=10)
        yield f, session, blue, green


async def test_a_flip_on_one_node_reaches_every_node(tmp_path: Path, store_server: StoreServer) -> None:
    async with fleet(tmp_path, store_server) as (f, session, _, _):
        status, body = await f.api(session, 1, "POST", "/v1/flip?wait=all", {"to": "green"})
        assert status == 200, body
        assert body["fleet"]["complete"] is True and body["fleet"]["pending"] == []
        version = body["version"]
        for state in await f.states(session):
            assert state["weights"] == {"blue": 0, "green": 100}
            assert state["version"] == version
            assert state["store"]["status"] == "ok"
        for node in f.nodes:
            async with session.get(node.url + "/echo") as r:
                assert r.status == 200 and "green" in await r.text()
        _, view = await f.api(session, 2, "GET", "/v1/fleet")
        assert sorted(n["node"] for n in view["nodes"]) == ["node0", "node1", "node2"]
        leads = []
        for node in f.nodes:
            async with session.get(node.admin_url + "/metrics") as r:
                text = await r.text()
            assert "bgproxy_store_up 1.0" in text
            leads.append("bgproxy_fleet_leader 1.0" in text)
        assert sum(leads) == 1
        assert all(n["version"] == version and n["behind"] == 0 for n in view["nodes"])
        assert sum(n["leader"] for n in view["nodes"]) == 1 and view["leader"] in {"node0", "node1", "node2"}
        # The audit log is the fleet's: the same on every node, naming the node that made the change.
        logs = [(await f.api(session, i, "GET", "/v1/events"))[1]["events"] for i in range(3)]
        assert logs[0] == logs[1] == logs[2]
        assert any(e["kind"] == "switch" and e.get("node") == "node1" for e in logs[0])


def documented(path: str, method: str, status: int, body: Any) -> None:
    """The answer is the one the OpenAPI document promises (test_openapi covers the rest)."""
    doc = openapi_document()
    schema = doc["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]
    Draft202012Validator({**schema, "components": doc["components"]}).validate(body)


async def test_wait_all_names_the_node_that_does_not_apply(tmp_path: Path, store_server: StoreServer) -> None:
    async with fleet(tmp_path, store_server, n=2) as (f, session, _, _):
        _, view = await f.api(session, 0, "GET", "/v1/fleet")
        documented("/v1/fleet", "get", 200, view)
        assert [n["node"] for n in view["nodes"]] == ["node0", "node1"], view
        f.nodes[1].signal(signal.SIGSTOP)  # alive (its record is fresh for 3 s) but applying nothing
        try:
            status, body = await f.api(
                session, 0, "PUT", "/v1/weights?wait=all&wait_timeout=300ms", {"blue": 50, "green": 50}
            )
            assert status == 202, body
            documented("/v1/weights", "put", 202, body)
            assert body["fleet"] == {**body["fleet"], "complete": False, "pending": ["node1"]}
            assert body["weights"] == {"blue": 50, "green": 50}  # made, just not everywhere yet
            status, body = await f.api(
                session, 0, "POST", "/v1/flip?wait=all&wait_timeout=300ms", {"to": "blue"}
            )
            assert status == 202 and body["fleet"]["pending"] == ["node1"], body
            documented("/v1/flip", "post", 202, body)
        finally:
            f.nodes[1].signal(signal.SIGCONT)
        status, body = await f.api(session, 1, "POST", "/v1/flip?wait=all", {"to": "green"})
        assert status == 200 and body["fleet"]["complete"], body
        status, body = await f.api(session, 0, "POST", "/v1/flip?wait=maybe", {"to": "blue"})
        assert status == 422 and "wait" in body["detail"][0]
        store_server.kill()
        status, body = await f.api(session, 0, "GET", "/v1/fleet")
        assert status == 503, body
        documented("/v1/fleet", "get", 503, body)


async def test_concurrent_changes_with_one_if_match_exactly_one_wins(
    tmp_path: Path, store_server: StoreServer
) -> None:
    async with fleet(tmp_path, store_server, n=2) as (f, session, _, _):
        for round_ in range(5):
            _, state = await f.api(session, 0, "GET", "/v1/state")
            match = {"If-Match": f'"{state["version"]}"'}
            answers = await asyncio.gather(
                f.api(session, 0, "PUT", "/v1/weights?wait=all", {"blue": 10 + round_, "green": 90}, match),
                f.api(session, 1, "PUT", "/v1/weights?wait=all", {"blue": 90, "green": 10 + round_}, match),
            )
            statuses = sorted(status for status, _ in answers)
            assert statuses == [200, 409], answers
            winner = next(body for status, body in answers if status == 200)
            for s in await f.states(session):
                assert s["weights"] == winner["weights"] and s["version"] == winner["version"]


async def test_store_outage_serves_refuses_changes_and_resyncs(
    tmp_path: Path, store_server: StoreServer
) -> None:
    async with fleet(tmp_path, store_server) as (f, session, _, _):
        status, body = await f.api(session, 0, "POST", "/v1/flip?wait=all", {"to": "green"})
        assert status == 200 and body["fleet"]["complete"], body
        version = body["version"]
        store_server.kill()

        async def degraded() -> bool:
            return all(s["store"]["status"] == "degraded" for s in await f.states(session))

        await until(degraded, timeout=10)
        async with session.get(f.nodes[0].admin_url + "/metrics") as r:
            assert "bgproxy_store_up 0.0" in await r.text()
        for node in f.nodes:  # traffic goes on, on the last state
            async with session.get(node.url + "/echo") as r:
                assert r.status == 200 and "green" in await r.text()
            async with session.get(node.admin_url + "/readyz") as r:
                assert r.status == 200
        status, refused = await f.api(session, 1, "POST", "/v1/flip", {"to": "blue"})
        assert status == 503, refused
        assert "state store" in refused["error"] and "the change is not applied" in refused["error"]
        assert all(s["weights"] == {"blue": 0, "green": 100} for s in await f.states(session))
        # A node restarted during the outage starts from its local copy, and says so.
        restarted = f.nodes[2]
        restarted.kill()
        await restarted.start(session)
        assert "last-known-good" in restarted.log_text()
        _, state = await f.api(session, 2, "GET", "/v1/state")
        assert state["version"] == version and state["store"]["status"] == "degraded"
        async with session.get(restarted.url + "/echo") as r:
            assert "green" in await r.text()

        await store_server.start()
        loop = asyncio.get_running_loop()
        back = loop.time()

        async def healthy() -> bool:
            return all(s["store"]["status"] == "ok" for s in await f.states(session))

        await until(healthy, timeout=10)
        resync = loop.time() - back
        assert resync < 3.0, f"resync took {resync:.2f} s"
        status, body = await f.api(session, 2, "POST", "/v1/flip?wait=all", {"to": "blue"})
        assert status == 200 and body["fleet"]["complete"], body
        assert all(s["weights"] == {"blue": 100, "green": 0} for s in await f.states(session))


async def _rollout(f: Fleet, session: aiohttp.ClientSession, node: int) -> dict[str, Any]:
    _, body = await f.api(session, node, "GET", "/v1/rollouts/current")
    return body


async def _traffic(session: aiohttp.ClientSession, nodes: list[BgproxyProcess], stop: asyncio.Event) -> int:
    sent = 0
    while not stop.is_set():
        for node in nodes:
            async with session.get(node.url + "/echo") as r:
                await r.read()
            sent += 1
    return sent


async def test_leader_killed_mid_rollout_another_node_finishes_it(
    tmp_path: Path, store_server: StoreServer
) -> None:
    async with fleet(tmp_path, store_server) as (f, session, _, _):
        _, view = await f.api(session, 0, "GET", "/v1/fleet")
        leader = int(view["leader"].removeprefix("node"))
        follower = (leader + 1) % 3
        stop = asyncio.Event()
        others = [n for i, n in enumerate(f.nodes) if i != leader]
        traffic = asyncio.create_task(_traffic(session, others, stop))
        try:
            # Sent to a follower: it is carried to the leader.
            body = {"to": "green", "steps": [10, 50, 100], **FAST, "step_pause": "1s"}
            status, started = await f.api(session, follower, "POST", "/v1/rollouts", body)
            assert status == 201, started

            async def stepped() -> bool:
                return (await _rollout(f, session, follower))["step"] >= 1

            await until(stepped, timeout=20)
            f.nodes[leader].kill()

            async def finished() -> bool:
                return (await _rollout(f, session, follower))["state"] in {
                    "promoted",
                    "rolled_back",
                    "aborted",
                }

            await until(finished, timeout=40)
        finally:
            stop.set()
            await traffic
        done = await _rollout(f, session, follower)
        assert done["state"] == "promoted", done["decisions"]
        assert done["id"] == started["id"]

        async def everywhere_promoted() -> bool:
            live = [i for i in range(3) if i != leader]
            states = [(await f.api(session, i, "GET", "/v1/state"))[1] for i in live]
            return all(s["weights"]["blue"] == 0 for s in states)

        await until(everywhere_promoted, timeout=5)
        _, view = await f.api(session, follower, "GET", "/v1/fleet")
        assert view["leader"] != f"node{leader}"


async def test_a_fleet_rollout_rolls_back_on_the_summed_error_ratio(
    tmp_path: Path, store_server: StoreServer
) -> None:
    async with fleet(tmp_path, store_server) as (f, session, _, green):
        green.fail_ratio = 0.3
        _, view = await f.api(session, 0, "GET", "/v1/fleet")
        leader = int(view["leader"].removeprefix("node"))
        # No request goes through the leader: only the sum of the others' counters can show errors.
        others = [n for i, n in enumerate(f.nodes) if i != leader]
        stop = asyncio.Event()
        traffic = asyncio.create_task(_traffic(session, others, stop))
        try:
            body = {"to": "green", "steps": [50, 100], **FAST, "step_pause": "30s"}
            status, started = await f.api(session, leader, "POST", "/v1/rollouts", body)
            assert status == 201, started

            async def finished() -> bool:
                return (await _rollout(f, session, leader))["state"] in DONE

            await until(finished, timeout=30)
        finally:
            stop.set()
            await traffic
        done = await _rollout(f, session, leader)
        assert done["state"] == "rolled_back", json.dumps(done["decisions"])
        assert done["rule"] == "error_ratio"
        evidence = done["steps"][0]["evidence"]["candidate"]
        assert evidence["errors"] > 0 and evidence["requests"] >= evidence["errors"]

        async def everywhere_stable() -> bool:  # the leader's rollback reaches the others in milliseconds
            return all(s["weights"]["green"] == 0 for s in await f.states(session))

        await until(everywhere_stable, timeout=5)


async def test_if_match_newer_than_this_node_is_read_from_the_store(
    make_proxy: Any, store_server: StoreServer, tmp_path: Path
) -> None:
    """Another node's write whose notification has not arrived yet: its version is read, not refused."""
    async with origin("blue") as blue, origin("green") as green:
        url = store_server.url(f"/t-{tmp_path.name}/")
        proxy = await make_proxy([blue.addr], [green.addr], state_store=url, flip_probe="off")
        app = proxy.app
        deaf(proxy)
        other = make_store(url)
        try:
            stored = await other.read()
            assert stored is not None
            newer = PersistedState(Weights(50, 50), stored.state.version + 1, time.time())
            await other.swap(stored.revision, encode_document(newer, {"node": "elsewhere"}))
        finally:
            await other.close()
        assert app.switchboard.version == newer.version - 1  # behind
        result = await app.controller.flip(
            "green", actor="test", expected_version=newer.version, drain_timeout=None
        )
        assert result.event is not None and result.event.version == newer.version + 1
        assert result.event.from_weights == Weights(50, 50)
        with pytest.raises(VersionConflict):  # an If-Match older than the store's is still refused
            await app.controller.flip("blue", actor="test", expected_version=newer.version)


async def test_a_rollback_made_while_the_store_is_down_reaches_the_fleet_when_it_is_back(
    make_proxy: Any, store_server: StoreServer, tmp_path: Path
) -> None:
    """Urgent changes (a rollout's rollback) are routed first; one the store missed is written first
    when it answers again, so the fleet follows it instead of this node drifting apart."""
    async with origin("blue") as blue, origin("green") as green:
        shared = {"state_store": store_server.url(f"/t-{tmp_path.name}/"), "flip_probe": "off"}
        a = await make_proxy([blue.addr], [green.addr], weights=(50, 50), node_name="a", **shared)
        b = await make_proxy([blue.addr], [green.addr], weights=(50, 50), node_name="b", **shared)
        store_server.kill()
        await a.app.controller.set_weights(Weights(100, 0), actor="rollback", urgent=True)
        assert a.app.switchboard.weights == Weights(100, 0)  # routed at once
        assert b.app.switchboard.weights == Weights(50, 50)
        await store_server.start()

        async def followed() -> bool:
            return b.app.switchboard.weights == Weights(100, 0) and a.app.fleet.error is None

        await until(followed, timeout=5)
        assert a.app.switchboard.version == b.app.switchboard.version
        # A rollout's own step never lands once the rollout no longer holds the switch.
        with pytest.raises(RolloutHolds):
            await a.app.controller.set_weights(Weights(0, 100), actor="r-gone", owner="r-gone")


async def test_a_version_that_does_not_read_leaves_the_node_serving_and_following(
    make_proxy: Any, store_server: StoreServer, tmp_path: Path
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        url = store_server.url(f"/t-{tmp_path.name}/")
        proxy = await make_proxy([blue.addr], [green.addr], state_store=url, flip_probe="off")
        app = proxy.app
        writer = make_store(url)
        try:
            stored = await writer.read()
            assert stored is not None
            future = {"id": "r-x", "state": "from-a-newer-bgproxy"}
            bad = PersistedState(Weights(0, 100), stored.state.version + 1, time.time(), (future,))
            revision = await writer.swap(stored.revision, encode_document(bad, {"node": "newer"}))

            async def refused() -> bool:
                return app.fleet.error is not None and "rollouts do not read" in app.fleet.error

            await until(refused, timeout=5)
            assert app.switchboard.weights == Weights(100, 0)  # nothing of it applied
            good = PersistedState(Weights(0, 100), bad.version + 1, time.time())
            await writer.swap(revision, encode_document(good, {"node": "newer"}))
            began = asyncio.get_running_loop().time()

            async def applied() -> bool:
                return app.switchboard.weights == Weights(0, 100) and app.fleet.error is None

            await until(applied, timeout=5, every=0.005)
            # By the watch, not the once-a-second poll: the watch survived the bad version.
            assert asyncio.get_running_loop().time() - began < 0.5
        finally:
            await writer.close()


def deaf(proxy: Any) -> None:
    """This node's watch and poll stop: it hears of other nodes' writes only when it writes itself."""
    for task in proxy.app.fleet._tasks[:2]:
        task.cancel()


async def test_a_rollback_that_meets_another_nodes_write_goes_on_top_of_it(
    make_proxy: Any, store_server: StoreServer, tmp_path: Path
) -> None:
    async with origin("blue") as blue, origin("green") as green, origin("green") as spare:
        shared = {"state_store": store_server.url(f"/t-{tmp_path.name}/"), "flip_probe": "off"}
        a = await make_proxy([blue.addr], [green.addr], weights=(90, 10), node_name="a", **shared)
        b = await make_proxy([blue.addr], [green.addr], weights=(90, 10), node_name="b", **shared)
        deaf(a)
        await b.app.membership.add("green", spare.addr, How(actor="ops", force=True))  # b writes first
        await a.app.controller.set_weights(Weights(100, 0), actor="rollback", urgent=True)
        reader = make_store(store_server.url(f"/t-{tmp_path.name}/"))
        try:
            stored = await reader.read()
        finally:
            await reader.close()
        assert stored is not None
        assert stored.state.weights == Weights(100, 0)  # the rollback, not the version it met
        assert stored.state.pools is not None and spare.addr in stored.state.pools["green"]["upstreams"]
        assert a.app.switchboard.version == stored.state.version
        assert a.app.membership.members("green") == [green.addr, spare.addr]  # b's change kept here too

        async def b_follows() -> bool:
            return b.app.switchboard.weights == Weights(100, 0)

        await until(b_follows, timeout=5)


async def test_a_change_after_an_unsaved_rollback_writes_the_rollback_first(
    make_proxy: Any, store_server: StoreServer, tmp_path: Path
) -> None:
    async with origin("blue") as blue, origin("green") as green:
        shared = {"state_store": store_server.url(f"/t-{tmp_path.name}/"), "flip_probe": "off"}
        a = await make_proxy([blue.addr], [green.addr], weights=(50, 50), node_name="a", **shared)
        b = await make_proxy([blue.addr], [green.addr], weights=(50, 50), node_name="b", **shared)
        deaf(a)  # so only a's own next write can bring the rollback to the store
        store_server.kill()
        await a.app.controller.set_weights(Weights(100, 0), actor="rollback", urgent=True)
        await store_server.start()
        await a.app.controller.set_weights(Weights(80, 20), actor="ops")
        assert a.app.switchboard.version == 2  # the rollback (1), then this change on top of it

        async def b_follows() -> bool:  # not the rollback written over the newer change
            return b.app.switchboard.weights == Weights(80, 20)

        await until(b_follows, timeout=5)
        assert b.app.switchboard.version == 2
